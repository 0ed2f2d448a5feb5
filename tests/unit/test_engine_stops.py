"""Turns that stop early: a client that went away (undone), a deadline (kept as answered), and
sampling values at the edge of float32. Each is compared with a twin session that never asked."""

from __future__ import annotations

import time

import pytest

from llava_sessions.config import ServingConfig
from llava_sessions.errors import TurnCancelled
from llava_sessions.handler.engine.engine import SessionEngine, TurnRequest
from llava_sessions.handler.engine.generation import SamplingParams
from tests.fakes import GoneAfter

LONG = SamplingParams(max_new_tokens=24)
SHORT = SamplingParams(max_new_tokens=6)


def make_engine(loaded):
    return SessionEngine(loaded, ServingConfig(max_sessions_per_worker=16))


def twins(engine, images):
    """Two sessions with the same image and the same first turn."""
    ids = [engine.open_session(images[:1]).session_id for _ in range(2)]
    for sid in ids:
        engine.turn(sid, "What is in the image?", SHORT)
    return ids


def test_a_turn_whose_client_hung_up_is_not_kept(loaded_tiny, images):
    engine = make_engine(loaded_tiny)
    asked, twin = twins(engine, images)
    client = GoneAfter(3)
    decoded_before = engine.counters.decode_tokens
    [outcome] = engine.turns([TurnRequest(asked, "Describe it at length please", LONG,
                                          on_token=client.on_token, cancelled=client)])
    assert isinstance(outcome, TurnCancelled)
    # It stopped within a step of the hang-up, far short of its 24 tokens.
    assert client.received == 3 and engine.counters.decode_tokens - decoded_before <= 3
    assert engine.counters.turns_cancelled == 1
    # The next turn continues from the last delivered answer, as the twin's does.
    after = engine.turn(asked, "What colour is it?", SHORT)
    expected = engine.turn(twin, "What colour is it?", SHORT)
    assert after.token_ids == expected.token_ids
    assert after.prompt_tokens == expected.prompt_tokens
    # The history's KV was kept: only the new question was prefilled.
    assert after.cached_tokens >= expected.cached_tokens > 0


def test_a_turn_cancelled_before_it_starts_touches_nothing(loaded_tiny, images):
    engine = make_engine(loaded_tiny)
    asked, twin = twins(engine, images)
    prefilled = engine.counters.prefill_tokens
    bytes_before = engine.bytes_held()
    [outcome] = engine.turns([TurnRequest(asked, "Anything?", SHORT, images=tuple(images[1:]),
                                          cancelled=lambda: True)])
    assert isinstance(outcome, TurnCancelled)
    assert engine.counters.prefill_tokens == prefilled and engine.counters.images_encoded == 2
    assert engine.bytes_held() == bytes_before
    assert engine.turn(asked, "Why?", SHORT).token_ids == engine.turn(twin, "Why?", SHORT).token_ids


def test_a_hang_up_in_a_batch_stops_only_that_row(loaded_tiny, images):
    engine = make_engine(loaded_tiny)
    sessions = [engine.open_session(images[:1]).session_id for _ in range(3)]
    alone = make_engine(loaded_tiny)
    reference = [alone.open_session(images[:1]).session_id for _ in range(2)]
    client = GoneAfter(2)
    outcomes = engine.turns([
        TurnRequest(sessions[0], "What is in the image?", LONG),
        TurnRequest(sessions[1], "What is in the image?", LONG, on_token=client.on_token, cancelled=client),
        TurnRequest(sessions[2], "Is it dark?", LONG),
    ])
    assert isinstance(outcomes[1], TurnCancelled)
    assert outcomes[0].token_ids == alone.turn(reference[0], "What is in the image?", LONG).token_ids
    assert outcomes[2].token_ids == alone.turn(reference[1], "Is it dark?", LONG).token_ids
    # The undone row's session answers its next turn as a fresh one would.
    fresh = alone.open_session(images[:1]).session_id
    assert engine.turn(sessions[1], "Why?", SHORT).token_ids == alone.turn(fresh, "Why?", SHORT).token_ids


def test_a_turn_past_its_deadline_answers_what_it_has_and_keeps_exactly_that(loaded_tiny, images):
    engine = make_engine(loaded_tiny)
    cut, twin = twins(engine, images)
    [result] = engine.turns([TurnRequest(cut, "Describe it at length please", LONG,
                                         deadline=time.monotonic() - 1)])
    assert result.finish_reason == "deadline" and result.completion_tokens == 1
    assert engine.counters.turns_past_deadline == 1
    # The twin asked for exactly the one token the deadline left.
    one = engine.turn(twin, "Describe it at length please", SamplingParams(max_new_tokens=1))
    assert one.token_ids == result.token_ids and one.finish_reason == "length"
    after = engine.turn(cut, "Why?", SHORT)
    expected = engine.turn(twin, "Why?", SHORT)
    assert (after.token_ids, after.prompt_tokens) == (expected.token_ids, expected.prompt_tokens)


def test_a_deadline_in_the_future_changes_nothing(loaded_tiny, images):
    engine = make_engine(loaded_tiny)
    timed, twin = twins(engine, images)
    [result] = engine.turns([TurnRequest(timed, "Why?", LONG, deadline=time.monotonic() + 600)])
    assert result.finish_reason in ("stop", "length")
    assert result.token_ids == engine.turn(twin, "Why?", LONG).token_ids


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-6])
def test_temperatures_too_small_for_float32_pick_greedily(loaded_tiny, images, temperature):
    engine = make_engine(loaded_tiny)
    tiny, greedy = twins(engine, images)
    result = engine.turn(tiny, "Why?", SamplingParams(max_new_tokens=8, temperature=temperature))
    assert result.token_ids == engine.turn(greedy, "Why?", SamplingParams(max_new_tokens=8)).token_ids


def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token(loaded_tiny, images):
    engine = make_engine(loaded_tiny)
    nucleus, greedy = twins(engine, images)
    result = engine.turn(nucleus, "Why?", SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-300))
    assert result.token_ids == engine.turn(greedy, "Why?", SamplingParams(max_new_tokens=8)).token_ids
