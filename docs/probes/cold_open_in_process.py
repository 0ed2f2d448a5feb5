"""In process, the `small` preset: an open with an image and a question (one token) against
stateless `generate` on the processor's output, first through the engine (a decoded image), then
through the TorchServe handler (the request's bytes: JSON, base64, JPEG decode, as served) against
stateless `generate` that decodes the same JPEG. Usage:
    .venv/bin/python docs/probes/cold_open_in_process.py"""

import base64
import io
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from ts.context import Context, RequestProcessor

from llava_sessions.handler import router_hop
from llava_sessions.handler.torchserve_handler import LlavaSessionHandler
from llava_sessions.handler.engine.generation import SamplingParams
from llava_sessions.tiny_model import write_tiny_llava

SESSION = "X-Amzn-SageMaker-Session-Id"
checkpoint = tempfile.mkdtemp()
write_tiny_llava(checkpoint, preset="small")
os.environ[router_hop.SECRET_ENV] = router_hop.new_secret()
os.environ["LLAVA_SESSIONS_CPU_THREADS"] = "2"
handler = LlavaSessionHandler()
handler.initialize(Context("llava", "/nonexistent", {}, 1, None, "0.12.0", model_yaml_config={
    "handler": {"model": checkpoint, "compile": "on", "session_ttl_s": 600}}))
engine, loaded = handler.engine, handler.engine.loaded
rng = np.random.default_rng(0)
pixels = (np.linspace(0, 255, 640)[None, :, None] + rng.normal(0, 20, (480, 640, 3))).clip(0, 255).astype("uint8")
buffer = io.BytesIO()
Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
image_b64 = base64.b64encode(buffer.getvalue()).decode()
image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
prompt = "What is shown in this image? Describe it."
open_body = json.dumps({"requestType": "NEW_SESSION", "images": [image_b64], "prompt": prompt, "max_new_tokens": 1})


def call(body: str, headers: dict) -> RequestProcessor:
    context = Context("llava", "/nonexistent", {}, 1, None, "0.12.0")
    context.request_processor = [RequestProcessor(headers)]
    handler.handle([{"body": body.encode()}], context)
    return context.request_processor[0]


def ours_engine() -> float:
    started = time.perf_counter()
    session = engine.open_session([image]).session_id
    engine.turn(session, prompt, SamplingParams(1))
    seconds = time.perf_counter() - started
    engine.close_session(session)
    return seconds


def ours_handler() -> float:
    started = time.perf_counter()
    processor = call(open_body, {SESSION: "NEW_SESSION"})
    seconds = time.perf_counter() - started
    call(json.dumps({"requestType": "CLOSE"}), {SESSION: processor.get_response_headers()[SESSION].split(";")[0]})
    return seconds


def stateless(from_bytes: bool) -> float:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True)
    started = time.perf_counter()
    picture = Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB") if from_bytes else image
    inputs = loaded.processor(images=[picture], text=text, return_tensors="pt")
    with torch.inference_mode():
        loaded.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return time.perf_counter() - started


for ours, from_bytes, what in ((ours_engine, False, "engine, a decoded image"),
                               (ours_handler, True, "handler, the request's bytes")):
    ours(), stateless(from_bytes)  # warm
    pairs = [(ours(), stateless(from_bytes)) for _ in range(10)]
    print(f"{what}: ours {statistics.median(p[0] for p in pairs) * 1e3:.1f} ms, stateless "
          f"{statistics.median(p[1] for p in pairs) * 1e3:.1f} ms, median of the pairs' ratios "
          f"{statistics.median(a / b for a, b in pairs):.3f} ({len(pairs)} pairs)")
handler.engine.stop()
