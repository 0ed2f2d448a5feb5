"""Token streaming: TGI framing, and the adapter under TorchServe's real Context and wire format.

The fake ``cl_socket`` receives exactly the bytes ``send_intermediate_predict_response``
writes to the frontend; they are decoded back into predictions as the frontend does.
"""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

from ts.context import Context, RequestProcessor
from ts.protocol.otf_message_handler import create_predict_response

from llava_sessions.errors import InternalError, SessionNotFound
from llava_sessions.handler import streaming
from llava_sessions.handler.dialects.base import TgiEvents
from llava_sessions.handler.engine import generation
from llava_sessions.tiny_model import build_tokenizer
from tests.fakes import png_b64

SESSION = "X-Amzn-SageMaker-Session-Id"
MAX_NEW = 12


# --- framing ------------------------------------------------------------------------


def parse_events(text: str) -> list[dict]:
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(event.startswith("data:") and "\n" not in event for event in events)
    return [json.loads(event[len("data:"):]) for event in events]


def test_frames_are_tgi_events():
    events = TgiEvents()
    text = events.token(7, "猫 \"x\"\n", False)
    assert text.startswith('data:{"token": {"id": 7') and text.endswith("}\n\n") and text.count("\n") == 2
    assert parse_events(text) == [{"token": {"id": 7, "text": "猫 \"x\"\n", "special": False}, "generated_text": None}]
    result = SimpleNamespace(text="hi", finish_reason="stop", prompt_tokens=9, cached_tokens=4, completion_tokens=2)
    assert parse_events(events.final(2, "", True, result)) == [{
        "token": {"id": 2, "text": "", "special": True},
        "generated_text": "hi",
        "details": {"finish_reason": "eos_token", "generated_tokens": 2},
        "usage": {"prompt_tokens": 9, "cached_tokens": 4, "completion_tokens": 2},
    }]
    [last] = parse_events(events.final(None, "", False, SimpleNamespace(**{**vars(result), "finish_reason": "length"})))
    assert last["details"]["finish_reason"] == "length" and last["token"] is None
    assert parse_events(events.error(InternalError("boom"))) == [{"error": "boom", "error_type": "INTERNAL_ERROR"}]


def test_a_stream_holds_back_what_may_start_a_stop_string():
    tokenizer = build_tokenizer()
    ids = tokenizer.encode("tea and cake", add_special_tokens=False)
    # The engine stops at the token that completes the stop string: that one is the last.
    last = next(k for k in range(len(ids)) if " and c" in tokenizer.decode(ids[: k + 1]))
    sent: list[str] = []
    stream = streaming.TokenStream(tokenizer, set(), sent.append, TgiEvents(), stops=(" and c",))
    for token_id in ids[:last]:
        stream.on_token(token_id, False)
    stream.on_token(ids[last], True)
    streamed = "".join(e["token"]["text"] for chunk in sent for e in parse_events(chunk))
    assert "tea".startswith(streamed)  # " and" could have been the stop's start: held back
    result = SimpleNamespace(text="tea", finish_reason="stop", prompt_tokens=5, cached_tokens=0,
                             completion_tokens=last + 1)
    [final] = parse_events(stream.final_reply(result).body)
    assert streamed + final["token"]["text"] == "tea" and final["generated_text"] == "tea"


def test_token_stream_sends_each_token_at_once_and_the_last_with_the_answer():
    tokenizer = build_tokenizer()
    ids = tokenizer.encode("tea 🍵 ok", add_special_tokens=False) + [tokenizer.eos_token_id]
    sent: list[str] = []
    stream = streaming.TokenStream(tokenizer, {tokenizer.eos_token_id}, sent.append, TgiEvents())
    for count, token_id in enumerate(ids):
        last = count == len(ids) - 1
        stream.on_token(token_id, last)
        assert len(sent) == (count if last else count + 1) and stream.started
    result = SimpleNamespace(text="tea 🍵 ok", finish_reason="stop", prompt_tokens=20, cached_tokens=0,
                             completion_tokens=len(ids))
    reply = stream.final_reply(result)
    assert reply.status == 200 and reply.content_type == "text/event-stream"
    events = [event for chunk in sent for event in parse_events(chunk)] + parse_events(reply.body)
    assert [e["token"]["id"] for e in events] == ids
    assert "".join(e["token"]["text"] for e in events) == "tea 🍵 ok"
    assert [e["token"]["special"] for e in events] == [False] * (len(ids) - 1) + [True]
    assert all(e["generated_text"] is None for e in events[:-1]) and events[-1]["generated_text"] == "tea 🍵 ok"


# --- the adapter under TorchServe ------------------------------------------------


class FakeSocket:
    def __init__(self):
        self.sent: list[bytes] = []

    def sendall(self, data) -> None:
        self.sent.append(bytes(data))


def decode_frame(data: bytes, raw: bool = False) -> dict:
    """TorchServe's predict response as the frontend reads it: {request id: prediction}
    (bodies as text, or as bytes when ``raw``)."""
    pos = 0

    def integer():
        nonlocal pos
        (value,) = struct.unpack_from("!i", data, pos)
        pos += 4
        return value

    def chunk():
        nonlocal pos
        n = integer()
        pos += n
        return data[pos - n:pos]

    code, message = integer(), chunk().decode()
    assert (code, message) in ((200, "Intermediate response"), (200, "Prediction success")), (code, message)
    predictions = {}
    while True:
        n = integer()
        if n == -1:
            break
        pos -= 4
        request_id = chunk().decode()
        content_type = chunk().decode()
        status, _phrase = integer(), chunk().decode()  # the phrase is read to advance
        headers = {chunk().decode(): chunk().decode() for _ in range(integer())}
        predictions[request_id] = {"content_type": content_type, "status": status, "headers": headers,
                                   "body": chunk() if raw else chunk().decode()}
    assert pos == len(data)
    return predictions


def batch(handler, requests: list[tuple[dict, dict]]):
    """One TorchServe batch through handle(), as service.predict runs it; returns (outputs, context, socket)."""
    context = Context("llava", "/nonexistent", {}, len(requests), None, "0.12.0")
    context.request_processor = [RequestProcessor(dict(headers)) for _, headers in requests]
    context.request_ids = {idx: f"req-{idx}" for idx in range(len(requests))}
    context.cl_socket = FakeSocket()
    outputs = handler.handle([{"body": json.dumps(body).encode()} for body, _ in requests], context)
    return outputs, context, context.cl_socket


def open_session(handler, image) -> str:
    [out], context, _ = batch(handler, [({"requestType": "NEW_SESSION", "images": [png_b64(image)]}, {})])
    return json.loads(out)["session_id"]


def turn(prompt, stream=None, max_new_tokens=MAX_NEW):
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens}
    if stream is not None:
        body["stream"] = stream
    return body


def test_a_streamed_turn_sends_one_event_per_token_to_its_request_only(handler, images):
    plain_sid, streamed_sid, twin_sid = (open_session(handler, images[0]) for _ in range(3))
    outputs, context, socket = batch(handler, [
        (turn("What is this?"), {SESSION: plain_sid}),
        (turn("What is this?", stream=True), {SESSION: streamed_sid}),
    ])

    # Intermediate chunks: addressed to req-1 alone, the HTTP head (200, text/event-stream) on each.
    frames = [decode_frame(data) for data in socket.sent]
    assert frames and all(set(frame) == {"req-1"} for frame in frames)
    first = frames[0]["req-1"]
    assert (first["status"], first["content_type"], first["headers"]["ts_stream_next"]) == (200, "text/event-stream", "true")
    events = [event for frame in frames for event in parse_events(frame["req-1"]["body"])]
    assert len(events) == len(frames)  # one event per chunk

    # The final event is handle()'s output for req-1; req-0 is an ordinary JSON answer.
    final = parse_events(outputs[1])
    assert len(final) == 1
    events += final
    assert all(isinstance(e["token"]["id"], int) for e in events)
    plain = json.loads(outputs[0])
    answer = final[0]["generated_text"]
    assert "".join(e["token"]["text"] for e in events) == answer == plain["generated_text"]
    assert final[0]["usage"] == plain["usage"]
    assert final[0]["details"] == {"finish_reason": "eos_token" if events[-1]["token"]["special"] else "length",
                                   "generated_tokens": len(events)}
    assert final[0]["usage"]["completion_tokens"] == len(events)

    # What TorchServe then sends as the batch's answer: the stream ends, req-0 never streamed.
    closing = decode_frame(create_predict_response(outputs, context.request_ids, "Prediction success", 200, context))
    assert closing["req-1"]["headers"]["ts_stream_next"] == "false"
    assert "ts_stream_next" not in closing["req-0"]["headers"]
    assert closing["req-0"]["content_type"] == "application/json" and closing["req-0"]["status"] == 200

    # The streamed session goes on like its non-streamed twin.
    [twin], _, _ = batch(handler, [(turn("What is this?"), {SESSION: twin_sid})])
    assert json.loads(twin)["generated_text"] == answer
    [later], _, socket = batch(handler, [(turn("And then?"), {SESSION: streamed_sid})])
    [twin_later], _, _ = batch(handler, [(turn("And then?"), {SESSION: twin_sid})])
    assert socket.sent == [] and json.loads(later) == json.loads(twin_later)
    assert json.loads(later)["usage"]["cached_tokens"] > 0


def test_a_streams_first_event_leaves_before_the_second_token_is_computed(handler, images, monkeypatch):
    """Time to first token: the prefill's token goes out before any decode step runs."""
    sid = open_session(handler, images[0])
    order: list[str] = []
    real_sendall, real_decode = FakeSocket.sendall, generation.step

    def sendall(self, data):
        order.append("sent")
        real_sendall(self, data)

    def decode(*args, **kwargs):
        order.append("decode")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(FakeSocket, "sendall", sendall)
    monkeypatch.setattr(generation, "step", decode)
    [out], _, socket = batch(handler, [(turn("Describe it", stream=True, max_new_tokens=6), {SESSION: sid})])
    final = parse_events(out)[-1]
    assert final["details"]["generated_tokens"] > 1, "the random model stopped at once; pick another prompt"
    # token k's event leaves before the decode step that computes token k + 1
    assert order[:2] == ["sent", "decode"] and order.count("sent") == final["details"]["generated_tokens"] - 1


def test_an_error_before_the_first_token_is_a_plain_json_error(handler, images, monkeypatch):
    [out], context, socket = batch(handler, [(turn("hi", stream=True), {SESSION: "sess-unknown"})])
    assert socket.sent == [] and json.loads(out)["error"]["code"] == SessionNotFound.code
    assert context.get_response_status(0)[0] == 404
    assert context.get_response_content_type(0) == "application/json"
    assert "ts_stream_next" not in context.get_response_headers(0)

    sid = open_session(handler, images[0])

    def fail(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(generation, "prefill", fail)
    [out], context, socket = batch(handler, [(turn("hi", stream=True), {SESSION: sid})])
    assert socket.sent == [] and context.get_response_status(0)[0] == 500
    assert json.loads(out)["error"]["code"] == "INTERNAL_ERROR"


def test_an_error_mid_stream_ends_it_with_an_error_event_and_keeps_the_session(handler, images, monkeypatch):
    sid, twin_sid = open_session(handler, images[1]), open_session(handler, images[1])
    real_decode = generation.step
    calls = []

    def decode_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(generation, "step", decode_then_fail)
    [out], context, socket = batch(handler, [(turn("Describe it", stream=True, max_new_tokens=20), {SESSION: sid})])
    monkeypatch.setattr(generation, "step", real_decode)

    frames = [decode_frame(data)["req-0"] for data in socket.sent]
    assert len(frames) == 3  # tokens 1-3 went out as they came; the decode of the fourth failed
    assert parse_events(out) == [{"error": "the server failed to process this request; it has been logged",
                                  "error_type": "INTERNAL_ERROR"}]
    assert context.get_response_content_type(0) == "text/event-stream"

    # The session is as before the failed turn: it answers like its twin.
    [again], _, _ = batch(handler, [(turn("Describe it", stream=True, max_new_tokens=20), {SESSION: sid})])
    [twin], _, _ = batch(handler, [(turn("Describe it", max_new_tokens=20), {SESSION: twin_sid})])
    final = parse_events(again)[-1]
    assert final["generated_text"] == json.loads(twin)["generated_text"]
    assert final["usage"] == json.loads(twin)["usage"]


def test_the_aws_sample_dialect_never_streams(handler, images):
    data_url = "data:image/png;base64," + png_b64(images[0])
    [out], _, _ = batch(handler, [({"type": "start_session", "path": data_url}, {})])
    sid = json.loads(out)["session_id"]
    body = {"type": "send_text_prompt", "session_id": sid, "prompt_text": "Describe", "stream": True,
            "max_new_tokens": 4}
    [out], context, socket = batch(handler, [(body, {SESSION: sid})])
    assert socket.sent == [] and set(json.loads(out)) == {"response_text"}
    assert context.get_response_content_type(0) == "application/json"


def test_a_one_token_stream_is_a_single_event_without_chunks(handler, images):
    sid = open_session(handler, images[0])
    [out], context, socket = batch(handler, [(turn("Hi", stream=True, max_new_tokens=1), {SESSION: sid})])
    # Nothing went out early, so TorchServe answers it in one piece (Content-Length, not chunked).
    assert socket.sent == [] and "ts_stream_next" not in context.get_response_headers(0)
    assert context.get_response_content_type(0) == "text/event-stream"
    [event] = parse_events(out)
    assert event["token"]["text"] == event["generated_text"] and event["usage"]["completion_tokens"] == 1
