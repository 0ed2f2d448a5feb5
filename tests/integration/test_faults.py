"""Faults against a real stack (router → TorchServe, two workers), and what ends up in its logs.

- A worker killed (kill -9) in the middle of a streamed answer: the stream ends cleanly with
  TGI's error event (WORKER_UNAVAILABLE); TorchServe restarts the worker; its sessions answer
  SESSION_NOT_FOUND, the other worker's sessions answer exactly as before, new sessions work.
- A turn past the model's ``responseTimeout``: TorchServe kills the worker, the client gets
  503 WORKER_UNAVAILABLE at once, the rest is as after a kill.
- The session client, through a local SageMaker runtime, when the worker of its session is
  killed mid-stream: the broken turn raises, the next turn reopens and replays, no turn lost.
- Nothing the clients sent (prompts, images) and no full session id is in any log.

One stack for the module. Its handler is the real one, except that a prompt starting with
"stall" stops answering after its second token (the worker is busy, as in a long prefill:
tests/integration/stalling_handler.py, the archive's handler file); its archive has a 3 s
responseTimeout instead of 600 s. See docs/faults.md.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import requests

from llava_sessions.archive import build_archive
from llava_sessions.serving_stack import ServingStack
from tests.conftest import noise_image
from tests.fakes import isolate_from_aws, png_b64
from tests.integration import stalling_handler

pytestmark = pytest.mark.integration

SESSION = "X-Amzn-SageMaker-Session-Id"
RESPONSE_TIMEOUT_S = 3
MAX_NEW = 8
# Distinctive text in every prompt: the log check looks for it.
SECRET = "quokka-tangerine-4417"
PROMPTS = [f"{SECRET} what is in the picture?", f"{SECRET} which colours?", f"{SECRET} and on the left?"]
STALL = f"{stalling_handler.STALL_PREFIX} {SECRET} tell me everything"

# Every id and image the module sent, for the log check.
SENT_IDS: set[str] = set()
SENT_IMAGES: list[str] = []


@pytest.fixture(scope="module")
def router_log():
    """Everything llava_sessions' loggers write during the module, at every level."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger("llava_sessions")
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory, router_log):
    tmp = tmp_path_factory.mktemp("faults")
    # A real module (imported above): TorchServe imports it from the archive as its handler.
    handler_file = Path(stalling_handler.__file__)
    archive = build_archive(tiny_model_dir, tmp / "archive", max_sessions_per_worker=8, session_ttl_s=600,
                            handler_file=handler_file)
    config = archive / "model-config.yaml"
    text = config.read_text()
    assert "responseTimeout: 600" in text
    config.write_text(text.replace("responseTimeout: 600", f"responseTimeout: {RESPONSE_TIMEOUT_S}"))
    stack = ServingStack(archive, tmp / "run", workers=2, port=0).start(ready_timeout=300)
    yield stack
    stack.stop()


# --- helpers ---------------------------------------------------------------------------


def invoke(url: str, body: dict, session: str | None = None, **kwargs) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if session is not None:
        headers[SESSION] = session
    return requests.post(f"{url}/invocations", data=json.dumps(body), headers=headers, timeout=120, **kwargs)


def open_session(stack, seed: int) -> str:
    image = png_b64(noise_image(seed, 40))
    SENT_IMAGES.append(image)
    response = invoke(stack.url, {"requestType": "NEW_SESSION", "images": [image]})
    assert response.status_code == 200, response.text
    assert "Server" not in response.headers
    session_id = response.json()["session_id"]
    SENT_IDS.add(session_id)
    return session_id


def sessions_on_both_workers(stack, seeds) -> dict[int, tuple[str, int]]:
    """Open sessions until each worker holds one; backend index -> (session id, image seed)."""
    placed: dict[int, tuple[str, int]] = {}
    for seed in seeds:
        session_id = open_session(stack, seed)
        placed.setdefault(stack.router.routes.lookup(session_id), (session_id, seed))
        if len(placed) == 2:
            return placed
    raise AssertionError(f"sessions did not spread over both workers: {placed}")


def ask(stack, session_id: str, prompt: str) -> requests.Response:
    return invoke(stack.url, {"prompt": prompt, "max_new_tokens": MAX_NEW}, session_id)


def expected_answers(loaded, seed: int, prompts) -> list[str]:
    """The answers a fresh engine gives the same conversation."""
    from llava_sessions.handler.engine.engine import SessionEngine
    from llava_sessions.handler.engine.generation import SamplingParams

    from llava_sessions.config import ServingConfig

    engine = SessionEngine(loaded, ServingConfig())
    session_id = engine.open_session([noise_image(seed, 40)]).session_id
    return [engine.turn(session_id, prompt, SamplingParams(MAX_NEW)).text for prompt in prompts]


def wait_restarted(stack, backend: int, old_pid: int, timeout: float = 90.0) -> int:
    """Wait until the copy's worker is READY again in a new process; its pid."""
    name = stack.torchserve.model_names[backend]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = stack.torchserve.describe(name)["workers"]
        if workers and workers[0].get("status") == "READY" and workers[0].get("pid") not in (None, -1, old_pid):
            return workers[0]["pid"]
        time.sleep(0.25)
    raise AssertionError(f"{name} not READY again after {timeout} s\n{stack.torchserve.log_tail()}")


def events_of(raw: bytes) -> list[dict]:
    from llava_sessions.deploy.client import iter_events

    return list(iter_events([raw]))


# --- a worker killed mid-stream ------------------------------------------------------------


def test_a_worker_killed_mid_stream_ends_the_stream_with_an_error_event_and_comes_back(stack, loaded_tiny):
    placed = sessions_on_both_workers(stack, seeds=range(10, 20))
    (victim_backend, (victim, _)), (other_backend, (other, other_seed)) = sorted(placed.items())
    assert ask(stack, victim, PROMPTS[0]).status_code == 200
    answers = [ask(stack, other, PROMPTS[0]).json()["generated_text"]]
    pid, other_pid = (stack.torchserve.worker_pids()[b] for b in (victim_backend, other_backend))

    body = {"prompt": STALL, "max_new_tokens": 64, "stream": True}
    with invoke(stack.url, body, victim, stream=True) as response:
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        assert "Server" not in response.headers and "ts_stream_next" not in response.headers
        chunks = response.iter_content(None)
        raw = next(chunks)  # the first token's event: the worker is now stalled on its third
        os.kill(pid, signal.SIGKILL)
        for chunk in chunks:  # the stream ends cleanly: no ChunkedEncodingError
            raw += chunk
    events = events_of(raw)
    assert [("token" in e, "error" in e) for e in events] == [(True, False)] * (len(events) - 1) + [(False, True)]
    assert events[-1]["error_type"] == "WORKER_UNAVAILABLE" and "open a new session" in events[-1]["error"]

    wait_restarted(stack, victim_backend, pid)
    # The restarted worker has no sessions: the old one is not found, and the router forgets it.
    lost = ask(stack, victim, PROMPTS[1])
    assert lost.status_code == 404 and lost.json()["error"]["code"] == "SESSION_NOT_FOUND"
    assert stack.router.routes.lookup(victim) is None
    # The other worker never stopped, and its session answers exactly as a fresh engine does.
    assert stack.torchserve.worker_pids()[other_backend] == other_pid
    later = ask(stack, other, PROMPTS[1])
    assert later.status_code == 200 and later.json()["usage"]["cached_tokens"] > 0
    answers.append(later.json()["generated_text"])
    assert answers == expected_answers(loaded_tiny, other_seed, PROMPTS[:2])
    # New sessions work on both workers, the restarted one included.
    for session_id, _ in sessions_on_both_workers(stack, seeds=range(20, 30)).values():
        assert ask(stack, session_id, PROMPTS[0]).status_code == 200


# --- a handler timeout ---------------------------------------------------------------------


def test_a_turn_past_the_response_timeout_costs_its_worker_and_only_that(stack, loaded_tiny):
    placed = sessions_on_both_workers(stack, seeds=range(30, 40))
    (victim_backend, (victim, _)), (other_backend, (other, other_seed)) = sorted(placed.items())
    answers = [ask(stack, other, PROMPTS[0]).json()["generated_text"]]
    pid, other_pid = (stack.torchserve.worker_pids()[b] for b in (victim_backend, other_backend))

    started = time.monotonic()
    response = invoke(stack.url, {"prompt": STALL, "max_new_tokens": 64}, victim)
    waited = time.monotonic() - started
    # TorchServe killed the worker after responseTimeout ("Worker died."); the router says so.
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "WORKER_UNAVAILABLE" and "sessions it held are gone" in error["message"]
    assert RESPONSE_TIMEOUT_S - 0.5 < waited < RESPONSE_TIMEOUT_S + 10
    # The router forgot the session at once: SESSION_NOT_FOUND without waiting for the restart.
    lost = ask(stack, victim, PROMPTS[1])
    assert lost.status_code == 404 and lost.json()["error"]["code"] == "SESSION_NOT_FOUND"

    wait_restarted(stack, victim_backend, pid)
    assert stack.torchserve.worker_pids()[other_backend] == other_pid
    later = ask(stack, other, PROMPTS[1])
    assert later.status_code == 200
    answers.append(later.json()["generated_text"])
    assert answers == expected_answers(loaded_tiny, other_seed, PROMPTS[:2])
    for session_id, _ in sessions_on_both_workers(stack, seeds=range(40, 50)).values():
        assert ask(stack, session_id, PROMPTS[0]).status_code == 200


def test_a_streamed_turn_only_times_out_when_no_token_comes_for_the_response_timeout(stack):
    """responseTimeout counts per chunk: a stream that stalls ends with the same error event."""
    placed = sessions_on_both_workers(stack, seeds=range(50, 60))
    victim_backend, (victim, _) = min(placed.items())
    pid = stack.torchserve.worker_pids()[victim_backend]
    with invoke(stack.url, {"prompt": STALL, "max_new_tokens": 64, "stream": True}, victim, stream=True) as response:
        raw = b"".join(response.iter_content(None))
    events = events_of(raw)
    assert "token" in events[0] and events[-1]["error_type"] == "WORKER_UNAVAILABLE"
    wait_restarted(stack, victim_backend, pid)


# --- the session client replays ----------------------------------------------------------------


@pytest.fixture
def local_aws_env(monkeypatch):
    isolate_from_aws(monkeypatch)


def test_the_session_client_replays_a_session_whose_worker_was_killed_mid_stream(stack, local_aws_env, tmp_path):
    from llava_sessions.deploy.client import SessionClient, SessionError
    from llava_sessions.deploy.local_runtime import SageMakerRuntimeServer

    image = tmp_path / "picture.png"
    noise_image(60, 40).save(image)
    SENT_IMAGES.append(png_b64(noise_image(60, 40)))
    with SageMakerRuntimeServer([stack.url], port=0) as runtime:
        client = SessionClient("faults", endpoint_url=runtime.url, region="us-east-1", max_new_tokens=MAX_NEW,
                               temperature=0)
        with client.open(images=[image]) as chat:
            SENT_IDS.add(chat.id)
            before = [chat.ask(PROMPTS[0]), chat.ask(PROMPTS[1])]
            backend = stack.router.routes.lookup(chat.id)
            pid = stack.torchserve.worker_pids()[backend]

            stream = chat.stream(STALL, max_new_tokens=64)
            next(stream)  # a token arrived; the worker is stalled on the third
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(SessionError) as broken:
                list(stream)
            assert broken.value.code == "WORKER_UNAVAILABLE"
            assert len(chat.history) == 2  # the broken turn is not part of the conversation

            wait_restarted(stack, backend, pid)
            answer = "".join(chat.stream(PROMPTS[2]))
            SENT_IDS.add(chat.id)
            assert answer and chat.reopened == 1 and chat.divergences == []
            assert [turn.answer for turn in chat.history] == [*before, answer]
            assert all(turn.complete for turn in chat.history)

        with client.open(images=[image]) as twin:  # the same conversation, never interrupted
            SENT_IDS.add(twin.id)
            assert [twin.ask(prompt) for prompt in PROMPTS] == [*before, answer]


# --- privacy: what the logs hold -------------------------------------------------------------


def test_no_log_holds_a_prompt_an_image_or_a_full_session_id(stack, router_log):
    """Runs last: every request above (kills and timeouts included) has been logged by now."""
    time.sleep(1.0)  # TorchServe's logging is asynchronous
    texts = {path.name: path.read_text(errors="replace") for path in stack.log_dir.iterdir() if path.is_file()}
    texts["router (llava_sessions loggers, DEBUG)"] = router_log.getvalue()
    assert len(texts) >= 5 and SENT_IDS and SENT_IMAGES
    assert any("W-9000" in text for text in texts.values())  # the workers' own lines are in there
    secrets_sent = {"prompt": [SECRET, "tell me everything"]}
    secrets_sent["image"] = [image[len(image) // 2 : len(image) // 2 + 24] for image in SENT_IMAGES]
    secrets_sent["session id"] = sorted(SENT_IDS) + [sid.removeprefix("sess-") for sid in SENT_IDS]
    secrets_sent["session id, a 13-character slice"] = [sid[-13:] for sid in SENT_IDS]
    leaks = [(kind, name) for kind, needles in secrets_sent.items() for needle in needles
             for name, text in texts.items() if needle in text]
    assert leaks == []
