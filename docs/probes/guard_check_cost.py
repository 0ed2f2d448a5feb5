"""In process, compiled: what dynamo's guard check costs a one-row decode step, for a decoder of 4
and of 32 layers (the `tiny` preset's widths; the 7B has 32). The check is timed by the profiler
("TorchDynamo Cache Lookup") and by stepping with guard evaluation skipped
(`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`, which the engine does not use: it
trusts guards it does not check). Usage:
    .venv/bin/python docs/probes/guard_check_cost.py"""

import tempfile
from dataclasses import replace

import torch
from torch.profiler import profile

from _in_process import median_ms
from llava_sessions import tiny_model
from llava_sessions.handler.engine import runner as R
from llava_sessions.handler.engine.model_loader import load_model

torch.set_num_threads(2)


for layers in (4, 32):
    torch._dynamo.reset()
    tiny_model.PRESETS[f"tiny-{layers}"] = replace(tiny_model.PRESETS["tiny"], text_num_layers=layers)
    checkpoint = tempfile.mkdtemp()
    tiny_model.write_tiny_llava(checkpoint, preset=f"tiny-{layers}")
    loaded = load_model(checkpoint, torch.device("cpu"), "float32")
    step_runner, shape = R.StepRunner(loaded, "on"), R.ArenaShape.of(loaded)
    with torch.inference_mode():
        buffers = [torch.zeros(1, shape.kv_heads, R.allocated_slots(256, True), shape.head_dim)[:, :, :256]
                   for _ in range(2 * shape.layers)]
        cache = R._StepCache(buffers[::2], buffers[1::2], dynamic_slots=True)
        ids, positions = torch.ones(1, 1, dtype=torch.long), torch.full((1, 1), 100)

        def step():
            step_runner.run(ids, positions, cache)

        for _ in range(20):
            step()
        with profile() as profiled:
            for _ in range(50):
                step()
        lookup = next(e for e in profiled.key_averages() if e.key == "TorchDynamo Cache Lookup")
        checked = median_ms(step, n=200, warm=0)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            skipped = median_ms(step, n=200, warm=0)
    print(f"{layers:2d} layers: a step {checked:.3f} ms, {skipped:.3f} ms with guards skipped; "
          f"the guard check under the profiler {lookup.self_cpu_time_total / 50:.0f} us a step")
