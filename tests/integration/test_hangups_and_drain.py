"""Through a real TorchServe: what only the router may send, clients that hang up (each session
compared with a twin that never asked), and `serve`'s drain on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from llava_sessions.archive import build_archive
from llava_sessions.handler import bundle
from llava_sessions.serving_stack import ServingStack
from tests.fakes import png_b64, raw_post, reset
from tests.integration.test_readme_commands import read_lines_until

pytestmark = pytest.mark.integration

SESSION = "X-Amzn-SageMaker-Session-Id"
IMAGE = png_b64(Image.new("RGB", (48, 40), (37, 91, 151)))
LONG = 300  # tokens: the tiny model never ends a turn early, and its context is 512
WAIT_S = 60


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hangups")
    archive = build_archive(tiny_model_dir, tmp / "archive", max_sessions_per_worker=16, session_ttl_s=600)
    server = ServingStack(archive, tmp / "run", workers=1, port=0).start(ready_timeout=300)
    yield server
    server.stop()


def invoke(url: str, body: dict, session: str | None = None, **headers) -> requests.Response:
    headers = {"Content-Type": "application/json", **headers}
    if session is not None:
        headers[SESSION] = session
    return requests.post(f"{url}/invocations", data=json.dumps(body), headers=headers, timeout=WAIT_S)


def twins(url: str) -> tuple[str, str]:
    """Two sessions with the same image and the same first turn."""
    ids = []
    for _ in range(2):
        sid = invoke(url, {"requestType": "NEW_SESSION", "images": [IMAGE]}).json()["session_id"]
        assert invoke(url, {"prompt": "What is in the picture?", "max_new_tokens": 6}, sid).status_code == 200
        ids.append(sid)
    return ids[0], ids[1]


def raw_request(url: str, body: dict, session: str) -> socket.socket:
    return raw_post(int(url.rsplit(":", 1)[1]), json.dumps(body).encode(), **{SESSION: session})


def assert_same_next_turn(url: str, asked: str, twin: str) -> None:
    """The session that asked and hung up goes on exactly as its twin that never asked."""
    follow_up = {"prompt": "And what colour is it?", "max_new_tokens": 8}
    after, expected = invoke(url, follow_up, asked).json(), invoke(url, follow_up, twin).json()
    assert after["generated_text"] == expected["generated_text"]
    assert after["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]
    assert after["usage"]["cached_tokens"] > 0  # and its history's KV was kept


# --- what only the router may send ----------------------------------------------------------


def test_a_forged_bundle_gets_a_json_400_at_the_router_and_at_the_worker(stack):
    members = bundle.encode_request([({}, b'{"requestType": "NEW_SESSION"}')] * 31)
    headers = {bundle.BUNDLE_HEADER: "31", "Content-Type": bundle.CONTENT_TYPE}
    at_router = requests.post(f"{stack.url}/invocations", data=members, headers=headers, timeout=WAIT_S)
    assert at_router.status_code == 400 and at_router.json()["error"]["code"] == "INVALID_REQUEST"
    # Straight to TorchServe (loopback), past the router: the worker wants the router's secret.
    at_worker = requests.post(stack.torchserve.backend_urls[0], data=members, headers=headers, timeout=WAIT_S)
    assert at_worker.status_code == 400 and at_worker.json()["error"]["code"] == "INVALID_REQUEST"
    # Nothing was opened: the worker still has room for all 16 of its sessions.
    ids = [invoke(stack.url, {"requestType": "NEW_SESSION"}).json()["session_id"] for _ in range(16)]
    for sid in ids:
        assert invoke(stack.url, {"requestType": "CLOSE"}, sid).status_code == 200


def test_a_request_the_parser_refuses_gets_json_that_does_not_echo_it(stack):
    port = int(stack.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(f"POST /invocations HTTP/1.1\r\nHost: x\r\n{SESSION}: sess-SECRET42\x01\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].endswith(b" 400 Bad Request") and b"application/json" in head
    assert b"aiohttp" not in head  # no server software named
    assert json.loads(body)["error"]["code"] == "BAD_HTTP_REQUEST" and b"SECRET42" not in reply


# --- clients that hang up --------------------------------------------------------------------


def test_a_client_that_resets_mid_stream_leaves_its_session_as_before_the_turn(stack):
    asked, twin = twins(stack.url)
    sock = raw_request(stack.url, {"prompt": "Tell me everything", "max_new_tokens": LONG, "stream": True}, asked)
    received = b""
    while b"data:" not in received:
        received += sock.recv(4096)
    reset(sock)
    assert_same_next_turn(stack.url, asked, twin)


def test_a_client_that_leaves_while_its_turn_waits_leaves_its_session_as_before(stack):
    asked, twin = twins(stack.url)
    busy = invoke(stack.url, {"requestType": "NEW_SESSION", "images": [IMAGE]}).json()["session_id"]
    with ThreadPoolExecutor(1) as pool:
        holding = pool.submit(invoke, stack.url, {"prompt": "Tell me everything", "max_new_tokens": LONG}, busy)
        time.sleep(0.1)  # the worker has it in hand: the next turn waits at the router
        sock = raw_request(stack.url, {"prompt": "Anything else?", "max_new_tokens": LONG}, asked)
        time.sleep(0.05)
        reset(sock)
        assert holding.result(WAIT_S).status_code == 200
    assert_same_next_turn(stack.url, asked, twin)


# --- serve's drain on SIGTERM ----------------------------------------------------------------


def test_sigterm_ends_every_answer_whole_then_exits_0(tmp_path):
    from llava_sessions.tiny_model import write_tiny_llava

    # The small preset streams a long answer (about 1,450 tokens, seconds on a CPU): still in flight
    # when the signal comes, however slow the machine.
    model_dir = write_tiny_llava(tmp_path / "small", preset="small")
    env = {**os.environ, "LLAVA_SESSIONS_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llava_sessions.cli", "serve", "--model", str(model_dir), "--port", "0",
         "--run-dir", str(tmp_path / "run"), "--drain-seconds", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        match, lines = read_lines_until(proc.stdout, re.compile(r"serving .* at (http://127\.0\.0\.1:\d+)"), 300)
        assert match, "".join(lines)[-3000:]
        url = match.group(1)
        opened = invoke(url, {"requestType": "NEW_SESSION", "images": [IMAGE]})
        assert opened.status_code == 200, opened.text
        streamed = opened.json()["session_id"]
        with ThreadPoolExecutor(1) as pool:
            reply = requests.post(f"{url}/invocations", stream=True, timeout=WAIT_S,
                                  data=json.dumps({"prompt": "Tell me a long story about it", "max_new_tokens": 1500,
                                                   "stream": True}),
                                  headers={"Content-Type": "application/json", SESSION: streamed})
            chunks = reply.iter_content(chunk_size=None)
            text = next(chunks)  # the stream is flowing
            # The session's next turn cannot join the bundle its stream runs in: it waits at the router.
            waiting = pool.submit(invoke, url, {"prompt": "Queued?", "max_new_tokens": 4}, streamed)
            time.sleep(0.2)  # it waits at the router behind the stream
            proc.send_signal(signal.SIGTERM)
            for chunk in chunks:  # a clean end: no ChunkedEncodingError
                text += chunk
            answer = waiting.result(WAIT_S)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    events = [json.loads(part[5:]) for part in text.decode().split("\n\n") if part.startswith("data:")]
    assert events[-1].get("error_type") == "WORKER_UNAVAILABLE", (len(events), events[-1], proc.stdout.read()[-3000:])
    assert "shutting down" in events[-1]["error"]
    assert all("token" in event for event in events[:-1])
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "WORKER_UNAVAILABLE"
    assert answer.headers["Retry-After"]
    log = proc.stdout.read()
    assert re.search(r"drained \(0 finished, 2 cut, 0 refused\)", log), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
