"""Random-weight LLaVA checkpoints, built offline, loadable like a real one.

A checkpoint written here goes through exactly the loading code of a real one such as
llava-hf/llava-1.5-7b-hf (`AutoProcessor.from_pretrained`, `LlavaForConditionalGeneration
.from_pretrained`), so tests and benchmarks exercise the real code paths with no model hub.
The weights are random: answers are noise, but shapes, token counts and timings are honest.

One family per real kind of checkpoint (``FAMILIES``), each with its presets:
- ``llava``: LLaVA-1.5, a CLIP tower (its CLS token dropped), a Llama decoder, the Vicuna
  template with ``</s>``;
- ``llava-siglip``: the SigLIP LLaVAs such as llava-hf/llava-interleave-qwen-0.5b-hf, a SigLIP
  tower (no CLS token, strategy "full", last layer), a Qwen2 decoder, the ChatML template
  with ``<|im_end|>``;
- ``next``: LLaVA-NeXT (llava-hf/llava-v1.6-mistral-7b-hf), a LlavaNextForConditionalGeneration:
  a CLIP tower over anyres tiles (``image_grid_pinpoints``; an image's token count depends on
  its size and shape), a Mistral decoder (grouped KV, no sliding window), the Mistral
  ``[INST] ... [/INST]`` template with ``</s>``;
- ``onevision``: LLaVA-OneVision (llava-hf/llava-onevision-qwen2-0.5b-ov-hf), a
  LlavaOnevisionForConditionalGeneration: a SigLIP tower over anyres tiles (``anyres_max_9``: a
  single image tiled by its shape, several in one request untiled), a Qwen2 decoder, its ChatML
  template with ``<|im_end|>``. Its processor is built without a video processor (that one needs
  torchvision; images only).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from dataclasses import asdict, dataclass, replace

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
# The PIL backends: transformers 5's default image processors need torchvision.
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

__all__ = [
    "CHAT_TEMPLATE",
    "CHATML_TEMPLATE",
    "FAMILIES",
    "MISTRAL_TEMPLATE",
    "NEXT_PRESETS",
    "ONEVISION_PRESETS",
    "ONEVISION_TEMPLATE",
    "PRESETS",
    "MARKER_FILE",
    "LlavaGeometry",
    "build_config",
    "build_processor",
    "build_random_model",
    "build_tokenizer",
    "write_tiny_llava",
]

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
# Llama order for the first three, so ids 0/1/2 mean what they mean in Vicuna.
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IMAGE]

# The SigLIP family's tokenizer (Qwen2's specials; like Qwen2 it adds no bos).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML_SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, IMAGE]
VIDEO = "<video>"  # OneVision's tokenizer has it too (this server takes images only)

MARKER_FILE = "tiny_llava.json"

# Both templates loop over the messages, each message's content as a list of parts.
_EACH_MESSAGE_AS_PARTS = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}"
    "{%- set parts = message['content'] -%}"
    "{%- endif -%}"
)

# llava-1.5-hf turn format, with the `</s>` that closes each answer in the Vicuna v1 training data:
#   "USER: <image>\n<prompt> ASSISTANT: <answer></s>USER: <prompt> ASSISTANT:"
# Newlines are only ever emitted from expressions ({{ '\n' }}), so trim_blocks cannot eat them.
CHAT_TEMPLATE = _EACH_MESSAGE_AS_PARTS + (
    "{%- if message['role'] == 'system' -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] + ' ' }}{%- endfor -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'USER: ' }}"
    "{%- for part in parts if part['type'] == 'image' -%}{{ '<image>' + '\\n' }}{%- endfor -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT: ' }}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{{ '</s>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# llava-interleave-qwen's ChatML turn format, each answer closed by <|im_end|> and a newline:
#   "<|im_start|>user\n<image>\n<prompt><|im_end|>\n<|im_start|>assistant\n<answer><|im_end|>\n"
CHATML_TEMPLATE = _EACH_MESSAGE_AS_PARTS + (
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- for part in parts if part['type'] == 'image' -%}{{ '<image>' + '\\n' }}{%- endfor -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant' + '\\n' }}{%- endif -%}"
)

# llava-v1.6-mistral's turn format (Mistral-Instruct's), each answer closed by </s>:
#   "[INST] <image>\n<prompt> [/INST]<answer></s>[INST] <prompt> [/INST]"
# The tokenizer writes the <s> that opens the conversation; [/INST] itself asks for the answer.
MISTRAL_TEMPLATE = _EACH_MESSAGE_AS_PARTS + (
    "{%- if message['role'] == 'system' -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] + '\n\n' }}{%- endfor -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '[INST] ' }}"
    "{%- for part in parts if part['type'] == 'image' -%}{{ '<image>' + '\n' }}{%- endfor -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{{ ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{{ '</s>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# llava-onevision-qwen2's ChatML (its chat_template.json): images first, then "\n" + each text;
# no newline after <|im_end|>. An assistant message renders as "\n" + its text, so a rendered
# history has one "\n" more before each answer than the generation prompt asked the model for
# (the engine keeps the ids the model answered after, never a re-render):
#   "<|im_start|>user\n<image>\n<prompt><|im_end|><|im_start|>assistant\n<answer><|im_end|>"
ONEVISION_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}"
    "{{ '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Training text for the toy BPE: plain English in the register of image chat, so common words
# become single tokens and rare ones split into sensible pieces.
CORPUS = """\
USER: What is shown in this image? ASSISTANT: The image shows a small brown dog sitting on a wooden
floor next to a red ball. The dog is looking at the camera with its ears up.
USER: What color is the car? ASSISTANT: The car is blue, with black tires and silver wheels. It is
parked on the side of a quiet street in front of a white house.
USER: How many people are in the picture? ASSISTANT: There are three people in the picture. Two of
them are standing near the window and one is sitting at the table reading a book.
USER: Describe the scene in detail. ASSISTANT: This is a photo of a busy city street at night. Tall
buildings line both sides of the road, and their windows are lit in yellow and orange. Cars and
buses move slowly through the traffic, and people walk along the sidewalks under the street lights.
USER: Is there a cat in the image? ASSISTANT: Yes, there is a grey cat sleeping on a green sofa. A
soft blanket is folded beside it, and a plant stands in a pot near the window.
USER: What is the weather like? ASSISTANT: The sky is clear and bright blue, with a few white
clouds. The sun is shining, so it looks like a warm summer day in the park.
USER: What are the children doing? ASSISTANT: The children are playing football on the grass. One
boy is kicking the ball while a girl runs to catch it, and their parents watch from a bench.
USER: What food is on the plate? ASSISTANT: The plate holds a slice of pizza, some fresh salad with
tomatoes and cucumbers, and a piece of bread. A glass of water stands next to the plate.
USER: Where was this photo taken? ASSISTANT: The photo was probably taken at the beach. You can see
the sand, the blue sea, a few small boats on the water and mountains far away in the background.
USER: What is written on the sign? ASSISTANT: The sign says "Open every day from nine to five". It is
painted in large black letters on a white board hanging above the door of the shop.
USER: Can you tell me what the man is holding? ASSISTANT: The man is holding an umbrella in his left
hand and a cup of coffee in his right hand. He is wearing a dark coat and a hat.
USER: Is this a kitchen or a living room? ASSISTANT: It is a kitchen. There is a stove, a sink, a
refrigerator and a wooden table with four chairs. Pots and pans hang on the wall.
USER: What animal is this? ASSISTANT: This animal is a horse. It is brown with a white spot on its
face, and it is eating grass in a field surrounded by a wooden fence.
USER: What time of day is it? ASSISTANT: It seems to be early morning. The light is soft and golden,
the shadows are long, and there is a thin layer of mist over the lake.
USER: Please count the apples. ASSISTANT: I can count seven apples in the basket: four red ones and
three green ones. One more apple has fallen on the table.
USER: What is unusual about this image? ASSISTANT: The unusual thing is that a man is ironing clothes
on a board attached to the back of a yellow taxi while it drives through the city.
USER: Thank you. ASSISTANT: You are welcome! Let me know if you have any other questions about the
image or if you would like me to describe something else.
A picture is worth a thousand words. Images can show people, animals, buildings, streets, rooms,
food, plants, trees, flowers, mountains, rivers, the sea, the sky, the sun and the moon. Colors such
as red, orange, yellow, green, blue, purple, pink, brown, black, white and grey help us describe what
we see. We can say that something is large or small, near or far, left or right, above or below,
inside or outside, in front of or behind something else.
"""


@dataclass(frozen=True)
class LlavaGeometry:
    """Every number that shapes a LLaVA model: vision tower, projector, decoder; ``family`` says
    which kinds (``llava``: CLIP and Llama; ``llava-siglip``: SigLIP and Qwen2; ``next``:
    LLaVA-NeXT, CLIP over anyres tiles and Mistral)."""

    image_size: int
    patch_size: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_layers: int
    vision_num_heads: int
    text_hidden_size: int
    text_intermediate_size: int
    text_num_layers: int
    text_num_heads: int
    text_num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    rms_norm_eps: float = 1e-5
    # Std of the projector's and decoder's random weights (CLIP keeps its own width-scaled init).
    # Larger than the usual 0.02 on small widths so that attention and MLP outputs are not
    # swamped by the residual stream: answers then depend on the prompt and the image, not only
    # on the last token.
    init_std: float = 0.02
    family: str = "llava"
    # LLaVA-NeXT and OneVision: the (height, width) resolutions an image is tiled at (anyres)
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None

    @property
    def num_image_tokens(self) -> int:
        """`<image>` placeholders per image: one per patch, plus CLIP's CLS token unless the
        "default" strategy drops it (SigLIP has none). LLaVA-NeXT: the base tile's count (its
        config's ``image_seq_length``); an image adds its anyres tiles' rows to it."""
        patches = (self.image_size // self.patch_size) ** 2
        cls = 0 if self.family in ("llava-siglip", "onevision") else 1
        return patches + cls - (1 if self.vision_feature_select_strategy == "default" else 0)


PRESETS: dict[str, LlavaGeometry] = {
    "tiny": LlavaGeometry(
        image_size=32,
        patch_size=8,
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_num_layers=2,
        vision_num_heads=2,
        text_hidden_size=64,
        text_intermediate_size=128,
        text_num_layers=2,
        text_num_heads=4,
        text_num_kv_heads=4,
        vocab_size=1024,
        max_position_embeddings=512,
        init_std=0.2,
    ),
    "small": LlavaGeometry(
        image_size=336,
        patch_size=14,
        vision_hidden_size=192,
        vision_intermediate_size=768,
        vision_num_layers=4,
        vision_num_heads=4,
        text_hidden_size=384,
        text_intermediate_size=1024,
        text_num_layers=4,
        text_num_heads=6,
        text_num_kv_heads=6,
        vocab_size=1024,
        max_position_embeddings=2048,
        init_std=0.1,
    ),
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px, 2-layer gelu projector, Vicuna-7B.
    "llava-1.5-7b": LlavaGeometry(
        image_size=336,
        patch_size=14,
        vision_hidden_size=1024,
        vision_intermediate_size=4096,
        vision_num_layers=24,
        vision_num_heads=16,
        text_hidden_size=4096,
        text_intermediate_size=11008,
        text_num_layers=32,
        text_num_heads=32,
        text_num_kv_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
    ),
}

# The SigLIP LLaVAs (llava-interleave-qwen): SigLIP tower read at its last layer with every
# token kept (no CLS), Qwen2 decoder with grouped KV heads; otherwise the llava presets' widths.
_SIGLIP = {"vision_feature_layer": -1, "vision_feature_select_strategy": "full", "rms_norm_eps": 1e-6,
           "text_num_kv_heads": 2, "family": "llava-siglip"}
SIGLIP_PRESETS: dict[str, LlavaGeometry] = {
    # 25 image tokens: not the CLIP tiny count, and a "+1 for CLS" would show
    "tiny": replace(PRESETS["tiny"], image_size=40, **_SIGLIP),
    # SigLIP-so400m's input geometry: 384 px, patch 14, 729 tokens per image
    "small": replace(PRESETS["small"], image_size=384, **_SIGLIP),
}

# LLaVA-NeXT: a CLIP tower (CLS dropped) over anyres tiles, a Mistral decoder (grouped KV, no
# sliding window); the Mistral template.
NEXT_PRESETS: dict[str, LlavaGeometry] = {
    # 32 px tiles of 16 tokens; images are tiled 1x2, 2x1 or 2x2 by their shape, so images of
    # other aspect ratios take other counts (up to 16 + 8 x 9 = 88)
    "tiny": replace(PRESETS["tiny"], family="next", text_num_kv_heads=2, max_position_embeddings=1024,
                    image_grid_pinpoints=((32, 64), (64, 32), (64, 64))),
    # the 7B's tiling (336 px tiles, patch 14, its five pinpoints: up to 2,928 tokens per image)
    # at the small widths
    "small": replace(PRESETS["small"], family="next", text_num_kv_heads=2, max_position_embeddings=8192,
                     image_grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))),
    # llava-hf/llava-v1.6-mistral-7b-hf: CLIP ViT-L/14 at 336 px over its five pinpoints,
    # Mistral-7B (8 KV heads). A 672x672 image is 2,928 tokens, a 336x336 one 1,176.
    "llava-next-mistral-7b": replace(
        PRESETS["llava-1.5-7b"], family="next", text_intermediate_size=14336, text_num_kv_heads=8,
        max_position_embeddings=32768, rms_norm_eps=1e-5,
        image_grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
    ),
}

# OneVision's 36 pinpoints: every (h, w) in multiples of 384 up to 2304 (6 x 6 tiles).
_ONEVISION_PINPOINTS = tuple((384 * h, 384 * w) for h in range(1, 7) for w in range(1, 7))
# LLaVA-OneVision: a SigLIP tower (no CLS, strategy "full", last layer) over anyres tiles, a Qwen2
# decoder (grouped KV); anyres_max_9 (a tiled image's grid is scaled down past 9 tiles' worth of
# rows); the ChatML template of llava-onevision-qwen2.
_ONEVISION = dict(_SIGLIP, family="onevision")
ONEVISION_PRESETS: dict[str, LlavaGeometry] = {
    # 40 px tiles of 25 tokens (patch 8); a single image is tiled 1x1, 1x2, 2x1 or 2x2 by its shape,
    # or 4x4 when large (then scaled down by anyres_max_9); several images take 25 + 1 each
    "tiny": replace(SIGLIP_PRESETS["tiny"], max_position_embeddings=2048,
                    image_grid_pinpoints=((40, 40), (40, 80), (80, 40), (80, 80), (160, 160)), **_ONEVISION),
    # the real tiling (384 px tiles, patch 14: 729 tokens a tile, the 36 pinpoints) at the small widths
    "small": replace(SIGLIP_PRESETS["small"], max_position_embeddings=16384,
                     image_grid_pinpoints=_ONEVISION_PINPOINTS, **_ONEVISION),
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf: SigLIP-so400m (27 layers of 1152 less the head: 26
    # read), Qwen2-0.5B (24 layers x 14 heads, 2 KV heads of 64).
    "llava-onevision-qwen2-0.5b": LlavaGeometry(
        image_size=384, patch_size=14, vision_hidden_size=1152, vision_intermediate_size=4304,
        vision_num_layers=26, vision_num_heads=16, text_hidden_size=896, text_intermediate_size=4864,
        text_num_layers=24, text_num_heads=14, vocab_size=151936,  # 2 KV heads, as _SIGLIP
        max_position_embeddings=32768, image_grid_pinpoints=_ONEVISION_PINPOINTS, **_ONEVISION,
    ),
}

# video_preprocessor_config.json as llava-onevision-qwen2's (384 px there), never loaded here.
_ONEVISION_VIDEO = {"video_processor_type": "LlavaOnevisionVideoProcessor", "processor_class": "LlavaOnevisionProcessor",
                    "do_resize": True, "size": {"height": 384, "width": 384}, "resample": 3, "do_rescale": True,
                    "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}

# Family -> its presets; `llava-sessions tiny-model --family F --preset P`.
FAMILIES: dict[str, dict[str, LlavaGeometry]] = {"llava": PRESETS, "llava-siglip": SIGLIP_PRESETS,
                                                 "next": NEXT_PRESETS, "onevision": ONEVISION_PRESETS}
# The aspect-ratio rule of the OneVision presets (config.json's and the processor's vision_aspect_ratio).
ONEVISION_ASPECT_RATIO = "anyres_max_9"


def geometry_of(preset: str, family: str = "llava") -> LlavaGeometry:
    """The geometry of ``family``'s ``preset``; ValueError naming the choices for an unknown one."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if preset not in FAMILIES[family]:
        raise ValueError(f"family {family!r} has no preset {preset!r}; choose one of {', '.join(FAMILIES[family])}")
    return FAMILIES[family][preset]


def _train_bpe(vocab_size: int, special_tokens: list[str], bos: str | None) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) trained on CORPUS; the special tokens take the first ids."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if bos is not None:
        # Like Llama: "<s>" opens every sequence, nothing closes it (the chat template writes "</s>").
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tokenizer


def build_tokenizer(vocab_size: int = 1024, family: str = "llava") -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer with at most `vocab_size` entries and the family's chat
    template: Vicuna's with <s> and </s> (``llava``), ChatML's with <|im_end|> and no bos
    (``llava-siglip``, as Qwen2's), Mistral's [INST] with <s> and </s> (``next``).

    The corpus is small, so large vocab sizes stop where the merges run out; the model's
    embedding is then larger than the tokenizer, as in llava-1.5-7b-hf (32064 rows, 32002 tokens).
    """
    if family in ("llava-siglip", "onevision"):
        onevision = family == "onevision"
        return PreTrainedTokenizerFast(
            tokenizer_object=_train_bpe(vocab_size, CHATML_SPECIAL_TOKENS + [VIDEO] * onevision, bos=None),
            eos_token=IM_END,
            pad_token=ENDOFTEXT,
            extra_special_tokens={"image_token": IMAGE, **({"video_token": VIDEO} if onevision else {})},
            chat_template=ONEVISION_TEMPLATE if onevision else CHATML_TEMPLATE,
            padding_side="left",
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(vocab_size, SPECIAL_TOKENS, bos=BOS),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        chat_template=MISTRAL_TEMPLATE if family == "next" else CHAT_TEMPLATE,
        padding_side="left",
    )


def build_config(
    geometry: LlavaGeometry, tokenizer: PreTrainedTokenizerFast | None = None
) -> LlavaConfig | LlavaNextConfig:
    """The LlavaConfig (LlavaNextConfig for ``next``) of `geometry`, its special-token ids taken
    from `tokenizer` (default: ours)."""
    tokenizer = tokenizer or build_tokenizer(geometry.vocab_size, geometry.family)
    if len(tokenizer) > geometry.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, model vocab only {geometry.vocab_size}")
    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": geometry.vision_hidden_size,
        "intermediate_size": geometry.vision_intermediate_size,
        "num_hidden_layers": geometry.vision_num_layers,
        "num_attention_heads": geometry.vision_num_heads,
        "image_size": geometry.image_size,
        "patch_size": geometry.patch_size,
    }
    if geometry.family in ("llava-siglip", "onevision"):
        # llava-interleave-qwen's and OneVision's tower: no pooling head (LLaVA reads the hidden states).
        vision_config = SiglipVisionConfig(**vision, vision_use_head=False)
        text_class = Qwen2Config
    elif geometry.family == "next":
        vision_config = CLIPVisionConfig(**vision, projection_dim=768)
        text_class = MistralConfig
        # Mistral's config defaults head_dim to 128 and a 4096-token sliding window: neither here
        token_ids.update(head_dim=geometry.text_hidden_size // geometry.text_num_heads, sliding_window=None)
    else:
        # projection_dim as in llava-1.5-7b-hf; unused by the vision tower itself
        vision_config = CLIPVisionConfig(**vision, projection_dim=768)
        text_class = LlamaConfig
    text_config = text_class(
        vocab_size=geometry.vocab_size,
        hidden_size=geometry.text_hidden_size,
        intermediate_size=geometry.text_intermediate_size,
        num_hidden_layers=geometry.text_num_layers,
        num_attention_heads=geometry.text_num_heads,
        num_key_value_heads=geometry.text_num_kv_heads,
        max_position_embeddings=geometry.max_position_embeddings,
        rms_norm_eps=geometry.rms_norm_eps,
        initializer_range=geometry.init_std,
        **token_ids,
    )
    common = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.image_token_id,
        image_seq_length=geometry.num_image_tokens,
        projector_hidden_act=geometry.projector_hidden_act,
        vision_feature_layer=geometry.vision_feature_layer,
        vision_feature_select_strategy=geometry.vision_feature_select_strategy,
        pad_token_id=tokenizer.pad_token_id,
    )
    if geometry.family == "next":
        return LlavaNextConfig(**common, image_grid_pinpoints=[list(p) for p in geometry.image_grid_pinpoints])
    if geometry.family == "onevision":
        common.pop("image_seq_length")  # OneVision's config has none: the processor's num_image_tokens
        return LlavaOnevisionConfig(**common, image_grid_pinpoints=[list(p) for p in geometry.image_grid_pinpoints],
                                    vision_aspect_ratio=ONEVISION_ASPECT_RATIO,
                                    video_token_index=tokenizer.convert_tokens_to_ids(VIDEO),
                                    tie_word_embeddings=False)
    return LlavaConfig(**common)


def build_processor(
    geometry: LlavaGeometry, tokenizer: PreTrainedTokenizerFast
) -> LlavaProcessor | LlavaNextProcessor:
    """The family's preprocessing at `geometry.image_size` and `<image>` expansion matching the
    model: CLIP's resize and center crop, SigLIP's squash to a square, or LLaVA-NeXT's anyres
    tiles (each image resized and padded to its best pinpoint, cut into tiles, plus the whole
    image as a base tile; OneVision's the same, but only for a request's single image, several
    being padded to squares and untiled)."""
    side = geometry.image_size
    if geometry.family == "onevision":
        # PIL backend, and no video processor: both of transformers 5's others need torchvision
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": side, "width": side},
            image_grid_pinpoints=[list(p) for p in geometry.image_grid_pinpoints],
            image_mean=IMAGENET_STANDARD_MEAN,  # 0.5, as llava-onevision-qwen2's
            image_std=IMAGENET_STANDARD_STD,
            do_convert_rgb=True,
        )
        # LlavaOnevisionProcessor less its video processor (it needs torchvision), as the adapter loads it
        from llava_sessions.handler.engine.models.llava_onevision import ImagesOnlyOnevisionProcessor

        return ImagesOnlyOnevisionProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_image_tokens=geometry.num_image_tokens,  # one tile's: SigLIP has no CLS
            vision_feature_select_strategy=geometry.vision_feature_select_strategy,
            vision_aspect_ratio=ONEVISION_ASPECT_RATIO,
            chat_template=ONEVISION_TEMPLATE,
        )
    if geometry.family == "next":
        # PIL backend: transformers 5's default LlavaNextImageProcessor needs torchvision
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            image_grid_pinpoints=[list(p) for p in geometry.image_grid_pinpoints],
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
            do_convert_rgb=True,
        )
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=geometry.patch_size,
            vision_feature_select_strategy=geometry.vision_feature_select_strategy,
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by "default"
            chat_template=MISTRAL_TEMPLATE,
        )
    if geometry.family == "llava-siglip":
        image_processor = SiglipImageProcessorPil(
            size={"height": side, "width": side},
            image_mean=IMAGENET_STANDARD_MEAN,
            image_std=IMAGENET_STANDARD_STD,
            do_convert_rgb=True,
        )
        extra_tokens, template = 0, CHATML_TEMPLATE  # SigLIP has no CLS token
    else:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
            do_convert_rgb=True,
        )
        extra_tokens, template = 1, CHAT_TEMPLATE  # CLIP's CLS token, dropped again by "default"
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=geometry.patch_size,
        vision_feature_select_strategy=geometry.vision_feature_select_strategy,
        num_additional_image_tokens=extra_tokens,
        chat_template=template,
    )


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _mute_padding_rows(model: LlavaForConditionalGeneration | LlavaNextForConditionalGeneration,
                       num_tokens: int) -> None:
    """Zero the output rows of ids past the tokenizer (the padded part of the vocab).

    Their logits are then 0 while the best of the real, random logits is well above 0, so greedy
    decoding never emits an id that the tokenizer would silently decode to nothing.
    """
    with torch.no_grad():
        model.get_output_embeddings().weight[num_tokens:].zero_()


def build_random_model(
    preset: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    family: str = "llava",
) -> tuple[LlavaForConditionalGeneration | LlavaNextForConditionalGeneration, LlavaProcessor | LlavaNextProcessor]:
    """(model, processor) with random weights, initialised directly on `device` in `dtype`.

    Nothing touches the disk, so the 7b shape costs 14 GB of (GPU) memory, not of disk.
    """
    geometry = geometry_of(preset, family)
    tokenizer = build_tokenizer(geometry.vocab_size, family)
    config = build_config(geometry, tokenizer)
    torch.manual_seed(seed)
    model_class = {"next": LlavaNextForConditionalGeneration,
                   "onevision": LlavaOnevisionForConditionalGeneration}.get(family, LlavaForConditionalGeneration)
    with torch.device(device), _default_dtype(dtype):
        model = model_class(config)
    _mute_padding_rows(model, len(tokenizer))
    model.generation_config = _generation_config(tokenizer)
    return model.eval(), build_processor(geometry, tokenizer)


# The real checkpoint each family's tiny one loads like.
_LOADS_LIKE = {"llava": "llava-hf/llava-1.5-7b-hf", "llava-siglip": "llava-hf/llava-interleave-qwen-0.5b-hf",
               "next": "llava-hf/llava-v1.6-mistral-7b-hf", "onevision": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"}


def _checkpoint_readme(preset: str, seed: int, geometry: LlavaGeometry) -> str:
    return (
        f"# Random-weight LLaVA ({geometry.family} {preset}, seed {seed})\n\n"
        "Written by `llava_sessions.tiny_model`. The weights are RANDOM: every answer\n"
        "is noise. Only the shapes are meaningful: the checkpoint loads through the same code as\n"
        f"{_LOADS_LIKE[geometry.family]}, so it exercises the serving path and gives honest timings.\n\n"
        f"- image {geometry.image_size} px, patch {geometry.patch_size} px, "
        f"{geometry.num_image_tokens} image tokens per image"
        + (f" plus its anyres tiles' (pinpoints {[list(p) for p in geometry.image_grid_pinpoints]})"
           if geometry.image_grid_pinpoints else "")
        + "\n"
        f"- vision {geometry.vision_num_layers} x {geometry.vision_hidden_size}, "
        f"text {geometry.text_num_layers} x {geometry.text_hidden_size}, vocab {geometry.vocab_size}\n"
    )


def _identity(preset: str, seed: int, dtype: torch.dtype, init_device: torch.device, family: str = "llava") -> dict:
    """What determines the checkpoint's bytes: same identity, same files."""
    identity = {"preset": preset, "seed": seed, "dtype": str(dtype).removeprefix("torch.")}
    if family != "llava":  # LLaVA-1.5 checkpoints keep the identity they always had
        identity["family"] = family
    if init_device.type != "cpu":  # CPU checkpoints keep the identity they always had
        identity["init_device"] = init_device.type
    return identity


def _is_complete(out_dir: pathlib.Path, identity: dict) -> bool:
    """True when the marker names `identity` and every file it lists is there at its size."""
    try:
        marker = json.loads((out_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("identity") != identity:
        return False
    return all(
        (out_dir / name).is_file() and (out_dir / name).stat().st_size == size
        for name, size in marker.get("files", {}).items()
    )


def _write_marker(out_dir: pathlib.Path, identity: dict, geometry: LlavaGeometry) -> None:
    files = {
        path.name: path.stat().st_size
        for path in sorted(out_dir.iterdir())
        if path.is_file() and path.name != MARKER_FILE
    }
    marker = {"identity": identity, "geometry": asdict(geometry), "files": files}
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def write_tiny_llava(
    out_dir: str | pathlib.Path,
    preset: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    init_device: str | torch.device = "cpu",
    family: str = "llava",
) -> pathlib.Path:
    """Write a complete random-weight LLaVA checkpoint (safetensors only) of ``family``
    (FAMILIES: ``llava``, ``llava-siglip``, ``next``, ``onevision``) to `out_dir`.

    Deterministic: the same preset, seed, dtype and kind of `init_device` give byte-identical
    weights (CPU and CUDA draw different numbers from one seed). Idempotent: a complete checkpoint
    of the same identity is left as it is. A 7B shape should be drawn on a GPU: the CPU draws
    fp16 normals on one core (about 6 minutes for 7B on a 16-core host), a GPU in about a second.
    """
    out_dir = pathlib.Path(out_dir)
    init_device = torch.device(init_device)
    geometry = geometry_of(preset, family)
    identity = _identity(preset, seed, dtype, init_device, family)
    if _is_complete(out_dir, identity):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written last, so an interrupted write never passes for a complete checkpoint.
    (out_dir / MARKER_FILE).unlink(missing_ok=True)
    model, processor = build_random_model(preset, seed, dtype, init_device, family)
    model.save_pretrained(out_dir)  # transformers 5 always writes safetensors
    processor.save_pretrained(out_dir)
    if family == "onevision":
        # The real checkpoints ship one; loading must not build it (its processor needs torchvision).
        (out_dir / "video_preprocessor_config.json").write_text(json.dumps(_ONEVISION_VIDEO, indent=2) + "\n")
    del model
    if init_device.type == "cuda":
        torch.cuda.empty_cache()  # the weights' blocks go back before anything loads the checkpoint
    (out_dir / "README.md").write_text(_checkpoint_readme(preset, seed, geometry))
    _write_marker(out_dir, identity, geometry)
    return out_dir
