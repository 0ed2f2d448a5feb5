"""In process, the `small` preset, compiled: decode tokens/s of a follow-up (64 tokens, 6 sessions),
with inductor's Python wrapper or its C++ wrapper. Usage:
    .venv/bin/python docs/probes/decode_step_wrapper.py          # Python wrapper (the default)
    CPP_WRAPPER=1 .venv/bin/python docs/probes/decode_step_wrapper.py"""

import os
import statistics
import tempfile
import time

import torch
from PIL import Image

if os.environ.get("CPP_WRAPPER") == "1":
    torch._inductor.config.cpp_wrapper = True

from llava_sessions.config import ServingConfig  # noqa: E402
from llava_sessions.handler.engine.engine import SessionEngine  # noqa: E402
from llava_sessions.handler.engine.generation import SamplingParams  # noqa: E402
from llava_sessions.handler.engine.model_loader import load_model  # noqa: E402
from llava_sessions.tiny_model import write_tiny_llava  # noqa: E402

torch.set_num_threads(2)
checkpoint = tempfile.mkdtemp()
write_tiny_llava(checkpoint, preset="small")
engine = SessionEngine(load_model(checkpoint, torch.device("cpu"), "float32"), ServingConfig(compile="on"))
started = time.perf_counter()
engine.warm_up()
warm_up_s = time.perf_counter() - started
image = Image.new("RGB", (336, 336), (120, 30, 200))
rates = []
for _ in range(6):
    session = engine.open_session([image]).session_id
    engine.turn(session, "Describe the picture.", SamplingParams(4))
    result = engine.turn(session, "And then what happens in it?", SamplingParams(64))
    rates.append((result.completion_tokens - 1) / result.decode_s)
    engine.close_session(session)
print(f"warm-up {warm_up_s:.0f} s; decode {statistics.median(rates):.0f} tokens/s (median of {len(rates)} turns)")
