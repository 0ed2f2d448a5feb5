"""The session engine on CPU with the tiny model: exact answers, exact counters, memory freed."""

from __future__ import annotations

import gc
import time
import weakref

import pytest
import torch

from llava_sessions.config import ServingConfig
from llava_sessions.errors import (
    InvalidRequest,
    PromptTooLong,
    SessionNotFound,
    TooManyImages,
    TooManySessions,
)
from llava_sessions.handler.engine import generation
from llava_sessions.handler.engine.engine import SessionEngine
from llava_sessions.handler.engine.generation import SamplingParams
from llava_sessions.wire import is_valid_session_id

QUESTIONS = [
    "What is in the image?",
    "And what colour is it?",
    "Tell me more about the left side please",
    "Why?",
    "Summarise everything you said so far in one sentence",
]
GREEDY = SamplingParams(max_new_tokens=10)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_engine(loaded, clock=None, **config):
    return SessionEngine(loaded, ServingConfig(**config), clock=clock or FakeClock())


def stateless_answer(loaded, history_ids, images, max_new_tokens):
    """What a stateless server computes: vision tower and full prefill over the whole history."""
    kwargs = {}
    if images:
        kwargs["pixel_values"] = loaded.image_processor(images=images, return_tensors="pt")["pixel_values"]
    ids = torch.tensor([history_ids])
    out = loaded.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        suppress_tokens=[loaded.image_token_id],  # as the engine does: a placeholder is never an answer
        **kwargs,
    )
    return out[0, len(history_ids):].tolist()


def prompt_ids_of_last_turn(engine, session_id, result):
    """The history the last answer was conditioned on (everything before the answer)."""
    ids = list(engine.session_history(session_id))
    after_answer = len(result.token_ids) + (0 if result.finish_reason == "stop" else 1)
    return ids[: len(ids) - after_answer]


def held_tensors(monkeypatch):
    """Weak references to the image features (generation.encode_images) and the KV caches
    (generation.new_cache) the engine makes from now on, oldest first: a test can watch them be freed."""
    features, caches = [], []
    encode_images, new_cache = generation.encode_images, generation.new_cache

    def encoded(loaded, images):
        out = encode_images(loaded, images)
        features.extend(weakref.ref(f) for f in out)
        return out

    def made(loaded):
        cache = new_cache(loaded)
        caches.append(weakref.ref(cache))
        return cache

    monkeypatch.setattr(generation, "encode_images", encoded)
    monkeypatch.setattr(generation, "new_cache", made)
    return features, caches


@pytest.fixture
def vision_calls(loaded_tiny):
    calls = []
    handle = loaded_tiny.model.model.vision_tower.register_forward_hook(
        lambda module, args, out: calls.append(args[0].shape[0])
    )
    yield calls
    handle.remove()


def test_every_turn_equals_a_stateless_run_over_the_full_history(loaded_tiny, images):
    engine = make_engine(loaded_tiny)
    for image in images:
        session = engine.open_session([image])
        for question in QUESTIONS:
            result = engine.turn(session.session_id, question, GREEDY)
            history = prompt_ids_of_last_turn(engine, session.session_id, result)
            assert list(result.token_ids) == stateless_answer(loaded_tiny, history, [image], 10)


def test_followup_turns_reuse_the_kv_cache_and_never_rerun_the_vision_tower(loaded_tiny, images, vision_calls):
    engine = make_engine(loaded_tiny)
    session = engine.open_session(images)
    assert vision_calls == [2]  # one batched run for the two images at open
    first = engine.turn(session.session_id, QUESTIONS[0], GREEDY)
    assert first.cached_tokens == 0
    prefill_after_first = engine.counters.prefill_tokens
    second = engine.turn(session.session_id, QUESTIONS[1], GREEDY)
    assert vision_calls == [2]
    assert engine.counters.vision_tower_runs == 1
    assert engine.counters.images_encoded == 2
    # Cached: the first turn's prompt and all but the last generated token.
    assert second.cached_tokens == first.prompt_tokens + first.completion_tokens - 1
    assert second.prompt_tokens > second.cached_tokens
    # The second turn prefilled only what the cache lacked.
    assert engine.counters.prefill_tokens - prefill_after_first == second.prompt_tokens - second.cached_tokens
    assert first.prompt_tokens >= 2 * loaded_tiny.fixed_image_tokens


def test_images_sent_in_a_later_turn_are_encoded_once_and_used(loaded_tiny, images, vision_calls):
    engine = make_engine(loaded_tiny)
    session = engine.open_session([images[0]])
    engine.turn(session.session_id, QUESTIONS[0], GREEDY)
    result = engine.turn(session.session_id, "Compare with this one", GREEDY, images=[images[1]])
    assert vision_calls == [1, 1]
    history = prompt_ids_of_last_turn(engine, session.session_id, result)
    assert history.count(loaded_tiny.image_token_id) == 2 * loaded_tiny.fixed_image_tokens
    engine.turn(session.session_id, QUESTIONS[1], GREEDY)
    assert vision_calls == [1, 1]
    assert list(result.token_ids) == stateless_answer(loaded_tiny, history, images, 10)


def test_sessions_do_not_disturb_each_other(loaded_tiny, images):
    engine = make_engine(loaded_tiny)
    alone = make_engine(loaded_tiny)
    solo = alone.open_session([images[0]])
    expected = [alone.turn(solo.session_id, q, GREEDY).token_ids for q in QUESTIONS[:3]]
    a = engine.open_session([images[0]])
    b = engine.open_session([images[1]])
    answers = []
    for question in QUESTIONS[:3]:
        answers.append(engine.turn(a.session_id, question, GREEDY).token_ids)
        engine.turn(b.session_id, question, GREEDY)
    assert answers == expected


def test_the_model_never_generates_the_image_placeholder(loaded_tiny):
    """With this image the random tiny model's first greedy answer would contain <image>
    (found by search); an answer must never add a placeholder that has no features."""
    from tests.conftest import noise_image

    image = noise_image(2)
    engine = make_engine(loaded_tiny)
    session = engine.open_session([image])
    for question in QUESTIONS:
        result = engine.turn(session.session_id, question, GREEDY)
        assert loaded_tiny.image_token_id not in result.token_ids
        history = prompt_ids_of_last_turn(engine, session.session_id, result)
        assert list(result.token_ids) == stateless_answer(loaded_tiny, history, [image], 10)


def test_session_ids_are_random_and_sagemaker_shaped(loaded_tiny):
    engine = make_engine(loaded_tiny, max_sessions_per_worker=200)
    ids = {engine.open_session([]).session_id for _ in range(200)}
    assert len(ids) == 200
    assert all(is_valid_session_id(i) and len(i) >= 32 for i in ids)


def test_close_frees_features_and_kv(loaded_tiny, images, monkeypatch):
    engine = make_engine(loaded_tiny)
    features, caches = held_tensors(monkeypatch)
    session = engine.open_session(images)
    engine.turn(session.session_id, QUESTIONS[0], GREEDY)
    assert len(features) == 2 and len(caches) == 1  # the session's features and its one cache
    feature_ref, cache_ref = features[0], caches[0]
    key_ref = weakref.ref(cache_ref().layers[0].keys)
    assert engine.bytes_held() > 0
    view = engine.snapshot().sessions[session.session_id]
    assert view.images == 2 and view.kv_bytes > 0 and view.kv_tokens > 0
    engine.close_session(session.session_id)
    gc.collect()
    assert engine.bytes_held() == 0 and engine.session_count() == 0
    assert feature_ref() is None and key_ref() is None and cache_ref() is None
    assert engine.counters.sessions_closed == 1
    with pytest.raises(SessionNotFound):
        engine.turn(session.session_id, QUESTIONS[1], GREEDY)
    with pytest.raises(SessionNotFound):
        engine.close_session(session.session_id)


def test_expired_sessions_are_freed_without_being_named_again(loaded_tiny, images, monkeypatch):
    clock = FakeClock()
    engine = make_engine(loaded_tiny, clock=clock, session_ttl_s=60)
    features, _caches = held_tensors(monkeypatch)
    old = engine.open_session([images[0]])
    assert old.expires_at == clock.now + 60
    engine.turn(old.session_id, QUESTIONS[0], GREEDY)
    clock.now += 30
    young = engine.open_session([images[1]])
    feature_ref = features[0]  # old's image (young's is features[1])
    assert feature_ref() is not None
    clock.now += 30  # old is now exactly at its expiry
    assert engine.sweep_expired() == 1
    gc.collect()
    assert feature_ref() is None
    assert engine.has_session(young.session_id) and not engine.has_session(old.session_id)
    assert engine.counters.sessions_expired == 1
    with pytest.raises(SessionNotFound):
        engine.turn(old.session_id, QUESTIONS[1], GREEDY)
    engine.turn(young.session_id, QUESTIONS[0], GREEDY)


def test_background_sweeper_frees_expired_sessions(loaded_tiny):
    clock = FakeClock()
    engine = make_engine(loaded_tiny, clock=clock, session_ttl_s=1)
    engine.open_session([])
    clock.now += 5
    engine.start_expiry_sweeper(interval_s=0.01)
    try:
        for _ in range(500):
            if engine.session_count() == 0:
                break
            time.sleep(0.01)
        assert engine.session_count() == 0
    finally:
        engine.stop()


def test_full_worker_refuses_new_sessions_until_one_closes(loaded_tiny):
    engine = make_engine(loaded_tiny, max_sessions_per_worker=2)
    first = engine.open_session([])
    engine.open_session([])
    with pytest.raises(TooManySessions):
        engine.open_session([])
    engine.close_session(first.session_id)
    engine.open_session([])


def test_a_full_worker_still_opens_a_session_for_one_answer(loaded_tiny):
    engine = make_engine(loaded_tiny, max_sessions_per_worker=1)
    kept = engine.open_session([])
    with pytest.raises(TooManySessions):
        engine.open_session([])
    transient = engine.open_session([], transient=True)  # a one-shot's: it keeps nothing after its answer
    assert engine.turn(transient.session_id, "hello", GREEDY).completion_tokens > 0
    engine.close_session(transient.session_id)
    assert engine.session_count() == 1 and engine.has_session(kept.session_id)
    with pytest.raises(TooManySessions):
        engine.open_session([])


def test_limits_are_client_errors_that_leave_the_session_intact(loaded_tiny, images):
    engine = make_engine(loaded_tiny, max_images_per_session=2)
    reference = make_engine(loaded_tiny)
    session = engine.open_session([images[0]])
    twin = reference.open_session([images[0]])
    with pytest.raises(TooManyImages):
        engine.open_session(images * 2)
    with pytest.raises(TooManyImages):
        engine.turn(session.session_id, "two more", GREEDY, images=images)
    with pytest.raises(PromptTooLong):
        engine.turn(session.session_id, "word " * (loaded_tiny.max_context + 10), GREEDY)
    with pytest.raises(InvalidRequest):
        engine.turn(session.session_id, "sneaky <image> token", GREEDY)
    assert (
        engine.turn(session.session_id, QUESTIONS[0], GREEDY).token_ids
        == reference.turn(twin.session_id, QUESTIONS[0], GREEDY).token_ids
    )


def test_a_turn_that_fails_midway_leaves_the_session_as_it_was(loaded_tiny, images):
    engine = make_engine(loaded_tiny)
    reference = make_engine(loaded_tiny)
    session = engine.open_session([images[0]])
    twin = reference.open_session([images[0]])
    engine.turn(session.session_id, QUESTIONS[0], GREEDY)
    reference.turn(twin.session_id, QUESTIONS[0], GREEDY)

    def explode(token, _last):
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        engine.turn(session.session_id, QUESTIONS[1], GREEDY, images=[images[1]], on_token=explode)
    after = engine.turn(session.session_id, QUESTIONS[1], GREEDY)
    assert after.token_ids == reference.turn(twin.session_id, QUESTIONS[1], GREEDY).token_ids
    assert after.cached_tokens == 0  # the KV was dropped and rebuilt from the kept features


def test_max_new_tokens_ends_the_turn_with_eos_in_history(loaded_tiny):
    engine = make_engine(loaded_tiny)
    session = engine.open_session([])
    result = engine.turn(session.session_id, QUESTIONS[0], SamplingParams(max_new_tokens=3))
    assert result.completion_tokens == 3
    ids = engine.session_history(session.session_id)
    assert ids[-1] in loaded_tiny.eos_token_ids


def test_sampling_is_reproducible_only_where_asked(loaded_tiny):
    engine = make_engine(loaded_tiny)
    session = engine.open_session([])
    params = SamplingParams(max_new_tokens=8, temperature=1.5, top_p=0.9)
    torch.manual_seed(0)
    first = engine.turn(session.session_id, QUESTIONS[0], params)
    assert first.completion_tokens >= 1
    greedy = SamplingParams(max_new_tokens=8)
    a = engine.open_session([])
    b = engine.open_session([])
    assert engine.turn(a.session_id, "hi", greedy).token_ids == engine.turn(b.session_id, "hi", greedy).token_ids
