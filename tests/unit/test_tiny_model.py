"""The random-weight LLaVA checkpoints load and run through the public transformers APIs."""

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
)

from llava_sessions.tiny_model import (
    FAMILIES,
    MARKER_FILE,
    NEXT_PRESETS,
    SIGLIP_PRESETS,
    _identity,
    _is_complete,
    PRESETS,
    build_config,
    build_processor,
    build_tokenizer,
    geometry_of,
    write_tiny_llava,
)

TINY = PRESETS["tiny"]

TWO_TURNS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A dog on a sofa."}]},
    {"role": "user", "content": [{"type": "text", "text": "What color is it?"}]},
]
TWO_TURNS_RENDERED = (
    "USER: <image>\nWhat is in the picture? ASSISTANT: A dog on a sofa.</s>"
    "USER: What color is it? ASSISTANT:"
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub: huggingface_hub reads HF_HUB_OFFLINE once at import, so patch the constant too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llava(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir).eval()
    return model, processor


def noise_image(seed: int, size=(48, 40)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def image_prompt_inputs(processor, image, text):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=prompt, return_tensors="pt")


def greedy_answer(model, inputs, max_new_tokens=8) -> list[int]:
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def file_bytes(directory, name):
    return (directory / name).read_bytes()


def test_tiny_checkpoint_is_safetensors_only_and_small(tiny_dir):
    names = {path.name for path in tiny_dir.iterdir()}
    assert "model.safetensors" in names
    assert not {name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))}
    assert sum(path.stat().st_size for path in tiny_dir.iterdir()) < 5_000_000
    with safe_open(tiny_dir / "model.safetensors", "pt") as weights:
        assert weights.metadata() == {"format": "pt"}
    assert "RANDOM" in (tiny_dir / "README.md").read_text()


def test_loads_through_public_apis_with_matching_token_ids(loaded):
    model, processor = loaded
    tokenizer = processor.tokenizer
    assert isinstance(processor, LlavaProcessor)
    image_id, eos_id = tokenizer.convert_tokens_to_ids(["<image>", "</s>"])
    assert model.config.image_token_id == tokenizer.image_token_id == image_id
    assert model.config.text_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == eos_id
    assert model.generation_config.bos_token_id == tokenizer.bos_token_id
    assert len(tokenizer) <= model.config.text_config.vocab_size


def test_processor_expands_one_image_into_one_token_per_patch(loaded):
    model, processor = loaded
    inputs = image_prompt_inputs(processor, noise_image(0), "What is in the image?")
    expected = (TINY.image_size // TINY.patch_size) ** 2
    assert expected == TINY.num_image_tokens == 16
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == expected
    assert inputs["pixel_values"].shape == (1, 3, TINY.image_size, TINY.image_size)


def test_greedy_generation_is_deterministic_and_depends_on_image_and_prompt(loaded):
    model, processor = loaded
    inputs = image_prompt_inputs(processor, noise_image(0), "What is in the image?")
    answer = greedy_answer(model, inputs)
    assert answer and answer == greedy_answer(model, inputs)
    other_image = image_prompt_inputs(processor, noise_image(1), "What is in the image?")
    other_prompt = image_prompt_inputs(processor, noise_image(0), "Describe the scene in detail.")
    assert greedy_answer(model, other_image) != answer
    assert greedy_answer(model, other_prompt) != answer
    assert max(answer) < len(processor.tokenizer), "padded vocab rows must not win the argmax"


def test_same_seed_gives_identical_bytes(tmp_path, tiny_dir):
    again = write_tiny_llava(tmp_path / "again", seed=0)
    other_seed = write_tiny_llava(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert file_bytes(again, name) == file_bytes(tiny_dir, name)
    assert file_bytes(other_seed, "model.safetensors") != file_bytes(tiny_dir, "model.safetensors")


def test_complete_checkpoint_is_not_rewritten(tmp_path):
    out_dir = write_tiny_llava(tmp_path / "ckpt")
    weights = out_dir / "model.safetensors"
    written_at = weights.stat().st_mtime_ns
    assert write_tiny_llava(out_dir) == out_dir
    assert weights.stat().st_mtime_ns == written_at


def test_incomplete_or_different_checkpoint_is_rewritten(tmp_path):
    out_dir = write_tiny_llava(tmp_path / "ckpt")
    seed0_weights = file_bytes(out_dir, "model.safetensors")
    (out_dir / "tokenizer.json").unlink()
    write_tiny_llava(out_dir)
    assert (out_dir / "tokenizer.json").is_file()
    write_tiny_llava(out_dir, seed=1)
    assert file_bytes(out_dir, "model.safetensors") != seed0_weights
    assert '"seed": 1' in (out_dir / MARKER_FILE).read_text()


def test_a_checkpoint_drawn_on_the_cpu_does_not_pass_for_one_drawn_on_a_gpu(tmp_path):
    # CPU and CUDA draw different numbers from one seed: the bench's GPU checkpoint is its own.
    out_dir = write_tiny_llava(tmp_path / "ckpt")
    assert _is_complete(out_dir, _identity("tiny", 0, torch.float32, torch.device("cpu")))
    assert not _is_complete(out_dir, _identity("tiny", 0, torch.float32, torch.device("cuda")))


def test_chat_template_renders_two_turns_exactly(loaded):
    _, processor = loaded
    for renderer in (processor, processor.tokenizer, build_tokenizer()):
        assert renderer.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True) == (
            TWO_TURNS_RENDERED
        )
    without_prompt = processor.apply_chat_template(TWO_TURNS[:2], tokenize=False)
    assert without_prompt == "USER: <image>\nWhat is in the picture? ASSISTANT: A dog on a sofa.</s>"


def test_tokenizer_is_a_real_bpe_with_single_token_specials():
    tokenizer = build_tokenizer()
    text = "USER: <image>\nWhat color is the dog? ASSISTANT: The dog is brown.</s>"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert tokenizer.tokenize(" dog") == ["Ġdog"]  # a frequent word is one piece
    assert len(tokenizer.tokenize(" doghouse")) > 1  # an unseen one splits
    for token in ("<s>", "</s>", "<unk>", "<pad>", "<image>"):
        assert len(tokenizer.tokenize(token)) == 1


def test_small_preset_has_llava_1_5_image_geometry():
    geometry = PRESETS["small"]
    tokenizer = build_tokenizer(geometry.vocab_size)
    config = build_config(geometry, tokenizer)
    processor = build_processor(geometry, tokenizer)
    prompt = processor.apply_chat_template(TWO_TURNS, add_generation_prompt=True)
    inputs = processor(images=noise_image(0, size=(480, 640)), text=prompt, return_tensors="pt")
    assert geometry.num_image_tokens == config.image_seq_length == 576
    assert (inputs["input_ids"] == config.image_token_id).sum().item() == 576
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")


def test_llava_1_5_7b_preset_has_the_real_shape_and_parameter_count():
    config = build_config(PRESETS["llava-1.5-7b"])
    vision, text = config.vision_config, config.text_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (336, 14, 1024)
    assert (vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size) == (24, 16, 4096)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (4096, 32, 32)
    assert (text.intermediate_size, text.vocab_size, text.max_position_embeddings) == (11008, 32064, 4096)
    assert text.rms_norm_eps == 1e-5
    assert config.projector_hidden_act == "gelu" and config.image_seq_length == 576
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    projector = model.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_2.out_features) == (1024, 4096)
    # llava-hf/llava-1.5-7b-hf: 7,063,427,072 parameters.
    assert sum(parameter.numel() for parameter in model.parameters()) == 7_063_427_072


# --- the SigLIP family (llava-interleave-qwen's kind) ------------------------------------------

SIGLIP = SIGLIP_PRESETS["tiny"]
CHATML_TWO_TURNS_RENDERED = (
    "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n"
    "<|im_start|>assistant\nA dog on a sofa.<|im_end|>\n"
    "<|im_start|>user\nWhat color is it?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def siglip(tiny_siglip_dir):
    processor = AutoProcessor.from_pretrained(tiny_siglip_dir)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_siglip_dir).eval()
    return model, processor


def test_siglip_preset_is_a_llava_with_a_siglip_tower_and_a_qwen2_decoder(siglip):
    model, processor = siglip
    config = model.config
    assert (config.model_type, config.vision_config.model_type, config.text_config.model_type) == (
        "llava", "siglip_vision_model", "qwen2")
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert config.text_config.num_key_value_heads < config.text_config.num_attention_heads  # grouped KV
    assert not config.vision_config.vision_use_head
    assert (processor.num_additional_image_tokens, processor.vision_feature_select_strategy) == (0, "full")
    tokenizer = processor.tokenizer
    assert tokenizer.bos_token is None and tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == config.text_config.eos_token_id
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>"):
        assert len(tokenizer.tokenize(token)) == 1


@pytest.mark.parametrize("size", [(48, 40), (20, 90), (128, 128)])
def test_siglip_processor_squashes_any_image_to_one_token_per_patch_and_no_cls(siglip, size):
    model, processor = siglip
    inputs = image_prompt_inputs(processor, noise_image(0, size=size), "What is in the image?")
    assert SIGLIP.num_image_tokens == (SIGLIP.image_size // SIGLIP.patch_size) ** 2 == 25
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 25
    assert inputs["pixel_values"].shape == (1, 3, SIGLIP.image_size, SIGLIP.image_size)
    features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert [f.shape for f in features] == [(25, model.config.text_config.hidden_size)]


def test_siglip_chat_template_is_chatml(siglip):
    _, processor = siglip
    for renderer in (processor, processor.tokenizer, build_tokenizer(family="llava-siglip")):
        assert renderer.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True) == (
            CHATML_TWO_TURNS_RENDERED
        )


@pytest.mark.parametrize("family", ["siglip", "next_model"])
def test_each_familys_greedy_generation_depends_on_image_and_prompt(family, request):
    model, processor = request.getfixturevalue(family)
    inputs = image_prompt_inputs(processor, noise_image(0), "What is in the image?")
    answer = greedy_answer(model, inputs)
    assert answer and answer == greedy_answer(model, inputs)
    assert greedy_answer(model, image_prompt_inputs(processor, noise_image(1), "What is in the image?")) != answer
    assert greedy_answer(model, image_prompt_inputs(processor, noise_image(0), "Describe the scene.")) != answer
    assert max(answer) < len(processor.tokenizer), "padded vocab rows must not win the argmax"


def test_a_family_is_part_of_the_checkpoints_identity(tiny_siglip_dir, tiny_dir):
    assert _is_complete(tiny_siglip_dir, _identity("tiny", 0, torch.float32, torch.device("cpu"), "llava-siglip"))
    assert not _is_complete(tiny_siglip_dir, _identity("tiny", 0, torch.float32, torch.device("cpu")))
    assert not _is_complete(tiny_dir, _identity("tiny", 0, torch.float32, torch.device("cpu"), "llava-siglip"))
    assert "llava-interleave-qwen" in (tiny_siglip_dir / "README.md").read_text()


def test_tiny_model_command_takes_a_family(tmp_path, monkeypatch, capsys):
    import llava_sessions.tiny_model as tiny_model
    from llava_sessions.cli import main

    written = []
    monkeypatch.setattr(tiny_model, "write_tiny_llava", lambda out, **kw: written.append(kw) or out)
    assert main(["tiny-model", str(tmp_path / "a"), "--family", "llava-siglip", "--preset", "small"]) == 0
    assert main(["tiny-model", str(tmp_path / "b")]) == 0
    assert written == [{"preset": "small", "seed": 0, "family": "llava-siglip"},
                       {"preset": "tiny", "seed": 0, "family": "llava"}]
    assert "llava-siglip small" in capsys.readouterr().out
    assert main(["tiny-model", str(tmp_path / "c"), "--family", "next"]) == 0
    assert written[-1] == {"preset": "tiny", "seed": 0, "family": "next"}
    assert main(["tiny-model", str(tmp_path / "d"), "--family", "onevision"]) == 0
    assert written[-1] == {"preset": "tiny", "seed": 0, "family": "onevision"}
    with pytest.raises(SystemExit):
        main(["tiny-model", str(tmp_path / "e"), "--family", "mllama"])
    with pytest.raises(ValueError, match="choose one of llava, llava-siglip, next, onevision"):
        geometry_of("tiny", "mllama")
    assert set(FAMILIES) == {"llava", "llava-siglip", "next", "onevision"}


# --- the LLaVA-NeXT family (llava-v1.6-mistral's kind) ------------------------------------------

NEXT = NEXT_PRESETS["tiny"]
MISTRAL_TWO_TURNS_RENDERED = (
    "[INST] <image>\nWhat is in the picture? [/INST]A dog on a sofa.</s>[INST] What color is it? [/INST]"
)


@pytest.fixture(scope="module")
def next_model(tiny_next_dir):
    processor = AutoProcessor.from_pretrained(tiny_next_dir)
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_next_dir).eval()
    return model, processor


def test_next_preset_is_a_llava_next_with_a_clip_tower_and_a_mistral_decoder(next_model, tiny_next_dir):
    model, processor = next_model
    config = model.config
    assert (config.model_type, config.vision_config.model_type, config.text_config.model_type) == (
        "llava_next", "clip_vision_model", "mistral")
    assert config.text_config.sliding_window is None
    assert config.text_config.head_dim == NEXT.text_hidden_size // NEXT.text_num_heads
    assert config.text_config.num_key_value_heads < config.text_config.num_attention_heads  # grouped KV
    assert config.image_grid_pinpoints == [[32, 64], [64, 32], [64, 64]]
    assert isinstance(processor, LlavaNextProcessor)
    assert type(processor.image_processor).__name__ == "LlavaNextImageProcessorPil"  # no torchvision
    assert processor.image_processor.image_grid_pinpoints == config.image_grid_pinpoints
    assert (processor.num_additional_image_tokens, processor.vision_feature_select_strategy) == (1, "default")
    tokenizer = processor.tokenizer
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == config.text_config.eos_token_id
    for renderer in (processor, tokenizer, build_tokenizer(family="next")):
        assert renderer.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True) == (
            MISTRAL_TWO_TURNS_RENDERED
        )
    assert "llava-v1.6-mistral-7b-hf" in (tiny_next_dir / "README.md").read_text()


@pytest.mark.parametrize(("size", "tokens", "tiles"), [((48, 40), 72, 5), ((20, 90), 34, 3), ((128, 128), 88, 5)])
def test_next_processor_tiles_an_image_by_its_shape(next_model, size, tokens, tiles):
    """(height, width) 48x40 tiles 2x2 (+ the base tile), 20x90 1x2; unpadding cuts the padding back out."""
    model, processor = next_model
    inputs = image_prompt_inputs(processor, noise_image(0, size=size), "What is in the image?")
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == tokens
    assert inputs["pixel_values"].shape == (1, tiles, 3, NEXT.image_size, NEXT.image_size)
    features = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    assert [f.shape for f in features.pooler_output] == [(tokens, model.config.text_config.hidden_size)]
