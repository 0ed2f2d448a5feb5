"""Served (`serve` stack, one worker, the `small` preset, compiled): a follow-up's time to its
one token when the client sends only the new message (native and OpenAI) and when it resends the
whole conversation with its image every turn, as OpenAI clients do. Usage:
    .venv/bin/python docs/probes/chat_follow_ups.py"""

import base64
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import requests
from PIL import Image

from llava_sessions.archive import build_archive
from llava_sessions.serving_stack import ServingStack
from llava_sessions.tiny_model import write_tiny_llava

SESSION = "X-Amzn-SageMaker-Session-Id"
TURNS = 6
work = Path(tempfile.mkdtemp())
write_tiny_llava(work / "model", preset="small")
archive = build_archive(work / "model", work / "archive", max_sessions_per_worker=16, session_ttl_s=600,
                        handler_overrides={"compile": "on"})
stack = ServingStack(archive, work / "run", workers=1, port=0).start(ready_timeout=900)
buffer = io.BytesIO()
Image.effect_noise((640, 480), 60).convert("RGB").save(buffer, "JPEG", quality=90)
data_url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
http = requests.Session()


def post(body: dict, session: str) -> tuple[float, requests.Response]:
    started = time.perf_counter()
    reply = http.post(f"{stack.url}/invocations", data=json.dumps(body),
                      headers={"Content-Type": "application/json", SESSION: session})
    assert reply.status_code == 200, reply.text
    return time.perf_counter() - started, reply


def conversation(mode: str) -> list[float]:
    first = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                         {"type": "text", "text": "What is in the picture?"}]}
    _, reply = post({"messages": [first], "max_tokens": 16, "temperature": 0}, "NEW_SESSION")
    session = reply.headers[SESSION].split(";")[0]
    messages = [first, {"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"]}]
    times = []
    for k in range(TURNS):
        question = f"Tell me more about part {k} of it."
        if mode == "native":
            seconds, reply = post({"prompt": question, "max_new_tokens": 1}, session)
        elif mode == "openai, new message only":
            seconds, reply = post({"messages": [{"role": "user", "content": question}], "max_tokens": 1,
                                   "temperature": 0}, session)
        else:
            messages.append({"role": "user", "content": question})
            seconds, reply = post({"messages": messages, "max_tokens": 1, "temperature": 0}, session)
            messages.append({"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"]})
        times.append(seconds)
    http.post(f"{stack.url}/invocations", json={"requestType": "CLOSE"}, headers={SESSION: session})
    return times


try:
    modes = ["native", "openai, new message only", "openai, whole conversation"]
    conversation("native")  # warm
    samples = {mode: [] for mode in modes}
    for _ in range(3):
        for mode in modes:
            samples[mode] += conversation(mode)
    for mode in modes:
        print(f"{mode:28s} follow-up, one token: {statistics.median(samples[mode]) * 1e3:.1f} ms "
              f"(median of {len(samples[mode])})")
finally:
    stack.stop()
