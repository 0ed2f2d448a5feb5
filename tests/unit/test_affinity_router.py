"""The affinity router against fake TorchServe backends on 127.0.0.1.

The fake serves one "model" per backend (``/predictions/llava-<i>``) like TorchServe does, mints
``sess-...`` ids with an Expires header on open, answers the Closed header on close, 404
SESSION_NOT_FOUND for ids it does not hold, and records every request it sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import requests
from aiohttp import web

from multidict import CIMultiDict

from llava_sessions.affinity_router import AffinityRouter, _body_session_id
from llava_sessions.config import RouterConfig
from llava_sessions.handler import bundle
from llava_sessions.http_proxy_server import STOP_TIMEOUT_S
from llava_sessions.session_routes import SessionRoutes
from llava_sessions.wire import CLOSED_SESSION_HEADER, SESSION_HEADER, format_expires

pytestmark = pytest.mark.timeout(30)

BACKEND_TTL_S = 600
WAIT_S = 5.0  # bound on every wait in these tests


@dataclass
class Seen:
    backend: int
    header_names: list[str]  # as spelled on the wire
    headers: dict[str, str]
    body: bytes


class FakeTorchServe:
    """One aiohttp server with a model per backend, run on its own event loop thread."""

    def __init__(self, n_models: int):
        self.n_models = n_models
        self.sessions: list[set[str]] = [set() for _ in range(n_models)]
        self.seen: list[Seen] = []
        self.bundles: list[list[dict]] = []  # each bundle's member bodies
        self.answered = [0] * n_models  # requests answered per model, a bundle's members each
        self.ping_status = 200
        self.full: set[int] = set()  # backends that answer opens 429 TOO_MANY_SESSIONS
        self.events_sent = 0  # events of X-Test-Events streams
        self.release = threading.Event()  # lets a slow stream go on
        self.released_in_time: bool | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.port}/predictions/llava-{index}" for index in range(self.n_models)]

    @property
    def ping_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ping"

    def __enter__(self) -> "FakeTorchServe":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(WAIT_S)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(WAIT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT_S)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/ping", self._ping)
        app.router.add_post("/predictions/llava-{index:\\d+}", self._predict)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "Healthy"}, status=self.ping_status)

    async def _predict(self, request: web.Request) -> web.StreamResponse:
        backend = int(request.match_info["index"])
        body = await request.read()
        names = [name.decode() for name, _ in request.raw_headers]
        self.seen.append(Seen(backend, names, {k.lower(): v for k, v in request.headers.items()}, body))
        if "X-Test-Stream" in request.headers:
            return await self._slow_stream(request)
        if "X-Test-Die" in request.headers:
            return await self._die_mid_stream(request)
        if "X-Test-Events" in request.headers:
            return await self._event_stream(request)
        if "X-Test-Hold" in request.headers:  # the worker stays busy until released
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, WAIT_S)
        count = bundle.member_count(request.headers)
        if count is not None:
            return await self._bundle(request, backend, bundle.decode_request(body, count))
        status, headers, payload = self._answer(backend, request.headers, body)
        return web.Response(status=status, body=payload, headers=headers, content_type="application/json")

    def _answer(self, backend: int, headers, body: bytes) -> tuple[int, dict, bytes]:
        """What the handler answers one request: (status, headers, JSON body)."""
        self.answered[backend] += 1
        payload = json.loads(body)
        session_id = CIMultiDict(headers).get(SESSION_HEADER) or payload.get("session_id")
        if session_id in (None, "NEW_SESSION") and backend in self.full:
            error = {"error": {"code": "TOO_MANY_SESSIONS", "message": "this worker is full"}}
            return 429, {}, json.dumps(error).encode()
        if session_id in (None, "NEW_SESSION"):
            session_id = "sess-" + secrets.token_hex(8)
            self.sessions[backend].add(session_id)
            header = f"{session_id}; Expires={format_expires(time.time() + BACKEND_TTL_S)}"
            return 200, {SESSION_HEADER: header}, json.dumps({"session_id": session_id}).encode()
        if session_id not in self.sessions[backend]:
            error = {"error": {"code": "SESSION_NOT_FOUND", "message": "no such session"}}
            return 404, {}, json.dumps(error).encode()
        if payload.get("requestType") == "CLOSE" or payload.get("type") == "close_session":
            self.sessions[backend].discard(session_id)
            return 200, {CLOSED_SESSION_HEADER: session_id}, b'{"closed": true}'
        answer = {"backend": backend, "session_id": session_id, "headers": dict(headers)}
        return 200, {}, json.dumps(answer).encode()

    async def _bundle(self, request: web.Request, backend: int, members) -> web.StreamResponse:
        """Answers in frames, interleaved: every head first, then the bodies and ends last member first."""
        self.bundles.append([json.loads(body) for _, body in members])
        answers = [self._answer(backend, headers, body) for headers, body in members]
        reply = web.StreamResponse(headers={"Content-Type": bundle.CONTENT_TYPE})
        reply.enable_chunked_encoding()
        await reply.prepare(request)
        for member, (status, headers, _) in enumerate(answers):
            await reply.write(bundle.head_frame(member, status, headers, "application/json"))
        for member in reversed(range(len(answers))):
            data = bundle.frame(member, bundle.DATA, answers[member][2]) + bundle.frame(member, bundle.END)
            for cut in (data[:3], data[3:]):  # frames need not align with chunks
                await reply.write(cut)
        await reply.write_eof()
        return reply

    async def _slow_stream(self, request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse(headers={"ts_stream_next": "true", "X-Reply-Note": "kept"})
        reply.enable_chunked_encoding()
        await reply.prepare(request)
        await reply.write(b"first\n")
        # The rest only once the client has seen the first chunk: a buffering router would stall here.
        self.released_in_time = await asyncio.get_running_loop().run_in_executor(None, self.release.wait, WAIT_S)
        for chunk in (b"second\n", b"third\n"):
            await asyncio.sleep(0.02)
            await reply.write(chunk)
        await reply.write_eof()
        return reply

    async def _event_stream(self, request: web.Request) -> web.StreamResponse:
        """A token stream, one event every 50 ms until released (at most 100), then the last one."""
        reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        reply.enable_chunked_encoding()
        await reply.prepare(request)
        self.release.clear()
        for _ in range(100):
            if self.release.is_set():
                break
            await reply.write(b'data:{"token": {"id": 1, "text": "a", "special": false}, "generated_text": null}\n\n')
            self.events_sent += 1
            await asyncio.sleep(0.05)
        await reply.write(b'data:{"token": null, "generated_text": "aaa"}\n\n')
        await reply.write_eof()
        return reply

    async def _die_mid_stream(self, request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse()
        reply.enable_chunked_encoding()
        await reply.prepare(request)
        await reply.write(b"partial\n")
        await asyncio.sleep(0.05)
        request.transport.close()  # the worker process died
        return reply


class FakeClock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake():
    with FakeTorchServe(3) as server:
        yield server


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def make_router(fake, clock):
    started: list[AffinityRouter] = []

    def make(backends: list[str] | None = None, ping_url: str | None = None, **options) -> AffinityRouter:
        backends = backends or fake.urls
        routes = SessionRoutes(len(backends), clock=clock)
        options.setdefault("joining", False)  # the fake's workers take no joiners (see the joining tests)
        router = AffinityRouter(backends, port=0, ping_url=ping_url or fake.ping_url, routes=routes, **options)
        started.append(router.start())
        return router

    yield make
    for router in started:
        router.stop()


@pytest.fixture
def router(make_router):
    return make_router()


@pytest.fixture
def http():
    with requests.Session() as session:
        session.trust_env = False  # no proxies from the environment for 127.0.0.1
        yield session


def invoke(http, router, body: dict | bytes, session_id: str | None = None, **headers) -> requests.Response:
    if session_id is not None:
        headers[SESSION_HEADER] = session_id
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(f"{router.url}/invocations", data=data, headers=headers, timeout=WAIT_S)


def open_session(http, router, **headers) -> tuple[str, requests.Response]:
    reply = invoke(http, router, {"requestType": "NEW_SESSION"}, **headers)
    assert reply.status_code == 200, reply.text
    return reply.json()["session_id"], reply


def turn(http, router, session_id: str, prompt: str = "hi") -> requests.Response:
    return invoke(http, router, {"prompt": prompt}, session_id)


def error_code(reply: requests.Response) -> str:
    return reply.json()["error"]["code"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- opening and routing ------------------------------------------------------------


def test_opens_alternate_across_backends(http, router, fake):
    for _ in range(6):
        open_session(http, router)
    assert [seen.backend for seen in fake.seen] == [0, 1, 2, 0, 1, 2]
    assert router.routes.counts() == [2, 2, 2]


def test_open_returns_the_backends_session_header(http, router):
    session_id, reply = open_session(http, router)
    assert reply.headers[SESSION_HEADER].startswith(f"{session_id}; Expires=")


def test_every_turn_reaches_the_backend_that_opened_the_session(http, router, fake):
    opened = {}
    for _ in range(9):
        session_id, _ = open_session(http, router)
        opened[session_id] = fake.seen[-1].backend
    turns = [session_id for _ in range(3) for session_id in opened]  # interleaved rounds

    with ThreadPoolExecutor(max_workers=6) as pool:
        replies = list(pool.map(lambda session_id: turn(http, router, session_id), turns))

    for session_id, reply in zip(turns, replies):
        assert reply.status_code == 200, reply.text
        assert (reply.json()["backend"], reply.json()["session_id"]) == (opened[session_id], session_id)
    # Turns that found their worker busy may have gone in one bundle: count what was answered.
    assert fake.answered == [3 + 9, 3 + 9, 3 + 9]


def test_lower_case_session_header_is_routed_and_resent_in_canonical_case(http, router, fake):
    session_id, _ = open_session(http, router)
    reply = invoke(http, router, {"prompt": "hi"}, **{"x-amzn-sagemaker-session-id": session_id})
    assert reply.status_code == 200
    assert SESSION_HEADER in fake.seen[-1].header_names
    assert fake.seen[-1].headers[SESSION_HEADER.lower()] == session_id


@pytest.mark.parametrize("headers, forwarded", [
    ({}, None), ({SESSION_HEADER: ""}, None),
    # NEW_SESSION travels on: without it a question is a one-shot answer, not an open.
    ({SESSION_HEADER: "NEW_SESSION"}, "NEW_SESSION"), ({"x-amzn-sagemaker-session-id": "NEW_SESSION"}, "NEW_SESSION"),
])
def test_absent_empty_and_new_session_headers_open_on_the_least_loaded_backend(http, router, fake, headers, forwarded):
    session_id, _ = open_session(http, router, **headers)
    assert router.routes.lookup(session_id) == 0
    assert fake.seen[-1].headers.get(SESSION_HEADER.lower()) == forwarded


def test_unknown_session_is_refused_without_calling_a_backend(http, router, fake):
    reply = turn(http, router, "sess-never-opened")
    assert reply.status_code == 404
    assert error_code(reply) == "SESSION_NOT_FOUND"
    assert "NEW_SESSION" in reply.json()["error"]["message"]
    assert fake.seen == []


@pytest.mark.parametrize("session_id", ["bad_id", "-lead", "a" * 257])
def test_invalid_session_id_is_refused_without_calling_a_backend(http, router, fake, session_id):
    reply = turn(http, router, session_id)
    assert reply.status_code == 400
    assert error_code(reply) == "INVALID_REQUEST"
    assert fake.seen == []


def test_close_unbinds_the_session(http, router, fake):
    session_id, _ = open_session(http, router)
    reply = invoke(http, router, {"requestType": "CLOSE"}, session_id)
    assert reply.status_code == 200
    assert reply.headers[CLOSED_SESSION_HEADER] == session_id
    assert router.routes.lookup(session_id) is None

    again = turn(http, router, session_id)
    assert again.status_code == 404 and error_code(again) == "SESSION_NOT_FOUND"
    assert len(fake.seen) == 2  # the open and the close only


def test_expired_session_is_refused_by_the_router(http, router, fake, clock):
    session_id, _ = open_session(http, router)
    assert turn(http, router, session_id).status_code == 200
    clock.now += BACKEND_TTL_S + 1
    reply = turn(http, router, session_id)
    assert reply.status_code == 404 and error_code(reply) == "SESSION_NOT_FOUND"
    assert len(fake.seen) == 2
    assert len(router.routes) == 0


def test_a_session_the_backend_lost_is_unbound(http, router, fake):
    session_id, _ = open_session(http, router)
    fake.sessions[0].clear()  # the worker restarted

    lost = turn(http, router, session_id)
    assert lost.status_code == 404 and error_code(lost) == "SESSION_NOT_FOUND"
    assert lost.json()["error"]["message"] == "no such session"  # the backend's own answer
    assert router.routes.lookup(session_id) is None

    turn(http, router, session_id)
    assert len(fake.seen) == 2  # the router answered the second turn itself


def test_aws_sample_dialect_routes_by_the_body_session_id(http, router, fake):
    open_session(http, router)  # occupies backend 0
    opened = invoke(http, router, {"type": "start_session", "path": "s3://bucket/cat.png", "session_id": None})
    session_id = opened.json()["session_id"]
    assert fake.seen[-1].backend == 1

    prompt = invoke(http, router, {"type": "send_text_prompt", "session_id": session_id, "prompt_text": "hi"})
    assert prompt.json()["backend"] == 1
    assert fake.seen[-1].headers[SESSION_HEADER.lower()] == session_id

    closed = invoke(http, router, {"type": "close_session", "session_id": session_id})
    assert closed.headers[CLOSED_SESSION_HEADER] == session_id
    after = invoke(http, router, {"type": "send_text_prompt", "session_id": session_id, "prompt_text": "hi"})
    assert after.status_code == 404 and error_code(after) == "SESSION_NOT_FOUND"
    assert len(fake.seen) == 4


def test_the_body_session_id_is_found_however_its_key_is_written():
    # The router skips parsing bodies that cannot name one (an open's inline image), and only those.
    assert _body_session_id(b'{"type": "chat", "session_id": "sess-ab"}') == "sess-ab"
    assert _body_session_id(b'{"type": "chat", "session\\u005fid": "sess-ab"}') == "sess-ab"
    assert _body_session_id(b'{"type": "open", "images": ["' + b"A/+=" * 50000 + b'"]}') is None


def test_invalid_body_session_id_is_refused(http, router, fake):
    reply = invoke(http, router, {"type": "send_text_prompt", "session_id": "not_valid", "prompt_text": "hi"})
    assert reply.status_code == 400 and error_code(reply) == "INVALID_REQUEST"
    assert fake.seen == []


# --- what passes through ------------------------------------------------------------


def test_end_to_end_headers_pass_and_hop_by_hop_headers_do_not(http, router, fake):
    session_id, _ = open_session(http, router)
    reply = invoke(
        http, router, {"prompt": "hi"}, session_id,
        **{"X-Amzn-SageMaker-Custom-Attributes": "trace=1", "Connection": "keep-alive, X-Hop", "X-Hop": "secret"},
    )
    seen = fake.seen[-1].headers
    assert seen["x-amzn-sagemaker-custom-attributes"] == "trace=1"
    assert "x-hop" not in seen
    assert seen["content-type"] == "application/json"  # the default when the client sends none
    assert reply.status_code == 200


def test_content_type_is_passed_through(http, router, fake):
    open_session(http, router, **{"Content-Type": "application/json; charset=utf-8"})
    assert fake.seen[-1].headers["content-type"] == "application/json; charset=utf-8"


def test_chunks_stream_through_as_they_arrive(http, router, fake):
    with invoke_stream(http, router, **{"X-Test-Stream": "1"}) as reply:
        chunks = reply.iter_content(chunk_size=None)
        first = next(chunks)
        fake.release.set()
        rest = b"".join(chunks)
    assert first == b"first\n"
    assert rest == b"second\nthird\n"
    assert fake.released_in_time is True  # the first chunk arrived before the last was sent
    assert reply.headers["X-Reply-Note"] == "kept"
    assert "ts_stream_next" not in reply.headers


def test_backend_dying_mid_stream_ends_the_clients_stream(http, router):
    started = time.monotonic()
    with invoke_stream(http, router, **{"X-Test-Die": "1"}) as reply:
        received = bytearray()
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for chunk in reply.iter_content(chunk_size=None):
                received += chunk
    assert received == b"partial\n"
    assert time.monotonic() - started < 2.0


def invoke_stream(http, router, **headers) -> requests.Response:
    return http.post(f"{router.url}/invocations", data=b'{"prompt": "hi"}', headers=headers, stream=True, timeout=WAIT_S)


# --- limits and failures ------------------------------------------------------------


def test_body_over_the_limit_is_refused(http, make_router, fake):
    router = make_router(config=RouterConfig(max_request_bytes=1024))
    assert invoke(http, router, b"x" * 1024 + b"x").status_code == 413
    chunked = http.post(f"{router.url}/invocations", data=iter([b"x" * 700, b"x" * 700]), timeout=WAIT_S)
    assert chunked.status_code == 413
    assert error_code(chunked) == "REQUEST_TOO_LARGE"
    assert fake.seen == []
    assert invoke(http, router, {"requestType": "NEW_SESSION"}).status_code == 200


def test_backend_down_is_503_worker_unavailable_quickly(http, make_router):
    closed_port = free_port()
    router = make_router(backends=[f"http://127.0.0.1:{closed_port}/predictions/llava-0"])
    started = time.monotonic()
    reply = invoke(http, router, {"requestType": "NEW_SESSION"})
    assert reply.status_code == 503
    assert error_code(reply) == "WORKER_UNAVAILABLE"
    assert time.monotonic() - started < 2.0


def test_ping_reflects_the_backends_ping(http, router, fake, make_router):
    assert http.get(f"{router.url}/ping", timeout=WAIT_S).status_code == 200
    fake.ping_status = 500
    assert http.get(f"{router.url}/ping", timeout=WAIT_S).status_code == 503
    down = make_router(ping_url=f"http://127.0.0.1:{free_port()}/ping")
    assert http.get(f"{down.url}/ping", timeout=WAIT_S).status_code == 503


def test_other_paths_and_methods_get_json_errors(http, router):
    missing = http.get(f"{router.url}/models", timeout=WAIT_S)
    assert missing.status_code == 404 and error_code(missing) == "NOT_FOUND"
    wrong = http.get(f"{router.url}/invocations", timeout=WAIT_S)
    assert wrong.status_code == 405 and error_code(wrong) == "METHOD_NOT_ALLOWED"
    assert wrong.headers["Allow"] == "POST"


# --- lifecycle ---------------------------------------------------------------------


def test_stop_is_bounded_with_a_stream_in_flight(http, make_router, fake):
    router = make_router()
    reply = invoke_stream(http, router, **{"X-Test-Stream": "1"})
    assert next(reply.iter_content(chunk_size=None)) == b"first\n"
    started = time.monotonic()
    router.stop()
    assert time.monotonic() - started < STOP_TIMEOUT_S
    reply.close()


def test_routes_must_match_the_backends():
    with pytest.raises(ValueError):
        AffinityRouter(["http://127.0.0.1:1/a", "http://127.0.0.1:1/b"], ping_url="x", routes=SessionRoutes(3))


def test_run_forever_returns_on_sigterm(fake, http):
    port = free_port()
    code = (
        "from llava_sessions.affinity_router import AffinityRouter\n"
        f"AffinityRouter({fake.urls!r}, port={port}, ping_url={fake.ping_url!r}).run_forever()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        _wait_until_listening(http, f"http://127.0.0.1:{port}/ping", child)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=WAIT_S) == 0
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(WAIT_S)


def _wait_until_listening(http, url: str, child: subprocess.Popen) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert child.poll() is None, "the router process exited early"
        try:
            if http.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.05)
    pytest.fail("the router did not start listening within 10 s")


# --- batching: one request per worker in hand, the rest in one bundle ------------------


def test_requests_for_a_busy_worker_go_together_in_one_bundle(http, make_router, fake):
    router = make_router(backends=fake.urls[:1])
    ids = [open_session(http, router)[0] for _ in range(4)]
    fake.release.clear()
    with ThreadPoolExecutor(8) as pool:
        busy = pool.submit(invoke_alone, router, {"prompt": "first"}, ids[0], **{"X-Test-Hold": "1"})
        assert _wait_for(lambda: len(fake.seen) == 5)  # the held turn is in the worker's hands
        others = [pool.submit(invoke_alone, router, {"prompt": f"p{i}"}, sid) for i, sid in enumerate(ids[1:], 1)]
        again = pool.submit(invoke_alone, router, {"prompt": "again"}, ids[3])
        time.sleep(0.2)
        assert len(fake.seen) == 5  # nothing else reached the worker while it was busy
        fake.release.set()
        replies = [future.result(WAIT_S) for future in [*others, again]]
        assert busy.result(WAIT_S).status_code == 200
    # One more request reached the worker: the bundle of the four that waited.
    assert len(fake.seen) == 6 and fake.seen[-1].headers[bundle.BUNDLE_HEADER.lower()] == "4"
    [members] = fake.bundles
    assert sorted(m["prompt"] for m in members) == ["again", "p1", "p2", "p3"]
    for reply, sid in zip(replies, [*ids[1:], ids[3]]):
        assert reply.status_code == 200 and reply.json()["session_id"] == sid
        assert reply.json()["headers"][SESSION_HEADER] == sid  # each member kept its own headers


def test_bundle_members_answers_feed_the_routes(http, make_router, fake):
    router = make_router(backends=fake.urls[:1])
    sid, _ = open_session(http, router)
    router.routes.bind("sess-00000000", 0, time.time() + 60)  # a session the worker no longer holds
    fake.release.clear()
    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(invoke_alone, router, {"prompt": "hold"}, sid, **{"X-Test-Hold": "1"})
        assert _wait_for(lambda: len(fake.seen) == 2)
        opened = pool.submit(invoke_alone, router, {"requestType": "NEW_SESSION"})
        closed = pool.submit(invoke_alone, router, {"requestType": "CLOSE"}, sid)
        lost = pool.submit(invoke_alone, router, {"prompt": "x"}, "sess-00000000")
        time.sleep(0.2)
        fake.release.set()
        opened, closed, lost = (f.result(WAIT_S) for f in (opened, closed, lost))
        busy.result(WAIT_S)
    assert [len(members) for members in fake.bundles] == [3]
    new_sid = opened.json()["session_id"]
    assert opened.headers[SESSION_HEADER].startswith(new_sid) and router.routes.lookup(new_sid) == 0
    assert closed.headers[CLOSED_SESSION_HEADER] == sid and router.routes.lookup(sid) is None
    assert lost.status_code == 404 and error_code(lost) == "SESSION_NOT_FOUND"
    assert router.routes.lookup("sess-00000000") is None  # the worker lost it: unbound


def invoke_alone(router, body: dict, session_id: str | None = None, **headers) -> requests.Response:
    """``invoke`` on a connection of its own, for requests sent from several threads at once."""
    with requests.Session() as session:
        session.trust_env = False
        return invoke(session, router, body, session_id, **headers)


def test_past_max_waiting_a_busy_workers_requests_are_refused_at_once(make_router, fake):
    router = make_router(backends=fake.urls[:1], max_waiting=2)
    with requests.Session() as session:
        session.trust_env = False
        ids = [open_session(session, router)[0] for _ in range(4)]
    fake.release.clear()
    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(invoke_alone, router, {"prompt": "hold"}, ids[0], **{"X-Test-Hold": "1"})
        assert _wait_for(lambda: len(fake.seen) == 5)
        waiting = [pool.submit(invoke_alone, router, {"prompt": "w"}, sid) for sid in ids[1:3]]
        assert _wait_for(lambda: len(router._gates[0].waiting) == 2)
        started = time.monotonic()
        refused = invoke_alone(router, {"prompt": "over"}, ids[3])
        assert time.monotonic() - started < 1.0
        assert refused.status_code == 503 and error_code(refused) == "WORKER_UNAVAILABLE"
        fake.release.set()
        assert [f.result(WAIT_S).status_code for f in [busy, *waiting]] == [200, 200, 200]
    assert [len(members) for members in fake.bundles] == [2]


def test_a_lone_request_is_never_bundled(http, router, fake):
    sid, _ = open_session(http, router)
    for _ in range(3):
        assert turn(http, router, sid).status_code == 200
    assert fake.bundles == [] and all(bundle.BUNDLE_HEADER.lower() not in s.headers for s in fake.seen)


def _wait_for(condition, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False
