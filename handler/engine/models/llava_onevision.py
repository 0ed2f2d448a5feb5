"""``model_type == "llava_onevision"``: LlavaOnevisionForConditionalGeneration, images only.

Serves LLaVA-OneVision (llava-hf/llava-onevision-qwen2-0.5b-ov-hf, -7b-ov-hf): a SigLIP tower
(384 px, patch 14: 729 tokens a tile, no CLS), a Qwen2 decoder, the ChatML template. Like
LLaVA-NeXT it tiles an image over ``image_grid_pinpoints`` (a base tile, then the best pinpoint's
tiles unpadded, one ``image_newline`` row closing each row of patches; past nine tiles' worth of
rows the grid is scaled down: ``anyres_max_9``). Unlike NeXT, its processor tiles an image only
when it is the prompt's ONLY image: a prompt with several images takes each padded to a square
and untiled, 729 + 1 (newline) tokens each.

Image policy for a session. The images of one request (those sent at open, or those of one
turn) are processed together, as that request's own prompt would process them: a request with
one image tiles it, a request with several leaves each untiled (729 + 1). An image already in
the session never changes: its features and KV stay as they were (re-encoding earlier images as
"several" once a second one arrives would change tokens the cache already holds). The stateless
reference the tests compare with is defined the same way: the full history's ids, and the
model's own vision path over each request's images as that request's group (``generate`` with
``batch_num_images`` holding each group's size, which is what the model tiles by).

Loading without torchvision. The real checkpoints ship video_preprocessor_config.json, and
``AutoProcessor`` then builds a video processor, which needs torchvision (and so does
transformers 5's default image processor). The adapter builds the processor itself: the
tokenizer (AutoTokenizer), the PIL-backend ``LlavaOnevisionImageProcessorPil`` from the
checkpoint's preprocessor_config.json, and ``ImagesOnlyOnevisionProcessor`` (a
LlavaOnevisionProcessor with no video processor) with the checkpoint's ``num_image_tokens``,
``vision_feature_select_strategy``, ``vision_aspect_ratio`` and chat template, read from its
processor_config.json and chat template files (``get_processor_dict``). Videos are not served.

The engine prefills with the precomputed features (``mm_encoder_outputs``; OneVision's forward
takes them as Llava's does) and decodes through ``model.model.language_model`` and
``model.lm_head``, which OneVision has too.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from llava_sessions.errors import ConfigError
from llava_sessions.handler.engine.models.base import ModelAdapter, height_width

# What LlavaOnevisionProcessor takes from processor_config.json besides its sub-processors.
_PROCESSOR_SETTINGS = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio",
                       "image_token", "video_token", "chat_template")


class ImagesOnlyOnevisionProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor with an image processor and a tokenizer, no video processor:
    transformers checks a video processor's class through a module that needs torchvision, so
    this one does not have the attribute at all. Images and text are processed exactly as
    LlavaOnevisionProcessor does; ``videos=`` is not accepted (no video processor)."""

    video_processor = None

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, video_processor=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, video_token=video_token, vision_aspect_ratio=vision_aspect_ratio)

    def save_pretrained(self, save_directory, **kwargs):
        """The files of llava-hf's OneVision checkpoints, less the video processor's: the tokenizer's,
        preprocessor_config.json, a flat processor_config.json (processor_class
        LlavaOnevisionProcessor) and chat_template.jinja."""
        import json
        import pathlib

        out = pathlib.Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out)
        image_processor = self.image_processor.to_dict()
        image_processor.update(image_processor_type="LlavaOnevisionImageProcessor",
                               processor_class="LlavaOnevisionProcessor")
        (out / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2) + "\n")
        settings = {key: getattr(self, key) for key in _PROCESSOR_SETTINGS if key != "chat_template"}
        (out / "processor_config.json").write_text(
            json.dumps({**settings, "processor_class": "LlavaOnevisionProcessor"}, indent=2) + "\n")
        if self.chat_template:
            (out / "chat_template.jinja").write_text(self.chat_template)
        return [str(out)]


def load_processor(source: str) -> ImagesOnlyOnevisionProcessor:
    """The checkpoint's processor without its video processor (the module docstring)."""
    settings, _ = LlavaOnevisionProcessor.get_processor_dict(source)
    settings = {key: settings[key] for key in _PROCESSOR_SETTINGS if settings.get(key) is not None}
    tokenizer = AutoTokenizer.from_pretrained(source)
    if "chat_template" not in settings and getattr(tokenizer, "chat_template", None):
        settings["chat_template"] = tokenizer.chat_template
    image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(source)
    return ImagesOnlyOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer, **settings)


class LlavaOnevisionAdapter(ModelAdapter):
    model_type = "llava_onevision"
    description = (
        "LLaVA-OneVision (llava-hf/llava-onevision-qwen2-0.5b-ov-hf), images only: a request's single "
        "image is tiled (anyres_max_9), several images in one request take 729 + 1 tokens each"
    )
    model_class = LlavaOnevisionForConditionalGeneration

    def __init__(self, model, processor, device: torch.device):
        super().__init__(model, processor, device)
        if not isinstance(processor, LlavaOnevisionProcessor) or not processor.num_image_tokens:
            raise ConfigError(
                f"the checkpoint's processor is a {type(processor).__name__} without num_image_tokens; its "
                "processor_config.json must name LlavaOnevisionProcessor with num_image_tokens (729 for "
                "SigLIP at 384 px, patch 14)"
            )
        self._tile = self.tile_size()
        self._check()

    @classmethod
    def load(cls, source: str, dtype) -> tuple[object, object]:
        model = cls.model_class.from_pretrained(source, dtype=dtype, use_safetensors=True)
        return model, load_processor(source)

    def pixel_inputs(self, images: Sequence) -> dict[str, torch.Tensor]:
        """One request's images as one group: ``pixel_values`` [n, max_tiles, 3, h, w] (a single
        image tiled, several untiled), ``image_sizes`` [n, 2] and ``batch_num_images`` [n], as
        the processor gives them for a prompt holding these images."""
        images = list(images)
        out = self.processor.image_processor(images=[images], return_tensors="pt")
        return {
            "pixel_values": out["pixel_values"].to(self.device, self.dtype),
            "image_sizes": out["image_sizes"].to(self.device),
            "batch_num_images": out["batch_num_images"].to(self.device),
        }

    def image_tokens(self, images: Sequence) -> list[int]:
        """One request's images as one group: a single image by its size, several 729 + 1 each."""
        if len(images) != 1:
            return [self._untiled_tokens()] * len(images)
        return [self._tiled_tokens(*height_width(images[0]))]

    def _untiled_tokens(self) -> int:
        count = self.processor.num_image_tokens + 1  # + the image_newline row
        return count - (self.processor.vision_feature_select_strategy == "default")

    def _tiled_tokens(self, height: int, width: int) -> int:
        """The processor's count for a prompt's only image (LlavaOnevisionProcessor.replace_image_token's)."""
        count = self.processor._get_number_of_features(height, width, *self._tile)
        return count - (self.processor.vision_feature_select_strategy == "default")

    def _expanded(self, images: list) -> int:
        """The placeholders the processor writes for ``images`` in one prompt (nested: the images
        of one prompt, as apply_chat_template gives them; a flat list reads as one image a prompt)."""
        text = self.processor.image_token * len(images)
        try:
            ids = self.processor(images=[images], text=text, return_tensors="pt")["input_ids"]
        except Exception as error:
            raise ConfigError(
                f"the checkpoint's processor cannot expand an image ({type(error).__name__}: {error}); its "
                "processor_config.json needs num_image_tokens and vision_feature_select_strategy"
            ) from None
        return int((ids == self.model.config.image_token_id).sum())

    def _check(self) -> None:
        """One awkwardly shaped image alone (tiled, unpadded) and two together (untiled): the
        processor's expansion, the counts here and the model's feature rows must agree."""
        height, width = self._tile
        probe = Image.new("RGB", (2 * width - width // 3, height - height // 4))
        config = self.model.config
        for group in ([probe], [probe, probe]):
            placeholders = self._expanded(group)
            counted = self.image_tokens(group)
            rows = [f.shape[0] for f in self.encode_images(group)]
            if not placeholders == sum(counted) == sum(rows) or counted != rows:
                raise ConfigError(
                    f"the checkpoint's processor expands {len(group)} {probe.width}x{probe.height} image(s) into "
                    f"{placeholders} tokens (counted {counted}) but the model gives {rows} feature rows "
                    f"(vision_feature_select_strategy {config.vision_feature_select_strategy!r}, "
                    f"image_grid_pinpoints {config.image_grid_pinpoints}, num_image_tokens "
                    f"{self.processor.num_image_tokens}); set processor_config.json and "
                    "preprocessor_config.json to match config.json"
                )
