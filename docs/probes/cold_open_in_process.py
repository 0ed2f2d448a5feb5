"""In process, the `small` preset: an open with an image and a question (one token) against
stateless `generate` on the processor's output. Usage: .venv/bin/python docs/probes/cold_open_in_process.py"""

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
engine = SessionEngine(loaded, ServingConfig(compile="on"))
engine.warm_up()
image = Image.effect_noise((640, 480), 60).convert("RGB")
prompt = "What is shown in this image? Describe it."


def ours() -> float:
    started = time.perf_counter()
    session = engine.open_session([image]).session_id
    engine.turn(session, prompt, SamplingParams(1))
    seconds = time.perf_counter() - started
    engine.close_session(session)
    return seconds


def stateless() -> float:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True)
    started = time.perf_counter()
    inputs = loaded.processor(images=[image], text=text, return_tensors="pt")
    with torch.inference_mode():
        loaded.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return time.perf_counter() - started


ours(), stateless()  # warm
pairs = [(ours(), stateless()) for _ in range(8)]
print(f"ours {statistics.median(p[0] for p in pairs) * 1e3:.1f} ms, "
      f"stateless {statistics.median(p[1] for p in pairs) * 1e3:.1f} ms (medians of {len(pairs)} pairs)")
