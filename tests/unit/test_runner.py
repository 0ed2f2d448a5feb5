"""The fixed-shape decode step (runner.py) on the CPU with the tiny model: compiled with
fullgraph=True, it answers as the eager step does, compiles once per row bucket (not per session,
history length, or as rows join and leave), and a step allocates nothing."""

from __future__ import annotations

import resource

import pytest
import torch

from llava_sessions.config import ServingConfig
from llava_sessions.handler.engine import generation, runner, sampling
from llava_sessions.handler.engine.engine import SessionEngine, TurnRequest
from llava_sessions.handler.engine.generation import SamplingParams
from tests.unit.test_engine import QUESTIONS

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(autouse=True)
def fresh_graphs():
    """Compiled graphs live in the process, keyed by the step's code: each test counts its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def engine(loaded, compile: str) -> SessionEngine:
    return SessionEngine(loaded, ServingConfig(compile=compile, compile_warmup_s=0, kv_headroom_tokens=0))


def conversation(engine: SessionEngine, images, rounds: int, lengths=(6, 12, 3)) -> list[tuple[int, ...]]:
    """Three sessions (different images, different answer lengths) taking turns together."""
    sessions = [engine.open_session([images[i % 2]] if i < 2 else []).session_id for i in range(3)]
    answers = []
    for round_ in range(rounds):
        results = engine.turns([
            TurnRequest(sid, QUESTIONS[(round_ + i) % len(QUESTIONS)], SamplingParams(lengths[i]))
            for i, sid in enumerate(sessions)
        ])
        answers += [result.token_ids for result in results]
    return answers


def test_the_compiled_step_answers_as_the_eager_one_and_compiles_once_per_bucket(loaded_tiny, images):
    eager, compiled = engine(loaded_tiny, "off"), engine(loaded_tiny, "on")
    assert not eager.compiled and compiled.compiled
    assert conversation(compiled, images, rounds=2) == conversation(eager, images, rounds=2)
    assert compiled.compiled  # fullgraph=True: a graph break would have raised and fallen back to eager
    compiles = compiled.counters.step_compiles
    assert compiles == 3  # the row buckets this conversation met: 3 rows (bucket 4), then 2, then 1
    # New sessions of other lengths, rows joining and leaving within those buckets: no recompile.
    conversation(compiled, images, rounds=1, lengths=(5, 9, 2))
    assert compiled.counters.step_compiles == compiles


def test_a_step_allocates_nothing(loaded_tiny):
    step_runner = runner.StepRunner(loaded_tiny, "off")
    session = SessionEngine(loaded_tiny, ServingConfig(compile="off"))
    sid = session.open_session([]).session_id
    session.turn(sid, QUESTIONS[0], SamplingParams(4))  # a history to prefill the arena's row from
    prefix = generation.new_cache(loaded_tiny)
    generation.prefill(loaded_tiny, torch.tensor([list(session.session_history(sid))]), None, prefix)
    arena = runner.DecodeArena(loaded_tiny, {"a": prefix}, {"a": 150}, step_runner)
    held, token = arena.bytes_held(), 5
    for _ in range(10):
        token = sampling.pick(arena.step({"a": token}), [SamplingParams(1)])[0]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(100):
        token = sampling.pick(arena.step({"a": token}), [SamplingParams(1)])[0]
    assert arena.bytes_held() == held
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 2048  # KiB: no growth per step


def test_on_device_sampling_matches_the_rules(loaded_tiny):
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0], [3.0, 1.0, 0.0, 9.0]])
    greedy = [SamplingParams(1), SamplingParams(1)]
    assert sampling.pick(logits.clone(), greedy, suppressed=3) == [1, 0]
    tiny_t = [SamplingParams(1, temperature=1e-300), SamplingParams(1, temperature=5e-324)]
    assert sampling.pick(logits.clone(), tiny_t) == [1, 3]
    nucleus = [SamplingParams(1, temperature=1.0, top_p=1e-300)] * 2
    assert sampling.pick(logits.clone(), nucleus) == [1, 3]  # top_p keeps the most likely token
    generator = torch.Generator().manual_seed(0)
    hot = [SamplingParams(1, temperature=2.0)] * 2
    seen = {tuple(sampling.pick(logits.clone(), hot, suppressed=2, generator=generator)) for _ in range(200)}
    assert all(row[0] != 2 and row[1] != 2 for row in seen) and len({row[0] for row in seen}) > 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_graph_captured_step_answers_as_the_eager_one(tiny_model_dir, images):
    """CUDA graphs (mode="reduce-overhead"): the same answers as eager, no fallback, no recompiles."""
    from llava_sessions.handler.engine.model_loader import load_model

    loaded = load_model(str(tiny_model_dir), torch.device("cuda:0"), "float32")
    eager, compiled = engine(loaded, "off"), engine(loaded, "auto")  # auto: on for CUDA
    assert compiled.compiled and compiled.snapshot().kept_arena_bytes > 0  # auto with CUDA graphs
    assert conversation(compiled, images, rounds=2) == conversation(eager, images, rounds=2)
    compiles = compiled.counters.step_compiles
    conversation(compiled, images, rounds=1, lengths=(5, 9, 2))
    assert compiled.compiled and compiled.counters.step_compiles == compiles
    assert compiled.counters.cuda_graph_skips == 0  # every decode step replays a captured graph


def test_one_graph_per_row_bucket_serves_every_history_length(loaded_tiny):
    """Warm-up compiles each row bucket once; histories of any length then reuse those graphs."""
    step_runner = runner.StepRunner(loaded_tiny, "on")
    assert step_runner.warm_up(max_rows=4, seconds=600) == [1, 2, 4]
    assert step_runner.compiled and step_runner.compiles == 4  # and the follow-up prefill
    shape = runner.ArenaShape.of(loaded_tiny)
    with torch.inference_mode():
        for rows in (1, 2, 4):
            for slots in (64, 192, 448):
                allocated = runner.allocated_slots(slots, bucketed=True)  # views, as an arena's steps see it
                buffers = [torch.zeros(rows, shape.kv_heads, allocated, shape.head_dim)[:, :, :slots]
                           for _ in range(2 * shape.layers)]
                cache = runner._StepCache(buffers[::2], buffers[1::2], dynamic_slots=True)
                positions = (torch.arange(rows) + slots - rows)[:, None]  # [B, 1]
                logits = step_runner.run(torch.ones(rows, 1, dtype=torch.long), positions, cache)
                assert logits.shape == (rows, loaded_tiny.model.config.get_text_config().vocab_size)
    assert step_runner.compiled and step_runner.compiles == 4


def lone_follow_ups(loaded, images, compile: str) -> tuple[SessionEngine, list[tuple[int, ...]]]:
    """Two sessions taking turns one at a time (each follow-up prefills alone, in its spare slots)."""
    engine = SessionEngine(loaded, ServingConfig(compile=compile, compile_warmup_s=0))
    sessions = [engine.open_session([images[i % 2]]).session_id for i in range(2)]
    answers = [engine.turn(sid, QUESTIONS[round_ + i], SamplingParams(4 + 3 * i)).token_ids
               for round_ in range(3) for i, sid in enumerate(sessions)]
    return engine, answers


def test_after_warm_up_turns_compile_nothing(loaded_tiny, images):
    """The worker's warm-up compiles what its turns then use: decode buckets and the prefill."""
    compiled = SessionEngine(loaded_tiny, ServingConfig(compile="on", compile_warmup_s=600))
    assert compiled.warm_up() == [1, 2, 4, 8]
    compiles = compiled.counters.step_compiles
    assert compiles == 5
    conversation(compiled, images, rounds=2)  # rows joining and leaving: buckets 4, 2 and 1
    sid = compiled.open_session([images[0]]).session_id
    for question in QUESTIONS[:3]:  # lone turns: follow-ups prefill in place
        compiled.turn(sid, question, SamplingParams(5))
    assert compiled.counters.prefills_compiled == 2
    assert compiled.counters.step_compiles == compiles and compiled.compiled


def test_a_follow_up_prefills_in_its_spare_slots_with_the_compiled_step(loaded_tiny, images):
    """A lone follow-up's new tokens run through the compiled step (one graph for every feed and
    history length), writing into the session's spare KV slots; answers are the eager ones."""
    (eager, expected), (compiled, answers) = lone_follow_ups(loaded_tiny, images, "off"), lone_follow_ups(loaded_tiny, images, "on")
    assert answers == expected
    assert eager.counters.prefills_compiled == 0
    assert compiled.counters.prefills_compiled == 4  # every follow-up: rounds 2 and 3 of both sessions
    compiles = compiled.counters.step_compiles
    sid = compiled.open_session([images[0]]).session_id
    for question in QUESTIONS[:4]:  # other feed and history lengths: the same graphs
        compiled.turn(sid, question, SamplingParams(5))
    assert compiled.counters.step_compiles == compiles and compiled.compiled


def test_a_lone_compiled_turn_decodes_in_its_sessions_own_buffers(loaded_tiny, images):
    """No arena to fill and empty for one turn alone (on a CPU): its steps write into the session's
    buffers, with the answers of eager decoding and the graphs the warm-up compiled."""
    compiled = SessionEngine(loaded_tiny, ServingConfig(compile="on", compile_warmup_s=600))
    compiled.warm_up()
    compiles = compiled.counters.step_compiles
    eager = SessionEngine(loaded_tiny, ServingConfig(compile="off"))
    arena_bytes = []
    answers = {}
    for engine in (compiled, eager):
        sid = engine.open_session([images[0]]).session_id
        on_token = (lambda *_: arena_bytes.append(compiled.snapshot().batch_view_bytes)) if engine is compiled else None
        answers[engine] = [engine.turns([TurnRequest(sid, question, SamplingParams(6), on_token=on_token)])[0].token_ids
                           for question in QUESTIONS[:3]]
    assert answers[compiled] == answers[eager]
    assert len(arena_bytes) > 3 and set(arena_bytes) == {0}
    assert compiled.counters.step_compiles == compiles and compiled.compiled


def test_a_follow_up_its_spare_slots_cannot_hold_still_prefills_compiled(loaded_tiny, images):
    """With 2 spare slots kept between turns, no question fits in place: the session's buffers move
    first (the move an eager prefill makes) and the compiled step prefills; answers are the eager ones."""
    def follow_ups(compile: str):
        engine = SessionEngine(loaded_tiny, ServingConfig(compile=compile, compile_warmup_s=0, kv_headroom_tokens=2))
        sid = engine.open_session([images[0]]).session_id
        answers = [engine.turn(sid, question, SamplingParams(1 + i % 3)).token_ids for i, question in enumerate(QUESTIONS)]
        return engine, answers

    (_, expected), (compiled, answers) = follow_ups("off"), follow_ups("on")
    assert answers == expected
    assert compiled.counters.prefills_compiled == len(QUESTIONS) - 1  # every follow-up


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_a_follow_up_prefills_through_the_captured_step(tiny_model_dir, images):
    """On CUDA the compiled in-place prefill (never captured) answers as the eager prefill."""
    from llava_sessions.handler.engine.model_loader import load_model

    loaded = load_model(str(tiny_model_dir), torch.device("cuda:0"), "float32")
    (_, expected), (compiled, answers) = lone_follow_ups(loaded, images, "off"), lone_follow_ups(loaded, images, "auto")
    assert answers == expected and compiled.compiled and compiled.counters.prefills_compiled == 4


def test_a_kept_arena_serves_every_wave_that_fits_and_compiles_nothing_after_warm_up(loaded_tiny, images):
    """KeptArena: waves decode in views of buffers kept for the engine's life (set aside from the
    budget), with the same answers as arenas allocated per wave; a wave that does not fit
    (more rows than it has) allocates its own."""
    budget = 64 * 1024 * 1024
    config = ServingConfig(compile="on", compile_warmup_s=600, kv_headroom_tokens=0, memory_budget_bytes=budget)
    kept = SessionEngine(loaded_tiny, config, keep_arena=True)
    shape = runner.ArenaShape.of(loaded_tiny)
    # An eighth of the budget holds 1,024 slots a row of the tiny model: its whole context (512).
    kept_bytes = shape.bytes(8, runner.allocated_slots(loaded_tiny.max_context, bucketed=True))
    assert kept.snapshot().kept_arena_bytes == kept_bytes and kept.memory_budget_bytes == budget - kept_bytes
    assert kept.warm_up() == [1, 2, 4, 8]
    compiles = kept.counters.step_compiles
    views = []
    per_wave = SessionEngine(loaded_tiny, ServingConfig(compile="off", kv_headroom_tokens=0))

    def answers(engine, record=None, compiles=None):
        sids = [engine.open_session([images[i % 2]]).session_id for i in range(9)]
        out = []
        for n in (5, 8, 3, 1, 9):  # 9 rows do not fit the 8 kept rows
            on_token = (lambda *_: record.append((n, engine.snapshot().batch_view_bytes))) if record is not None else None
            results = engine.turns([TurnRequest(sid, QUESTIONS[i % len(QUESTIONS)], SamplingParams(3 + i), on_token=on_token)
                                    for i, sid in enumerate(sids[:n])])
            out += [result.token_ids for result in results]
            if compiles is not None:
                compiles.append(engine.counters.step_compiles)
        return out

    after_waves = []
    assert answers(kept, views, after_waves) == answers(per_wave)
    assert {held for n, held in views if n < 9} == {0} and max(held for n, held in views if n == 9) > 0
    # The waves that fit reuse the warm-up's graphs; the 9-row wave's own arena (other strides)
    # compiles its buckets as they come.
    assert after_waves[:4] == [compiles] * 4 and after_waves[4] > compiles
