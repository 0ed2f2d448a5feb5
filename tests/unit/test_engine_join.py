"""Turns that join a running ``SessionEngine.turns`` call (api.Joiners): a request that arrives
while a call decodes starts at the next step's end instead of after the whole call.

A joined turn answers exactly as it would alone (greedy, token for token), its outcome comes
through its ``on_done``; one the call cannot take goes back untouched through ``declined``.
"""

from __future__ import annotations

import pytest

from llava_sessions.config import ServingConfig
from llava_sessions.errors import SessionNotFound
from llava_sessions.handler.engine import runner
from llava_sessions.handler.engine.engine import SessionEngine, TurnRequest, TurnResult
from llava_sessions.handler.engine.generation import SamplingParams
from tests.unit.test_engine import QUESTIONS, make_engine
from tests.unit.test_engine_batch import assert_same_answer, assert_same_turn
from tests.unit.test_engine_memory import check_accounting

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Arrivals:
    """api.Joiners: ``schedule`` maps the how-manieth ``arrivals`` call to the requests it gives."""

    def __init__(self, schedule: dict[int, list[TurnRequest]]):
        self.schedule = dict(schedule)
        self.polls = 0
        self.declined_requests: list[TurnRequest] = []

    def arrivals(self) -> list[TurnRequest]:
        self.polls += 1
        return self.schedule.pop(self.polls, [])

    def declined(self, request: TurnRequest) -> None:
        self.declined_requests.append(request)


def told(outcomes: dict, key):
    """An on_done that files the outcome under ``key``, and checks it is told once."""

    def on_done(outcome):
        assert key not in outcomes, f"{key} told twice"
        outcomes[key] = outcome

    return on_done


def twin_pairs(engine, twin, images, n):
    return [(engine.open_session([images[i % 2]]).session_id, twin.open_session([images[i % 2]]).session_id)
            for i in range(n)]


@pytest.mark.parametrize("compile", ["off", "on", "kept"])
def test_joined_turns_answer_as_they_would_alone(loaded_tiny, images, compile, monkeypatch):
    """A long host turn; three follow-ups join after its first step, two more later (compiled,
    the arena then has free rows; eager, it is rebuilt), each group prefilled in one forward in
    its arena rows: every answer equals the twin's turn run alone, and the host's answer is unchanged.
    "kept": compiled in the engine's kept arena (as with CUDA graphs), whose free rows take both groups. Compiled, joining compiles nothing past the row buckets."""
    taken_in, prefilled_in = [], []
    admit, prefill = runner.DecodeArena.admit, runner.DecodeArena.prefill
    monkeypatch.setattr(runner.DecodeArena, "admit", lambda arena, *a: taken_in.append(admit(arena, *a)) or taken_in[-1])
    monkeypatch.setattr(runner.DecodeArena, "prefill", lambda arena, feeds: prefilled_in.append(len(feeds)) or prefill(arena, feeds))
    config = dict(compile="on" if compile == "kept" else compile, compile_warmup_s=0)
    engine = SessionEngine(loaded_tiny, ServingConfig(**config), keep_arena=compile == "kept")
    twin = make_engine(loaded_tiny)
    pairs = twin_pairs(engine, twin, images, 6)
    # A first turn for each: the joined ones are follow-ups on a cached history.
    for sid, twin_sid in pairs:
        assert_same_turn(engine.turn(sid, QUESTIONS[0], SamplingParams(2)), twin.turn(twin_sid, QUESTIONS[0], SamplingParams(2)))
    outcomes: dict = {}
    max_new = [14, 6, 1, 9, 4, 7]
    requests = [TurnRequest(sid, QUESTIONS[(i + 1) % len(QUESTIONS)], SamplingParams(max_new[i]),
                            on_done=told(outcomes, i) if i else None)
                for i, (sid, _) in enumerate(pairs)]
    arrivals = Arrivals({1: requests[1:4], 4: requests[4:]})
    compiles = engine.counters.step_compiles
    [host] = engine.turns(requests[:1], arrivals)
    assert arrivals.declined_requests == [] and set(outcomes) == {1, 2, 3, 4, 5}
    for i, (request, (_, twin_sid)) in enumerate(zip(requests, pairs)):
        got = host if i == 0 else outcomes[i]
        assert isinstance(got, TurnResult), got
        assert_same_answer(got, twin.turn(twin_sid, request.prompt, request.params))
    assert engine.counters.turns_joined == 5 and engine.counters.joins_declined == 0
    assert taken_in == {"off": [False, False], "on": [True], "kept": [True, True]}[compile]
    assert prefilled_in == [3, 2]  # each group of joiners in one forward, in its arena rows
    if compile != "off":
        assert engine.compiled
        assert engine.counters.step_compiles - compiles <= len(runner.ROW_BUCKETS[:4]) + 1  # buckets and the prefill
    check_accounting(engine)
    # The sessions go on as usual afterwards.
    for sid, twin_sid in pairs[:2]:
        assert_same_turn(engine.turn(sid, QUESTIONS[2], SamplingParams(3)), twin.turn(twin_sid, QUESTIONS[2], SamplingParams(3)))


def test_a_turn_that_cannot_join_is_declined_untouched(loaded_tiny, images):
    """A second turn of a session in the call, and turns past the rows a step decodes, go back
    through ``declined``: never told, their sessions as before. A turn that fails its own checks
    (an unknown session) is taken and told its error."""
    engine = make_engine(loaded_tiny)
    sids = [engine.open_session([images[0]]).session_id for _ in range(runner.KEPT_ARENA_ROWS + 1)]
    outcomes: dict = {}
    host = TurnRequest(sids[0], QUESTIONS[0], SamplingParams(12))
    same_session = TurnRequest(sids[0], QUESTIONS[1], SamplingParams(3), on_done=told(outcomes, "same"))
    others = [TurnRequest(sid, QUESTIONS[1], SamplingParams(8), on_done=told(outcomes, i))
              for i, sid in enumerate(sids[1:])]
    unknown = TurnRequest("no-such-session", QUESTIONS[1], SamplingParams(3), on_done=told(outcomes, "unknown"))
    arrivals = Arrivals({1: [same_session, unknown, *others]})
    histories = {sid: engine.session_history(sid) for sid in sids}
    [result] = engine.turns([host], arrivals)
    assert isinstance(result, TurnResult)
    # The host and KEPT_ARENA_ROWS - 1 joiners decode; the last joiner has no row.
    assert arrivals.declined_requests == [same_session, others[-1]]
    assert isinstance(outcomes.pop("unknown"), SessionNotFound)
    assert sorted(outcomes) == list(range(runner.KEPT_ARENA_ROWS - 1))
    assert all(isinstance(outcome, TurnResult) for outcome in outcomes.values())
    assert engine.session_history(sids[-1]) == histories[sids[-1]]
    assert engine.counters.joins_declined == 2
    check_accounting(engine)


def test_nothing_joins_a_call_whose_turns_do_not_decode(loaded_tiny, images):
    """Turns of one token end at their prefill: there is no step's end to join at."""
    engine = make_engine(loaded_tiny)
    sid, other = (engine.open_session([images[0]]).session_id for _ in range(2))
    arrivals = Arrivals({1: [TurnRequest(other, QUESTIONS[0], SamplingParams(3))]})
    engine.turns([TurnRequest(sid, QUESTIONS[0], SamplingParams(1))], arrivals)
    assert arrivals.polls == 0 and engine.counters.turns_joined == 0


def test_a_failed_prefill_in_the_arena_falls_back_to_one_turn_at_a_time(loaded_tiny, images, monkeypatch):
    """Follow-ups join with their history and prefill in their arena rows, in one forward; when
    that forward fails, they leave the arena with their history and prefill one at a time: every
    answer, and what each turn found cached, as alone."""
    engine, twin = make_engine(loaded_tiny), make_engine(loaded_tiny)
    pairs = twin_pairs(engine, twin, images, 3)
    for sid, twin_sid in pairs:
        engine.turn(sid, QUESTIONS[0], SamplingParams(2))
        twin.turn(twin_sid, QUESTIONS[0], SamplingParams(2))
    failures = []

    def out_of_memory(arena, feeds):
        failures.append(list(feeds))
        raise RuntimeError("CPU out of memory (a test's)")

    monkeypatch.setattr(runner.DecodeArena, "prefill", out_of_memory)
    outcomes: dict = {}
    arrivals = Arrivals({1: [TurnRequest(sid, QUESTIONS[1], SamplingParams(5), on_done=told(outcomes, sid))
                             for sid, _ in pairs[1:]]})
    [host] = engine.turns([TurnRequest(pairs[0][0], QUESTIONS[1], SamplingParams(10))], arrivals)
    assert len(failures) == 1 and len(failures[0]) == 2  # the two joiners, once
    assert_same_turn(host, twin.turn(pairs[0][1], QUESTIONS[1], SamplingParams(10)))
    for sid, twin_sid in pairs[1:]:
        assert_same_turn(outcomes[sid], twin.turn(twin_sid, QUESTIONS[1], SamplingParams(5)))
    assert engine.counters.turns_joined == 2
    check_accounting(engine)
