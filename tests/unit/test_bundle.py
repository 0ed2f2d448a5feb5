"""Turn bundles: the router's batch in one TorchServe request, and the answers in frames.

The wire format both ways, and the handler running a bundle under TorchServe's real Context
(its intermediate responses captured as the frontend would read them).
"""

from __future__ import annotations

import json
import time

import pytest
from ts.context import Context, RequestProcessor

from llava_sessions.errors import InvalidRequest
from llava_sessions.handler import bundle, router_hop
from tests.fakes import png_b64
from tests.unit.test_streaming import FakeSocket, decode_frame, parse_events

SESSION = "X-Amzn-SageMaker-Session-Id"


# --- wire format ------------------------------------------------------------------------


def test_request_members_round_trip():
    members = [({SESSION: "sess-a", "Content-Type": "application/json"}, b'{"prompt": "hi"}'),
               ({}, b""), ({"X-Note": "caf\u00e9"}, bytes(range(256)))]
    assert bundle.decode_request(bundle.encode_request(members), 3) == members


@pytest.mark.parametrize("cut", [1, 5, 30])
def test_truncated_or_miscounted_bundles_are_refused(cut):
    body = bundle.encode_request([({"a": "b"}, b"body")] * 2)
    with pytest.raises(InvalidRequest, match="truncated"):
        bundle.decode_request(body[:-cut], 2)
    with pytest.raises(InvalidRequest, match="announced 3 members and holds 2"):
        bundle.decode_request(body, 3)


@pytest.mark.parametrize("value", ["0", "-1", "x", ""])
def test_member_count_must_be_positive(value):
    assert bundle.member_count({"Content-Type": "application/json"}) is None
    assert bundle.member_count({bundle.BUNDLE_HEADER.lower(): "2"}) == 2
    with pytest.raises(InvalidRequest, match="positive member count"):
        bundle.member_count({bundle.BUNDLE_HEADER: value})


def test_frames_come_back_from_a_stream_cut_anywhere():
    frames = [bundle.head_frame(1, 404, {"X-A": "1"}, "application/json"),
              bundle.frame(0, bundle.DATA, "\u732b data"), bundle.frame(1, bundle.DATA, b""),
              bundle.frame(0, bundle.END)]
    data = b"".join(frames)
    reader, seen = bundle.FrameReader(), []
    for byte in range(len(data)):
        seen += reader.feed(data[byte : byte + 1])
    assert reader.pending == 0
    assert [(f.member, f.kind) for f in seen] == [(1, bundle.HEAD), (0, bundle.DATA), (1, bundle.DATA), (0, bundle.END)]
    assert seen[0].head() == (404, {"X-A": "1"}, "application/json")
    assert seen[1].payload.decode() == "\u732b data"


# --- the handler ---------------------------------------------------------------------------


def run_bundle(handler, members: list[tuple[dict, dict | bytes]], order: list | None = None,
               bundle_id: str | None = None):
    """One bundle through handle(), as TorchServe delivers it; returns {member: [frames]}.
    ``order`` gets (chunk index, frame) of every frame as sent (the final response last)."""
    encoded = [(headers, body if isinstance(body, bytes) else json.dumps(body).encode()) for body, headers in members]
    context = Context("llava", "/nonexistent", {}, 1, None, "0.12.0")
    headers = {bundle.BUNDLE_HEADER: str(len(members)), router_hop.SECRET_HEADER: handler.router_secret}
    if bundle_id is not None:
        headers[router_hop.REQUEST_ID_HEADER] = bundle_id
    context.request_processor = [RequestProcessor(headers)]
    context.request_ids = {0: "req-0"}
    context.cl_socket = FakeSocket()
    [out] = handler.handle([{"body": bundle.encode_request(encoded)}], context)
    chunks = [decode_frame(sent, raw=True)["req-0"] for sent in context.cl_socket.sent]
    assert all(c["content_type"] == bundle.CONTENT_TYPE and c["status"] == 200 for c in chunks)
    assert context.request_processor[0].get_response_status_code() == 200
    reader, by_member = bundle.FrameReader(), {}
    for index, data in enumerate([c["body"] for c in chunks] + [out]):
        for frame in reader.feed(data):
            by_member.setdefault(frame.member, []).append(frame)
            if order is not None:
                order.append((index, frame))
    assert reader.pending == 0
    return by_member, len(chunks)


def answer(frames) -> tuple[int, dict, str, bytes]:
    """(status, headers, content type, body) of one member: a head, data, one end last."""
    assert frames[0].kind == bundle.HEAD and frames[-1].kind == bundle.END
    assert all(f.kind == bundle.DATA for f in frames[1:-1])
    status, headers, content_type = frames[0].head()
    return status, headers, content_type, b"".join(f.payload for f in frames[1:-1])


def open_session(handler, image) -> str:
    context = Context("llava", "/nonexistent", {}, 1, None, "0.12.0")
    context.request_processor = [RequestProcessor({})]
    [out] = handler.handle([{"body": json.dumps({"requestType": "NEW_SESSION", "images": [png_b64(image)]}).encode()}],
                           context)
    return json.loads(out)["session_id"]


def test_a_bundle_runs_its_members_as_one_batch_and_answers_each(handler, images):
    plain, streamed, twin_plain, twin_streamed, closing = (open_session(handler, images[0]) for _ in range(5))
    question = {"prompt": "What is this?", "max_new_tokens": 6}
    decoded_before = handler.engine.counters.decode_tokens
    by_member, chunks = run_bundle(handler, [
        (question, {SESSION: plain}),
        ({**question, "stream": True}, {SESSION: streamed}),
        (b"{not json", {SESSION: plain}),
        (question, {SESSION: "sess-0000000000000000"}),
        ({"requestType": "CLOSE"}, {SESSION: closing}),
    ])
    assert sorted(by_member) == [0, 1, 2, 3, 4]
    status, _, content_type, body = answer(by_member[0])
    assert (status, content_type) == (200, "application/json")
    first = json.loads(body)
    # The streamed member: its events as they were generated (one chunk each), the last in the answer.
    status, _, content_type, body = answer(by_member[1])
    assert (status, content_type) == (200, "text/event-stream")
    events = parse_events(body.decode())
    assert chunks == len(events) - 1 and events[-1]["usage"] == first["usage"]
    assert answer(by_member[2])[0] == 400 and json.loads(answer(by_member[2])[3])["error"]["code"] == "INVALID_JSON"
    assert answer(by_member[3])[0] == 404
    status, headers, _, _ = answer(by_member[4])
    assert status == 200 and headers["X-Amzn-SageMaker-Closed-Session-Id"] == closing
    assert not handler.engine.has_session(closing)
    # The two turns decoded together: as many tokens as they generated, and the answers a lone turn gives.
    assert handler.engine.counters.decode_tokens - decoded_before == 2 * (first["usage"]["completion_tokens"] - 1)
    for twin in (twin_plain, twin_streamed):
        alone, _ = run_bundle(handler, [(question, {SESSION: twin})])
        assert json.loads(answer(alone[0])[3])["generated_text"] == first["generated_text"]
    assert events[-1]["generated_text"] == first["generated_text"]


def test_a_member_is_answered_when_its_turn_ends_not_when_the_bundles_last_does(handler, images):
    short, long_ = (open_session(handler, images[0]) for _ in range(2))
    order: list = []
    by_member, chunks = run_bundle(handler, [
        ({"prompt": "What is this?", "max_new_tokens": 12, "stream": True}, {SESSION: long_}),
        ({"prompt": "What is this?", "max_new_tokens": 1}, {SESSION: short}),
    ], order)
    status, _, _, body = answer(by_member[1])
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 1
    long_events = parse_events(answer(by_member[0])[3].decode())
    assert long_events[-1]["usage"]["completion_tokens"] > 2
    # The short answer's end went out in a chunk of its own while the long one still streamed.
    short_end = next(index for index, frame in order if frame.member == 1 and frame.kind == bundle.END)
    later_tokens = [index for index, frame in order if frame.member == 0 and frame.kind == bundle.DATA and index > short_end]
    assert short_end < chunks and len(later_tokens) >= 2


def wait_for_joiners(handler, bundle_id: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while handler.joins.waiting(bundle_id) < count:
        assert time.monotonic() < deadline, "the joiners never reached the worker's listener"
        time.sleep(0.01)


def test_requests_sent_to_join_a_running_bundle_are_answered_in_its_frames(handler, images):
    """The router's joiners for a bundle (router_hop.JoinSender): a follow-up turn is taken while
    the bundle's turn decodes and answered in the bundle's frames, as it would be alone; a close
    and a second turn of the running session are left for the next bundle (no frame at all);
    a joiner for a bundle that has ended is dropped."""
    host, joining, twin, closing = (open_session(handler, images[0]) for _ in range(4))
    question = {"prompt": "What is this?", "max_new_tokens": 6}
    sender = router_hop.JoinSender(handler.router_secret)

    def offer(bundle_id, member, session, body):
        hop = router_hop.Hop(f"req-{member}", time.time()).headers(handler.router_secret)
        return sender.offer("llava", router_hop.Joiner(bundle_id, member, {SESSION: session, **hop},
                                                       json.dumps(body).encode()))

    try:
        assert offer("bundle-1", 1, joining, {**question, "stream": True})
        assert offer("bundle-1", 2, closing, {"requestType": "CLOSE"})
        assert offer("bundle-1", 3, host, question)
        wait_for_joiners(handler, "bundle-1", 3)
        by_member, chunks = run_bundle(handler, [({"prompt": "Describe it", "max_new_tokens": 12}, {SESSION: host})],
                                       bundle_id="bundle-1")
        assert sorted(by_member) == [0, 1]
        assert handler.engine.counters.turns_joined == 1 and handler.engine.has_session(closing)
        status, _, content_type, body = answer(by_member[1])
        assert (status, content_type) == (200, "text/event-stream")
        alone, _ = run_bundle(handler, [(question, {SESSION: twin})])
        assert parse_events(body.decode())[-1]["generated_text"] == json.loads(answer(alone[0])[3])["generated_text"]
        # Late for bundle-1 (ended): dropped; the listener keeps one for a bundle yet to come.
        assert offer("bundle-1", 4, joining, question) and offer("bundle-2", 1, joining, question)
        wait_for_joiners(handler, "bundle-2", 1)
        assert handler.joins.waiting("bundle-1") == 0
    finally:
        sender.close()


def test_a_malformed_bundle_is_one_client_error(handler):
    context = Context("llava", "/nonexistent", {}, 1, None, "0.12.0")
    context.request_processor = [RequestProcessor({bundle.BUNDLE_HEADER: "2",
                                                   router_hop.SECRET_HEADER: handler.router_secret})]
    [out] = handler.handle([{"body": b"\x00\x00"}], context)
    assert context.request_processor[0].get_response_status_code() == 400
    assert json.loads(out)["error"]["code"] == "INVALID_REQUEST"
