"""Model families through the engine: the SigLIP LLaVA (no CLS token, ChatML) and LLaVA-NeXT
(anyres tiles, an image's count depends on its size; Mistral template) answer as transformers
does on the processor's own output, and an unsupported model type is refused at load."""

from __future__ import annotations

import json
import shutil

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
    """What transformers' own pipeline feeds the model: the processor's prompt for ``messages``."""
    processor = loaded.processor
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=images, text=prompt, return_tensors="pt")


def generate(loaded, input_ids: torch.Tensor, images: list, max_new_tokens: int) -> list[int]:
    """Stateless greedy ``generate``: vision tower and full prefill over ``input_ids`` [1, T]
    (the processor's pixel_values, and image_sizes for LLaVA-NeXT)."""
    out = loaded.model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **loaded.adapter.pixel_inputs(images),
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


# Each family's loaded tiny model, the counts of ASPECTS[0] and ASPECTS[1], and how its template
# frames a text-only follow-up after an answer (the answer's closing included).
FAMILIES = {
    # ChatML: each answer closed by <|im_end|> and the newline after it
    "siglip": ("loaded_siglip", (25, 25),
               "<|im_end|>\n<|im_start|>user\nAnd what colour is it?<|im_end|>\n<|im_start|>assistant\n"),
    # Mistral: [INST] ... [/INST], each answer closed by </s>; each image its own count
    "next": ("loaded_next", (44, 56), "</s>[INST] And what colour is it? [/INST]"),
}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    """(loaded model, counts of the first two ASPECTS, follow-up frame) of each family."""
    fixture, counts, follow_up = FAMILIES[request.param]
    return request.getfixturevalue(fixture), counts, follow_up


@pytest.mark.parametrize("sizes", [[ASPECTS[0]], [ASPECTS[1]], [ASPECTS[3], ASPECTS[2]]], ids=["wide", "tall", "two"])
def test_first_turn_equals_transformers_generate_on_the_processors_output(family, sizes):
    loaded, _, _ = family
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
    loaded, counts, follow_up_frame = family
    engine = SessionEngine(loaded, ServingConfig(kv_headroom_tokens=0))
    first_image, second_image = picture(1, ASPECTS[0]), picture(2, ASPECTS[1])
    session = engine.open_session([first_image])
    sid = session.session_id
    first = engine.turn(sid, "What is in the image?", GREEDY)

    follow_up = engine.turn(sid, "And what colour is it?", GREEDY)
    assert follow_up.cached_tokens == first.prompt_tokens + first.completion_tokens - 1 > 0
    history = history_before_answer(engine, sid, follow_up)
    assert list(follow_up.token_ids) == generate(loaded, torch.tensor([history]), [first_image], 8)
    # The history is the conversation as the processor writes it with the family's template.
    messages = [user("What is in the image?", 1), assistant(first.text), user("And what colour is it?")]
    tokenizer = loaded.tokenizer
    rendered = processor_inputs(loaded, messages, [first_image])["input_ids"][0].tolist()
    assert tokenizer.decode(history) == tokenizer.decode(rendered)
    assert tokenizer.decode(history).endswith(follow_up_frame)

    with_image = engine.turn(sid, "Compare it with this one", GREEDY, images=[second_image])
    assert with_image.cached_tokens > follow_up.cached_tokens
    history = history_before_answer(engine, sid, with_image)
    assert history.count(loaded.image_token_id) == sum(counts)
    expected = generate(loaded, torch.tensor([history]), [first_image, second_image], 8)
    assert list(with_image.token_ids) == expected
    assert engine.counters.images_encoded == 2 and engine.counters.vision_tower_runs == 2

    # Memory: the features are each image's real rows, as accounted; all of it goes at close.
    snapshot = engine.snapshot()
    row_bytes = loaded.model.config.text_config.hidden_size * 4
    fixed = loaded.fixed_image_tokens  # SigLIP: 25 for every image; LLaVA-NeXT: none
    assert engine.feature_bytes_per_image == (None if fixed is None else fixed * row_bytes)
    assert engine.kv_manager.feature_bytes(counts) == sum(counts) * row_bytes
    assert snapshot.sessions[sid].feature_bytes == snapshot.device_features == sum(counts) * row_bytes
    assert snapshot.device_kv == snapshot.sessions[sid].kv_bytes > 0
    engine.close_session(sid)
    snapshot = engine.snapshot()
    assert snapshot.tiers == {"device_kv": 0, "device_features": 0, "host_kv": 0, "host_features": 0}
    assert engine.bytes_held() == 0 and not snapshot.sessions


def test_an_answer_ends_its_turn_as_each_template_does(loaded_siglip, loaded_tiny, loaded_next):
    """ChatML writes "<|im_end|>\n" after an answer, Vicuna and Mistral "</s>": eos when the answer
    was cut short, then what follows eos in the template."""
    for loaded, after_eos in ((loaded_siglip, "\n"), (loaded_tiny, ""), (loaded_next, "")):
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


# --- refusals at load -------------------------------------------------------------------------


def copy_with(checkpoint, tmp_path, name: str, **changes) -> str:
    """A copy of ``checkpoint`` with keys of one of its JSON files changed."""
    target = tmp_path / "changed"
    shutil.copytree(checkpoint, target)
    path = target / name
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return str(target)


@pytest.mark.parametrize("model_type", ["llava_onevision", "my_own_llava"])
def test_an_unsupported_model_type_is_refused_at_load_with_the_supported_list(tiny_model_dir, tmp_path, model_type):
    source = copy_with(tiny_model_dir, tmp_path, "config.json", model_type=model_type)
    with pytest.raises(ConfigError) as refused:
        load_model(source, torch.device("cpu"))
    message = str(refused.value)
    assert f"model_type {model_type!r}" in message
    assert "Supported model types: 'llava' (LLaVA-1.5 with a CLIP vision tower" in message
    assert "SigLIP LLaVAs" in message and "handler/engine/models/" in message
    assert "'llava_next' (LLaVA-NeXT (llava-hf/llava-v1.6-mistral-7b-hf)" in message


def test_a_processor_that_counts_a_cls_token_siglip_lacks_is_refused_at_load(tiny_siglip_dir, tmp_path):
    source = copy_with(tiny_siglip_dir, tmp_path, "processor_config.json", num_additional_image_tokens=1)
    with pytest.raises(ConfigError, match="expands an image into 26 tokens but its vision tower gives 25 feature rows"):
        load_model(source, torch.device("cpu"))


def test_a_next_processor_that_disagrees_with_the_model_is_refused_at_load(tiny_next_dir, tmp_path):
    source = copy_with(tiny_next_dir, tmp_path, "processor_config.json", num_additional_image_tokens=0)
    with pytest.raises(ConfigError, match="expands a 54x24 image into 51 tokens .counted 51. but the model gives 52 feature rows"):
        load_model(source, torch.device("cpu"))
