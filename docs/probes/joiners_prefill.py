"""In process, the `small` preset: seven follow-ups (25 new tokens on 650-710 tokens of history)
going into an 8-row decode arena, two ways. One at a time: each prefills on its own cache (the
engine's way when the budget has no room for an arena), then all are copied into the arena. In
their rows: each history copied once into its arena row, the seven prefilled in one forward over
their rows (DecodeArena.prefill, the engine's way for joiners and a bundle's follow-ups). Timed
in pairs, alternating which goes first. (At commit be6a5b2 this probe's first way was the
padded view of batch_prefill.prefill_together, since removed: 50.3 ms against 36.1.)
Usage:
    .venv/bin/python docs/probes/joiners_prefill.py"""

import copy
import statistics
import time

import torch

from _in_process import history, small_model
from llava_sessions.handler.engine import generation
from llava_sessions.handler.engine import runner as R
from llava_sessions.handler.engine.host_allocator import keep_freed_memory

keep_freed_memory()  # as the served worker does
loaded = small_model()
step_runner = R.StepRunner(loaded, "off")  # both ways prefill eagerly
generator = torch.Generator().manual_seed(0)
ROWS, FEED, ANSWER = 7, 25, 24


histories = [history(loaded, 650 + 10 * i, generator) for i in range(ROWS)]
feeds = [torch.randint(5, 1000, (FEED,), generator=generator).tolist() for _ in range(ROWS)]


def one_at_a_time() -> float:
    caches = [copy.deepcopy(cache) for cache in histories]
    started = time.perf_counter()
    for cache, feed in zip(caches, feeds):
        generation.prefill(loaded, torch.tensor([feed]), None, cache)
    R.DecodeArena(loaded, dict(enumerate(caches)), {i: ANSWER for i in range(ROWS)}, step_runner, min_rows=8)
    return time.perf_counter() - started


def in_their_rows() -> float:
    caches = [copy.deepcopy(cache) for cache in histories]
    started = time.perf_counter()
    arena = R.DecodeArena(loaded, dict(enumerate(caches)), {i: FEED + ANSWER for i in range(ROWS)}, step_runner,
                          min_rows=8)
    arena.prefill(dict(enumerate(feeds)))
    return time.perf_counter() - started


with torch.inference_mode():
    times: tuple[list, list] = ([], [])
    for i in range(12):
        for index, call in ((0, one_at_a_time), (1, in_their_rows)) if i % 2 else ((1, in_their_rows), (0, one_at_a_time)):
            times[index].append(call())
    a, b = (statistics.median(t[2:]) * 1e3 for t in times)
    print(f"{ROWS} follow-ups of {FEED} tokens into an 8-row arena: one at a time then the arena {a:.1f} ms, "
          f"prefilled in their arena rows {b:.1f} ms (medians of 10 pairs)")
