"""In process, the `small` preset: seven follow-ups (25 new tokens on 650-710 tokens of history)
joining a decode, the two ways the engine has had. Before: prefilled together in a padded view
(batch_prefill.prefill_together: each history copied into the view and back out), then copied
into an 8-row arena. Now: each history copied once into its arena row, the seven prefilled in one
forward over their rows (DecodeArena.prefill). Timed in pairs, alternating which goes first.
Usage:
    .venv/bin/python docs/probes/joiners_prefill.py"""

import copy
import statistics
import time

import torch

from _in_process import history, small_model
from llava_sessions.handler.engine import batch_prefill
from llava_sessions.handler.engine import runner as R
from llava_sessions.handler.engine.host_allocator import keep_freed_memory

keep_freed_memory()  # as the served worker does
loaded = small_model()
step_runner = R.StepRunner(loaded, "off")  # both ways prefill eagerly
generator = torch.Generator().manual_seed(0)
ROWS, FEED, ANSWER = 7, 25, 24


histories = [history(loaded, 650 + 10 * i, generator) for i in range(ROWS)]
feeds = [torch.randint(5, 1000, (FEED,), generator=generator).tolist() for _ in range(ROWS)]


def before() -> float:
    caches = [copy.deepcopy(cache) for cache in histories]
    started = time.perf_counter()
    batch_prefill.prefill_together(loaded, caches, feeds, [ANSWER] * ROWS)
    R.DecodeArena(loaded, dict(enumerate(caches)), {i: ANSWER for i in range(ROWS)}, step_runner, min_rows=8)
    return time.perf_counter() - started


def now() -> float:
    caches = [copy.deepcopy(cache) for cache in histories]
    started = time.perf_counter()
    arena = R.DecodeArena(loaded, dict(enumerate(caches)), {i: FEED + ANSWER for i in range(ROWS)}, step_runner,
                          min_rows=8)
    arena.prefill(dict(enumerate(feeds)))
    return time.perf_counter() - started


with torch.inference_mode():
    times: tuple[list, list] = ([], [])
    for i in range(12):
        for index, call in ((0, before), (1, now)) if i % 2 else ((1, now), (0, before)):
            times[index].append(call())
    a, b = (statistics.median(t[2:]) * 1e3 for t in times)
    print(f"{ROWS} joiners of {FEED} tokens into an 8-row arena: padded view then arena {a:.1f} ms, "
          f"prefilled in their arena rows {b:.1f} ms (medians of 10 pairs)")
