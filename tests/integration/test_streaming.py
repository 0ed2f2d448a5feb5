"""Token streaming through the real stack: router → TorchServe → handler, read as SageMaker clients read it.

The events are parsed with the ``TokenIterator`` of the AWS blog "Stream large language
model responses in Amazon SageMaker JumpStart", fed the ``{"PayloadPart": {"Bytes": ...}}``
dicts botocore's event stream yields.
"""

from __future__ import annotations

import io
import json
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
PROMPT = "What is in the picture?"
MAX_NEW = 32


class TokenIterator:
    """The AWS blog's client, unchanged but for the name of its event stream's items."""

    def __init__(self, stream):
        self.byte_iterator = iter(stream)
        self.buffer = io.BytesIO()
        self.read_pos = 0

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            self.buffer.seek(self.read_pos)
            line = self.buffer.readline()
            if line and line[-1] == ord("\n"):
                self.read_pos += len(line) + 1
                full_line = line[:-1].decode("utf-8")
                line_data = json.loads(full_line.lstrip("data:").rstrip("/n"))
                return line_data["token"]["text"]
            chunk = next(self.byte_iterator)
            self.buffer.seek(0, io.SEEK_END)
            self.buffer.write(chunk["PayloadPart"]["Bytes"])


def invoke(url: str, body: dict, session: str | None = None, **kwargs) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if session is not None:
        headers[SESSION] = session
    return requests.post(f"{url}/invocations", data=json.dumps(body), headers=headers, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streaming")
    archive = build_archive(tiny_model_dir, tmp / "archive", max_sessions_per_worker=12, session_ttl_s=600)
    server = ServingStack(archive, tmp / "run", workers=1, port=0).start(ready_timeout=300)
    yield server
    server.stop()


def open_session(url: str, image: Image.Image) -> str:
    response = invoke(url, {"requestType": "NEW_SESSION", "images": [png_b64(image)]})
    assert response.status_code == 200, response.text
    return response.json()["session_id"]


def test_a_streamed_turn_arrives_token_by_token_and_matches_the_plain_answer(server):
    image = Image.effect_noise((40, 40), 50).convert("RGB")
    streamed_sid, twin_sid = open_session(server.url, image), open_session(server.url, image)

    body = {"prompt": PROMPT, "max_new_tokens": MAX_NEW, "temperature": 0, "stream": True}
    chunks: list[tuple[float, bytes]] = []
    with invoke(server.url, body, streamed_sid, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert not any(name.lower() == "ts_stream_next" for name in response.headers)
        for chunk in response.iter_content(None):
            chunks.append((time.monotonic(), chunk))

    texts = list(TokenIterator({"PayloadPart": {"Bytes": chunk}} for _, chunk in chunks))
    raw = b"".join(chunk for _, chunk in chunks).decode("utf-8")
    events = [json.loads(line[len("data:"):]) for line in raw.split("\n\n") if line]
    assert len(texts) == len(events) and all("token" in event for event in events)
    final = events[-1]
    assert all(event["generated_text"] is None for event in events[:-1])
    assert "".join(texts) == final["generated_text"]
    assert final["usage"]["completion_tokens"] == len(events)
    assert final["details"]["finish_reason"] in ("eos_token", "length")
    # Tokens went out while the answer was being generated, not all at the end.
    assert len(events) > 4 and len(chunks) > 4, len(chunks)
    assert chunks[0][0] < chunks[-1][0]

    plain = invoke(server.url, {"prompt": PROMPT, "max_new_tokens": MAX_NEW, "temperature": 0}, twin_sid)
    assert plain.status_code == 200 and plain.headers["Content-Type"].startswith("application/json")
    assert plain.json()["generated_text"] == final["generated_text"]
    assert plain.json()["usage"] == final["usage"]

    # The session carries on without streaming, from its KV cache.
    later = invoke(server.url, {"prompt": "And the colours?", "max_new_tokens": 4}, streamed_sid)
    assert later.status_code == 200, later.text
    usage = later.json()["usage"]
    assert 0 < usage["cached_tokens"] < usage["prompt_tokens"]


def answer_timer(url: str, done: dict[str, float]):
    """``timed(name, sid, max_new)``: a plain turn's JSON answer, its end filed in ``done[name]``."""

    def timed(name: str, sid: str, max_new: int) -> dict:
        response = invoke(url, {"prompt": PROMPT, "max_new_tokens": max_new}, sid)
        done[name] = time.perf_counter()
        assert response.status_code == 200, response.text
        return response.json()

    return timed


def test_a_streamed_turn_on_an_unknown_session_is_a_plain_404(server):
    response = invoke(server.url, {"prompt": "hi", "stream": True}, "sess-does-not-exist", stream=True)
    assert response.status_code == 404
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"]["code"] == "SESSION_NOT_FOUND"


def test_streams_of_turns_that_waited_for_a_busy_worker_come_back_to_each_client(server):
    # A long plain turn keeps the worker busy; the streamed turns sent meanwhile join its bundle
    # (handler/bundle.py, handler/joiners.py) and each client gets its own stream, token by token.
    image = Image.effect_noise((40, 40), 50).convert("RGB")
    busy_sid, *sids = (open_session(server.url, image) for _ in range(4))
    twins = [open_session(server.url, image) for _ in range(3)]
    body = {"prompt": PROMPT, "max_new_tokens": MAX_NEW, "temperature": 0, "stream": True}

    def streamed(sid: str) -> list[bytes]:
        with invoke(server.url, body, sid, stream=True) as response:
            assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
            return list(response.iter_content(None))

    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(invoke, server.url, {"prompt": PROMPT, "max_new_tokens": 96}, busy_sid)
        time.sleep(0.05)  # the long turn is in the worker's hands
        streams = [pool.submit(streamed, sid) for sid in sids]
        chunks = [future.result(120) for future in streams]
        assert busy.result(120).status_code == 200
    for own, twin in zip(chunks, twins):
        texts = list(TokenIterator({"PayloadPart": {"Bytes": chunk}} for chunk in own))
        final = json.loads(b"".join(own).decode().split("\n\n")[-2][len("data:"):])
        alone = invoke(server.url, {"prompt": PROMPT, "max_new_tokens": MAX_NEW, "temperature": 0}, twin).json()
        assert "".join(texts) == final["generated_text"] == alone["generated_text"]
        assert final["usage"] == alone["usage"] and len(texts) == final["usage"]["completion_tokens"]
    for sid in (busy_sid, *sids, *twins):
        assert invoke(server.url, {"requestType": "CLOSE"}, sid).status_code == 200


def test_a_short_answer_in_a_bundle_does_not_wait_for_a_long_one(server):
    # Two plain turns sent to a busy worker join its bundle: the one-token answer comes back
    # when its turn ends, while the long answer is still being decoded.
    image = Image.effect_noise((40, 40), 50).convert("RGB")
    busy_sid, long_sid, short_sid = (open_session(server.url, image) for _ in range(3))
    done: dict[str, float] = {}
    timed = answer_timer(server.url, done)

    with ThreadPoolExecutor(3) as pool:
        # Long enough (240 tokens) that both turns below arrive while it runs.
        busy = pool.submit(invoke, server.url, {"prompt": PROMPT, "max_new_tokens": 240}, busy_sid)
        time.sleep(0.05)  # the long turn is in the worker's hands
        long_answer = pool.submit(timed, "long", long_sid, 96)
        short_answer = pool.submit(timed, "short", short_sid, 1)
        assert short_answer.result(120)["usage"]["completion_tokens"] == 1
        assert long_answer.result(120)["usage"]["completion_tokens"] >= 20
        busy_answer = busy.result(120)
        assert busy_answer.status_code == 200 and busy_answer.json()["usage"]["completion_tokens"] > 96
    assert done["short"] < done["long"]
    for sid in (busy_sid, long_sid, short_sid):
        assert invoke(server.url, {"requestType": "CLOSE"}, sid).status_code == 200


def test_follow_ups_sent_while_a_long_turn_decodes_join_it_and_answer_as_alone(server):
    # A follow-up for a busy worker joins the turns it decodes at the next step's end: answered
    # while the long turn still runs (without joining it would wait for that turn's end), and
    # exactly as the same turn of a twin session alone.
    image = Image.effect_noise((40, 40), 50).convert("RGB")
    busy_sid, *sids = (open_session(server.url, image) for _ in range(4))
    twins = [open_session(server.url, image) for _ in range(3)]
    done: dict[str, float] = {}
    timed = answer_timer(server.url, done)

    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(timed, "busy", busy_sid, 240)
        time.sleep(0.05)  # the long turn is in the worker's hands
        joined = [pool.submit(timed, f"joined {i}", sid, 8) for i, sid in enumerate(sids)]
        answers = [future.result(120) for future in joined]
        assert busy.result(120)["usage"]["completion_tokens"] > 32  # past the joined turns' 8, with room
    assert all(done[f"joined {i}"] < done["busy"] for i in range(len(sids)))
    for answer, twin in zip(answers, twins):
        alone = invoke(server.url, {"prompt": PROMPT, "max_new_tokens": 8}, twin).json()
        assert answer["generated_text"] == alone["generated_text"] and answer["usage"] == alone["usage"]
    for sid in (busy_sid, *sids, *twins):
        assert invoke(server.url, {"requestType": "CLOSE"}, sid).status_code == 200
