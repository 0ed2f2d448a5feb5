"""The wire protocol: one /invocations request in, one typed request out; responses shaped back.

Torch-free. Two payload dialects are accepted; the parsed request remembers which
one (``style``) so the response is shaped the same way.

Native dialect (the session id travels only in the ``X-Amzn-SageMaker-Session-Id`` header):

- open:  header absent, empty or ``NEW_SESSION``; body ``{"requestType": "NEW_SESSION",
  "images": [...]}`` (``images`` optional).
- turn:  header ``<id>``; body ``{"prompt", "max_new_tokens"?, "temperature"?, "top_p"?,
  "images"?, "stream"?}`` (no ``requestType``).
- close: header ``<id>``; body ``{"requestType": "CLOSE"}``.

AWS LLaVA sample dialect (aws-samples/sagemaker-genai-hosting-examples, LLava/torchserve),
recognised by a ``type`` field:

- ``{"type": "start_session", "path": <image ref>, "session_id": null?}``
- ``{"type": "send_text_prompt", "session_id"?, "prompt_text", ...}``; it also takes the native
  ``max_new_tokens``, ``temperature``, ``top_p`` and ``stream``.
- ``{"type": "close_session", "session_id"?}``

Rules for the ambiguous cases:

- The header carries "no session" when absent, empty or ``NEW_SESSION``: what SageMaker forwards
  for a new session is undocumented, so all three open a session.
- A turn or close whose header carries no session id is refused (INVALID_REQUEST): open first.
  In the sample dialect the id may instead come from the body's ``session_id``; when header and
  body both carry one they must be equal. ``"session_id": null`` counts as absent.
- An open (``NEW_SESSION`` / ``start_session``) whose header or body already names a session is
  refused: the server mints ids.
- Session ids must follow SageMaker's SessionId rule (``wire.is_valid_session_id``: letters,
  digits and inner hyphens, at most 256 characters); the header value is stripped of surrounding
  blanks first. Header names match in any case; two spellings of the session header with
  different values are refused.
- Unknown fields, a ``requestType`` other than NEW_SESSION/CLOSE and a ``type`` other than the
  three above are refused, listing what is allowed. A body with both ``type`` and
  ``requestType`` is a sample-dialect body with an unknown field.
- JSON must be UTF-8 without NaN/Infinity (also not by overflow, e.g. ``1e999``) and without
  duplicate keys (INVALID_JSON). A body that is JSON but not an object is INVALID_REQUEST.
- The image count is checked per request against ``max_images_per_session``; the total across
  a session's turns is the engine's to check.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from llava_sessions.config import ENV_PREFIX, ServingConfig
from llava_sessions.errors import (
    InvalidJson,
    InvalidRequest,
    PromptTooLong,
    SessionsError,
    TooManyImages,
)
# The SageMaker session contract (headers, markers, the id rule, Expires) is the wire's.
from llava_sessions.wire import (
    CLOSE,
    NEW_SESSION,
    SESSION_HEADER,
    SESSION_ID_MAX_LEN,
    format_expires,
    is_valid_session_id,
)

NATIVE = "native"
AWS_SAMPLE = "aws_sample"
STYLES = (NATIVE, AWS_SAMPLE)

MAX_TEMPERATURE = 2.0

_GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_p", "stream")
# An open may carry the first question: one round trip to the first answer.
_NATIVE_OPEN_FIELDS = ("requestType", "images", "prompt", "max_new_tokens", "temperature", "top_p")
_NATIVE_TURN_FIELDS = ("prompt", *_GENERATION_FIELDS, "images")
_NATIVE_CLOSE_FIELDS = ("requestType",)
_SAMPLE_START_FIELDS = ("type", "path", "session_id")
_SAMPLE_PROMPT_FIELDS = ("type", "session_id", "prompt_text", *_GENERATION_FIELDS)
_SAMPLE_CLOSE_FIELDS = ("type", "session_id")
_SAMPLE_TYPES = ("start_session", "send_text_prompt", "close_session")

_OPEN_FIRST = (
    f'open a session first: send {{"requestType": "NEW_SESSION"}} with SessionId={NEW_SESSION}, '
    f"then send turns with SessionId set to the id it returns"
)


@dataclass(frozen=True)
class OpenSession:
    images: tuple[str, ...]
    style: str
    # The first question, answered in the open's reply; its session_id is filled in once opened.
    first_turn: "Turn | None" = None


@dataclass(frozen=True)
class Turn:
    session_id: str
    prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    images: tuple[str, ...]
    stream: bool
    style: str


@dataclass(frozen=True)
class CloseSession:
    session_id: str
    style: str


Request = OpenSession | Turn | CloseSession


# --- parsing -----------------------------------------------------------------


def parse_request(
    body: bytes | bytearray | str, headers: Mapping[str, Any], config: ServingConfig
) -> Request:
    """Validate one request; raise a SessionsError whose message says how to fix it."""
    header_id = _header_session_id(headers)
    payload = _load_json_object(body)
    if "type" in payload:
        return _parse_sample(payload, header_id, config)
    return _parse_native(payload, header_id, config)


def _header_session_id(headers: Mapping[str, Any]) -> str | None:
    """The session id in the header, or None for absent, empty or NEW_SESSION."""
    wanted = SESSION_HEADER.lower()
    # TorchServe keeps the client's spelling of header names, and mixes in
    # non-header entries, so only the matching names are looked at.
    values = [value for name, value in headers.items() if name.lower() == wanted]
    if not values:
        return None
    if not all(isinstance(value, str) for value in values):
        raise InvalidRequest(f"the {SESSION_HEADER} header must be text")
    distinct = {value.strip() for value in values}
    if len(distinct) > 1:
        raise InvalidRequest(
            f"the {SESSION_HEADER} header was sent more than once with different values; send it once"
        )
    (value,) = distinct
    if value in ("", NEW_SESSION):
        return None
    return _check_session_id(value, f"the {SESSION_HEADER} header")


def _check_session_id(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} must be a string session id, got {_type_name(value)}")
    if not is_valid_session_id(value):
        raise InvalidRequest(
            f"{where} is not a valid session id: use the id returned when the session was opened "
            f"(letters, digits and inner hyphens, at most {SESSION_ID_MAX_LEN} characters)"
        )
    return value


def _load_json_object(body: bytes | bytearray | str) -> dict:
    text = _decode_utf8(body)
    if not text.strip():
        # A form or multipart Content-Type also gets here: TorchServe takes such a body apart.
        raise InvalidJson(
            'the request body is empty; send a JSON object such as {"requestType": "NEW_SESSION"} '
            "with Content-Type: application/json"
        )
    try:
        payload = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as exc:
        raise InvalidJson(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise InvalidJson("the request body is nested too deeply; send a flat JSON object") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise InvalidJson(f"the request body is not acceptable JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {_type_name(payload)}")
    return payload


def _decode_utf8(body: bytes | bytearray | str) -> str:
    if isinstance(body, str):
        return body
    try:
        return bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJson(
            f"the request body is not UTF-8 (bad byte at offset {exc.start}); send UTF-8 JSON"
        ) from None


def _reject_constant(name: str) -> float:
    raise InvalidJson(f"{name} is not valid JSON; send finite numbers only")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidJson(f"the number {text[:32]} is out of range; send finite numbers only")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise InvalidJson(f"duplicate key {_short(key)} in a JSON object; send each field once")
        result[key] = value
    return result


# --- native dialect --------------------------------------------------------


def _parse_native(payload: dict, header_id: str | None, config: ServingConfig) -> Request:
    if "requestType" not in payload:
        return _native_turn(payload, header_id, config)
    request_type = payload["requestType"]
    if request_type == NEW_SESSION:
        return _native_open(payload, header_id, config)
    if request_type == CLOSE:
        return _native_close(payload, header_id)
    raise InvalidRequest(
        f"requestType must be {NEW_SESSION!r} or {CLOSE!r} (leave it out to send a turn), "
        f"got {_short(request_type)}"
    )


def _native_open(payload: dict, header_id: str | None, config: ServingConfig) -> OpenSession:
    if header_id is not None:
        raise InvalidRequest(
            f"requestType NEW_SESSION opens a new session, but the {SESSION_HEADER} header names one; "
            f"send SessionId={NEW_SESSION} to open, or leave requestType out to continue the session"
        )
    if "stream" in payload:
        raise InvalidRequest(
            "a NEW_SESSION answers its first question in one piece (SageMaker cannot stream an open); "
            "leave 'stream' out, or open first and stream the question as a turn"
        )
    _check_fields(payload, _NATIVE_OPEN_FIELDS, NEW_SESSION)
    first_turn = None
    if "prompt" in payload:
        first_turn = _turn(payload, "prompt", "", (), NATIVE, config)
    elif set(payload) & set(_GENERATION_FIELDS):
        raise InvalidRequest("generation settings in a NEW_SESSION need a 'prompt' to apply to; add one or leave them out")
    return OpenSession(images=_images(payload.get("images", []), config), style=NATIVE, first_turn=first_turn)


def _native_turn(payload: dict, header_id: str | None, config: ServingConfig) -> Turn:
    _check_fields(payload, _NATIVE_TURN_FIELDS, "turn")
    if header_id is None:
        raise InvalidRequest(f"this turn names no session; {_OPEN_FIRST}")
    return _turn(payload, "prompt", header_id, _images(payload.get("images", []), config), NATIVE, config)


def _native_close(payload: dict, header_id: str | None) -> CloseSession:
    _check_fields(payload, _NATIVE_CLOSE_FIELDS, CLOSE)
    if header_id is None:
        raise InvalidRequest(
            f"requestType CLOSE needs the session's id in the {SESSION_HEADER} header (boto3: SessionId=<id>)"
        )
    return CloseSession(session_id=header_id, style=NATIVE)


# --- AWS sample dialect ------------------------------------------------------


def _parse_sample(payload: dict, header_id: str | None, config: ServingConfig) -> Request:
    kind = payload["type"]
    if kind == "start_session":
        return _sample_start(payload, header_id, config)
    if kind == "send_text_prompt":
        _check_fields(payload, _SAMPLE_PROMPT_FIELDS, kind)
        session_id = _sample_session_id(payload, header_id)
        return _turn(payload, "prompt_text", session_id, (), AWS_SAMPLE, config)
    if kind == "close_session":
        _check_fields(payload, _SAMPLE_CLOSE_FIELDS, kind)
        return CloseSession(session_id=_sample_session_id(payload, header_id), style=AWS_SAMPLE)
    raise InvalidRequest(f"type must be one of {', '.join(_SAMPLE_TYPES)}; got {_short(kind)}")


def _sample_start(payload: dict, header_id: str | None, config: ServingConfig) -> OpenSession:
    _check_fields(payload, _SAMPLE_START_FIELDS, "start_session")
    if header_id is not None or payload.get("session_id") is not None:
        raise InvalidRequest(
            f"start_session opens a new session and the server chooses its id; leave session_id "
            f"out (or null) and send SessionId={NEW_SESSION}"
        )
    return OpenSession(images=(_image_ref(payload.get("path"), "'path'"),), style=AWS_SAMPLE)


def _sample_session_id(payload: dict, header_id: str | None) -> str:
    body_id = payload.get("session_id")
    if body_id is not None:
        body_id = _check_session_id(body_id, "session_id")
    if header_id is not None and body_id is not None and header_id != body_id:
        raise InvalidRequest(
            f"session_id in the body differs from the {SESSION_HEADER} header; send the same id in both"
        )
    session_id = header_id or body_id
    if session_id is None:
        raise InvalidRequest(
            f"{payload['type']} names no session; send session_id or SessionId=<id>, or {_OPEN_FIRST}"
        )
    return session_id


# --- shared field checks ---------------------------------------------------------


def _check_fields(payload: dict, allowed: tuple[str, ...], kind: str) -> None:
    unknown = sorted(set(payload) - set(allowed))
    if unknown:
        names = ", ".join(_short(name) for name in unknown[:5])
        raise InvalidRequest(f"unknown field(s) {names} in a {kind} request; allowed: {', '.join(allowed)}")


def _turn(
    payload: dict,
    prompt_field: str,
    session_id: str,
    images: tuple[str, ...],
    style: str,
    config: ServingConfig,
) -> Turn:
    return Turn(
        session_id=session_id,
        prompt=_prompt(payload.get(prompt_field), prompt_field, config),
        max_new_tokens=_max_new_tokens(payload.get("max_new_tokens", config.default_max_new_tokens), config),
        temperature=_temperature(payload.get("temperature", 0.0)),
        top_p=_top_p(payload.get("top_p", 1.0)),
        images=images,
        stream=_stream(payload.get("stream", False)),
        style=style,
    )


def _prompt(value: Any, field: str, config: ServingConfig) -> str:
    if value is None:
        raise InvalidRequest(f"'{field}' is missing; send the user's message as a string")
    if not isinstance(value, str):
        raise InvalidRequest(f"'{field}' must be a string, got {_type_name(value)}")
    if not value.strip():
        raise InvalidRequest(f"'{field}' is empty; send the user's message")
    if len(value) > config.max_prompt_chars:
        raise PromptTooLong(
            f"'{field}' has {len(value)} characters, over the limit of {config.max_prompt_chars}; "
            f"send a shorter prompt or raise {ENV_PREFIX}MAX_PROMPT_CHARS"
        )
    # A lone UTF-16 surrogate ("\ud800") parses but cannot be tokenised.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            f"'{field}' holds an unpaired surrogate escape; send valid Unicode text"
        ) from None
    return value


def _max_new_tokens(value: Any, config: ServingConfig) -> int:
    limit = config.max_new_tokens_limit
    # bool is an int subclass; true is not a token count.
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise InvalidRequest(f"max_new_tokens must be an integer from 1 to {limit}, got {_short(value)}")
    return value


def _temperature(value: Any) -> float:
    if not _is_number(value) or not 0.0 <= value <= MAX_TEMPERATURE:
        raise InvalidRequest(
            f"temperature must be a number from 0 (greedy) to {MAX_TEMPERATURE:g}, got {_short(value)}"
        )
    return float(value)


def _top_p(value: Any) -> float:
    if not _is_number(value) or not 0.0 < value <= 1.0:
        raise InvalidRequest(f"top_p must be a number greater than 0 and at most 1, got {_short(value)}")
    return float(value)


def _stream(value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"stream must be true or false, got {_short(value)}")
    return value


def _images(value: Any, config: ServingConfig) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise InvalidRequest(f"'images' must be a list of image strings, got {_type_name(value)}")
    refs = tuple(_image_ref(item, "each entry of 'images'") for item in value)
    if len(refs) > config.max_images_per_session:
        raise TooManyImages(
            f"{len(refs)} images sent, at most {config.max_images_per_session} are allowed per session; "
            f"send fewer or raise {ENV_PREFIX}MAX_IMAGES_PER_SESSION"
        )
    return refs


def _image_ref(value: Any, what: str) -> str:
    """An image reference stays a raw string; image_sources decodes it."""
    if not isinstance(value, str) or not value.strip():
        got = "an empty string" if isinstance(value, str) else _type_name(value)
        raise InvalidRequest(
            f"{what} must be a non-empty string (base64, a data: URL, an s3:// or https:// URL), got {got}"
        )
    return value


def _is_number(value: Any) -> bool:
    # Parsed floats are finite already (see _finite_float); bool is no number here.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    """A value for an error message, cut so a client cannot make our errors (and logs) huge."""
    if isinstance(value, (dict, list)):
        return _type_name(value)
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


# --- response bodies ---------------------------------------------------------------


def open_response(session_id: str, expires_epoch: float, style: str = NATIVE, first_answer: dict | None = None) -> dict:
    """``first_answer``: the turn_response of a question sent with the open, merged in."""
    if _check_style(style) == AWS_SAMPLE:
        return {"session_id": session_id}
    return {"session_id": session_id, "expires_at": format_expires(expires_epoch), **(first_answer or {})}


def turn_response(
    generated_text: str,
    *,
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
    finish_reason: str | None = None,
    style: str = NATIVE,
) -> dict:
    """``finish_reason``: "stop" (end of turn), "length" (max_new_tokens or the context) or
    "deadline" (a turn that is not streamed stopped at turn_deadline_s with what it had)."""
    if _check_style(style) == AWS_SAMPLE:
        return {"response_text": generated_text}
    finish = {} if finish_reason is None else {"finish_reason": finish_reason}
    return {
        "generated_text": generated_text,
        **finish,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "cached_tokens": cached_tokens,
            "completion_tokens": completion_tokens,
        },
    }


def close_response(session_id: str, style: str = NATIVE) -> dict:
    if _check_style(style) == AWS_SAMPLE:
        return {"success": True}
    return {"session_id": session_id, "closed": True}


def error_response(error: SessionsError) -> dict:
    """The same shape in both dialects: the sample defines no error body."""
    return error.to_dict()


def _check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    return style
