"""Unit tests for llava_sessions.handler.protocol and the native and AWS-sample dialects:
parsing, ids and response shapes (test_dialects.py: OpenAI and TGI).

The id rule, the header names and the Expires format are llava_sessions.wire's (test_wire.py).
"""

from __future__ import annotations

import json
import re
import secrets
from types import SimpleNamespace

import pytest

from llava_sessions.config import ServingConfig
from llava_sessions.errors import InvalidRequest, SessionNotFound, SessionsError
from llava_sessions import wire
from llava_sessions.handler.engine.session_store import new_session_id
from llava_sessions.handler.dialects import AWS_SAMPLE, NATIVE
from llava_sessions.handler.protocol import NEW_SESSION, SESSION_HEADER, parse_request
from llava_sessions.handler.requests import CloseSession, OneShot, OpenSession, Turn

CONFIG = ServingConfig()
SID = "sess-0123456789abcdef0123456789abcdef"
def result(text, prompt_tokens, cached_tokens, completion_tokens, finish_reason="stop"):
    """A TurnResult's fields, as the dialects read them."""
    return SimpleNamespace(text=text, prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
                           completion_tokens=completion_tokens, finish_reason=finish_reason)


SAGEMAKER_PATTERN = re.compile(r"^(NEW_SESSION)$|^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")


def parse(body, session_header=None, config=CONFIG, header_name=SESSION_HEADER):
    raw = body if isinstance(body, (bytes, bytearray, str)) else json.dumps(body).encode()
    headers = {} if session_header is None else {header_name: session_header}
    return parse_request(raw, headers, config)


def error_code(body, session_header=None, config=CONFIG, headers=None):
    raw = body if isinstance(body, (bytes, bytearray, str)) else json.dumps(body).encode()
    if headers is None:
        headers = {} if session_header is None else {SESSION_HEADER: session_header}
    with pytest.raises(SessionsError) as info:
        parse_request(raw, headers, config)
    return info.value.code


# --- constants ---------------------------------------------------------------------


def test_header_names_and_new_session_literal_are_the_wires():
    assert SESSION_HEADER == wire.SESSION_HEADER == "X-Amzn-SageMaker-Session-Id"
    assert NEW_SESSION == wire.NEW_SESSION == "NEW_SESSION"


# --- native dialect: open ------------------------------------------------------------


@pytest.mark.parametrize("session_header", [None, "", "  ", NEW_SESSION, f" {NEW_SESSION} "])
def test_native_open_with_no_session_in_header(session_header):
    assert parse({"requestType": "NEW_SESSION", "images": ["aGk="]}, session_header) == OpenSession(
        images=("aGk=",), dialect=NATIVE
    )


def test_native_open_without_images():
    assert parse({"requestType": "NEW_SESSION"}, NEW_SESSION) == OpenSession(images=(), dialect=NATIVE)


def test_native_open_may_bring_the_first_question():
    request = parse({"requestType": "NEW_SESSION", "images": ["aGk="], "prompt": "What is it?",
                     "max_new_tokens": 7, "temperature": 0.5}, NEW_SESSION)
    assert request.images == ("aGk=",)
    assert request.first_turn == Turn(session_id="", prompt="What is it?", max_new_tokens=7, temperature=0.5,
                                      top_p=1.0, images=(), stream=False, dialect=NATIVE)


@pytest.mark.parametrize("body, message", [
    ({"requestType": "NEW_SESSION", "prompt": "hi", "stream": True}, "cannot stream an open"),
    ({"requestType": "NEW_SESSION", "max_new_tokens": 5}, "need a 'prompt'"),
    ({"requestType": "NEW_SESSION", "prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
])
def test_native_open_question_mistakes(body, message):
    with pytest.raises(InvalidRequest, match=message):
        parse(body, NEW_SESSION)


def test_open_response_carries_the_first_answer():
    body = NATIVE.open_body(SID, 0, result("A cat.", 30, 0, 3), None)
    assert body["session_id"] == SID and body["generated_text"] == "A cat." and body["usage"]["prompt_tokens"] == 30


def test_native_open_with_a_session_id_in_header_is_refused():
    with pytest.raises(InvalidRequest, match="NEW_SESSION"):
        parse({"requestType": "NEW_SESSION"}, SID)


# --- native dialect: turn ------------------------------------------------------------


def test_native_turn_with_every_field():
    body = {
        "prompt": "What is in the picture?",
        "max_new_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "images": ["s3://bucket/a.png", "https://h/b.jpg"],
        "stream": True,
    }
    assert parse(body, SID) == Turn(
        session_id=SID,
        prompt="What is in the picture?",
        max_new_tokens=64,
        temperature=0.7,
        top_p=0.9,
        images=("s3://bucket/a.png", "https://h/b.jpg"),
        stream=True,
        dialect=NATIVE,
    )


def test_native_turn_defaults():
    config = CONFIG.replace(default_max_new_tokens=77)
    turn = parse({"prompt": "hi"}, SID, config=config)
    assert (turn.max_new_tokens, turn.temperature, turn.top_p, turn.images, turn.stream) == (
        77,
        0.0,
        1.0,
        (),
        False,
    )
    assert isinstance(turn.temperature, float) and isinstance(turn.top_p, float)


@pytest.mark.parametrize(
    "header_name",
    ["x-amzn-sagemaker-session-id", "X-AMZN-SAGEMAKER-SESSION-ID", "X-Amzn-Sagemaker-Session-Id"],
)
def test_header_names_match_in_any_case(header_name):
    assert parse({"prompt": "hi"}, SID, header_name=header_name).session_id == SID


def test_torchserve_style_headers_with_non_text_entries():
    # TorchServe's get_all_request_header also holds {"body": {"content-type": ...}}.
    headers = {"body": {"content-type": "application/json"}, "x-amzn-sagemaker-session-id": f" {SID} "}
    assert parse_request(b'{"prompt": "hi"}', headers, CONFIG).session_id == SID


def test_same_session_header_twice_with_equal_values_is_fine():
    headers = {SESSION_HEADER: SID, SESSION_HEADER.lower(): SID}
    assert parse_request(b'{"prompt": "hi"}', headers, CONFIG).session_id == SID


@pytest.mark.parametrize(
    "headers",
    [
        {SESSION_HEADER: SID, SESSION_HEADER.lower(): "other-id"},
        {SESSION_HEADER: 123},
    ],
)
def test_ambiguous_or_non_text_session_header_is_refused(headers):
    assert error_code({"prompt": "hi"}, headers=headers) == "INVALID_REQUEST"


@pytest.mark.parametrize("session_header", [None, "", "  "])
def test_native_turn_without_a_session_is_a_one_shot(session_header):
    request = parse({"prompt": "hi", "images": ["aGk="]}, session_header)
    assert isinstance(request, OneShot)
    assert (request.turn.prompt, request.turn.images, request.dialect) == ("hi", ("aGk=",), NATIVE)


def test_native_turn_with_new_session_header_opens_with_it_as_first_turn():
    request = parse({"prompt": "hi", "images": ["aGk="], "max_new_tokens": 5}, NEW_SESSION)
    assert isinstance(request, OpenSession) and request.images == ("aGk=",)
    assert (request.first_turn.prompt, request.first_turn.max_new_tokens) == ("hi", 5)
    with pytest.raises(InvalidRequest, match="cannot stream an open"):
        parse({"prompt": "hi", "stream": True}, NEW_SESSION)


def test_a_pasted_open_header_value_counts_as_its_id():
    assert parse({"prompt": "hi"}, f"{SID}; Expires=2030-01-01T00:00:00Z").session_id == SID


def test_native_rewind_needs_a_count_and_a_session():
    assert parse({"prompt": "hi", "rewind_to": 2}, SID).rewind_to == 2
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(InvalidRequest, match="rewind_to"):
            parse({"prompt": "hi", "rewind_to": bad}, SID)
    with pytest.raises(InvalidRequest, match="needs a session"):
        parse({"prompt": "hi", "rewind_to": 1})


def test_a_form_encoded_body_is_refused_for_its_content_type():
    with pytest.raises(InvalidRequest, match="application/x-www-form-urlencoded.*application/json"):
        parse_request(b"", {"Content-Type": "application/x-www-form-urlencoded"}, CONFIG)


def test_a_body_of_no_dialect_names_them_all():
    with pytest.raises(InvalidRequest) as info:
        parse({"question": "hi"}, SID)
    for marker in ("prompt", "messages", "inputs", "type"):
        assert marker in info.value.message


# --- native dialect: close -----------------------------------------------------------


def test_native_close():
    assert parse({"requestType": "CLOSE"}, SID) == CloseSession(session_id=SID, dialect=NATIVE)


@pytest.mark.parametrize("session_header", [None, "", NEW_SESSION])
def test_native_close_without_session_id_is_refused(session_header):
    with pytest.raises(InvalidRequest, match="CLOSE needs"):
        parse({"requestType": "CLOSE"}, session_header)


@pytest.mark.parametrize("request_type", ["close", "OPEN", "", None, 1, ["CLOSE"]])
def test_unknown_request_type_lists_the_allowed_ones(request_type):
    with pytest.raises(InvalidRequest) as info:
        parse({"requestType": request_type}, SID)
    assert "'NEW_SESSION'" in info.value.message and "'CLOSE'" in info.value.message


@pytest.mark.parametrize(
    "body, session_header",
    [
        ({"requestType": "NEW_SESSION", "question": "hi"}, None),
        ({"prompt": "hi", "session_id": SID}, SID),
        ({"prompt": "hi", "max_tokens": 5}, SID),
        ({"requestType": "CLOSE", "images": []}, SID),
    ],
)
def test_unknown_fields_are_refused_with_the_allowed_list(body, session_header):
    with pytest.raises(InvalidRequest, match="unknown field.*allowed: "):
        parse(body, session_header)


# --- JSON ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"\xff\xfe{}",
        b'{"prompt": "caf\xe9"}',  # Latin-1, not UTF-8
        b"{prompt: 1}",
        b'{"prompt": "hi",}',
        b'{"prompt": "hi", "temperature": NaN}',
        b'{"prompt": "hi", "temperature": Infinity}',
        b'{"prompt": "hi", "temperature": -Infinity}',
        b'{"prompt": "hi", "temperature": 1e999}',
        b'{"prompt": "hi", "prompt": "again"}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"prompt": "hi", "max_new_tokens": ' + b"9" * 5000 + b"}",
    ],
)
def test_bad_json_is_invalid_json(raw):
    assert error_code(raw, SID) == "INVALID_JSON"


def test_empty_body_names_the_content_type():
    # What the handler gets when a form or multipart Content-Type made TorchServe take the body apart.
    with pytest.raises(SessionsError) as info:
        parse(b"", SID)
    assert info.value.code == "INVALID_JSON"
    assert "Content-Type: application/json" in info.value.message


@pytest.mark.parametrize("raw", [b"[]", b'"hi"', b"3", b"null", b"true"])
def test_json_that_is_not_an_object_is_invalid_request(raw):
    assert error_code(raw, SID) == "INVALID_REQUEST"


@pytest.mark.parametrize("raw", [bytearray(b'{"prompt": "hi"}'), '{"prompt": "hi"}'])
def test_body_as_bytearray_or_text(raw):
    assert parse(raw, SID).prompt == "hi"


def test_unicode_prompt_survives():
    # A UTF-8 é, and an emoji sent as a JSON surrogate-pair escape.
    body = '{"prompt": "caf\u00e9 ' + r'\ud83d\ude00"}'
    assert parse(body.encode(), SID).prompt == "caf\u00e9 \U0001f600"


# --- field validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("prompt", None),
        ("prompt", ""),
        ("prompt", "   \n"),
        ("prompt", 5),
        ("prompt", ["hi"]),
        ("max_new_tokens", 0),
        ("max_new_tokens", -1),
        ("max_new_tokens", CONFIG.max_new_tokens_limit + 1),
        ("max_new_tokens", True),
        ("max_new_tokens", 8.0),
        ("max_new_tokens", "8"),
        ("max_new_tokens", None),
        ("max_new_tokens", 10**100),
        ("temperature", -0.01),
        ("temperature", 2.01),
        ("temperature", True),
        ("temperature", "0.5"),
        ("temperature", None),
        ("top_p", 0),
        ("top_p", -0.5),
        ("top_p", 1.0001),
        ("top_p", False),
        ("top_p", "1"),
        ("images", "aGk="),
        ("images", {"a": "b"}),
        ("images", [""]),
        ("images", ["  "]),
        ("images", [1]),
        ("images", [None]),
        ("images", [["aGk="]]),
        ("stream", "true"),
        ("stream", 1),
        ("stream", None),
    ],
)
def test_invalid_turn_fields(field, value):
    body = {"prompt": "hi", field: value}
    assert error_code(body, SID) == "INVALID_REQUEST"


def test_missing_prompt():
    with pytest.raises(InvalidRequest, match="'prompt' is missing"):
        parse({"max_new_tokens": 5}, SID)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("max_new_tokens", 1, 1),
        ("max_new_tokens", CONFIG.max_new_tokens_limit, CONFIG.max_new_tokens_limit),
        ("temperature", 0, 0.0),
        ("temperature", 2, 2.0),
        ("temperature", 1e-9, 1e-9),
        ("top_p", 1, 1.0),
        ("top_p", 0.01, 0.01),
        ("stream", False, False),
    ],
)
def test_boundary_values_are_accepted(field, value, expected):
    assert getattr(parse({"prompt": "hi", field: value}, SID), field) == expected


def test_prompt_length_limit():
    config = CONFIG.replace(max_prompt_chars=10)
    assert parse({"prompt": "x" * 10}, SID, config=config).prompt == "x" * 10
    assert error_code({"prompt": "x" * 11}, SID, config=config) == "PROMPT_TOO_LONG"


def test_prompt_with_an_unpaired_surrogate_is_refused():
    assert error_code(b'{"prompt": "a\\ud800b"}', SID) == "INVALID_REQUEST"


def test_prompt_text_is_not_echoed_in_errors():
    config = CONFIG.replace(max_prompt_chars=10)
    with pytest.raises(SessionsError) as info:
        parse({"prompt": "SECRET-" * 3}, SID, config=config)
    assert "SECRET" not in info.value.message


@pytest.mark.parametrize(
    "body, session_header",
    [
        ({"requestType": "NEW_SESSION", "images": ["a"] * 3}, None),
        ({"prompt": "hi", "images": ["a"] * 3}, SID),
    ],
)
def test_image_count_limit(body, session_header):
    config = CONFIG.replace(max_images_per_session=2)
    assert error_code(body, session_header, config=config) == "TOO_MANY_IMAGES"
    body["images"] = ["a"] * 2
    assert len(parse(body, session_header, config=config).images) == 2


# --- session ids -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "session_id",
    ["a", "Z9", "a-b", "a---b", "ts-seq-0b8f7a3c-1d2e-4f5a-9b8c-7d6e5f4a3b2c", "x" * 256, SID],
)
def test_valid_session_ids(session_id):
    assert SAGEMAKER_PATTERN.match(session_id)
    assert parse({"prompt": "hi"}, session_id).session_id == session_id


@pytest.mark.parametrize(
    "session_id",
    [
        "-a",
        "a-",
        "a_b",
        "a.b",
        "a b",
        "x" * 257,
        "caf\u00e9",
        "a;b",
        "new_session",
        f"{SID}; Expires=soon",  # not a pasted open header: no valid Expires
    ],
)
def test_invalid_session_ids(session_id):
    assert error_code({"prompt": "hi"}, session_id) == "INVALID_REQUEST"
    body_id_sample = {"type": "send_text_prompt", "session_id": session_id, "prompt_text": "hi"}
    assert error_code(body_id_sample, None) == "INVALID_REQUEST"


def test_new_session_ids_are_unique_random_and_match_the_pattern():
    ids = [new_session_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for session_id in ids:
        assert re.fullmatch(r"sess-[0-9a-f]{32}", session_id)  # 32 hex digits = 128 random bits
        assert SAGEMAKER_PATTERN.match(session_id) and len(session_id) <= 256
        assert wire.is_valid_session_id(session_id)
    # Every hex position varies: no fixed or counter-like digits.
    for position in range(5, 37):
        assert len({session_id[position] for session_id in ids}) == 16


def test_new_session_id_uses_secrets(monkeypatch):
    monkeypatch.setattr(secrets, "token_hex", lambda n: "ab" * n)
    assert new_session_id() == "sess-" + "ab" * 16


# --- AWS sample dialect --------------------------------------------------------------------


@pytest.mark.parametrize("session_header", [None, "", NEW_SESSION])
def test_sample_start_session(session_header):
    # dataclass_json's to_json() sends the optional session_id as null.
    body = {"type": "start_session", "path": "https://images.example.com/cat.jpg", "session_id": None}
    assert parse(body, session_header) == OpenSession(
        images=("https://images.example.com/cat.jpg",), dialect=AWS_SAMPLE
    )


@pytest.mark.parametrize(
    "body, session_header",
    [
        ({"type": "start_session", "path": "aGk=", "session_id": SID}, None),
        ({"type": "start_session", "path": "aGk="}, SID),
        ({"type": "start_session"}, None),
        ({"type": "start_session", "path": ""}, None),
        ({"type": "start_session", "path": ["aGk="]}, None),
        ({"type": "start_session", "path": "aGk=", "images": ["aGk="]}, None),
    ],
)
def test_sample_start_session_refusals(body, session_header):
    assert error_code(body, session_header) == "INVALID_REQUEST"


@pytest.mark.parametrize(
    "session_header, body_id",
    [(SID, None), (SID, SID), (None, SID), (NEW_SESSION, SID), ("", SID)],
)
def test_sample_text_prompt_takes_the_id_from_header_or_body(session_header, body_id):
    body = {"type": "send_text_prompt", "session_id": body_id, "prompt_text": "describe the picture"}
    assert parse(body, session_header) == Turn(
        session_id=SID,
        prompt="describe the picture",
        max_new_tokens=CONFIG.default_max_new_tokens,
        temperature=0.0,
        top_p=1.0,
        images=(),
        stream=False,
        dialect=AWS_SAMPLE,
    )


def test_sample_text_prompt_accepts_generation_options():
    body = {
        "type": "send_text_prompt",
        "session_id": SID,
        "prompt_text": "hi",
        "max_new_tokens": 9,
        "temperature": 0.2,
        "top_p": 0.5,
        "stream": True,
    }
    turn = parse(body, SID)
    # The sample's answers never stream: "stream" is accepted and the answer comes whole.
    assert (turn.max_new_tokens, turn.temperature, turn.top_p, turn.stream) == (9, 0.2, 0.5, False)


@pytest.mark.parametrize(
    "body, session_header, message",
    [
        ({"type": "send_text_prompt", "session_id": "other-id", "prompt_text": "hi"}, SID, "differs"),
        ({"type": "send_text_prompt", "prompt_text": "hi"}, None, "names no session"),
        ({"type": "send_text_prompt", "prompt_text": "hi"}, NEW_SESSION, "open a session first"),
        ({"type": "send_text_prompt", "session_id": 7, "prompt_text": "hi"}, None, "must be a string"),
        ({"type": "send_text_prompt", "session_id": SID}, None, "'prompt_text' is missing"),
        ({"type": "send_text_prompt", "session_id": SID, "prompt": "hi"}, None, "unknown field"),
        ({"type": "close_session"}, None, "names no session"),
        ({"type": "close_session", "session_id": "other-id"}, SID, "differs"),
        (
            {"type": "reset_session", "session_id": SID},
            None,
            "start_session, send_text_prompt, close_session",
        ),
        ({"type": None}, None, "start_session, send_text_prompt, close_session"),
        ({"type": "close_session", "requestType": "CLOSE", "session_id": SID}, None, "unknown field"),
    ],
)
def test_sample_refusals(body, session_header, message):
    with pytest.raises(InvalidRequest, match=message):
        parse(body, session_header)


@pytest.mark.parametrize("session_header, body_id", [(SID, None), (None, SID), (SID, SID)])
def test_sample_close_session(session_header, body_id):
    body = {"type": "close_session", "session_id": body_id}
    assert parse(body, session_header) == CloseSession(session_id=SID, dialect=AWS_SAMPLE)


def test_sample_round_trip_like_the_notebook():
    """The AWS sample's client: open, two prompts, close; each reply parses with its field names."""
    opened = parse(
        json.dumps({"type": "start_session", "path": "https://h/x.jpg", "session_id": None}), NEW_SESSION
    )
    reply = opened.dialect.open_body(SID, 1_700_000_000, None, None)
    assert reply == {"session_id": SID}

    for prompt in ("describe the picture", "is there a mountain in the picture, describe it"):
        turn = parse(
            json.dumps(
                {"type": "send_text_prompt", "session_id": reply["session_id"], "prompt_text": prompt}
            ),
            reply["session_id"],
        )
        assert (turn.session_id, turn.prompt, turn.dialect) == (SID, prompt, AWS_SAMPLE)
        answer = turn.dialect.turn_body(result("A cat.", 600, 590, 3), turn)
        assert answer == {"response_text": "A cat."}

    closed = parse(json.dumps({"type": "close_session", "session_id": SID}), SID)
    assert closed.dialect.close_body(closed.session_id) == {"success": True}


def test_native_round_trip():
    opened = parse({"requestType": "NEW_SESSION", "images": ["aGk="]}, NEW_SESSION)
    assert opened.dialect.open_body(SID, 1_700_000_000, None, None) == {
        "session_id": SID,
        "expires_at": "2023-11-14T22:13:20Z",
    }
    turn = parse({"prompt": "hi"}, SID)
    assert turn.dialect.turn_body(result("Hello.", 10, 4, 2), turn) == {
        "generated_text": "Hello.",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 10, "cached_tokens": 4, "completion_tokens": 2},
    }
    closed = parse({"requestType": "CLOSE"}, SID)
    assert closed.dialect.close_body(closed.session_id) == {"session_id": SID, "closed": True}


# --- responses ------------------------------------------------------------------------------


def test_error_response_uses_the_error_dict():
    error = SessionNotFound("no session with that id on this worker; open a new one")
    assert NATIVE.error_body(error, 404) == AWS_SAMPLE.error_body(error, 404) == {
        "error": {
            "code": "SESSION_NOT_FOUND",
            "message": "no session with that id on this worker; open a new one",
        }
    }


def test_responses_are_json_serialisable():
    for body in (
        NATIVE.open_body(SID, 0, None, None),
        NATIVE.turn_body(result("x", 1, 0, 1), None),
        NATIVE.close_body(SID),
        NATIVE.error_body(InvalidRequest("x"), 400),
    ):
        json.dumps(body, allow_nan=False)
