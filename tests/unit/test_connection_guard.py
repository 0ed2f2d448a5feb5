"""Connection-level limits and JSON parser errors, played against a real server with raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import select
import socket
import time

import pytest
from aiohttp import web

from llava_sessions.connection_guard import ConnectionLimits, GuardedAppRunner
from llava_sessions.errors import ConfigError
from llava_sessions.http_proxy_server import HttpProxyServer

pytestmark = pytest.mark.timeout(30)

IDLE_S = 0.5
HEADER_S = 0.5
MARGIN_S = 1.5  # a busy test machine's scheduling slack; every wait below is bounded by it
FAST = ConnectionLimits(idle_timeout_s=IDLE_S, header_timeout_s=HEADER_S)
STREAM_CHUNKS = 4
STREAM_GAP_S = 0.3  # together longer than both timeouts


class TinyServer(HttpProxyServer):
    name = "tiny-guarded"

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/echo-len", self._echo_len)
        app.router.add_get("/stream", self._stream)
        app.router.add_get("/boom", self._boom)
        app.router.add_post("/early", self._early)
        return app

    async def _echo_len(self, request: web.Request) -> web.Response:
        return web.json_response({"length": len(await request.read())})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(STREAM_CHUNKS):
            await response.write(b"chunk%d\n" % i)
            await asyncio.sleep(STREAM_GAP_S)
        await response.write_eof()
        return response

    async def _early(self, request: web.Request) -> web.Response:
        return web.json_response({"read": False}, status=202)  # before the body has arrived

    async def _boom(self, request: web.Request) -> web.Response:
        raise RuntimeError("boom-detail-from-the-handler")


@contextlib.contextmanager
def serving(limits: ConnectionLimits = FAST):
    with TinyServer("127.0.0.1", 0, limits=limits) as server:
        yield server


def connect(server: TinyServer) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=MARGIN_S + 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_to_eof(sock: socket.socket, within_s: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes, or until ``within_s``; and whether it closed."""
    data = b""
    deadline = time.monotonic() + within_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length response off a kept-alive connection."""
    sock.settimeout(MARGIN_S + 5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed mid-response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status, headers = parse_head(head)
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the server closed mid-body"
        body += chunk
    return status, headers, body


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def parse_whole(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    return status, headers, body


def post(body: bytes = b"hello") -> bytes:
    return b"POST /echo-len HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def assert_json_error(headers: dict[str, str], body: bytes, code: str) -> dict:
    assert headers["content-type"].startswith("application/json")
    document = json.loads(body)
    assert document["error"]["code"] == code
    assert document["error"]["message"]
    return document


# --- idle connections -------------------------------------------------------------


def test_connections_that_send_nothing_are_closed_after_the_idle_timeout():
    with serving() as server:
        socks = [connect(server) for _ in range(20)]
        opened = time.monotonic()
        try:
            results = [read_to_eof(sock, IDLE_S + MARGIN_S - (time.monotonic() - opened)) for sock in socks]
            closed_after = time.monotonic() - opened
        finally:
            for sock in socks:
                sock.close()
    assert [closed for _, closed in results] == [True] * 20
    assert [data for data, _ in results] == [b""] * 20  # silently: there was no request to answer
    assert closed_after < IDLE_S + MARGIN_S


def test_a_kept_alive_connection_is_closed_once_idle():
    with serving() as server, connect(server) as sock:
        sock.sendall(post())
        assert read_response(sock)[0] == 200
        answered = time.monotonic()
        data, closed = read_to_eof(sock, IDLE_S + MARGIN_S)
        assert closed and data == b""
        assert time.monotonic() - answered >= IDLE_S * 0.8


# --- slow headers -----------------------------------------------------------------


def test_slow_partial_headers_get_a_408_then_the_connection_closes():
    with serving() as server, connect(server) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\n")
        started = time.monotonic()
        dribbled = 0
        # A byte every 0.1 s (a header name that never ends) until the server answers.
        while time.monotonic() - started < HEADER_S + MARGIN_S:
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                break
            try:
                sock.sendall(b"X")
            except OSError:
                break
            dribbled += 1
        raw, closed = read_to_eof(sock, MARGIN_S)
        answered_after = time.monotonic() - started
    assert dribbled >= 3  # bytes kept arriving, and still the deadline held
    assert closed
    assert answered_after < HEADER_S + MARGIN_S
    status, headers, body = parse_whole(raw)
    assert status == 408
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert_json_error(headers, body, "REQUEST_TIMEOUT")


def test_two_requests_on_one_kept_alive_connection():
    with serving() as server, connect(server) as sock:
        for body in (b"first", b"the second one"):
            sock.sendall(post(body))
            status, headers, answer = read_response(sock)
            assert status == 200
            assert json.loads(answer) == {"length": len(body)}
            assert headers.get("connection", "keep-alive").lower() != "close"


def test_headers_in_two_quick_pieces():
    request = post(b"abc")
    with serving() as server, connect(server) as sock:
        sock.sendall(request[:20])
        time.sleep(0.1)
        sock.sendall(request[20:])
        status, _, answer = read_response(sock)
    assert status == 200 and json.loads(answer) == {"length": 3}


def test_a_request_begun_just_before_the_idle_deadline_is_not_cut_off():
    """Its headers straddle the idle deadline: from their first byte the header timeout rules."""
    request = post(b"abc")
    with serving() as server, connect(server) as sock:
        time.sleep(IDLE_S * 0.7)
        for piece in (request[:10], request[10:20], request[20:]):
            sock.sendall(piece)
            time.sleep(IDLE_S * 0.25)
        status, _, answer = read_response(sock)
    assert status == 200 and json.loads(answer) == {"length": 3}


def test_a_slow_but_complete_body_is_not_cut_by_the_header_timeout():
    body = b"0123456789"
    with serving() as server, connect(server) as sock:
        sock.sendall(b"POST /echo-len HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body))
        started = time.monotonic()
        for byte in body:
            time.sleep(0.15)
            sock.sendall(bytes([byte]))
        assert time.monotonic() - started > HEADER_S + IDLE_S
        status, _, answer = read_response(sock)
    assert status == 200 and json.loads(answer) == {"length": len(body)}


def test_a_body_still_arriving_after_an_early_answer_is_not_taken_for_late_headers():
    """The handler answers without reading the body; its bytes keep coming past the header timeout."""
    body = b"0123456789"
    with serving() as server, connect(server) as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body))
        status, _, _ = read_response(sock)
        assert status == 202
        for byte in body:
            time.sleep(0.15)
            sock.sendall(bytes([byte]))
        sock.sendall(post())
        status, _, answer = read_response(sock)  # a 408 would come first
    assert status == 200 and json.loads(answer) == {"length": 5}


def test_a_streamed_response_outlives_both_timeouts_and_the_connection_stays_usable():
    with serving() as server, connect(server) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
        data = b""
        sock.settimeout(MARGIN_S + 5)
        while not data.endswith(b"0\r\n\r\n"):  # the chunked body's last chunk
            chunk = sock.recv(65536)
            assert chunk, f"the server closed mid-stream: {data!r}"
            data += chunk
        assert all(b"chunk%d\n" % i in data for i in range(STREAM_CHUNKS))
        sock.sendall(post())
        assert read_response(sock)[0] == 200


# --- the connection cap -----------------------------------------------------------


def test_one_connection_over_the_cap_gets_a_503_and_is_closed():
    limits = ConnectionLimits(idle_timeout_s=10.0, header_timeout_s=HEADER_S, max_connections=3)
    with serving(limits) as server:
        admitted = [connect(server) for _ in range(3)]
        try:
            for sock in admitted:
                sock.sendall(post())
                assert read_response(sock)[0] == 200
            with connect(server) as extra:
                raw, closed = read_to_eof(extra, MARGIN_S)
            assert closed
            status, headers, body = parse_whole(raw)
            assert status == 503
            assert headers["retry-after"] == "1"
            assert headers["connection"] == "close"
            assert_json_error(headers, body, "TOO_MANY_CONNECTIONS")

            admitted.pop().close()
            # The server sees the close a moment later; until then a newcomer may still be refused.
            deadline = time.monotonic() + MARGIN_S
            while True:
                with connect(server) as newcomer:
                    newcomer.sendall(post(b"after"))
                    status, _, answer = read_response(newcomer)
                if status == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert status == 200 and json.loads(answer) == {"length": 5}
        finally:
            for sock in admitted:
                sock.close()


# --- aiohttp's own errors ---------------------------------------------------------


MALFORMED = {
    "bad request line": b"GARBAGE SECRET123\r\n\r\n",
    "header name with a space": b"GET / HTTP/1.1\r\nHost: a\r\nBad SECRET123: x\r\n\r\n",
    "control byte in a session id": (
        b"POST /echo-len HTTP/1.1\r\nHost: a\r\nX-Amzn-SageMaker-Session-Id: sess-SECRET123\x01\r\n"
        b"Content-Length: 0\r\n\r\n"
    ),
    "oversized header": (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Amzn-SageMaker-Session-Id: sess-SECRET123" + b"x" * 9000 + b"\r\n\r\n"
    ),
}


@pytest.mark.parametrize("request_bytes", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_request_gets_a_json_400_that_echoes_nothing(request_bytes, caplog):
    caplog.set_level(logging.DEBUG)
    with serving() as server, connect(server) as sock:
        sock.sendall(request_bytes)
        raw, closed = read_to_eof(sock, MARGIN_S)
    assert closed
    assert b"SECRET123" not in raw
    status, headers, body = parse_whole(raw)
    assert status == 400
    message = assert_json_error(headers, body, "BAD_HTTP_REQUEST")["error"]["message"]
    assert "send a valid HTTP/1.1 request" in message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    ours = [r for r in caplog.records if r.name == "llava_sessions.connection_guard"]
    assert len(ours) == 1 and ours[0].levelno == logging.DEBUG and ours[0].exc_info is None
    assert "SECRET123" not in caplog.text


def test_a_failing_handler_gets_a_json_500_and_its_traceback_logged(caplog):
    with serving() as server, connect(server) as sock:
        sock.sendall(b"GET /boom HTTP/1.1\r\nHost: a\r\n\r\n")
        raw, closed = read_to_eof(sock, MARGIN_S)
    assert closed  # as aiohttp does after an error
    status, headers, body = parse_whole(raw)
    assert status == 500
    assert_json_error(headers, body, "INTERNAL_ERROR")
    assert b"boom-detail" not in body
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "boom-detail-from-the-handler" in caplog.text


# --- configuration ----------------------------------------------------------------


def test_the_defaults():
    assert ConnectionLimits() == ConnectionLimits(idle_timeout_s=75.0, header_timeout_s=10.0, max_connections=1000)
    assert TinyServer("127.0.0.1", 0).connection_limits == ConnectionLimits()


@pytest.mark.parametrize(
    "field, value",
    [
        ("idle_timeout_s", 0),
        ("idle_timeout_s", -1.0),
        ("idle_timeout_s", math.nan),
        ("idle_timeout_s", math.inf),
        ("idle_timeout_s", "75"),
        ("header_timeout_s", 0.0),
        ("header_timeout_s", True),
        ("max_connections", 0),
        ("max_connections", -5),
        ("max_connections", 2.5),
        ("max_connections", True),
    ],
)
def test_limits_that_make_no_sense_are_refused_with_a_fix(field, value):
    with pytest.raises(ConfigError) as info:
        ConnectionLimits(**{field: value})
    assert f"ConnectionLimits.{field} must be" in str(info.value)
    assert "use e.g." in str(info.value)


def test_the_runner_takes_the_idle_timeout_from_the_limits_only():
    with pytest.raises(TypeError, match="idle_timeout_s"):
        GuardedAppRunner(web.Application(), limits=ConnectionLimits(), keepalive_timeout=5)
