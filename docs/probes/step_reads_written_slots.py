"""In process, the `small` preset, compiled: a step that reads the KV slots its rows have written
(rounded up to SLOT_ALIGN) against one that reads every slot its arena or buffer holds, timed in
pairs on the same graph (alternating which goes first). Usage:
    .venv/bin/python docs/probes/step_reads_written_slots.py

Decode: 8 rows of 650-720 tokens in an arena sized for 256 more tokens each (an answer asked for
up to 256 tokens), then 24 tokens; the first 48 steps. Prefill: a 28-token follow-up on a
630-token history whose buffers hold 256 spare slots."""

import statistics
import tempfile
import time

import torch

from llava_sessions.handler.engine import generation
from llava_sessions.handler.engine import runner as R
from llava_sessions.handler.engine.model_loader import load_model
from llava_sessions.tiny_model import write_tiny_llava

torch.set_num_threads(2)
checkpoint = tempfile.mkdtemp()
write_tiny_llava(checkpoint, preset="small")
loaded = load_model(checkpoint, torch.device("cpu"), "float32")
step_runner = R.StepRunner(loaded, "on")
generator = torch.Generator().manual_seed(0)


def history(n: int):
    cache = generation.new_cache(loaded)
    generation.prefill(loaded, torch.randint(5, 1000, (1, n), generator=generator), None, cache)
    return cache


def paired(first, second, pairs: int, skip: int = 0) -> tuple[float, float]:
    """Medians (ms) of ``first()`` and ``second()`` timed alternately, after ``skip`` pairs."""
    times: tuple[list, list] = ([], [])
    for i in range(pairs):
        order = ((0, first), (1, second)) if i % 2 else ((1, second), (0, first))
        for index, call in order:
            started = time.perf_counter()
            call()
            times[index].append(time.perf_counter() - started)
    return tuple(statistics.median(t[skip:]) * 1e3 for t in times)


with torch.inference_mode():
    for remaining in (256, 24):
        arena = R.DecodeArena(loaded, {i: history(650 + 10 * i) for i in range(8)}, {i: remaining for i in range(8)},
                              step_runner)
        ids, last = torch.full((8, 1), 7), arena._last[:8]
        whole, written = [], []
        step_runner.run(ids, arena._positions[:8, None], arena._step_cache(8, arena.slots), last)  # compiled
        for _ in range(48):
            positions = arena._positions[:8, None]
            reads = R.aligned_slots(max(arena._lengths) + 1, arena.slots, R.SLOT_ALIGN)
            a, b = paired(lambda: step_runner.run(ids, positions, arena._step_cache(8, arena.slots), last),
                          lambda: step_runner.run(ids, positions, arena._step_cache(8, reads), last), 1)
            whole.append(a)
            written.append(b)
            arena._positions[:8] += 1
            arena._lengths = [n + 1 for n in arena._lengths]
        print(f"decode, 8 rows, up to {remaining} more tokens (arena of {arena.slots} slots): every slot "
              f"{statistics.median(whole):.2f} ms, written slots {statistics.median(written):.2f} ms a step")

    length, feed = 630, list(range(5, 33))
    base = history(length)
    shape = R.ArenaShape.of(loaded)
    buffers = []
    for layer in base.layers:
        pair = [torch.zeros(1, shape.kv_heads, length + 256, shape.head_dim) for _ in range(2)]
        pair[0][:, :, :length], pair[1][:, :, :length] = layer.keys, layer.values
        buffers.append(pair)

    def prefill(slots: int):
        cache = R._StepCache([k[:, :, :slots] for k, _ in buffers], [v[:, :, :slots] for _, v in buffers], dynamic_slots=True)
        ids = torch.tensor([feed])
        positions = torch.arange(length, length + len(feed))[None, :]
        for tensor in (ids, positions):
            torch._dynamo.mark_dynamic(tensor, 1)
        return step_runner.run(ids, positions, cache, graphs=False)

    a, b = paired(lambda: prefill(length + 255), lambda: prefill(length + len(feed)), 60, skip=4)
    print(f"prefill, 28 tokens on 630: every spare slot {a:.2f} ms, written slots {b:.2f} ms")
print(f"graphs compiled: {step_runner.compiles}")
