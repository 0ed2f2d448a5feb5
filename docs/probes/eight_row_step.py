"""In process, the `small` preset, compiled: what a decode step of 8 rows spends, against one row.
Times a step of 1 row (704 slots read) and of 8 rows (650-720 tokens each, 768 slots read), then
profiles 20 steps of 8 rows (self CPU time by operator), and times attention alone at the 8-row
step's shape against reading the same bytes with a sum (what the memory streams here).
Usage:
    .venv/bin/python docs/probes/eight_row_step.py"""

import torch
import torch.nn.functional as F
from torch.profiler import profile

from _in_process import history, median_ms, small_model
from llava_sessions.handler.engine import runner as R

loaded = small_model()
step_runner = R.StepRunner(loaded, "on")
generator = torch.Generator().manual_seed(0)


with torch.inference_mode():
    for rows in (1, 8):
        arena = R.DecodeArena(loaded, {i: history(loaded, 650 + 10 * i, generator) for i in range(rows)}, {i: 24 for i in range(rows)},
                              step_runner)
        ids, last, positions = torch.full((rows, 1), 7), arena._last[:rows], arena._positions[:rows, None]
        reads = R.aligned_slots(max(arena._lengths) + 1, arena.slots, R.SLOT_ALIGN)
        cache = arena._step_cache(rows, reads)
        print(f"{rows} row(s), {reads} slots read: {median_ms(lambda: step_runner.run(ids, positions, cache, last)):.2f} ms a step")
    with profile() as prof:
        for _ in range(20):
            step_runner.run(ids, positions, cache, last)
    total = sum(event.self_cpu_time_total for event in prof.key_averages())
    for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:4]:
        print(f"  {event.key[:60]:60s} {100 * event.self_cpu_time_total / total:5.1f} % of the step")

    shape = R.ArenaShape.of(loaded)
    q = torch.randn(8, 1, shape.kv_heads, shape.head_dim).transpose(1, 2)  # [B, H, 1, D]
    k, v = (torch.randn(8, shape.kv_heads, reads + 1, shape.head_dim)[:, :, :reads] for _ in range(2))
    mask = torch.ones(8, 1, 1, reads, dtype=torch.bool)
    layer_bytes = 2 * k.numel() * k.element_size()
    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    print(f"attention of one layer, 8 rows: {ms:.3f} ms, {layer_bytes / ms / 1e6:.1f} GB/s of KV")
    flat = torch.randn(layer_bytes * shape.layers // 4)
    ms = median_ms(lambda: flat.sum())
    print(f"a sum over the step's KV bytes ({layer_bytes * shape.layers / 1e6:.0f} MB): {flat.numel() * 4 / ms / 1e6:.1f} GB/s")
