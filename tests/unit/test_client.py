"""The session client against real botocore clients: Stubber, and a fake endpoint at the HTTP layer.

The fake endpoint answers on botocore's ``before-send`` hook, so every response goes through
botocore's own parsing: headers (NewSessionId), ModelError bodies, and the binary event-stream
framing of InvokeEndpointWithResponseStream.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
import warnings

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.response import StreamingBody
from botocore.stub import ANY, Stubber
from llava_sessions import wire
from llava_sessions.deploy import client as client_module
from llava_sessions.deploy.client import (
    ReplayDivergenceWarning,
    SessionClient,
    SessionError,
    iter_events,
    parse_new_session_id,
)
from tests.fakes import isolate_from_aws

EXPIRES = "2099-01-01T00:00:00Z"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    isolate_from_aws(monkeypatch)


def runtime_client():
    return boto3.client("sagemaker-runtime", region_name="us-east-1")


# --- event-stream encoding (the framing botocore decodes) -------------------------------


def _message(headers: dict[str, str], payload: bytes) -> bytes:
    encoded = b"".join(
        bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value)) + value.encode()
        for name, value in headers.items()
    )
    prelude = struct.pack(">II", 16 + len(encoded) + len(payload), len(encoded))
    message = prelude + struct.pack(">I", binascii.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", binascii.crc32(message))


def payload_part(data: bytes) -> bytes:
    return _message({":message-type": "event", ":event-type": "PayloadPart",
                     ":content-type": "application/octet-stream"}, data)


def stream_exception(kind: str, body: dict) -> bytes:
    return _message({":message-type": "exception", ":exception-type": kind,
                     ":content-type": "application/json"}, json.dumps(body).encode())


class FakeRaw:
    """What botocore reads an HTTP body from: read() for plain bodies, stream() for event streams."""

    def __init__(self, chunks: list[bytes]):
        self._chunks = chunks
        self._buffer = io.BytesIO(b"".join(chunks))
        self.closed = False

    def read(self, amt=None):
        return self._buffer.read(amt)

    def stream(self, **kwargs):
        yield from self._chunks

    def close(self):
        self.closed = True


# --- a fake endpoint: our container's protocol behind SageMaker's runtime API ------------------


def sse(event: dict) -> bytes:
    return ("data:" + json.dumps(event, ensure_ascii=False) + "\n\n").encode()


class FakeEndpoint:
    """Sessions whose answers depend only on the conversation, so a replay gives the same answers."""

    def __init__(self):
        self.sessions: dict[str, dict] = {}
        self.requests: list[tuple[str, str | None, dict]] = []  # (operation, SessionId, body)
        self.opened = 0
        self.busy_once = False
        self.stream_error_after: int | None = None  # tokens before a data:{"error"} event
        self.stream_exception: str | None = None  # a ModelStreamError ErrorCode after the first token
        self.diverge = False  # answers get a suffix (a "different instance")

    def attach(self, client, first: bool = False):
        register = client.meta.events.register_first if first else client.meta.events.register
        register("before-send.sagemaker-runtime", self.handle)
        return client

    def lose_all(self):
        self.sessions.clear()

    # the HTTP layer
    def handle(self, request, **kwargs):
        operation = "stream" if request.url.endswith("invocations-response-stream") else "invoke"
        headers = {k.lower(): v for k, v in request.headers.items()}
        session_id = headers.get("x-amzn-sagemaker-session-id")
        if isinstance(session_id, bytes):
            session_id = session_id.decode()
        body = json.loads(request.body)
        self.requests.append((operation, session_id, body))
        if body.get("requestType") == "NEW_SESSION":
            assert session_id == "NEW_SESSION" and operation == "invoke"
            self.opened += 1
            new_id = f"s{self.opened}"
            self.sessions[new_id] = {"images": body.get("images", []), "turns": []}
            return self._json(request, 200, {"session_id": new_id, "expires_at": EXPIRES},
                              {"X-Amzn-SageMaker-New-Session-Id": f"{new_id}; Expires={EXPIRES}"})
        if session_id not in self.sessions:
            return self._model_error(request, 404, "SESSION_NOT_FOUND", "no such session")
        if body.get("requestType") == "CLOSE":
            del self.sessions[session_id]
            return self._json(request, 200, {"session_id": session_id, "closed": True},
                              {"X-Amzn-SageMaker-Closed-Session-Id": session_id})
        if self.busy_once:
            self.busy_once = False
            return self._model_error(request, 409, "SESSION_BUSY", "another turn is running")
        session = self.sessions[session_id]
        n_images = len(session["images"]) + sum(len(t[1]) for t in session["turns"])
        n_images += len(body.get("images", []))
        answer = f"answer {len(session['turns'])} to {body['prompt']} with {n_images} images é日本"
        if self.diverge:
            answer += " (other instance)"
        if operation == "invoke":
            session["turns"].append((body["prompt"], body.get("images", []), answer))
            return self._json(request, 200, {"generated_text": answer,
                                             "usage": {"prompt_tokens": 10, "cached_tokens": 4,
                                                       "completion_tokens": 3}})
        return self._stream(request, session, body, answer)

    def _stream(self, request, session, body, answer):
        words = answer.split(" ")
        pieces = [words[0]] + [" " + word for word in words[1:]]
        text = b""
        for index, piece in enumerate(pieces[:-1]):
            if self.stream_error_after is not None and index == self.stream_error_after:
                text += sse({"error": "the turn failed", "error_type": "INTERNAL_ERROR"})
                break
            text += sse({"token": {"id": index, "text": piece, "special": False}, "generated_text": None})
        else:
            session["turns"].append((body["prompt"], body.get("images", []), answer))
            text += sse({"token": {"id": 99, "text": pieces[-1], "special": False}, "generated_text": None})
            text += sse({"token": {"id": 2, "text": "", "special": True}, "generated_text": answer,
                         "details": {"finish_reason": "eos_token", "generated_tokens": len(pieces)},
                         "usage": {"prompt_tokens": 10, "cached_tokens": 4, "completion_tokens": len(pieces)}})
        # PayloadParts cut at awkward places: inside "data:", inside JSON, inside a UTF-8 character.
        parts = [text[i:i + 7] for i in range(0, len(text), 7)]
        frames = [payload_part(part) for part in parts]
        if self.stream_exception:
            frames = frames[:1] + [stream_exception("ModelStreamError", {"Message": "broken",
                                                                         "ErrorCode": self.stream_exception})]
        data = b"".join(frames)
        # and the event-stream frames themselves arrive in odd-sized network chunks
        chunks = [data[i:i + 13] for i in range(0, len(data), 13)]
        return AWSResponse(request.url, 200, {"Content-Type": "application/vnd.amazon.eventstream"}, FakeRaw(chunks))

    def _json(self, request, status, body, headers=None):
        data = json.dumps(body).encode()
        return AWSResponse(request.url, status, {"Content-Type": "application/json", **(headers or {})},
                           FakeRaw([data]))

    def _model_error(self, request, status, code, message):
        original = json.dumps({"error": {"code": code, "message": message}})
        body = {"ErrorCode": "CLIENT_ERROR_FROM_MODEL", "OriginalStatusCode": status, "OriginalMessage": original,
                "Message": f"Received client error ({status}) from primary with message \"{original}\"",
                "LogStreamArn": "arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/Endpoints/e"}
        return AWSResponse(request.url, 424, {"Content-Type": "application/json",
                                              "x-amzn-ErrorType": "ModelError:http://internal.amazon.com/"},
                           FakeRaw([json.dumps(body).encode()]))

    def turns(self):
        return [(op, sid, body) for op, sid, body in self.requests if "prompt" in body]


@pytest.fixture
def endpoint():
    return FakeEndpoint()


@pytest.fixture
def client(endpoint):
    return SessionClient("ep", runtime=endpoint.attach(runtime_client()))


# --- NewSessionId ------------------------------------------------------------------------------


def test_parse_new_session_id():
    session_id, expires = parse_new_session_id("sess-5b0c; Expires=2026-11-22T10:20:00Z")
    assert session_id == "sess-5b0c"
    assert (expires.year, expires.hour, expires.minute, expires.utcoffset().total_seconds()) == (2026, 10, 20, 0)
    assert parse_new_session_id("abc") == ("abc", None)
    assert parse_new_session_id(" abc ") == ("abc", None)
    assert parse_new_session_id("abc;expires=2026-11-22T10:20:00Z")[0] == "abc"
    assert parse_new_session_id("abc; Path=/; Expires=2026-11-22T10:20:00Z")[0] == "abc"  # other attributes ignored


def test_parse_new_session_id_reads_what_the_wire_formats():
    session_id, expires = parse_new_session_id(wire.format_session_header("sess-1", 1_767_225_600.5))
    assert (session_id, expires.timestamp(), expires.utcoffset().total_seconds()) == ("sess-1", 1_767_225_600, 0)


@pytest.mark.parametrize("value", [None, "", "  ", "bad_id; Expires=2026-11-22T10:20:00Z", "abc; Expires=tomorrow",
                                   "abc; Expires=2026-13-40T10:20:00Z", "abc; garbage", "a" * 257,
                                   "abc; Expires=2026-11-22T10:20:00Z; Expires=2026-11-23T10:20:00Z"])
def test_parse_new_session_id_refuses_ill_formed(value):
    with pytest.raises(SessionError) as caught:
        parse_new_session_id(value)
    assert caught.value.code == "BAD_RESPONSE"


# --- TGI events (wire.iter_events; split at every byte in test_wire.py) -------------------------------

EVENTS = [
    {"token": {"id": 1, "text": " The", "special": False}, "generated_text": None},
    {"token": {"id": 3, "text": "", "special": True}, "generated_text": "The"},
]


def test_events_are_the_wires_split_anywhere():
    text = ("".join(wire.event(e) for e in EVENTS)).encode()
    for cut in range(len(text) + 1):
        assert list(iter_events([text[:cut], text[cut:]])) == EVENTS


def test_an_error_from_the_chunks_passes_through_unchanged():
    def chunks():
        yield wire.event(EVENTS[0]).encode()
        raise SessionError("STREAM_BROKEN", None, "the stream broke off")

    events = iter_events(chunks())
    assert next(events) == EVENTS[0]
    with pytest.raises(SessionError) as caught:
        next(events)
    assert caught.value.code == "STREAM_BROKEN"


def test_events_last_line_without_newline_and_bad_json():
    assert list(iter_events([b'data: {"a": 1}'])) == [{"a": 1}]
    with pytest.raises(SessionError) as caught:
        list(iter_events([b"data:{not json\n\n"]))
    assert caught.value.code == "BAD_RESPONSE"


# --- Stubber: open / ask / close and replay ------------------------------------------------------------


def body(payload: dict) -> StreamingBody:
    data = json.dumps(payload).encode()
    return StreamingBody(io.BytesIO(data), len(data))


class Scripted:
    """A Stubber on a real client, plus the request bodies it was sent."""

    def __init__(self):
        self.client = runtime_client()
        self.stub = Stubber(self.client)
        self.sent: list[tuple[str, dict]] = []
        self.client.meta.events.register("before-parameter-build.sagemaker-runtime.InvokeEndpoint", self._capture)

    def _capture(self, params, **kwargs):
        self.sent.append((params["SessionId"], json.loads(params["Body"])))

    def opens(self, session_id):
        self.stub.add_response("invoke_endpoint", {"Body": body({"session_id": session_id}),
                                                   "NewSessionId": f"{session_id}; Expires={EXPIRES}"},
                               {"EndpointName": "ep", "Body": ANY, "ContentType": "application/json",
                                "SessionId": "NEW_SESSION"})

    def answers(self, session_id, text):
        self.stub.add_response("invoke_endpoint", {"Body": body({"generated_text": text, "usage": {
            "prompt_tokens": 7, "cached_tokens": 2, "completion_tokens": 5}})},
            {"EndpointName": "ep", "Body": ANY, "ContentType": "application/json", "SessionId": session_id})

    def closes(self, session_id, confirmed=None):
        self.stub.add_response("invoke_endpoint", {"Body": body({"closed": True}),
                                                   "ClosedSessionId": confirmed or session_id})

    def fails(self, status, code, aws_code="ModelError"):
        if aws_code == "ModelError":
            self.stub.add_client_error(
                "invoke_endpoint", service_error_code="ModelError", http_status_code=424,
                service_message=f"Received client error ({status}) from primary",
                modeled_fields={"OriginalStatusCode": status,
                                "OriginalMessage": json.dumps({"error": {"code": code, "message": "msg " + code}})})
        else:
            self.stub.add_client_error("invoke_endpoint", service_error_code=aws_code, http_status_code=status,
                                       service_message=code)


def test_open_ask_close_with_stubber():
    script = Scripted()
    script.opens("abc")
    script.answers("abc", "A cat.")
    script.closes("abc")
    with script.stub:
        with SessionClient("ep", runtime=script.client, max_new_tokens=16).open(images=[PNG]) as chat:
            assert chat.id == "abc" and chat.expires_at.year == 2099
            assert chat.ask("What is it?", temperature=0) == "A cat."
            assert chat.last_usage == {"prompt_tokens": 7, "cached_tokens": 2, "completion_tokens": 5}
        assert chat.closed
        chat.close()  # idempotent: nothing more is sent
        script.stub.assert_no_pending_responses()
    assert script.sent == [
        ("NEW_SESSION", {"requestType": "NEW_SESSION", "images": [base64.b64encode(PNG).decode()]}),
        ("abc", {"prompt": "What is it?", "max_new_tokens": 16, "temperature": 0}),
        ("abc", {"requestType": "CLOSE"}),
    ]
    with pytest.raises(SessionError) as caught:
        chat.ask("more?")
    assert caught.value.code == "SESSION_CLOSED"


def test_close_must_be_confirmed_and_missing_new_session_id_is_clear():
    script = Scripted()
    script.opens("abc")
    script.closes("abc", confirmed="other")
    script.stub.add_response("invoke_endpoint", {"Body": body({})})
    with script.stub:
        chat = SessionClient("ep", runtime=script.client).open()
        with pytest.raises(SessionError, match="not confirmed"):
            chat.close()
        with pytest.raises(SessionError, match="no NewSessionId"):
            SessionClient("ep", runtime=script.client).open()


def test_model_error_maps_to_the_containers_code():
    script = Scripted()
    script.opens("abc")
    script.fails(400, "PROMPT_TOO_LONG")
    with script.stub:
        chat = SessionClient("ep", runtime=script.client).open()
        with pytest.raises(SessionError) as caught:
            chat.ask("x" * 10)
    error = caught.value
    assert (error.code, error.status, error.message, error.aws_code) == (
        "PROMPT_TOO_LONG", 400, "msg PROMPT_TOO_LONG", "ModelError")
    assert chat.history == []


def test_replay_after_session_not_found():
    script = Scripted()
    script.opens("one")
    script.answers("one", "first answer")
    script.fails(404, "SESSION_NOT_FOUND")
    script.opens("two")
    script.answers("two", "first answer")  # turn 1 replayed
    script.answers("two", "second answer")  # turn 2 retried
    with script.stub:
        chat = SessionClient("ep", runtime=script.client).open(images=[PNG])
        assert chat.ask("q1", max_new_tokens=8) == "first answer"
        assert chat.ask("q2") == "second answer"
        script.stub.assert_no_pending_responses()
    assert chat.reopened == 1 and chat.id == "two" and chat.divergences == []
    assert "SESSION_NOT_FOUND" in chat.last_reopen_reason
    image = base64.b64encode(PNG).decode()
    assert script.sent == [
        ("NEW_SESSION", {"requestType": "NEW_SESSION", "images": [image]}),
        ("one", {"prompt": "q1", "max_new_tokens": 8}),
        ("one", {"prompt": "q2"}),
        ("NEW_SESSION", {"requestType": "NEW_SESSION", "images": [image]}),
        ("two", {"prompt": "q1", "max_new_tokens": 8}),
        ("two", {"prompt": "q2"}),
    ]
    assert [(t.prompt, t.answer) for t in chat.history] == [("q1", "first answer"), ("q2", "second answer")]


def test_replay_off_raises():
    script = Scripted()
    script.opens("one")
    script.answers("one", "first answer")
    script.fails(404, "SESSION_NOT_FOUND")
    with script.stub:
        chat = SessionClient("ep", runtime=script.client, replay=False).open()
        chat.ask("q1")
        with pytest.raises(SessionError) as caught:
            chat.ask("q2")
    assert (caught.value.code, caught.value.status) == ("SESSION_NOT_FOUND", 404)
    assert chat.reopened == 0


def test_sagemaker_validation_error_about_the_session_replays_too():
    script = Scripted()
    script.opens("one")
    script.answers("one", "a1")
    script.fails(400, "Session one has expired", aws_code="ValidationError")
    script.opens("two")
    script.answers("two", "a1")
    script.answers("two", "a2")
    with script.stub:
        chat = SessionClient("ep", runtime=script.client).open()
        chat.ask("q1")
        assert chat.ask("q2") == "a2"
    assert chat.reopened == 1


def test_other_validation_errors_do_not_replay():
    script = Scripted()
    script.opens("one")
    script.fails(400, "Endpoint ep of account 1 not found.", aws_code="ValidationError")
    with script.stub:
        chat = SessionClient("ep", runtime=script.client).open()
        with pytest.raises(SessionError) as caught:
            chat.ask("q1")
    assert caught.value.code == "ValidationError" and chat.reopened == 0


def test_replay_divergence_warns_and_keeps_the_new_answer():
    script = Scripted()
    script.opens("one")
    script.answers("one", "old answer")
    script.fails(404, "SESSION_NOT_FOUND")
    script.opens("two")
    script.answers("two", "new answer")
    script.answers("two", "a2")
    with script.stub:
        chat = SessionClient("ep", runtime=script.client).open()
        chat.ask("q1")
        with pytest.warns(ReplayDivergenceWarning, match="different answer"):
            chat.ask("q2")
    assert [(d.turn, d.before, d.after) for d in chat.divergences] == [(0, "old answer", "new answer")]
    assert chat.history[0].answer == "new answer"


def test_session_busy_is_waited_out():
    script = Scripted()
    script.opens("one")
    script.fails(409, "SESSION_BUSY")
    script.answers("one", "a1")
    with script.stub:
        chat = SessionClient("ep", runtime=script.client).open()
        assert chat.ask("q1") == "a1"


def test_a_worker_that_died_mid_turn_costs_no_turn():
    script = Scripted()
    script.opens("one")
    script.answers("one", "a1")
    script.fails(503, "WORKER_UNAVAILABLE")  # the worker died during q2
    script.fails(404, "SESSION_NOT_FOUND")  # sent again: the session went with it
    script.opens("two")
    script.answers("two", "a1")
    script.answers("two", "a2")
    with script.stub:
        chat = SessionClient("ep", runtime=script.client, unavailable_retry_s=0).open()
        chat.ask("q1")
        assert chat.ask("q2") == "a2"
        script.stub.assert_no_pending_responses()
    assert chat.reopened == 1 and [t.answer for t in chat.history] == ["a1", "a2"]


def test_a_worker_unavailable_twice_is_raised():
    script = Scripted()
    script.opens("one")
    script.fails(503, "WORKER_UNAVAILABLE")
    script.fails(503, "WORKER_UNAVAILABLE")
    with script.stub:
        chat = SessionClient("ep", runtime=script.client, unavailable_retry_s=0).open()
        with pytest.raises(SessionError) as raised:
            chat.ask("q1")
    assert raised.value.code == "WORKER_UNAVAILABLE" and chat.history == []


def test_exit_does_not_mask_the_original_error():
    script = Scripted()
    script.opens("one")
    script.fails(500, "INTERNAL_ERROR")  # the close fails
    with script.stub, pytest.warns(RuntimeWarning, match="closing session one failed"):
        with pytest.raises(KeyError):
            with SessionClient("ep", runtime=script.client).open():
                raise KeyError("user code failed")


def test_close_of_a_lost_session_is_fine():
    script = Scripted()
    script.opens("one")
    script.fails(404, "SESSION_NOT_FOUND")
    with script.stub, SessionClient("ep", runtime=script.client).open() as chat:
        pass
    assert chat.closed


def test_expired_session_is_reopened_before_the_turn():
    script = Scripted()
    script.stub.add_response("invoke_endpoint", {"Body": body({}), "NewSessionId": "one; Expires=2001-01-01T00:00:00Z"})
    script.opens("two")
    script.answers("two", "a1")
    with script.stub:
        chat = SessionClient("ep", runtime=script.client).open()
        assert chat.ask("q1") == "a1"
    assert chat.reopened == 1 and chat.id == "two"
    assert "Expires" in chat.last_reopen_reason


# --- the fake endpoint: streaming, replay across streams, messages -----------------------------------


def test_stream_yields_tokens_that_add_up(client, endpoint):
    with client.open(images=[PNG]) as chat:
        turn = chat.stream("What?", max_new_tokens=20)
        pieces = list(turn)
        expected = "answer 0 to What? with 1 images é日本"
        assert "".join(pieces) == expected == turn.text
        assert len(pieces) == len(expected.split(" "))
        assert turn.details["finish_reason"] == "eos_token"
        assert chat.last_usage["completion_tokens"] == len(pieces)
        assert chat.ask("Then?") == "answer 1 to Then? with 1 images é日本"
        assert [t.answer for t in chat.history] == [expected, "answer 1 to Then? with 1 images é日本"]
    stream_ops = [(op, body) for op, _, body in endpoint.requests if op == "stream"]
    assert stream_ops == [("stream", {"prompt": "What?", "max_new_tokens": 20, "stream": True})]


def test_stream_error_event_raises_and_leaves_no_turn(client, endpoint):
    chat = client.open()
    endpoint.stream_error_after = 2
    turn = chat.stream("What?")
    got = []
    with pytest.raises(SessionError) as caught:
        for piece in turn:
            got.append(piece)
    assert caught.value.code == "INTERNAL_ERROR" and len(got) == 2
    assert chat.history == []


def test_model_stream_error_event_raises(client, endpoint):
    chat = client.open()
    endpoint.stream_exception = "StreamBroken"
    with pytest.raises(SessionError) as caught:
        chat.stream("What?").read()
    # botocore keeps only the exception type and Message of an event-stream exception
    assert (caught.value.code, caught.value.aws_code, caught.value.message) == (
        "ModelStreamError", "ModelStreamError", "broken")
    assert chat.history == []


def test_stream_replays_a_lost_session(client, endpoint):
    chat = client.open(images=[PNG])
    first = chat.ask("q1")
    endpoint.lose_all()  # the instance went away
    assert chat.stream("q2").read() == "answer 1 to q2 with 1 images é日本"
    assert chat.reopened == 1 and chat.id == "s2"
    assert endpoint.sessions["s2"]["turns"][0][2] == first
    assert [t.prompt for t in chat.history] == ["q1", "q2"]


def test_a_stopped_stream_is_not_part_of_the_conversation(client, endpoint):
    chat = client.open()
    turn = chat.stream("q1")
    assert next(turn) == "answer"
    turn.close()  # a hang-up: the server stops the turn and does not keep it
    assert chat.history == [] and turn.text is None
    endpoint.lose_all()
    assert chat.ask("q2") == "answer 0 to q2 with 0 images é日本"  # nothing to replay: q2 is turn 0
    assert [t.prompt for t in chat.history] == ["q2"] and chat.divergences == []


def test_replay_with_another_instance_diverging(client, endpoint):
    chat = client.open()
    chat.ask("q1")
    endpoint.lose_all()
    endpoint.diverge = True
    with pytest.warns(ReplayDivergenceWarning):
        chat.ask("q2")
    assert len(chat.divergences) == 1


def test_lost_again_during_replay_recovers_a_bounded_number_of_times(endpoint):
    client = SessionClient("ep", runtime=endpoint.attach(runtime_client()), max_recoveries=2)
    chat = client.open()
    chat.ask("q1")
    endpoint.lose_all()
    original = endpoint.handle

    def always_lose(request, **kwargs):
        response = original(request, **kwargs)
        if b'"prompt"' in request.body:
            endpoint.lose_all()
            return endpoint._model_error(request, 404, "SESSION_NOT_FOUND", "gone")
        return response

    endpoint.handle = always_lose
    client.runtime.meta.events.unregister("before-send.sagemaker-runtime", original)
    client.runtime.meta.events.register("before-send.sagemaker-runtime", always_lose)
    with pytest.raises(SessionError) as caught:
        chat.ask("q2")
    assert caught.value.code == "SESSION_NOT_FOUND"
    assert [t.prompt for t in chat.history] == ["q1"]


# --- messages ---------------------------------------------------------------------------------------


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_messages_on_a_fresh_session_send_earlier_turns_first(client, endpoint):
    chat = client.open()
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Look."},
                                     {"type": "image_url", "image_url": {"url": data_url(PNG)}}]},
        {"role": "assistant", "content": "answer 0 to Look. with 1 images é日本"},
        {"role": "user", "content": "And?"},
    ]
    assert chat.ask(messages=messages) == "answer 1 to And? with 1 images é日本"
    sent = [body for _, _, body in endpoint.turns()]
    assert sent == [{"prompt": "Look.", "images": [base64.b64encode(PNG).decode()]}, {"prompt": "And?"}]
    # The whole conversation again plus one message: only the new one is sent.
    messages += [{"role": "assistant", "content": "answer 1 to And? with 1 images é日本"},
                 {"role": "user", "content": [{"type": "text", "text": "More?"}]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chat.ask(messages=messages)
    assert [body["prompt"] for _, _, body in endpoint.turns()] == ["Look.", "And?", "More?"]
    # Only the new user message: the next turn.
    chat.ask(messages=[{"role": "user", "content": [
        {"type": "text", "text": "This one?"}, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    assert endpoint.turns()[-1][2] == {"prompt": "This one?", "images": ["https://example.com/a.png"]}
    assert chat.messages()[-2:] == [{"role": "user", "content": "This one?"},
                                    {"role": "assistant", "content": "answer 3 to This one? with 2 images é日本"}]


def test_messages_that_rewrite_history_are_refused(client):
    chat = client.open()
    chat.ask("q1")
    chat.ask("q2")
    with pytest.raises(ValueError, match="differ"):
        chat.ask(messages=[{"role": "user", "content": "q1"}, {"role": "assistant", "content": chat.history[0].answer},
                           {"role": "user", "content": "other"}, {"role": "assistant", "content": "y"},
                           {"role": "user", "content": "q3"}])
    with pytest.raises(ValueError, match="whole conversation"):
        chat.ask(messages=[{"role": "user", "content": "q1"}, {"role": "assistant", "content": "x"},
                           {"role": "user", "content": "q3"}])


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}], "system prompt"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "last message"),
    ([{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}], "must follow"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "parts must be"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(PNG)}}]}], "no text"),
])
def test_bad_messages(client, messages, match):
    chat = client.open()
    with pytest.raises(ValueError, match=match):
        chat.ask(messages=messages)


# --- images: inline or through S3 ------------------------------------------------------------------------


def test_image_kinds(client, endpoint, tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(path)
    with client.open(images=[path, str(path), Image.new("RGB", (2, 2)), data_url(PNG), "s3://b/k.png"]):
        pass
    images = endpoint.requests[0][2]["images"]
    assert images[0] == images[1] == base64.b64encode(path.read_bytes()).decode()
    assert base64.b64decode(images[2]).startswith(b"\x89PNG")
    assert images[3] == base64.b64encode(PNG).decode() and images[4] == "s3://b/k.png"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        client.open(images=[tmp_path / "missing.png"])
    with pytest.raises(TypeError):
        client.open(images=[42])


def test_large_images_go_through_s3(endpoint):
    from moto import mock_aws

    big = b"\x89PNG\r\n\x1a\n" + bytes(7_000_000)
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="staging")
        runtime = endpoint.attach(runtime_client(), first=True)  # ahead of moto's own sagemaker-runtime
        client = SessionClient("ep", runtime=runtime, s3=s3, s3_staging="s3://staging/llava")
        with client.open(images=[big, PNG]) as chat:
            images = endpoint.requests[0][2]["images"]
            assert images[0].startswith("s3://staging/llava/") and images[0].endswith(".png")
            assert images[1] == base64.b64encode(PNG).decode()
            key = images[0][len("s3://staging/"):]
            assert s3.get_object(Bucket="staging", Key=key)["Body"].read() == big
            assert len(json.dumps(endpoint.requests[0][2])) < 10_000
            chat.ask("q1", images=[big])  # the same image again: staged once
            assert endpoint.turns()[-1][2]["images"] == [images[0]]
            endpoint.lose_all()
            chat.ask("q2")  # the replay reuses the staged object
            assert endpoint.requests[-3][2]["images"] == images
            assert chat.staged == [images[0]]
        assert s3.list_objects_v2(Bucket="staging").get("KeyCount") == 0

        kept = SessionClient("ep", runtime=runtime, s3=s3, s3_staging="s3://staging/", delete_staged=False)
        with kept.open(images=[big]):
            pass
        assert s3.list_objects_v2(Bucket="staging")["KeyCount"] == 1


def test_large_image_without_staging_is_a_clear_error(client, endpoint):
    with pytest.raises(SessionError) as caught:
        client.open(images=[b"\x89PNG" + bytes(4_500_000)])
    assert caught.value.code == "REQUEST_TOO_LARGE" and "s3_staging" in caught.value.message
    assert endpoint.requests == []
    client.open(images=[b"\x89PNG" + bytes(4_000_000)])  # 5.3 MB of base64: still inline
    assert len(endpoint.requests[-1][2]["images"][0]) > 5_000_000


def test_no_region_needed_for_a_local_runtime(monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setattr("botocore.utils.InstanceMetadataFetcher.retrieve_iam_role_credentials", lambda self: {})
    runtime = SessionClient("ep", endpoint_url="http://127.0.0.1:1").runtime
    assert runtime.meta.region_name == "us-east-1"
    assert runtime.meta.config.retries["total_max_attempts"] == 1


# --- the chat command ---------------------------------------------------------------------------------------


@pytest.fixture
def cli_endpoint(endpoint, monkeypatch):
    real = client_module.SessionClient._make_client

    def make(self, service, endpoint_url):
        made = real(self, service, endpoint_url)
        return endpoint.attach(made) if service == "sagemaker-runtime" else made

    monkeypatch.setattr(client_module.SessionClient, "_make_client", make)
    return endpoint


def run_chat(monkeypatch, capsys, lines, *args):
    from llava_sessions.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    code = main(["chat", "--endpoint", "ep", "--endpoint-url", "http://127.0.0.1:1", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_chat_streams_and_closes(cli_endpoint, monkeypatch, capsys, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(PNG)
    code, out, err = run_chat(monkeypatch, capsys, "What?\n\n/bogus\nAnd?\n/quit\nnot sent\n",
                              "--image", str(image), "--max-new-tokens", "5")
    assert code == 0
    assert "answer 0 to What? with 1 images é日本\n" in out and "answer 1 to And? with 1 images é日本\n" in out
    assert "session s1 open" in err and "unknown command /bogus" in err and "session s1 closed" in err
    assert [body["prompt"] for _, _, body in cli_endpoint.turns()] == ["What?", "And?"]
    assert cli_endpoint.turns()[0][2]["max_new_tokens"] == 5
    assert cli_endpoint.sessions == {}


def test_chat_no_stream_eof_and_replay_notice(cli_endpoint, monkeypatch, capsys):
    original = cli_endpoint.handle

    def lose_before_second_turn(request, **kwargs):
        if b'"prompt":"q2"' in request.body and cli_endpoint.opened == 1:
            cli_endpoint.lose_all()
        return original(request, **kwargs)

    cli_endpoint.handle = lose_before_second_turn
    code, out, err = run_chat(monkeypatch, capsys, "q1\n/image s3://b/k.png\nq2\n", "--no-stream")
    assert code == 0
    assert out.count("answer") == 2 and "answer 1 to q2 with 1 images" in out
    assert "reopened as s2" in err and "session s2 closed" in err
    assert cli_endpoint.turns()[-1][2] == {"prompt": "q2", "images": ["s3://b/k.png"]}


def test_chat_ctrl_c_stops_the_answer_only(cli_endpoint, monkeypatch, capsys):
    import sys

    writes = []

    class Interrupting(io.StringIO):
        def write(self, text):
            if text.startswith(" to") and not writes:
                writes.append(text)
                raise KeyboardInterrupt
            return super().write(text)

    stdout = Interrupting()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr("sys.stdin", io.StringIO("q1\nq2\n"))
    from llava_sessions.cli import main

    assert main(["chat", "--endpoint", "ep", "--endpoint-url", "http://127.0.0.1:1"]) == 0
    err = capsys.readouterr().err
    assert "stopped" in err and "closed" in err
    assert "answer 1 to q2" in stdout.getvalue()


def test_chat_open_failure_is_reported(cli_endpoint, monkeypatch, capsys, tmp_path):
    code, _, err = run_chat(monkeypatch, capsys, "", "--image", str(tmp_path / "missing.png"))
    assert code == 1 and "could not open a session" in err and "does not exist" in err


def test_an_unread_stream_is_stopped_by_the_next_turn(client, endpoint):
    chat = client.open()
    first = chat.stream("q1")
    assert next(first) == "answer"
    assert chat.ask("q2") == "answer 1 to q2 with 0 images é日本"
    assert first.done and [t.prompt for t in chat.history] == ["q2"]  # q1 was not delivered whole
    assert list(first) == []


def test_front_door_413_is_request_too_large():
    script = Scripted()
    script.opens("one")
    script.stub.add_client_error("invoke_endpoint", service_error_code="413", http_status_code=413,
                                 service_message="HTTP content length exceeded 6291456 bytes.")
    with script.stub:
        chat = SessionClient("ep", runtime=script.client).open()
        with pytest.raises(SessionError) as caught:
            chat.ask("q")
    assert (caught.value.code, caught.value.status) == ("REQUEST_TOO_LARGE", 413)


def test_a_turn_the_user_stopped_waiting_for_is_not_part_of_the_conversation(client, endpoint, monkeypatch):
    chat = client.open()
    chat.ask("q1")
    hung_up = []
    monkeypatch.setattr(client, "_hang_up", lambda: hung_up.append(True))

    def interrupted(body, session_id):
        raise KeyboardInterrupt

    for send in ("_invoke", "_invoke_stream"):
        with monkeypatch.context() as patch:
            patch.setattr(client, send, interrupted)
            with pytest.raises(KeyboardInterrupt):
                chat.ask("q2") if send == "_invoke" else chat.stream("q2")
    # The server drops a turn whose client hung up; so does the transcript.
    assert [t.prompt for t in chat.history] == ["q1"] and hung_up == [True, True]


@pytest.mark.parametrize("stream", [True, False])
def test_chat_prints_no_control_characters(cli_endpoint, monkeypatch, capsys, stream):
    # The fake endpoint echoes the prompt in its answer: a model could answer with these too.
    evil = "look \x1b[2J\x1b]0;pwned\x07 here\r\x08"
    code, out, _ = run_chat(monkeypatch, capsys, f"{evil}\n/history\n", *([] if stream else ["--no-stream"]))
    assert code == 0
    assert not any(ch in out for ch in "\x1b\x07\r\x08")
    assert "look [2J]0;pwned here" in out  # the text around them stays, newlines too


def test_a_reopen_and_replay_is_logged_at_info(client, endpoint, caplog):
    caplog.set_level("INFO", logger="llava_sessions.deploy.client")
    chat = client.open()
    chat.ask("q1")
    endpoint.lose_all()
    chat.ask("q2")
    [record] = [r for r in caplog.records if "reopened" in r.getMessage()]
    assert record.levelname == "INFO" and "replayed 1 turn(s)" in record.getMessage()
    assert "reopened as s2" in record.getMessage()
