"""Model families through the engine: the SigLIP LLaVA (no CLS token, ChatML), LLaVA-NeXT
(anyres tiles, an image's count depends on its size; Mistral template) and LLaVA-OneVision (a
request's single image tiled, several untiled; ChatML) answer as transformers does on the
processor's own output, and an unsupported model type is refused at load.

OneVision's reference is defined by its image policy (handler/engine/models/llava_onevision.py):
each request's images are one group, processed as that request's own prompt would process them;
``pixel_inputs_by_request`` gives ``generate`` the groups (``batch_num_images``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava_sessions.config import ServingConfig
from llava_sessions.errors import ConfigError, InternalError
from llava_sessions.handler.engine import generation
from llava_sessions.handler.engine.engine import SessionEngine
from llava_sessions.handler.engine.generation import SamplingParams
from llava_sessions.handler.engine.model_loader import load_model
from tests.fakes import copy_with

GREEDY = SamplingParams(max_new_tokens=8)
# (width, height): wide, tall, square and very wide; SigLIP squashes each to its square input.
ASPECTS = [(40, 30), (30, 60), (64, 64), (100, 20)]


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    width, height = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def user(text: str, n_images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def processor_inputs(loaded, messages: list[dict], images: list) -> dict:
    """What transformers' own pipeline feeds the model: the processor's prompt for ``messages``,
    its images nested as one prompt's (as apply_chat_template passes them: OneVision reads a flat
    list as one image a prompt)."""
    processor = loaded.processor
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[images] if images else None, text=prompt, return_tensors="pt")


def pixel_inputs_by_request(loaded, requests: list[list]) -> dict:
    """The vision inputs of a history whose images came in ``requests`` (one list each): each
    family's processor over all of them, OneVision's with each request's images as one group
    (``batch_num_images``: a single image tiled, several untiled), as the engine encodes them."""
    if loaded.adapter.model_type != "llava_onevision":
        return loaded.adapter.pixel_inputs([image for images in requests for image in images])
    out = loaded.processor.image_processor(images=[list(images) for images in requests], return_tensors="pt")
    return {key: value.to(loaded.device) for key, value in out.items()}


def generate(loaded, input_ids: torch.Tensor, requests: list[list], max_new_tokens: int) -> list[int]:
    """Stateless greedy ``generate``: vision tower and full prefill over ``input_ids`` [1, T]
    (the processor's pixel_values, and image_sizes for the tiling families), the images of each
    request in ``requests`` as one group."""
    out = loaded.model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **pixel_inputs_by_request(loaded, requests),
        do_sample=False, max_new_tokens=max_new_tokens,
        suppress_tokens=[loaded.image_token_id],  # as the engine does: a placeholder is never an answer
    )
    return out[0, input_ids.shape[1]:].tolist()


def history_before_answer(engine, session_id, result) -> list[int]:
    ids = list(engine.session_history(session_id))
    return ids[: len(ids) - len(result.token_ids) - len(engine.formatter.closing_ids(list(result.token_ids),
                                                                                       engine.loaded.eos_token_ids))]


def test_siglip_images_take_their_real_feature_rows_with_no_cls(loaded_siglip):
    assert loaded_siglip.fixed_image_tokens == 25  # (40 / 8)^2 patches, no CLS token
    assert loaded_siglip.image_tokens([picture(0, size) for size in ASPECTS]) == [25] * len(ASPECTS)
    features = generation.encode_images(loaded_siglip, [picture(0, size) for size in ASPECTS])
    assert [tuple(f.shape) for f in features] == [(25, 64)] * len(ASPECTS)


# Each family's loaded tiny model, the counts of ASPECTS[0] and ASPECTS[1] (each alone in its
# request), how its template frames a text-only follow-up after an answer (the answer's closing
# included), and what its template writes before an answer in a rendered history beyond what the
# generation prompt asked the model for.
FAMILIES = {
    # ChatML: each answer closed by <|im_end|> and the newline after it
    "siglip": ("loaded_siglip", (25, 25),
               "<|im_end|>\n<|im_start|>user\nAnd what colour is it?<|im_end|>\n<|im_start|>assistant\n", ""),
    # Mistral: [INST] ... [/INST], each answer closed by </s>; each image its own count
    "next": ("loaded_next", (44, 56), "</s>[INST] And what colour is it? [/INST]", ""),
    # llava-onevision-qwen2's ChatML: "\n" before each text, nothing after <|im_end|>; an image
    # alone in its request tiled by its shape (base 25 + tiles unpadded + newline rows)
    "onevision": ("loaded_onevision", (43, 85),
                  "<|im_end|><|im_start|>user\n\nAnd what colour is it?<|im_end|><|im_start|>assistant\n", "\n"),
}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    """(loaded model, counts of the first two ASPECTS, follow-up frame, rendered answer lead) of
    each family."""
    fixture, counts, follow_up, lead = FAMILIES[request.param]
    return request.getfixturevalue(fixture), counts, follow_up, lead


@pytest.mark.parametrize("sizes", [[ASPECTS[0]], [ASPECTS[1]], [ASPECTS[3], ASPECTS[2]]], ids=["wide", "tall", "two"])
def test_first_turn_equals_transformers_generate_on_the_processors_output(family, sizes):
    loaded, _, _, _ = family
    engine = SessionEngine(loaded, ServingConfig())
    images = [picture(k, size) for k, size in enumerate(sizes)]
    session = engine.open_session(images)
    result = engine.turn(session.session_id, "What is in the image?", GREEDY)
    inputs = processor_inputs(loaded, [user("What is in the image?", len(images))], images)
    assert result.prompt_tokens == inputs["input_ids"].shape[1]
    assert history_before_answer(engine, session.session_id, result) == inputs["input_ids"][0].tolist()
    # generate on the processor's whole output (pixel_values, and image_sizes for LLaVA-NeXT)
    out = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=GREEDY.max_new_tokens,
                                suppress_tokens=[loaded.image_token_id])
    assert list(result.token_ids) == out[0, inputs["input_ids"].shape[1]:].tolist()
    engine.close_session(session.session_id)


def test_a_conversation_reuses_its_cache_takes_a_second_image_and_frees_its_memory(family):
    loaded, counts, follow_up_frame, answer_lead = family
    engine = SessionEngine(loaded, ServingConfig(kv_headroom_tokens=0))
    first_image, second_image = picture(1, ASPECTS[0]), picture(2, ASPECTS[1])
    session = engine.open_session([first_image])
    sid = session.session_id
    first = engine.turn(sid, "What is in the image?", GREEDY)

    follow_up = engine.turn(sid, "And what colour is it?", GREEDY)
    assert follow_up.cached_tokens == first.prompt_tokens + first.completion_tokens - 1 > 0
    history = history_before_answer(engine, sid, follow_up)
    assert list(follow_up.token_ids) == generate(loaded, torch.tensor([history]), [[first_image]], 8)
    # The history is the conversation as the processor writes it with the family's template.
    messages = [user("What is in the image?", 1), assistant(first.text), user("And what colour is it?")]
    tokenizer = loaded.tokenizer
    rendered = processor_inputs(loaded, messages, [first_image])["input_ids"][0].tolist()
    lead = "assistant\n"  # OneVision's template renders an answer as "\n" + its text
    assert tokenizer.decode(history) == tokenizer.decode(rendered).replace(lead + answer_lead, lead)
    assert tokenizer.decode(history).endswith(follow_up_frame)

    with_image = engine.turn(sid, "Compare it with this one", GREEDY, images=[second_image])
    assert with_image.cached_tokens > follow_up.cached_tokens
    history = history_before_answer(engine, sid, with_image)
    assert history.count(loaded.image_token_id) == sum(counts)
    expected = generate(loaded, torch.tensor([history]), [[first_image], [second_image]], 8)
    assert list(with_image.token_ids) == expected
    assert engine.counters.images_encoded == 2 and engine.counters.vision_tower_runs == 2

    # Memory: the features are each image's real rows, as accounted; all of it goes at close.
    snapshot = engine.snapshot()
    row_bytes = loaded.model.config.text_config.hidden_size * 4
    fixed = loaded.fixed_image_tokens  # SigLIP: 25 for every image; LLaVA-NeXT, OneVision: none
    assert engine.feature_bytes_per_image == (None if fixed is None else fixed * row_bytes)
    assert engine.kv_manager.feature_bytes(counts) == sum(counts) * row_bytes
    assert snapshot.sessions[sid].feature_bytes == snapshot.device_features == sum(counts) * row_bytes
    assert snapshot.device_kv == snapshot.sessions[sid].kv_bytes > 0
    engine.close_session(sid)
    snapshot = engine.snapshot()
    assert snapshot.tiers == {"device_kv": 0, "device_features": 0, "host_kv": 0, "host_features": 0}
    assert engine.bytes_held() == 0 and not snapshot.sessions


def test_an_answer_ends_its_turn_as_each_template_does(loaded_siglip, loaded_tiny, loaded_next, loaded_onevision):
    """ChatML writes "<|im_end|>\n" after an answer (OneVision's "<|im_end|>"), Vicuna and Mistral
    "</s>": eos when the answer was cut short, then what follows eos in the template."""
    for loaded, after_eos in ((loaded_siglip, "\n"), (loaded_tiny, ""), (loaded_next, ""), (loaded_onevision, "")):
        formatter = SessionEngine(loaded, ServingConfig()).formatter
        tokenizer, eos = loaded.tokenizer, loaded.eos_token_ids
        word = tokenizer("dog", add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(formatter.closing_ids(word, eos)) == tokenizer.eos_token + after_eos
        assert tokenizer.decode(formatter.closing_ids(word + [tokenizer.eos_token_id], eos)) == after_eos


def test_features_that_disagree_with_the_promised_count_are_an_internal_error(loaded_siglip, monkeypatch):
    monkeypatch.setattr(loaded_siglip.adapter, "_tokens", 26)  # "+1 for CLS", the bug a SigLIP tower exposes
    with pytest.raises(InternalError, match=r"\[25\] feature rows where the prompt expands them into \[26\]"):
        generation.encode_images(loaded_siglip, [picture(0, (30, 30))])


# --- LLaVA-NeXT: anyres tiles, a count per image -------------------------------------------------


def processor_count(loaded, image) -> int:
    """The placeholders the checkpoint's processor writes for one image."""
    ids = loaded.processor(images=[image], text=loaded.processor.image_token, return_tensors="pt")["input_ids"]
    return int((ids == loaded.image_token_id).sum())


def test_next_images_of_other_aspect_ratios_take_the_processors_counts(loaded_next):
    assert loaded_next.fixed_image_tokens is None and loaded_next.adapter.model_type == "llava_next"
    images = [picture(k, size) for k, size in enumerate(ASPECTS)]
    counts = loaded_next.image_tokens(images)
    # base tile 16 + the best pinpoint's tiles, unpadded, with a newline row per patch row
    assert counts == [44, 56, 88, 34] == [processor_count(loaded_next, image) for image in images]
    features = generation.encode_images(loaded_next, images)
    hidden = loaded_next.model.config.text_config.hidden_size
    assert [tuple(f.shape) for f in features] == [(count, hidden) for count in counts]


def test_next_counts_in_the_7b_geometry():
    """llava-v1.6-mistral-7b's processor (336 px tiles, patch 14, its five pinpoints): 2,928 tokens
    for 672x672, 1,176 for 336x336, as its expansion writes them."""
    from PIL import Image as PILImage

    from llava_sessions.tiny_model import NEXT_PRESETS, build_processor, build_tokenizer

    geometry = NEXT_PRESETS["llava-next-mistral-7b"]
    processor = build_processor(geometry, build_tokenizer(1024, "next"))
    for side, tokens in ((672, 2928), (336, 1176)):
        ids = processor(images=[PILImage.new("RGB", (side, side))], text="<image>", return_tensors="pt")["input_ids"]
        assert int((ids == processor.image_token_id).sum()) == tokens
    assert 2928 * geometry.text_hidden_size * 2 == 23_986_176  # fp16 feature bytes of a 672x672 image


def test_next_features_that_disagree_with_the_promised_count_are_an_internal_error(loaded_next, monkeypatch):
    monkeypatch.setattr(loaded_next.adapter, "_tile", (16, 16))  # counts for other tiles than the tower's
    with pytest.raises(InternalError, match=r"\[44\] feature rows where the prompt expands them into"):
        generation.encode_images(loaded_next, [picture(0, ASPECTS[0])])


# --- LLaVA-OneVision: a request's single image tiled, several untiled ---------------------------


def test_onevision_counts_follow_each_requests_images_as_the_processor_does(loaded_onevision):
    loaded = loaded_onevision
    assert loaded.fixed_image_tokens is None and loaded.adapter.model_type == "llava_onevision"
    hidden = loaded.model.config.text_config.hidden_size
    # Alone: tiled by its shape (1x1, 1x2, 2x1, 2x2; 200x180 picks 4x4, scaled down by anyres_max_9)
    alone = [picture(k, size) for k, size in enumerate(ASPECTS + [(200, 180)])]
    counts = [loaded.image_tokens([image])[0] for image in alone]
    assert counts == [43, 85, 135, 109, 249] == [processor_count(loaded, image) for image in alone]
    assert [generation.encode_images(loaded, [image])[0].shape for image in alone] == [(n, hidden) for n in counts]
    # Several in one request: each padded to a square, untiled, 25 + 1 (the newline row)
    several = alone[:3]
    assert loaded.image_tokens(several) == [26, 26, 26]
    ids = loaded.processor(images=[several], text="<image>" * 3, return_tensors="pt")["input_ids"]
    assert int((ids == loaded.image_token_id).sum()) == 78
    assert [f.shape for f in generation.encode_images(loaded, several)] == [(26, hidden)] * 3


def test_onevision_counts_in_the_0_5b_geometry():
    """llava-onevision-qwen2-0.5b/7b's processor (SigLIP 384 px, patch 14: 729 a tile; 36
    pinpoints, anyres_max_9): docs/design.md's figures, as its expansion writes them."""
    from PIL import Image as PILImage

    from llava_sessions.tiny_model import ONEVISION_PRESETS, build_processor, build_tokenizer

    geometry = ONEVISION_PRESETS["llava-onevision-qwen2-0.5b"]
    processor = build_processor(geometry, build_tokenizer(1024, "onevision"))

    def count(images):
        ids = processor(images=[images], text="<image>" * len(images), return_tensors="pt")["input_ids"]
        return int((ids == processor.image_token_id).sum())

    assert count([PILImage.new("RGB", (384, 384))]) == 729 + 27 * 28 == 1485  # base + 1x1 grid, newlines
    assert count([PILImage.new("RGB", (768, 768))]) == 729 + 54 * 55 == 3699
    # 2x3 tiles (768x1152): 54 rows of 81 patches, unpadded to 73 columns, a newline closing each row
    assert count([PILImage.new("RGB", (1024, 768))]) == 729 + 54 * 74 == 4725
    # 6x6 tiles: 162 x 162 patches, past 9 tiles' worth, scaled down by 2 to 81 x 81
    assert count([PILImage.new("RGB", (2304, 2304))]) == 729 + 81 * 82 == 7371
    assert count([PILImage.new("RGB", (384, 384))] * 2) == 2 * 730
    assert 3699 * geometry.text_hidden_size * 2 == 6_628_608  # bf16 feature bytes of a 768x768 image


def test_onevision_features_that_disagree_with_the_promised_count_are_an_internal_error(loaded_onevision,
                                                                                        monkeypatch):
    monkeypatch.setattr(loaded_onevision.adapter, "_tile", (20, 20))  # counts for other tiles than the tower's
    with pytest.raises(InternalError, match=r"\[43\] feature rows where the prompt expands them into"):
        generation.encode_images(loaded_onevision, [picture(0, ASPECTS[0])])


def test_onevision_loads_without_its_video_processor(tiny_onevision_dir, loaded_onevision):
    """The checkpoint ships video_preprocessor_config.json as the real ones do; the adapter builds
    the processor from the tokenizer and the PIL image processor with the checkpoint's settings."""
    from llava_sessions.handler.engine.models.llava_onevision import ImagesOnlyOnevisionProcessor

    assert (tiny_onevision_dir / "video_preprocessor_config.json").is_file()
    processor = loaded_onevision.processor
    assert isinstance(processor, ImagesOnlyOnevisionProcessor) and processor.video_processor is None
    assert type(processor.image_processor).__name__ == "LlavaOnevisionImageProcessorPil"
    assert (processor.num_image_tokens, processor.vision_feature_select_strategy,
            processor.vision_aspect_ratio) == (25, "full", "anyres_max_9")
    assert processor.chat_template.startswith("{% for message in messages %}{{ '<|im_start|>'")
    config = json.loads((tiny_onevision_dir / "processor_config.json").read_text())
    assert config["processor_class"] == "LlavaOnevisionProcessor"


def test_a_onevision_processor_that_disagrees_with_the_model_is_refused_at_load(tiny_onevision_dir, tmp_path):
    source = copy_with(tiny_onevision_dir, tmp_path, "processor_config.json", num_image_tokens=16)
    with pytest.raises(ConfigError, match="expands 1 67x30 image.s. into .* but the model gives"):
        load_model(source, torch.device("cpu"))


# --- refusals at load -------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["mllama", "my_own_llava"])
def test_an_unsupported_model_type_is_refused_at_load_with_the_supported_list(tiny_model_dir, tmp_path, model_type):
    source = copy_with(tiny_model_dir, tmp_path, "config.json", model_type=model_type)
    with pytest.raises(ConfigError) as refused:
        load_model(source, torch.device("cpu"))
    message = str(refused.value)
    assert f"model_type {model_type!r}" in message
    assert "Supported model types: 'llava' (LLaVA-1.5 with a CLIP vision tower" in message
    assert "SigLIP LLaVAs" in message and "handler/engine/models/" in message
    assert "'llava_next' (LLaVA-NeXT (llava-hf/llava-v1.6-mistral-7b-hf)" in message
    assert "'llava_onevision' (LLaVA-OneVision (llava-hf/llava-onevision-qwen2-0.5b-ov-hf), images only" in message


def test_a_processor_that_counts_a_cls_token_siglip_lacks_is_refused_at_load(tiny_siglip_dir, tmp_path):
    source = copy_with(tiny_siglip_dir, tmp_path, "processor_config.json", num_additional_image_tokens=1)
    with pytest.raises(ConfigError, match="expands an image into 26 tokens but its vision tower gives 25 feature rows"):
        load_model(source, torch.device("cpu"))


def test_a_next_processor_that_disagrees_with_the_model_is_refused_at_load(tiny_next_dir, tmp_path):
    source = copy_with(tiny_next_dir, tmp_path, "processor_config.json", num_additional_image_tokens=0)
    with pytest.raises(ConfigError, match="expands a 54x24 image into 51 tokens .counted 51. but the model gives 52 feature rows"):
        load_model(source, torch.device("cpu"))
