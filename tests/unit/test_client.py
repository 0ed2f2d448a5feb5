"""The session client against real botocore clients: Stubber, and a fake endpoint at the HTTP layer.

The fake endpoint answers on botocore's ``before-send`` hook, so every response goes through
botocore's own parsing: headers (NewSessionId), ModelError bodies, and the binary event-stream
framing of InvokeEndpointWithResponseStream.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
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
        self.reconciled: list[str] = []  # per chat turn: "continued", "extended" or "departed"

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
        if "messages" in body:
            return self._chat(request, operation, session_id, body)
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

    # the OpenAI dialect: a conversation, reconciled with what the session holds
    def _chat(self, request, operation, session_id, body):
        messages = chat_conversation(body["messages"])
        if session_id == "NEW_SESSION" and body.get("stream"):
            return self._model_error(request, 400, "INVALID_REQUEST", "an open cannot stream", chat=True)
        if session_id not in (None, "NEW_SESSION") and session_id not in self.sessions:
            return self._model_error(request, 404, "SESSION_NOT_FOUND", "no such session", chat=True)
        if session_id not in (None, "NEW_SESSION") and self.busy_once:
            self.busy_once = False
            return self._model_error(request, 409, "SESSION_BUSY", "another turn is running", chat=True)
        session = self.sessions.get(session_id) or {"images": [], "turns": [], "system": None}
        held = held_conversation(session)
        if len(messages) == 1:  # only the question: the session as it is
            how, wanted = "continued", held
            question = messages[0]
            question = ("user", question[1], [*session["images"], *question[2]] if not session["turns"] else question[2])
        else:
            *wanted, question = messages
            pending = [digest(ref) for ref in session["images"]] if not session["turns"] else []
            first = next((m for m in wanted + [question] if m[0] == "user"), None)
            carries = [digest(ref) for ref in first[2][:len(pending)]] == pending
            how = "extended" if keyed(wanted[:len(held)]) == keyed(held) and carries else "departed"
        cached = 0
        for mine, theirs in zip(keyed(held), keyed(wanted)):
            if mine != theirs:
                break
            cached += 10
        self.reconciled.append(how)
        system = wanted[0][1] if wanted and wanted[0][0] == "system" else None
        talk = [m for m in wanted if m[0] != "system"]
        turns = [(talk[i][1], talk[i][2], talk[i + 1][1]) for i in range(0, len(talk), 2)]
        n_images = sum(len(t[1]) for t in turns) + len(question[2])
        answer = f"answer {len(turns)} to {question[1]} with {n_images} images é日本"
        if self.diverge:
            answer += " (other instance)"
        state = {"images": [], "turns": turns + [(question[1], question[2], answer)], "system": system}
        usage = {"prompt_tokens": 10 * (len(wanted) + 1), "completion_tokens": 3, "total_tokens": 10 * len(wanted) + 13,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        if operation == "stream":
            return self._chat_stream(request, session_id, state, body, answer, usage)
        headers = {}
        if session_id == "NEW_SESSION":
            self.opened += 1
            session_id = f"s{self.opened}"
            headers["X-Amzn-SageMaker-New-Session-Id"] = f"{session_id}; Expires={EXPIRES}"  # as SageMaker relays it
        if session_id is not None:
            self.sessions[session_id] = state
        return self._json(request, 200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop",
                         "logprobs": None}],
            "usage": usage}, headers)

    def _chat_stream(self, request, session_id, state, body, answer, usage):
        words = answer.split(" ")
        pieces = [words[0]] + [" " + word for word in words[1:]]
        head = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": ""}
        with_usage = (body.get("stream_options") or {}).get("include_usage")

        def chunk(delta, finish=None):
            return sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                        **({"usage": None} if with_usage else {})})

        text = chunk({"role": "assistant", "content": ""})
        for index, piece in enumerate(pieces):
            if self.stream_error_after is not None and index == self.stream_error_after:
                text += sse({"error": {"message": "the turn failed", "type": "server_error", "param": None,
                                       "code": "INTERNAL_ERROR"}})
                break
            text += chunk({"content": piece})
        else:
            if session_id is not None:
                self.sessions[session_id] = state
            text += chunk({}, "stop")
            if with_usage:
                text += sse({**head, "choices": [], "usage": usage})
            text += b"data: [DONE]\n\n"
        parts = [text[i:i + 7] for i in range(0, len(text), 7)]
        data = b"".join(payload_part(part) for part in parts)
        chunks = [data[i:i + 13] for i in range(0, len(data), 13)]
        return AWSResponse(request.url, 200, {"Content-Type": "application/vnd.amazon.eventstream"}, FakeRaw(chunks))

    def _json(self, request, status, body, headers=None):
        data = json.dumps(body).encode()
        return AWSResponse(request.url, status, {"Content-Type": "application/json", **(headers or {})},
                           FakeRaw([data]))

    def _model_error(self, request, status, code, message, chat=False):
        error = {"code": code, "message": message}
        if chat:  # the OpenAI dialect's error body
            error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        original = json.dumps({"error": error})
        body = {"ErrorCode": "CLIENT_ERROR_FROM_MODEL", "OriginalStatusCode": status, "OriginalMessage": original,
                "Message": f"Received client error ({status}) from primary with message \"{original}\"",
                "LogStreamArn": "arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/Endpoints/e"}
        return AWSResponse(request.url, 424, {"Content-Type": "application/json",
                                              "x-amzn-ErrorType": "ModelError:http://internal.amazon.com/"},
                           FakeRaw([json.dumps(body).encode()]))

    def turns(self):
        return [(op, sid, body) for op, sid, body in self.requests if "prompt" in body]

    def chats(self):
        return [(op, sid, body) for op, sid, body in self.requests if "messages" in body]


def digest(ref: str) -> str:
    """An image's identity as the server sees it: its bytes (inline), or the reference itself (a fake cannot fetch)."""
    if ref.startswith(("s3://", "https://", "http://")):
        return ref
    payload = ref.partition(",")[2] if ref.startswith("data:") else ref
    return "sha:" + hashlib.sha256(base64.b64decode(payload)).hexdigest()


def chat_conversation(messages):
    """[(role, text, image refs)] as the server reads an OpenAI body: one role's neighbours joined."""
    out = []
    for message in messages:
        role = {"developer": "system"}.get(message["role"], message["role"])
        content = message["content"]
        if isinstance(content, str):
            text, images = content, []
        else:
            text = "\n".join(p["text"] for p in content if p["type"] == "text")
            images = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
        if out and out[-1][0] == role:
            last = out.pop()
            text, images = "\n\n".join(t for t in (last[1], text) if t), last[2] + images
        out.append((role, text, images))
    return out


def held_conversation(session):
    """A fake session's messages: the open's images in its first user message once a turn used them."""
    held = [("system", session["system"], [])] if session.get("system") is not None else []
    for index, (prompt, images, answer) in enumerate(session["turns"]):
        held += [("user", prompt, [*(session["images"] if index == 0 else []), *images]), ("assistant", answer, [])]
    return held


def keyed(messages):
    return [(role, text, [digest(ref) for ref in images]) for role, text, images in messages]


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


# --- messages: OpenAI bodies, reconciled by the server -------------------------------------------------


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, *images: bytes) -> dict:
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        *({"type": "image_url", "image_url": {"url": data_url(i)}} for i in images)]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_messages_go_as_they_are_and_the_answer_is_a_chat_completion(client, endpoint):
    chat = client.open()
    look = {"role": "user", "content": [{"type": "text", "text": "Look."},
                                        {"type": "image_url", "image_url": {"url": data_url(PNG), "detail": "low"}}]}
    first = chat.ask(messages=[look], max_new_tokens=9)
    assert first == "answer 0 to Look. with 1 images é日本"
    assert endpoint.chats() == [("invoke", "s1", {"messages": [look], "max_tokens": 9, "temperature": 0})]
    assert chat.last_usage == {"prompt_tokens": 10, "cached_tokens": 0, "completion_tokens": 3}
    assert chat.last_details == {"finish_reason": "stop"}
    [turn] = chat.history
    assert (turn.prompt, turn.images, turn.answer, turn.complete) == ("Look.", (data_url(PNG),), first, True)

    # The whole conversation again and one more question: one request, the messages as they are.
    conversation = [look, assistant(first), user("And?")]
    assert chat.ask(messages=conversation) == "answer 1 to And? with 1 images é日本"
    assert endpoint.chats()[-1][2] == {"messages": conversation, "temperature": 0}
    assert len(endpoint.requests) == 3 and endpoint.turns() == []
    assert endpoint.reconciled == ["continued", "extended"]
    assert chat.last_usage["cached_tokens"] == 20  # the session's two messages were kept
    assert chat.history[0] is turn  # the turn the session held stays, with its usage
    assert [t.prompt for t in chat.history] == ["Look.", "And?"] and all(t.complete for t in chat.history)


def test_a_conversation_that_departs_is_answered_as_a_fresh_session_would(client, endpoint):
    chat = client.open()
    a0 = chat.ask(messages=[user("q1")])
    a1 = chat.ask("q2")  # a native turn in between: the same conversation
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: the server takes the conversation as given
        # Regenerate: the conversation without its last answer.
        again = chat.ask(messages=[user("q1"), assistant(a0), user("q2")])
        assert endpoint.reconciled[-1] == "departed" and again == a1
        assert [(t.prompt, t.answer) for t in chat.history] == [("q1", a0), ("q2", again)]
        # An edited earlier message, with an answer the endpoint never gave.
        edited = [user("other"), assistant("made up"), user("q3")]
        answer = chat.ask(messages=edited)
    assert answer == "answer 1 to q3 with 0 images é日本" and endpoint.reconciled[-1] == "departed"
    assert chat.messages() == [*edited, assistant(answer)]
    assert chat.divergences == [] and chat.reopened == 0 and chat.id == "s1"


def test_system_and_developer_messages_go_to_the_server(client, endpoint):
    chat = client.open()
    messages = [{"role": "developer", "content": "Be brief."}, user("hi")]
    answer = chat.ask(messages=messages)
    assert endpoint.chats()[-1][2]["messages"] == messages
    assert chat.system == "Be brief."
    assert chat.messages() == [{"role": "system", "content": "Be brief."}, user("hi"), assistant(answer)]
    chat.ask(messages=[*chat.messages(), user("more")])
    assert endpoint.reconciled == ["extended", "extended"]
    assert [t.prompt for t in chat.history] == ["hi", "more"]


def test_the_opens_images_lead_the_first_user_message_of_a_whole_conversation(client, endpoint):
    chat = client.open(images=[PNG])
    a0 = chat.ask(messages=[user("q1")])
    assert a0 == "answer 0 to q1 with 1 images é日本"
    assert chat.history[0].images == ()  # the open's images are the session's, not the turn's
    a1 = chat.ask(messages=[user("q1"), assistant(a0), user("q2")])
    assert endpoint.chats()[-1][2]["messages"][0] == {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(PNG)}}, {"type": "text", "text": "q1"}]}
    # Given there already, they are not doubled.
    with_image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(PNG)}},
                                              {"type": "text", "text": "q1"}]}
    chat.ask(messages=[with_image, assistant(a0), user("q2"), assistant(a1), user("q3")])
    assert endpoint.chats()[-1][2]["messages"][0] == with_image
    assert endpoint.reconciled == ["continued", "extended", "extended"]
    assert [t.images for t in chat.history] == [(), (), ()]


def test_a_user_message_of_images_only_is_sent(client, endpoint):
    chat = client.open()
    only = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(PNG)}}]}
    assert chat.ask(messages=[only]) == "answer 0 to  with 1 images é日本"
    assert chat.history[0].prompt == ""


def test_messages_stream_as_chat_completion_chunks(client, endpoint):
    chat = client.open()
    first = chat.ask(messages=[user("q1")])
    turn = chat.stream(messages=[user("q1"), assistant(first), user("q2")], max_new_tokens=20)
    pieces = list(turn)
    expected = "answer 1 to q2 with 0 images é日本"
    assert "".join(pieces) == expected == turn.text and len(pieces) == len(expected.split(" "))
    assert turn.details == {"finish_reason": "stop"}
    assert chat.last_usage == turn.usage == {"prompt_tokens": 30, "cached_tokens": 20, "completion_tokens": 3}
    op, session_id, body = endpoint.chats()[-1]
    assert (op, session_id) == ("stream", "s1")
    assert (body["stream"], body["stream_options"], body["max_tokens"]) == (True, {"include_usage": True}, 20)
    assert [t.answer for t in chat.history] == [first, expected]
    assert chat.ask("q3") == "answer 2 to q3 with 0 images é日本"  # native turns go on from it


def test_a_departing_stream_not_delivered_whole_leaves_the_conversation_as_it_was(client, endpoint):
    chat = client.open()
    chat.ask(messages=[{"role": "system", "content": "S"}, user("q1")])
    before = (list(chat.history), chat.system)
    other = [user("other"), assistant("x"), user("q2")]
    turn = chat.stream(messages=other)
    assert next(turn) == "answer"
    assert [t.prompt for t in chat.history] == ["other", "q2"] and chat.system is None  # while it streams
    turn.close()
    assert (chat.history, chat.system) == before and turn.text is None
    endpoint.stream_error_after = 2
    with pytest.raises(SessionError) as caught:
        chat.stream(messages=other).read()
    assert (caught.value.code, caught.value.message) == ("INTERNAL_ERROR", "the turn failed")
    assert (chat.history, chat.system) == before


def test_a_lost_session_driven_by_messages_reopens_with_the_whole_conversation_in_one_request(client, endpoint):
    chat = client.open(images=[PNG])
    a0 = chat.ask(messages=[{"role": "system", "content": "S"}, user("q1")])
    endpoint.lose_all()
    sent = len(endpoint.requests)
    a1 = chat.ask(messages=[user("q2")])  # only the new message: the client knows the rest
    assert a1 == "answer 1 to q2 with 1 images é日本"
    assert [(op, sid) for op, sid, _ in endpoint.requests[sent:]] == [("invoke", "s1"), ("invoke", "NEW_SESSION")]
    image_q1 = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(PNG)}},
                                            {"type": "text", "text": "q1"}]}
    assert endpoint.requests[-1][2] == {"messages": [{"role": "system", "content": "S"}, image_q1, assistant(a0),
                                                     user("q2")], "temperature": 0}
    assert chat.reopened == 1 and chat.id == "s2" and "SESSION_NOT_FOUND" in chat.last_reopen_reason
    assert [(t.prompt, t.answer) for t in chat.history] == [("q1", a0), ("q2", a1)] and chat.system == "S"

    # A native turn of a session driven by messages reopens the same way.
    endpoint.lose_all()
    a2 = chat.ask("q3", max_new_tokens=4)
    assert endpoint.requests[-2][2] == {"prompt": "q3", "max_new_tokens": 4}
    assert endpoint.requests[-1][1] == "NEW_SESSION"
    assert endpoint.requests[-1][2]["messages"][-2:] == [assistant(a1), user("q3")]
    assert endpoint.requests[-1][2]["max_tokens"] == 4
    # And a whole conversation, here the text-only one chat.messages() gives: the open's image leads it.
    endpoint.lose_all()
    a3 = chat.ask(messages=[*chat.messages(), user("q4")])
    assert endpoint.requests[-1][1] == "NEW_SESSION" and endpoint.requests[-1][2]["messages"][1] == image_q1
    assert a3 == "answer 3 to q4 with 1 images é日本" and endpoint.reconciled[-1] == "extended"
    assert chat.reopened == 3 and chat.id == "s4" and chat.divergences == []
    assert [t.answer for t in chat.history] == [a0, a1, a2, a3]


def test_a_lost_session_driven_by_messages_streams_after_an_empty_open(client, endpoint, caplog):
    caplog.set_level("INFO", logger="llava_sessions.deploy.client")
    chat = client.open()
    a0 = chat.ask(messages=[user("q1")])
    endpoint.lose_all()
    sent = len(endpoint.requests)
    assert chat.stream(messages=[user("q2")]).read() == "answer 1 to q2 with 0 images é日本"
    assert [(op, sid, body.get("requestType")) for op, sid, body in endpoint.requests[sent:]] == [
        ("stream", "s1", None), ("invoke", "NEW_SESSION", "NEW_SESSION"), ("stream", "s2", None)]
    assert endpoint.requests[-1][2]["messages"] == [user("q1"), assistant(a0), user("q2")]
    assert chat.reopened == 1 and [t.prompt for t in chat.history] == ["q1", "q2"]
    [record] = [r for r in caplog.records if "reopened" in r.getMessage()]
    assert "reopened as s2... with the whole conversation (1 turn(s))" in record.getMessage()
    # A native stream of that session reopens the same way, and reads the chat chunks it gets.
    endpoint.lose_all()
    turn = chat.stream("q3")
    assert turn.read() == "answer 2 to q3 with 0 images é日本" and turn.details == {"finish_reason": "stop"}
    assert endpoint.requests[-1][2]["messages"][-1] == user("q3") and chat.id == "s3"
    assert [t.prompt for t in chat.history] == ["q1", "q2", "q3"]


def test_an_expired_session_driven_by_messages_reopens_before_the_turn(client, endpoint):
    from datetime import UTC, datetime

    chat = client.open()
    chat.ask(messages=[user("q1")])
    chat.expires_at = datetime(2001, 1, 1, tzinfo=UTC)
    sent = len(endpoint.requests)
    chat.ask(messages=[user("q2")])
    assert [sid for _, sid, _ in endpoint.requests[sent:]] == ["NEW_SESSION"]
    assert "Expires" in chat.last_reopen_reason and chat.id == "s2"

    endpoint.lose_all()
    off = SessionClient("ep", runtime=client.runtime, replay=False).open()
    off.ask(messages=[user("q1")])
    endpoint.lose_all()
    with pytest.raises(SessionError) as caught:
        off.ask(messages=[user("q2")])
    assert caught.value.code == "SESSION_NOT_FOUND" and off.reopened == 0


def test_a_busy_session_is_waited_out_for_messages_too(client, endpoint):
    chat = client.open()
    endpoint.busy_once = True
    assert chat.ask(messages=[user("q1")]) == "answer 0 to q1 with 0 images é日本"
    assert [sid for _, sid, _ in endpoint.chats()] == ["s1", "s1"]


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "tool", "content": "x"}, {"role": "user", "content": "hi"}], "role must be"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "last message"),
    ([{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}], "must follow"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "s"}, {"role": "user", "content": "x"}],
     "must come first"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "parts must be"),
    ([{"role": "user", "content": []}], "empty"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": data_url(PNG)}}]}, {"role": "user", "content": "x"}],
     "only user messages"),
])
def test_bad_messages(client, endpoint, messages, match):
    chat = client.open()
    with pytest.raises(ValueError, match=match):
        chat.ask(messages=messages)
    assert endpoint.chats() == []


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


def test_large_images_in_messages_go_through_s3(endpoint):
    from moto import mock_aws

    big = b"\x89PNG\r\n\x1a\n" + bytes(7_000_000)
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="staging")
        runtime = endpoint.attach(runtime_client(), first=True)
        client = SessionClient("ep", runtime=runtime, s3=s3, s3_staging="s3://staging/llava")
        with client.open() as chat:
            look = user("Look.", big, PNG)
            a0 = chat.ask(messages=[look])
            body = endpoint.chats()[-1][2]
            parts = body["messages"][0]["content"]
            staged = parts[1]["image_url"]["url"]
            assert staged.startswith("s3://staging/llava/") and staged.endswith(".png")
            assert parts[2]["image_url"]["url"] == data_url(PNG) and len(json.dumps(body)) < 10_000
            assert s3.get_object(Bucket="staging", Key=staged[len("s3://staging/"):])["Body"].read() == big
            endpoint.lose_all()
            # The conversation again, then the reopen with it: the staged object each time.
            chat.ask(messages=[look, assistant(a0), user("More?")])
            resent, reopen = endpoint.chats()[-2:]
            assert reopen[1] == "NEW_SESSION" and chat.reopened == 1
            for _, _, sent in (resent, reopen):
                assert [p["image_url"]["url"] for p in sent["messages"][0]["content"][1:]] == [staged, data_url(PNG)]
            assert chat.staged == [staged]
        assert s3.list_objects_v2(Bucket="staging").get("KeyCount") == 0


def test_large_image_without_staging_is_a_clear_error(client, endpoint):
    with pytest.raises(SessionError) as caught:
        client.open(images=[b"\x89PNG" + bytes(4_500_000)])
    assert caught.value.code == "REQUEST_TOO_LARGE" and "s3_staging" in caught.value.message
    assert endpoint.requests == []
    client.open(images=[b"\x89PNG" + bytes(4_000_000)])  # 5.3 MB of base64: still inline
    assert len(endpoint.requests[-1][2]["images"][0]) > 5_000_000
    chat = client.open()
    with pytest.raises(SessionError) as caught:
        chat.ask(messages=[user("Look.", b"\x89PNG" + bytes(4_500_000))])
    assert caught.value.code == "REQUEST_TOO_LARGE" and "s3_staging" in caught.value.message
    assert endpoint.chats() == [] and chat.history == []


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

    asks = [lambda: chat.ask("q2"), lambda: chat.stream("q2"),
            lambda: chat.ask(messages=[user("other"), assistant("x"), user("q2")]),
            lambda: chat.stream(messages=[user("other"), assistant("x"), user("q2")])]
    for index, turn in enumerate(asks):
        with monkeypatch.context() as patch:
            patch.setattr(client, "_invoke" if index % 2 == 0 else "_invoke_stream", interrupted)
            with pytest.raises(KeyboardInterrupt):
                turn()
    # The server drops a turn whose client hung up; so does the transcript.
    assert [t.prompt for t in chat.history] == ["q1"] and hung_up == [True] * 4


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


def test_messages_with_images_resend_as_this_sessions_conversation(client, endpoint):
    """``messages(images=True)`` gives each user message its images as sent (the open's first), so
    resending it whole with a new question extends the session rather than departing from it."""
    chat = client.open(images=[PNG])
    chat.ask("q1")
    chat.ask(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(PNG)}},
                                                    {"type": "text", "text": "q2"}]}])
    assert chat.messages()[2] == user("q2")  # text only by default
    whole = chat.messages(images=True)
    assert [part["type"] for part in whole[0]["content"]] == ["image_url", "text"]
    assert whole[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert [part["type"] for part in whole[2]["content"]] == ["image_url", "text"]
    chat.ask(messages=[*whole, user("q3")])
    assert endpoint.reconciled[-1] == "extended"
