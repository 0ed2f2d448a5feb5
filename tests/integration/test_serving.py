"""A real TorchServe with the tiny model and the session handler, driven over HTTP.

Two workers, many interleaved sessions: every turn must reach the worker that
holds its session and give exactly what a fresh engine gives for the same
conversation; the vision tower runs once per image; close and expiry free memory.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from llava_sessions.archive import build_archive
from llava_sessions.serving_stack import ServingStack
from tests.fakes import png_b64

pytestmark = pytest.mark.integration

SESSION = "X-Amzn-SageMaker-Session-Id"
CLOSED = "X-Amzn-SageMaker-Closed-Session-Id"
QUESTIONS = ["What is in the picture?", "What colour is it?", "Is there anything on the left side?"]
MAX_NEW = 8
EXPIRES = re.compile(r"^([A-Za-z0-9-]+); Expires=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)$")


def session_images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (48, 40), ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256)) for i in range(n)]


def invoke(url: str, body: dict, session: str | None = None) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if session is not None:
        headers[SESSION] = session
    return requests.post(f"{url}/invocations", data=json.dumps(body), headers=headers, timeout=120)


def start_server(model_dir, tmp, *, workers: int, ttl: int) -> ServingStack:
    archive = build_archive(model_dir, tmp / "archive", max_sessions_per_worker=16, session_ttl_s=ttl)
    return ServingStack(archive, tmp / "run", workers=workers, port=0).start(ready_timeout=300)


def gauge(server: ServingStack, name: str, label: str = "") -> float | None:
    """One copy's gauge on TorchServe's Prometheus port (None until first written)."""
    text = requests.get(server.torchserve.metrics_url, timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + "{") and 'ModelName="llava-0"' in line and label in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_for_gauge(server: ServingStack, name: str, value: float, label: str = "", timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while gauge(server, name, label) != value and time.monotonic() < deadline:
        time.sleep(0.2)
    return gauge(server, name, label) == value


def worker_log(server: ServingStack) -> str:
    return (server.log_dir / "model_log.log").read_text(errors="replace")


def wait_for_log(server: ServingStack, pattern: str, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.findall(pattern, worker_log(server))
        if found:
            return found
        time.sleep(0.2)
    return []


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("serving"), workers=2, ttl=1200)
    yield server
    server.stop()


def test_ping_and_unknown_session(server):
    assert requests.get(f"{server.url}/ping", timeout=10).status_code == 200
    response = invoke(server.url, {"prompt": "hi"}, session="sess-does-not-exist")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "SESSION_NOT_FOUND"


def test_interleaved_sessions_on_two_workers_match_a_fresh_engine(server, loaded_tiny):
    from llava_sessions.config import ServingConfig
    from llava_sessions.handler.engine.engine import SessionEngine
    from llava_sessions.handler.engine.generation import SamplingParams

    images = session_images(8)
    log_before = len(worker_log(server))

    def open_session(image):
        response = invoke(server.url, {"requestType": "NEW_SESSION", "images": [png_b64(image)]}, "NEW_SESSION")
        assert response.status_code == 200, response.text
        match = EXPIRES.match(response.headers[SESSION])
        assert match, response.headers[SESSION]
        assert response.json() == {"session_id": match.group(1), "expires_at": match.group(2)}
        return match.group(1)

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(open_session, images))
    assert len(set(ids)) == 8

    answers = {sid: [] for sid in ids}
    for question in QUESTIONS:
        for sid in ids:
            response = invoke(server.url, {"prompt": question, "max_new_tokens": MAX_NEW}, sid)
            assert response.status_code == 200, response.text
            body = response.json()
            answers[sid].append(body["generated_text"])
            usage = body["usage"]
            assert usage["completion_tokens"] >= 1
            if len(answers[sid]) > 1:
                assert 0 < usage["cached_tokens"] < usage["prompt_tokens"]

    for sid in ids:
        response = invoke(server.url, {"requestType": "CLOSE"}, sid)
        assert response.status_code == 200 and response.headers[CLOSED] == sid

    # The vision tower ran once per image, never on a follow-up turn.
    new_log = worker_log(server)[log_before:]
    encodes = re.findall(r"vision tower: encoded (\d+) image", new_log)
    assert sum(int(n) for n in encodes) == len(images)
    # The router balanced the sessions over both workers (log lines carry the worker's name).
    workers = re.findall(r"(W-\d+-llava-\d)[^ ]*.*vision tower: encoded", new_log)
    assert sorted(workers.count(w) for w in set(workers)) == [4, 4], workers
    # Every session's memory was given back, on both workers.
    freed = re.findall(r"(W-\d+-llava-\d)[^ ]*.*sessions: 0 open, 0 bytes held", worker_log(server)[log_before:])
    assert len(set(freed)) == 2, freed

    # A fresh engine, given the same conversations, answers exactly the same.
    fresh = SessionEngine(loaded_tiny, ServingConfig())
    for sid, image in zip(ids, images):
        opened = fresh.open_session([image])
        expected = [fresh.turn(opened.session_id, q, SamplingParams(MAX_NEW)).text for q in QUESTIONS]
        assert answers[sid] == expected

    for sid in ids:  # closed means gone
        assert invoke(server.url, {"prompt": "again?"}, sid).json()["error"]["code"] == "SESSION_NOT_FOUND"


def test_metrics_reach_prometheus_per_worker(server):
    """After the interleaved test: counters and gauges of both copies on TorchServe's metrics port.

    Workers write metrics once a second (handler/metrics.py), so this waits for the last write.
    """
    text = ""

    def values(name: str) -> dict[str, float]:
        found = re.findall(rf'^{name}\{{ModelName="(llava-\d)"[^}}]*\}} ([\d.eE+-]+)$', text, re.MULTILINE)
        return {model: float(value) for model, value in found}

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = requests.get(server.torchserve.metrics_url, timeout=10).text
        if sum(values("llava_time_to_first_token_seconds_count").values()) >= 8 * len(QUESTIONS):
            break
        time.sleep(0.2)

    assert set(values("llava_sessions_open")) == {"llava-0", "llava-1"}
    assert sum(values("llava_kv_cache_hits").values()) >= 8 * (len(QUESTIONS) - 1)
    assert sum(values("llava_prefill_tokens").values()) > 0
    assert sum(values("llava_time_to_first_token_seconds_count").values()) >= 8 * len(QUESTIONS)
    assert "llava_session_bytes" in text
    # Declared up front (model-store/metrics.yaml): never auto-detected, where two workers' first
    # lines of a metric race and one of them is dropped.
    front_end_log = "".join(p.read_text(errors="replace") for p in server.log_dir.glob("*.log"))
    front_end_log += server.torchserve.console_log.read_text(errors="replace")
    assert "llava_" not in "\n".join(re.findall(r"Registering auto detected backend metric.*", front_end_log))


def test_a_bad_request_leaves_other_sessions_untouched(server):
    sid = invoke(server.url, {"requestType": "NEW_SESSION", "images": [png_b64(session_images(2)[1])]}).json()[
        "session_id"
    ]
    first = invoke(server.url, {"prompt": QUESTIONS[0], "max_new_tokens": MAX_NEW}, sid).json()
    for bad in (b"{oops", json.dumps({"requestType": "NEW_SESSION", "images": ["!!"]}).encode()):
        response = requests.post(f"{server.url}/invocations", data=bad,
                                 headers={"Content-Type": "application/json"}, timeout=60)
        assert 400 <= response.status_code < 500
        assert response.json()["error"]["code"] in ("INVALID_JSON", "INVALID_IMAGE")
    second = invoke(server.url, {"prompt": QUESTIONS[1], "max_new_tokens": MAX_NEW}, sid).json()
    assert second["usage"]["cached_tokens"] > first["usage"]["cached_tokens"]
    assert invoke(server.url, {"requestType": "CLOSE"}, sid).status_code == 200


def test_sessions_expire_and_are_freed_without_another_request(tiny_model_dir, tmp_path):
    server = start_server(tiny_model_dir, tmp_path, workers=1, ttl=3)
    try:
        response = invoke(server.url, {"requestType": "NEW_SESSION", "images": [png_b64(session_images(1)[0])]})
        sid = response.json()["session_id"]
        assert invoke(server.url, {"prompt": "hi", "max_new_tokens": 3}, sid).status_code == 200
        assert wait_for_gauge(server, "llava_sessions_open", 1.0)  # written within a second
        # Freed by the worker's sweeper, with no request naming the session; the gauges say so
        # then, not at the next request.
        assert wait_for_log(server, r"sessions: 0 open, 0 bytes held", timeout=20)
        assert wait_for_gauge(server, "llava_sessions_open", 0.0)
        assert wait_for_gauge(server, "llava_session_bytes", 0.0, 'tier="device_kv"')
        response = invoke(server.url, {"prompt": "still there?"}, sid)
        assert response.status_code == 404 and response.json()["error"]["code"] == "SESSION_NOT_FOUND"
    finally:
        server.stop()
