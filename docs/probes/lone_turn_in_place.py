"""In process, the `small` preset, compiled: a lone turn decoding in its session's own buffers
(runner.InPlaceRow) against the same turn in a one-row arena (filled from the session and emptied
back into it), two engines on one model, their turns alternating; 24-token answers. Usage:
    .venv/bin/python docs/probes/lone_turn_in_place.py"""

import statistics
import tempfile
import time

import torch
from PIL import Image

from llava_sessions.config import ServingConfig
from llava_sessions.handler.engine.engine import SessionEngine
from llava_sessions.handler.engine.generation import SamplingParams
from llava_sessions.handler.engine.model_loader import load_model
from llava_sessions.tiny_model import write_tiny_llava

torch.set_num_threads(2)
checkpoint = tempfile.mkdtemp()
write_tiny_llava(checkpoint, preset="small")
loaded = load_model(checkpoint, torch.device("cpu"), "float32")
engines = {"in place": SessionEngine(loaded, ServingConfig(compile="on")),
           "arena": SessionEngine(loaded, ServingConfig(compile="on"))}
engines["arena"]._runner.room_to_decode_in_place = lambda cache, steps: False  # the arena, as before
for engine in engines.values():
    engine.warm_up()
image = Image.effect_noise((640, 480), 60).convert("RGB")
turn_s: dict[str, list[float]] = {name: [] for name in engines}
rates: dict[str, list[float]] = {name: [] for name in engines}
for _ in range(3):
    sessions = {name: engine.open_session([image]).session_id for name, engine in engines.items()}
    for name, engine in engines.items():
        engine.turn(sessions[name], "Describe the picture.", SamplingParams(4))
    for k in range(8):
        for name in (["in place", "arena"] if k % 2 else ["arena", "in place"]):
            started = time.perf_counter()
            result = engines[name].turn(sessions[name], f"And then what happens in part {k}?", SamplingParams(24))
            turn_s[name].append(time.perf_counter() - started)
            rates[name].append((result.completion_tokens - 1) / result.decode_s)
    for name, engine in engines.items():
        engine.close_session(sessions[name])
for name in engines:
    print(f"{name}: a whole turn {statistics.median(turn_s[name]) * 1e3:.2f} ms, decode "
          f"{statistics.median(rates[name]):.0f} tokens/s (medians of {len(turn_s[name])} turns)")
print(f"in place / arena, a whole turn: {statistics.median(a / b for a, b in zip(turn_s['in place'], turn_s['arena'])):.3f}"
      " (median of the pairs' ratios)")
