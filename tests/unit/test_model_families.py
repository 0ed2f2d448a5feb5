"""Model families through the engine: the SigLIP LLaVA (no CLS token, ChatML) answers as
transformers does on the processor's own output, and an unsupported model type is refused at load."""

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
    """Stateless greedy ``generate``: vision tower and full prefill over ``input_ids`` [1, T]."""
    pixels = loaded.image_processor(images=images, return_tensors="pt")["pixel_values"]
    out = loaded.model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
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


@pytest.mark.parametrize("sizes", [[ASPECTS[0]], [ASPECTS[1]], [ASPECTS[3], ASPECTS[2]]], ids=["wide", "tall", "two"])
def test_siglip_first_turn_equals_transformers_generate_on_the_processors_output(loaded_siglip, sizes):
    engine = SessionEngine(loaded_siglip, ServingConfig())
    images = [picture(k, size) for k, size in enumerate(sizes)]
    session = engine.open_session(images)
    result = engine.turn(session.session_id, "What is in the image?", GREEDY)
    inputs = processor_inputs(loaded_siglip, [user("What is in the image?", len(images))], images)
    assert result.prompt_tokens == inputs["input_ids"].shape[1]
    assert history_before_answer(engine, session.session_id, result) == inputs["input_ids"][0].tolist()
    assert list(result.token_ids) == generate(loaded_siglip, inputs["input_ids"], images, GREEDY.max_new_tokens)
    engine.close_session(session.session_id)


def test_a_siglip_conversation_reuses_its_cache_takes_a_second_image_and_frees_its_memory(loaded_siglip):
    engine = SessionEngine(loaded_siglip, ServingConfig(kv_headroom_tokens=0))
    first_image, second_image = picture(1, ASPECTS[0]), picture(2, ASPECTS[1])
    session = engine.open_session([first_image])
    sid = session.session_id
    first = engine.turn(sid, "What is in the image?", GREEDY)

    follow_up = engine.turn(sid, "And what colour is it?", GREEDY)
    assert follow_up.cached_tokens == first.prompt_tokens + first.completion_tokens - 1 > 0
    history = history_before_answer(engine, sid, follow_up)
    assert list(follow_up.token_ids) == generate(loaded_siglip, torch.tensor([history]), [first_image], 8)
    # The history is the ChatML conversation as the processor writes it: each answer closed by
    # <|im_end|> and the newline after it.
    messages = [user("What is in the image?", 1), assistant(first.text), user("And what colour is it?")]
    tokenizer = loaded_siglip.tokenizer
    rendered = processor_inputs(loaded_siglip, messages, [first_image])["input_ids"][0].tolist()
    assert tokenizer.decode(history) == tokenizer.decode(rendered)

    with_image = engine.turn(sid, "Compare it with this one", GREEDY, images=[second_image])
    assert with_image.cached_tokens > follow_up.cached_tokens
    history = history_before_answer(engine, sid, with_image)
    assert history.count(loaded_siglip.image_token_id) == 2 * 25
    expected = generate(loaded_siglip, torch.tensor([history]), [first_image, second_image], 8)
    assert list(with_image.token_ids) == expected
    assert engine.counters.images_encoded == 2 and engine.counters.vision_tower_runs == 2

    # Memory: the features are each image's real rows, as accounted; all of it goes at close.
    snapshot = engine.snapshot()
    row_bytes = loaded_siglip.model.config.text_config.hidden_size * 4
    assert engine.kv_manager.feature_bytes([25, 25]) == 2 * engine.feature_bytes_per_image == 50 * row_bytes
    assert snapshot.sessions[sid].feature_bytes == snapshot.device_features == 50 * row_bytes
    assert snapshot.device_kv == snapshot.sessions[sid].kv_bytes > 0
    engine.close_session(sid)
    snapshot = engine.snapshot()
    assert snapshot.tiers == {"device_kv": 0, "device_features": 0, "host_kv": 0, "host_features": 0}
    assert engine.bytes_held() == 0 and not snapshot.sessions


def test_an_answer_ends_its_turn_as_each_template_does(loaded_siglip, loaded_tiny):
    """ChatML writes "<|im_end|>\n" after an answer, Vicuna "</s>": eos when the answer was cut
    short, then what follows eos in the template."""
    for loaded, after_eos in ((loaded_siglip, "\n"), (loaded_tiny, "")):
        formatter = SessionEngine(loaded, ServingConfig()).formatter
        tokenizer, eos = loaded.tokenizer, loaded.eos_token_ids
        word = tokenizer("dog", add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(formatter.closing_ids(word, eos)) == tokenizer.eos_token + after_eos
        assert tokenizer.decode(formatter.closing_ids(word + [tokenizer.eos_token_id], eos)) == after_eos


def test_features_that_disagree_with_the_promised_count_are_an_internal_error(loaded_siglip, monkeypatch):
    monkeypatch.setattr(loaded_siglip.adapter, "_tokens", 26)  # "+1 for CLS", the bug a SigLIP tower exposes
    with pytest.raises(InternalError, match=r"\[25\] feature rows where the prompt expands them into \[26\]"):
        generation.encode_images(loaded_siglip, [picture(0, (30, 30))])


# --- refusals at load -------------------------------------------------------------------------


def copy_with(checkpoint, tmp_path, name: str, **changes) -> str:
    """A copy of ``checkpoint`` with keys of one of its JSON files changed."""
    target = tmp_path / "changed"
    shutil.copytree(checkpoint, target)
    path = target / name
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return str(target)


@pytest.mark.parametrize("model_type", ["llava_next", "my_own_llava"])
def test_an_unsupported_model_type_is_refused_at_load_with_the_supported_list(tiny_model_dir, tmp_path, model_type):
    source = copy_with(tiny_model_dir, tmp_path, "config.json", model_type=model_type)
    with pytest.raises(ConfigError) as refused:
        load_model(source, torch.device("cpu"))
    message = str(refused.value)
    assert f"model_type {model_type!r}" in message
    assert "Supported model types: 'llava' (LLaVA-1.5 with a CLIP vision tower" in message
    assert "SigLIP LLaVAs" in message and "handler/engine/models/" in message


def test_a_processor_that_counts_a_cls_token_siglip_lacks_is_refused_at_load(tiny_siglip_dir, tmp_path):
    source = copy_with(tiny_siglip_dir, tmp_path, "processor_config.json", num_additional_image_tokens=1)
    with pytest.raises(ConfigError, match="expands an image into 26 tokens but its vision tower gives 25 feature rows"):
        load_model(source, torch.device("cpu"))
