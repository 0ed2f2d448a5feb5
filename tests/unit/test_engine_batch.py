"""Turns of different sessions run together (SessionEngine.turns): batched decoding, same answers.

Every greedy answer must be token for token the answer of the same turn run alone (a twin
engine, one turn at a time) and of a stateless run over the full history; counters, memory
accounting and the budget behave as with sequential turns.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter

import pytest
import torch

from llava_sessions.errors import (
    InvalidRequest,
    PromptTooLong,
    SessionBusy,
    SessionNotFound,
    TooManyImages,
)
from llava_sessions.handler.engine import executor as executor_module, runner
from llava_sessions.handler.engine.engine import TurnRequest, TurnResult
from llava_sessions.handler.engine.generation import SamplingParams
from llava_sessions.handler.engine.prompt import Conversation
from tests.unit.test_engine import QUESTIONS, make_engine, prompt_ids_of_last_turn, stateless_answer
from tests.unit.test_engine_memory import FEATURES, KV_TOKEN, budgeted, check_accounting, measured
from tests.unit.test_streaming import SESSION, batch, open_session, parse_events, turn  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_NEW = [1, 3, 5, 8, 10, 12, 16]


@pytest.fixture
def batch_sizes(monkeypatch):
    """Live rows of every decode step the engine runs together (runner.DecodeArena.step)."""
    sizes = []
    step = runner.DecodeArena.step

    def record(arena, tokens):
        sizes.append(len(tokens))
        return step(arena, tokens)

    monkeypatch.setattr(runner.DecodeArena, "step", record)
    return sizes


def test_follow_ups_of_several_sessions_share_one_prefill_forward(loaded_tiny, images, monkeypatch):
    """Round 1 (images) prefills one by one; the follow-ups of round 2 go into an arena with their
    history and prefill there in one forward (one a turn of a single token, which leaves at once);
    every answer, and what each turn found cached, as alone."""
    calls = []
    prefill = runner.DecodeArena.prefill
    monkeypatch.setattr(runner.DecodeArena, "prefill", lambda arena, feeds: calls.append(len(feeds)) or prefill(arena, feeds))
    engine, twin = make_engine(loaded_tiny), make_engine(loaded_tiny)
    pairs = open_pairs(engine, twin, images, 4)
    for round_ in range(2):
        requests = [TurnRequest(sid, prompt_for(i, round_), SamplingParams(1 if i == 2 else 6))
                    for i, (sid, _, _) in enumerate(pairs)]
        for request, result, (_, twin_sid, _) in zip(requests, engine.turns(requests), pairs):
            assert_same_turn(result, twin.turn(twin_sid, request.prompt, request.params))
    # First turns have no cached history (or bring their images): each prefills alone.
    assert calls == [4]
    assert engine.counters.prefill_tokens == twin.counters.prefill_tokens
    check_accounting(engine)


def test_a_failed_shared_prefill_falls_back_to_one_turn_at_a_time(loaded_tiny, images, monkeypatch):
    """The shared forward fails: the turns leave the arena with their history and prefill one at a
    time on it; every answer, and what each turn found cached, as alone."""

    def failing(arena, feeds):
        raise RuntimeError("the shared forward failed")

    engine, twin = make_engine(loaded_tiny), make_engine(loaded_tiny)
    pairs = open_pairs(engine, twin, images, 3)
    for round_ in range(2):
        if round_ == 1:
            monkeypatch.setattr(runner.DecodeArena, "prefill", failing)
        requests = [TurnRequest(sid, prompt_for(i, round_), SamplingParams(4)) for i, (sid, _, _) in enumerate(pairs)]
        for request, result, (_, twin_sid, _) in zip(requests, engine.turns(requests), pairs):
            assert_same_turn(result, twin.turn(twin_sid, request.prompt, request.params))
    check_accounting(engine)


def open_pairs(engine, twin, images, n):
    """n sessions in both engines, with 0, 1 or 2 images so their histories differ in length."""
    pairs = []
    for i in range(n):
        pics = [images[i % 2], images[(i + 1) % 2]][: i % 3]
        pairs.append((engine.open_session(pics).session_id, twin.open_session(pics).session_id, pics))
    return pairs


def prompt_for(i, round_):
    return QUESTIONS[(i + round_) % len(QUESTIONS)] + " and more" * (i % 4)


def assert_same_answer(got: TurnResult, expected: TurnResult):
    assert got.token_ids == expected.token_ids
    assert (got.text, got.finish_reason, got.prompt_tokens, got.completion_tokens) == (
        expected.text, expected.finish_reason, expected.prompt_tokens, expected.completion_tokens,
    )


def assert_same_turn(got: TurnResult, expected: TurnResult):
    assert_same_answer(got, expected)
    assert got.cached_tokens == expected.cached_tokens


def reference(loaded, engine, session_id, result, images):
    """The stateless answer, cut at the first token in the engine's eos set (greedy is prefix-determined)."""
    history = prompt_ids_of_last_turn(engine, session_id, result)
    assert loaded.image_token_id not in result.token_ids  # the placeholder is never generated
    assert history.count(loaded.image_token_id) == len(images) * loaded.fixed_image_tokens
    answer = stateless_answer(loaded, history, images, len(result.token_ids))
    for i, token in enumerate(answer):
        if token in engine.loaded.eos_token_ids:
            return answer[: i + 1]
    return answer


def kv_tokens(engine, session_id: str) -> int:
    return engine.snapshot().sessions[session_id].kv_tokens


def run_rounds(loaded, images, rounds=3, n=7, batch_sizes=None):
    engine, twin = make_engine(loaded), make_engine(loaded)
    pairs = open_pairs(engine, twin, images, n)
    finishes = Counter()
    for round_ in range(rounds):
        requests = [
            TurnRequest(sid, prompt_for(i, round_), SamplingParams(MAX_NEW[(i + round_) % len(MAX_NEW)]))
            for i, (sid, _, _) in enumerate(pairs)
        ]
        results = engine.turns(requests)
        for request, result, (sid, twin_sid, pics) in zip(requests, results, pairs):
            assert isinstance(result, TurnResult), result
            assert_same_turn(result, twin.turn(twin_sid, request.prompt, request.params))
            assert list(result.token_ids) == reference(loaded, engine, sid, result, pics)
            finishes["stateless checks"] += 1
            finishes[result.finish_reason] += 1
    for name in ("prefill_tokens", "decode_tokens", "vision_tower_runs", "images_encoded"):
        assert getattr(engine.counters, name) == getattr(twin.counters, name), name
    check_accounting(engine)
    # The same KV, written back unpadded (the spare slots after a turn depend on the path).
    assert [kv_tokens(engine, sid) for sid, _, _ in pairs] == [kv_tokens(twin, sid) for _, sid, _ in pairs]
    assert finishes["stateless checks"] >= rounds * n * 2 // 3, finishes
    return finishes


def test_batched_turns_equal_sequential_turns_and_the_stateless_reference(loaded_tiny, images, batch_sizes):
    run_rounds(loaded_tiny, images)
    # Each round one turn asks for a single token (done at its prefill); the other six decode
    # together, and rows leave as they finish until the longest decodes alone.
    assert max(batch_sizes) == 6 and 1 in batch_sizes


def test_rows_that_stop_at_eos_leave_the_batch_and_the_others_go_on(loaded_tiny, images):
    # The tiny random model rarely picks its eos; make tokens it often picks eos tokens too.
    dry = make_engine(loaded_tiny)
    picked = Counter()
    for sid, _, _ in open_pairs(dry, make_engine(loaded_tiny), images, 7):
        picked.update(dry.turn(sid, QUESTIONS[0], SamplingParams(16)).token_ids[1:])
    frequent = {token for token, _ in picked.most_common(8)}
    loaded = dataclasses.replace(loaded_tiny, eos_token_ids=loaded_tiny.eos_token_ids | frequent)
    finishes = run_rounds(loaded, images)
    assert finishes["stop"] >= 3 and finishes["length"] >= 3, finishes


def test_several_batch_shapes(loaded_tiny, images):
    for n in (1, 2, 9):
        run_rounds(loaded_tiny, images, rounds=2, n=n)


def test_sampled_rows_do_not_change_greedy_rows(loaded_tiny, images):
    engine, twin = make_engine(loaded_tiny), make_engine(loaded_tiny)
    pairs = open_pairs(engine, twin, images, 6)
    sampled = SamplingParams(max_new_tokens=9, temperature=1.3, top_p=0.9)
    torch.manual_seed(0)
    for round_ in range(2):
        requests = [
            TurnRequest(sid, prompt_for(i, round_), sampled if i % 2 else SamplingParams(MAX_NEW[i]))
            for i, (sid, _, _) in enumerate(pairs)
        ]
        results = engine.turns(requests)
        for i, (request, result, (sid, _, pics)) in enumerate(zip(requests, results, pairs)):
            assert 1 <= result.completion_tokens <= request.params.max_new_tokens
            # Sampled rows' histories differ from any twin; greedy rows answer as the stateless run does.
            if not i % 2:
                assert list(result.token_ids) == reference(loaded_tiny, engine, sid, result, pics)
    # A greedy turn after sampled ones is still exact over whatever history the session has.
    results = engine.turns([TurnRequest(sid, "Why?", SamplingParams(10)) for sid, _, _ in pairs])
    for result, (sid, _, pics) in zip(results, pairs):
        assert list(result.token_ids) == reference(loaded_tiny, engine, sid, result, pics)
    check_accounting(engine)


def test_a_failing_request_fails_alone(loaded_tiny, images):
    engine = make_engine(loaded_tiny, max_images_per_session=2)
    twin = make_engine(loaded_tiny, max_images_per_session=2)
    pairs = open_pairs(engine, twin, images, 6)
    (a, ta, _), (b, tb, _), (c, tc, _), (d, td, _), (e, te, _), (f, tf, _) = pairs
    for sid, twin_sid in ((e, te), (f, tf)):  # some history first
        engine.turn(sid, QUESTIONS[0], SamplingParams(6))
        twin.turn(twin_sid, QUESTIONS[0], SamplingParams(6))
    calls = []

    def explode_on_the_third(token, _last):
        calls.append(token)
        if len(calls) == 3:
            raise RuntimeError("client went away")

    greedy = SamplingParams(10)
    requests = [
        TurnRequest(a, QUESTIONS[1], greedy),
        TurnRequest("no-such-session", QUESTIONS[1], greedy),
        TurnRequest(b, "three images", greedy, images=tuple(images * 2)),
        TurnRequest(c, "word " * (loaded_tiny.max_context + 10), greedy),
        TurnRequest(d, "sneaky <image> token", greedy),
        TurnRequest(e, QUESTIONS[2], greedy, images=(images[1],), on_token=explode_on_the_third),
        TurnRequest(a, QUESTIONS[2], greedy),  # a second turn of a: refused
        TurnRequest(f, QUESTIONS[2], greedy),
    ]
    results = engine.turns(requests)
    expected_errors = {1: SessionNotFound, 2: TooManyImages, 3: PromptTooLong, 4: InvalidRequest,
                       5: RuntimeError, 6: SessionBusy}
    for slot, kind in expected_errors.items():
        assert isinstance(results[slot], kind), (slot, results[slot])
    assert len(calls) == 3
    assert_same_turn(results[0], twin.turn(ta, QUESTIONS[1], greedy))
    assert_same_turn(results[7], twin.turn(tf, QUESTIONS[2], greedy))
    snapshot = engine.snapshot()
    assert snapshot.reserved == 0 and not any(view.busy for view in snapshot.sessions.values())
    check_accounting(engine)
    # Every session is as before its failed turn: the next turns answer like the twin's.
    retry = engine.turns([
        TurnRequest(sid, QUESTIONS[3], greedy) for sid in (a, b, c, d, e, f)
    ])
    for result, twin_sid, sid in zip(retry, (ta, tb, tc, td, te, tf), (a, b, c, d, e, f)):
        expected = twin.turn(twin_sid, QUESTIONS[3], greedy)
        (assert_same_answer if sid == e else assert_same_turn)(result, expected)
    assert retry[4].cached_tokens == 0  # e's KV was dropped with its failed turn and rebuilt
    assert retry[0].cached_tokens > 0 and retry[5].cached_tokens > 0
    assert engine.counters.images_encoded == twin.counters.images_encoded + 1  # e's image, then removed


def test_a_second_turn_of_the_same_session_in_one_call_is_busy(loaded_tiny, images):
    engine, twin = make_engine(loaded_tiny), make_engine(loaded_tiny)
    [(sid, twin_sid, _)] = open_pairs(engine, twin, images, 2)[1:]
    first, second = engine.turns([TurnRequest(sid, QUESTIONS[0], SamplingParams(8)),
                                  TurnRequest(sid, QUESTIONS[1], SamplingParams(8))])
    assert isinstance(second, SessionBusy)
    assert_same_turn(first, twin.turn(twin_sid, QUESTIONS[0], SamplingParams(8)))
    assert_same_turn(engine.turn(sid, QUESTIONS[1], SamplingParams(8)),
                     twin.turn(twin_sid, QUESTIONS[1], SamplingParams(8)))


def test_streaming_callbacks_come_in_order_per_row_and_interleave(loaded_tiny):
    engine = make_engine(loaded_tiny)
    sids = [engine.open_session([]).session_id for _ in range(4)]
    log = []
    requests = [
        TurnRequest(sid, prompt_for(i, 0), SamplingParams(6 + i), on_token=lambda t, _last, i=i: log.append((i, t)))
        for i, sid in enumerate(sids)
    ]
    answers = [result.token_ids for result in engine.turns(requests)]
    # Each prefill's first token in row order, then one token per unfinished row per step.
    expected = [(i, answer[0]) for i, answer in enumerate(answers)]
    for step in range(1, max(map(len, answers))):
        expected += [(i, answer[step]) for i, answer in enumerate(answers) if len(answer) > step]
    assert log == expected
    assert max(map(len, answers)) > 1 and [row for row, _ in log] != sorted(row for row, _ in log)


def sizes_of_views(monkeypatch):
    """Rows of each decode arena the engine builds, and 1 for each turn decoded alone."""
    sizes = []

    class Spy(runner.DecodeArena):
        def __init__(self, loaded, rows, *args, **kwargs):
            sizes.append(len(rows))
            super().__init__(loaded, rows, *args, **kwargs)

    class Alone(executor_module.AloneDecoder):
        def __init__(self, executor, rows):
            sizes.extend(1 for _ in rows)
            super().__init__(executor, rows)

    monkeypatch.setattr(executor_module, "DecodeArena", Spy)
    monkeypatch.setattr(executor_module, "AloneDecoder", Alone)
    return sizes


@pytest.mark.parametrize("pad_fits", [True, False])
def test_the_batch_padding_is_reserved_or_rows_decode_alone(loaded_tiny, images, monkeypatch, pad_fits):
    probe = make_engine(loaded_tiny)
    short, long = QUESTIONS[3], QUESTIONS[4]
    one_image = [loaded_tiny.fixed_image_tokens]
    contexts = [len(probe.formatter.user_turn_ids(Conversation(), q, one_image)) for q in (short, long)]
    new = 10
    reservations = sum(c + new for c in contexts) * KV_TOKEN
    # The arena, reserved whole (one token of each turn was picked at its prefill).
    pad = runner.arena_bytes(loaded_tiny, contexts, [new - 1, new - 1], bucketed=False)
    assert pad > 0
    budget = 2 * FEATURES + reservations + pad - (0 if pad_fits else 1)
    engine = budgeted(loaded_tiny, budget=budget, host_budget=0)
    twin = make_engine(loaded_tiny)
    sids = [engine.open_session([images[0]]).session_id for _ in range(2)]
    tids = [twin.open_session([images[0]]).session_id for _ in range(2)]
    sizes = sizes_of_views(monkeypatch)
    seen = []

    def within_budget(_token, _last):
        snapshot = engine.snapshot()
        tiers = measured(snapshot)
        held = tiers["device_kv"] + tiers["device_features"] + snapshot.batch_view_bytes
        seen.append(held)
        assert held <= budget

    results = engine.turns([
        TurnRequest(sid, q, SamplingParams(new), on_token=within_budget) for sid, q in zip(sids, (short, long))
    ])
    views = list(sizes)
    for result, tid, q in zip(results, tids, (short, long)):
        assert_same_turn(result, twin.turn(tid, q, SamplingParams(new)))
    assert views == ([2] if pad_fits else [1, 1])
    assert engine.counters.memory_refusals == 0 and engine.counters.kv_dropped == 0
    check_accounting(engine)


@pytest.mark.parametrize("seed", [7, 2024])
def test_batches_under_a_tight_budget_answer_like_an_unconstrained_twin(loaded_tiny, images, monkeypatch, seed):
    rng = random.Random(seed)
    budget = 240 * KV_TOKEN  # tight enough to drop KV, room enough for some arenas
    engine = budgeted(loaded_tiny, budget=budget, host_budget=2 * FEATURES)
    twin = make_engine(loaded_tiny)
    sizes = sizes_of_views(monkeypatch)
    twin_of, turns_of = {}, {}

    def within_budget(_token, _last):
        snapshot = engine.snapshot()
        tiers = measured(snapshot)
        assert tiers["device_kv"] + tiers["device_features"] + snapshot.batch_view_bytes <= budget

    for _ in range(25):
        live = [s for s in twin_of if engine.has_session(s)]
        for gone in set(twin_of) - set(live):
            twin.close_session(twin_of.pop(gone))
        while len(live) < 5:
            pics = [images[rng.randrange(2)]] if rng.random() < 0.7 else []
            sid = engine.open_session(pics).session_id
            twin_of[sid], turns_of[sid] = twin.open_session(pics).session_id, 0
            live.append(sid)
        chosen = [s for s in live if engine.has_session(s)]
        chosen = rng.sample(chosen, k=min(len(chosen), rng.randrange(2, 5)))
        requests = [
            TurnRequest(sid, QUESTIONS[turns_of[sid]], SamplingParams(rng.choice(MAX_NEW)), on_token=within_budget)
            for sid in chosen
        ]
        results = engine.turns(requests)
        for request, result in zip(requests, results):
            assert isinstance(result, TurnResult), result
            # A KV dropped under the budget changes cached_tokens, never the answer.
            assert_same_answer(result, twin.turn(twin_of[request.session_id], request.prompt, request.params))
            turns_of[request.session_id] += 1
            if turns_of[request.session_id] == 3:
                engine.close_session(request.session_id)
                twin.close_session(twin_of.pop(request.session_id))
        check_accounting(engine)
    c = engine.counters
    assert c.memory_refusals == 0
    assert c.kv_dropped > 0 and max(sizes) > 1
    assert c.turns_deferred > 0  # some requests waited for a later wave rather than being refused


# --- the adapter: a TorchServe batch's turns run in one engine call ---------------------


def test_a_torchserve_batch_runs_its_turns_together(handler, images, monkeypatch):  # noqa: F811
    sids = [open_session(handler, images[i % 2]) for i in range(3)]
    twins = [open_session(handler, images[i % 2]) for i in range(3)]
    calls = []
    real_turns = handler.engine.turns

    def spy(requests, joiners=None):
        calls.append(len(requests))
        return real_turns(requests, joiners)

    monkeypatch.setattr(handler.engine, "turns", spy)
    outputs, context, socket = batch(handler, [
        (turn("What is this?"), {SESSION: sids[0]}),
        (turn("Describe it", stream=True), {SESSION: sids[1]}),
        (turn("hi"), {SESSION: "sess-unknown"}),
        ({"requestType": "NEW_SESSION"}, {}),
        (turn("And the colour?", max_new_tokens=5), {SESSION: sids[2]}),
        ({"requestType": "CLOSE"}, {SESSION: sids[0]}),  # after its session's turn
    ])
    # One engine call for the four turns: the close of sids[0] waited for that session's turn.
    assert calls == [4]
    assert [context.get_response_status(i)[0] for i in range(6)] == [200, 200, 404, 200, 200, 200]
    streamed = parse_events(outputs[1])[-1]["generated_text"]
    expected = []
    for twin, (body, _) in zip(twins, [(turn("What is this?"), None), (turn("Describe it"), None),
                                       (turn("And the colour?", max_new_tokens=5), None)]):
        [out], _, _ = batch(handler, [(body, {SESSION: twin})])
        expected.append(json.loads(out))
    assert json.loads(outputs[0]) == expected[0]
    assert streamed == expected[1]["generated_text"]
    assert json.loads(outputs[4]) == expected[2]
    assert not handler.engine.has_session(sids[0])


def test_the_handler_module_keeps_a_single_class_for_torchserve():
    """TorchServe loads the one class a handler module defines; a second one kills the worker."""
    import inspect

    from llava_sessions.handler import torchserve_handler

    classes = [c for _, c in inspect.getmembers(torchserve_handler, inspect.isclass)
               if c.__module__ == torchserve_handler.__name__]
    assert classes == [torchserve_handler.LlavaSessionHandler]


def test_a_turn_that_ends_before_the_others_is_told_its_outcome_then(loaded_tiny, images):
    """on_done: a short answer's outcome comes while a longer one still decodes, committed to its
    session and equal to what the call returns; the turn that ends last, and a lone turn, are not told."""
    engine = make_engine(loaded_tiny)
    short, long_, alone = (engine.open_session([images[0]]).session_id for _ in range(3))
    events: list[tuple[str, object]] = []

    def short_done(outcome):
        events.append(("short done", (outcome, engine.session_history(short))))

    requests = [
        TurnRequest(short, QUESTIONS[0], SamplingParams(2), on_done=short_done),
        TurnRequest(long_, QUESTIONS[1], SamplingParams(12),
                    on_token=lambda token, last: events.append(("long token", last)),
                    on_done=lambda outcome: events.append(("long done", outcome))),
    ]
    before = len(engine.session_history(short))
    results = engine.turns(requests)
    assert results[1].completion_tokens > results[0].completion_tokens  # the long answer goes on
    [at] = [i for i, (kind, _) in enumerate(events) if kind == "short done"]
    outcome, history = events[at][1]
    assert outcome == results[0] and len(history) > before  # committed when told
    assert history == engine.session_history(short)
    later = sum(1 for kind, _ in events[at:] if kind == "long token")
    assert later == results[1].completion_tokens - results[0].completion_tokens
    assert not any(kind == "long done" for kind, _ in events)
    told = []
    engine.turns([TurnRequest(alone, QUESTIONS[0], SamplingParams(3), on_done=told.append)])
    assert told == []
