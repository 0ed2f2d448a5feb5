"""The router as a trust boundary and a good citizen: what clients may not send, opens that find
a worker full, clients that hang up, and the drain on SIGTERM. Against fake TorchServe backends."""

from __future__ import annotations

import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from llava_sessions.config import RouterConfig
from llava_sessions.handler import bundle, router_hop
from tests.fakes import raw_post, reset
from tests.unit.test_affinity_router import (  # noqa: F401  (fixtures)
    WAIT_S,
    _wait_for,
    clock,
    error_code,
    fake,
    http,
    invoke,
    invoke_alone,
    make_router,
    open_session,
    router,
)

pytestmark = pytest.mark.timeout(30)


def raw_request(router, body: bytes, **headers) -> socket.socket:
    return raw_post(router.port, body, **headers)


class Listeners:
    """The workers' ends of the cancellation channel, one per fake model."""

    def __init__(self, router, n: int):
        self.listeners = [router_hop.CancelListener(router.secret, f"llava-{i}") for i in range(n)]

    def heard(self, request_id: str) -> bool:
        return any(listener.is_cancelled(request_id) for listener in self.listeners)

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()


# --- what only the router may send ---------------------------------------------------------


def test_a_forged_bundle_is_refused_and_reaches_no_worker(http, router, fake):
    members = [({}, json.dumps({"requestType": "NEW_SESSION"}).encode())] * 31
    reply = invoke(http, router, bundle.encode_request(members), **{
        bundle.BUNDLE_HEADER: "31", "Content-Type": bundle.CONTENT_TYPE})
    assert reply.status_code == 400 and error_code(reply) == "INVALID_REQUEST"
    assert reply.headers["Content-Type"].startswith("application/json")
    assert fake.seen == [] and fake.bundles == []


@pytest.mark.parametrize("headers", [
    {"Content-Type": bundle.CONTENT_TYPE},
    {router_hop.SECRET_HEADER: "guess"},
    {router_hop.REQUEST_ID_HEADER: "rid"},
    {"x-llava-sessions-received-at": "0"},
])
def test_internal_headers_and_framing_from_a_client_are_refused(http, router, fake, headers):
    reply = invoke(http, router, {"requestType": "NEW_SESSION"}, **headers)
    assert reply.status_code == 400 and error_code(reply) == "INVALID_REQUEST"
    assert fake.seen == []


def test_the_router_tells_its_workers_who_it_is_and_when_each_request_arrived(http, router, fake):
    sid, _ = open_session(http, router)
    before = time.time()
    invoke(http, router, {"prompt": "hi"}, sid)
    seen = fake.seen[-1].headers
    assert seen[router_hop.SECRET_HEADER.lower()] == router.secret
    assert before - 1 <= float(seen[router_hop.RECEIVED_AT_HEADER.lower()]) <= time.time()
    assert seen[router_hop.REQUEST_ID_HEADER.lower()] != fake.seen[-2].headers[router_hop.REQUEST_ID_HEADER.lower()]


# --- an open that finds its worker full ------------------------------------------------------


def test_an_open_refused_by_a_full_worker_is_tried_on_another(http, router, fake):
    fake.full = {0, 1}
    for _ in range(4):
        sid, reply = open_session(http, router)
        assert router.routes.lookup(sid) == 2
    fake.full = {0, 1, 2}
    reply = invoke(http, router, {"requestType": "NEW_SESSION"})
    assert reply.status_code == 429 and error_code(reply) == "TOO_MANY_SESSIONS"
    # Each backend was asked once for that last open.
    assert [s.backend for s in fake.seen[-3:]] and sorted(s.backend for s in fake.seen[-3:]) == [0, 1, 2]


# --- clients that hang up ---------------------------------------------------------------------


def test_a_client_that_hangs_up_mid_stream_stops_its_turn_at_the_worker(router, fake):
    listeners = Listeners(router, 3)
    try:
        sock = raw_request(router, b'{"prompt": "hi"}', **{"X-Test-Events": "1"})
        received = b""
        while b"data:" not in received:  # the stream is flowing
            received += sock.recv(4096)
        request_id = fake.seen[-1].headers[router_hop.REQUEST_ID_HEADER.lower()]
        reset(sock)
        assert _wait_for(lambda: listeners.heard(request_id), timeout=2.0)
    finally:
        fake.release.set()
        listeners.close()


def test_a_client_that_hangs_up_while_queued_is_never_sent(make_router, fake):
    router = make_router(backends=fake.urls[:1])
    with requests.Session() as session:
        session.trust_env = False
        busy_sid, _ = open_session(session, router)
        queued_sid, _ = open_session(session, router)
    fake.release.clear()
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(invoke_alone, router, {"prompt": "hold"}, busy_sid, **{"X-Test-Hold": "1"})
        assert _wait_for(lambda: len(fake.seen) == 3)
        sock = raw_request(router, b'{"prompt": "gone"}', **{"X-Amzn-SageMaker-Session-Id": queued_sid})
        assert _wait_for(lambda: len(router._gates[0].waiting) == 1)
        reset(sock)
        assert _wait_for(lambda: all(w.answered.done() for w in router._gates[0].waiting))
        fake.release.set()
        assert busy.result(WAIT_S).status_code == 200
    time.sleep(0.2)
    assert len(fake.seen) == 3 and fake.bundles == []


# --- drain ----------------------------------------------------------------------------------------


def read_stream(router, headers: dict) -> tuple[int, list[dict], bool]:
    """(status, events, ended cleanly) of one streamed request."""
    with requests.Session() as session:
        session.trust_env = False
        with session.post(f"{router.url}/invocations", data=b'{"prompt": "hi"}', headers=headers,
                          stream=True, timeout=WAIT_S) as reply:
            text = b""
            try:
                for chunk in reply.iter_content(chunk_size=None):
                    text += chunk
                clean = True
            except requests.exceptions.ChunkedEncodingError:
                clean = False
    events = [json.loads(line[5:]) for line in text.decode().split("\n\n") if line.startswith("data:")]
    return reply.status_code, events, clean


def test_drain_refuses_new_requests_and_ends_what_its_grace_did_not_see_finish(make_router, fake):
    router = make_router(backends=fake.urls[:1])
    with requests.Session() as session:
        session.trust_env = False
        sid, _ = open_session(session, router)
    with ThreadPoolExecutor(3) as pool:
        stream = pool.submit(read_stream, router, {"X-Test-Events": "1"})
        assert _wait_for(lambda: fake.events_sent >= 2)
        queued = pool.submit(invoke_alone, router, {"prompt": "queued"}, sid)
        assert _wait_for(lambda: len(router._gates[0].waiting) == 1)
        draining = pool.submit(router.drain, 0.5)
        assert _wait_for(lambda: router._drain is not None)
        refused = invoke_alone(router, {"prompt": "new"}, sid)
        assert refused.status_code == 503 and error_code(refused) == "WORKER_UNAVAILABLE"
        assert "shutting down" in refused.json()["error"]["message"] and refused.headers["Retry-After"]
        assert requests.get(f"{router.url}/ping", timeout=WAIT_S).status_code == 503
        report = draining.result(WAIT_S)
        status, events, clean = stream.result(WAIT_S)
        queued = queued.result(WAIT_S)
    # The stream: its tokens, then TGI's error event and a clean end of the chunked body.
    assert status == 200 and clean and len(events) >= 2
    assert events[-1]["error_type"] == "WORKER_UNAVAILABLE" and "shutting down" in events[-1]["error"]
    assert queued.status_code == 503 and error_code(queued) == "WORKER_UNAVAILABLE"
    assert (report.finished, report.cut, report.refused) == (0, 2, 1)
    fake.release.set()


def test_what_finishes_within_the_grace_is_answered_whole(make_router, fake):
    router = make_router(backends=fake.urls[:1])
    with ThreadPoolExecutor(2) as pool:
        stream = pool.submit(read_stream, router, {"X-Test-Events": "1"})
        assert _wait_for(lambda: fake.events_sent >= 1)
        draining = pool.submit(router.drain, 5.0)
        time.sleep(0.2)
        fake.release.set()
        report = draining.result(WAIT_S)
        status, events, clean = stream.result(WAIT_S)
    assert status == 200 and clean and events[-1]["generated_text"] == "aaa"
    assert (report.finished, report.cut) == (1, 0)


def test_a_drain_with_nothing_in_flight_returns_at_once(router):
    started = time.monotonic()
    report = router.drain(10.0)
    assert time.monotonic() - started < 1.0 and (report.finished, report.cut) == (0, 0)


# --- connections -------------------------------------------------------------------------------


def test_the_router_closes_idle_and_slow_header_connections(make_router):
    router = make_router(config=RouterConfig(idle_timeout_s=0.3, header_timeout_s=0.3))
    idle = socket.create_connection(("127.0.0.1", router.port), timeout=WAIT_S)
    slow = socket.create_connection(("127.0.0.1", router.port), timeout=WAIT_S)
    slow.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")
    for _ in range(2):  # a byte now and then does not keep it open
        time.sleep(0.1)
        slow.sendall(b"X")
    assert idle.recv(100) == b""  # closed, no answer
    answer = b""
    while chunk := slow.recv(4096):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b'"REQUEST_TIMEOUT"' in answer
    idle.close()
    slow.close()


def test_a_client_gone_mid_body_is_one_quiet_line(router, fake, caplog):
    caplog.set_level("DEBUG")
    sock = socket.create_connection(("127.0.0.1", router.port), timeout=WAIT_S)
    sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
    time.sleep(0.1)
    reset(sock)
    time.sleep(0.3)
    assert fake.seen == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
