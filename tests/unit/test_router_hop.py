"""What only the router may tell a worker: bundles and hop headers need this start's secret; a
client that went away stops its turn; a turn that is not streamed has a deadline."""

from __future__ import annotations

import json
import time

import pytest
from ts.context import Context, RequestProcessor

from llava_sessions.handler import bundle, router_hop
from tests.fakes import png_b64
from tests.unit.test_streaming import FakeSocket, decode_frame, parse_events

SESSION = "X-Amzn-SageMaker-Session-Id"
WAIT_S = 5.0


def call(handler, body: dict, headers: dict, stream_socket: FakeSocket | None = None):
    """One request through handle(): (status, body) — for a stream, its chunks' text and the last event."""
    context = Context("llava", "/nonexistent", {}, 1, None, "0.12.0")
    context.request_processor = [RequestProcessor(headers)]
    context.request_ids = {0: "req-0"}
    context.cl_socket = stream_socket or FakeSocket()
    [out] = handler.handle([{"body": json.dumps(body).encode()}], context)
    return context.request_processor[0].get_response_status_code(), out


def open_session(handler, image) -> str:
    status, out = call(handler, {"requestType": "NEW_SESSION", "images": [png_b64(image)]}, {})
    assert status == 200
    return json.loads(out)["session_id"]


def hop_headers(handler, request_id: str, received_at: float | None = None, secret: str | None = None) -> dict:
    hop = router_hop.Hop(request_id, time.time() if received_at is None else received_at)
    return hop.headers(handler.router_secret if secret is None else secret)


def cancel(handler, request_id: str) -> None:
    """As the router does when the client goes away; waits until the worker has heard it."""
    sender = router_hop.CancelSender(handler.router_secret)
    try:
        sender.cancel("llava", request_id)
    finally:
        sender.close()
    deadline = time.monotonic() + WAIT_S
    while not handler.cancellations.is_cancelled(request_id) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handler.cancellations.is_cancelled(request_id)


@pytest.mark.parametrize("secret", [None, "", "not-the-secret"])
def test_a_bundle_without_the_routers_secret_is_refused_and_runs_nothing(handler, secret):
    members = [({}, json.dumps({"requestType": "NEW_SESSION"}).encode())] * 3
    headers = {bundle.BUNDLE_HEADER: "3"}
    if secret is not None:
        headers[router_hop.SECRET_HEADER] = secret
    before = handler.engine.session_count()
    context = Context("llava", "/nonexistent", {}, 1, None, "0.12.0")
    context.request_processor = [RequestProcessor(headers)]
    [out] = handler.handle([{"body": bundle.encode_request(members)}], context)
    assert context.request_processor[0].get_response_status_code() == 400
    assert json.loads(out)["error"]["code"] == "INVALID_REQUEST" and "router" in json.loads(out)["error"]["message"]
    assert handler.engine.session_count() == before


def test_cancellations_from_outside_the_router_do_not_count(handler):
    stranger = router_hop.CancelSender("a-guessed-secret")
    try:
        stranger.cancel("llava", "rid-stranger")
    finally:
        stranger.close()
    cancel(handler, "rid-known")  # sent after the stranger's: heard in order
    assert not handler.cancellations.is_cancelled("rid-stranger")


def test_a_turn_whose_client_went_away_is_stopped_and_not_kept(handler, images):
    asked, twin = open_session(handler, images[0]), open_session(handler, images[0])
    question = {"prompt": "What is this?", "max_new_tokens": 8}
    for sid in (asked, twin):
        assert call(handler, question, {SESSION: sid})[0] == 200
    cancel(handler, "rid-gone")
    decoded = handler.engine.counters.decode_tokens
    status, out = call(handler, {"prompt": "Tell me everything", "max_new_tokens": 64},
                       {SESSION: asked, **hop_headers(handler, "rid-gone")})
    assert status == 499 and json.loads(out)["error"]["code"] == "CLIENT_CLOSED_REQUEST"
    assert handler.engine.counters.decode_tokens == decoded  # it never started
    follow_up = {"prompt": "And then?", "max_new_tokens": 8}
    after = json.loads(call(handler, follow_up, {SESSION: asked})[1])
    expected = json.loads(call(handler, follow_up, {SESSION: twin})[1])
    assert after["generated_text"] == expected["generated_text"]
    assert after["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]


def test_hop_headers_without_the_secret_are_ignored(handler, images):
    sid = open_session(handler, images[0])
    cancel(handler, "rid-forged")
    forged = hop_headers(handler, "rid-forged", received_at=time.time() - 3600, secret="wrong")
    status, out = call(handler, {"prompt": "What is this?", "max_new_tokens": 6}, {SESSION: sid, **forged})
    assert status == 200
    answer = json.loads(out)
    # Neither the cancellation nor the hour-old arrival time applied.
    assert answer["finish_reason"] in ("stop", "length") and answer["usage"]["completion_tokens"] > 1


def test_an_open_whose_client_went_away_closes_its_session_again(handler, images):
    before = handler.engine.session_count()
    cancel(handler, "rid-open")
    status, out = call(handler, {"requestType": "NEW_SESSION", "images": [png_b64(images[0])]},
                       hop_headers(handler, "rid-open"))
    assert status == 499 and handler.engine.session_count() == before


def test_a_turn_that_is_not_streamed_stops_at_its_deadline_and_keeps_what_it_answered(handler, images):
    cut, twin = open_session(handler, images[0]), open_session(handler, images[0])
    late = hop_headers(handler, "rid-late", received_at=time.time() - handler.config.turn_deadline_s - 1)
    status, out = call(handler, {"prompt": "Describe it in detail", "max_new_tokens": 40}, {SESSION: cut, **late})
    answer = json.loads(out)
    assert status == 200 and answer["finish_reason"] == "deadline" and answer["usage"]["completion_tokens"] == 1
    one = json.loads(call(handler, {"prompt": "Describe it in detail", "max_new_tokens": 1}, {SESSION: twin})[1])
    assert one["generated_text"] == answer["generated_text"] and one["finish_reason"] == "length"
    follow_up = {"prompt": "Why?", "max_new_tokens": 6}
    assert call(handler, follow_up, {SESSION: cut})[1] == call(handler, follow_up, {SESSION: twin})[1]


def test_a_streamed_turn_has_no_deadline(handler, images):
    sid = open_session(handler, images[0])
    late = hop_headers(handler, "rid-stream", received_at=time.time() - handler.config.turn_deadline_s - 1)
    socket = FakeSocket()
    status, out = call(handler, {"prompt": "Describe it", "max_new_tokens": 12, "stream": True},
                       {SESSION: sid, **late}, socket)
    chunks = "".join(decode_frame(sent)["req-0"]["body"] for sent in socket.sent)
    events = parse_events(chunks + out)
    assert status == 200 and events[-1]["details"]["finish_reason"] in ("eos_token", "length")
    assert events[-1]["details"]["generated_tokens"] == len(events) > 1
