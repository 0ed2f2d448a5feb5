"""The wire protocol: one /invocations request in, one parsed request out (handler/requests.py).

Torch-free. This module reads what every dialect shares (the JSON body and the session header)
and hands the body to its dialect (handler/dialects/), which parses it and later shapes the
answer. Rules for the shared parts:

- The session header is absent or empty (no session: a one-shot answer, except a native
  ``requestType: NEW_SESSION`` body, which opens), ``NEW_SESSION`` (open one), or an id. A pasted
  open answer, ``<id>; Expires=...``, counts as its id. Session ids must follow SageMaker's rule
  (``wire.is_valid_session_id``); blanks around the value are stripped. Header names match in any
  case; two spellings of the header with different values are refused.
- JSON must be UTF-8 without NaN/Infinity (also not by overflow, e.g. ``1e999``) and without
  duplicate keys (INVALID_JSON). A body that is JSON but not an object is INVALID_REQUEST.
- A form-encoded or multipart body is refused for its content type (TorchServe takes such a body
  apart before the handler sees it).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from llava_sessions.config import ServingConfig
from llava_sessions.errors import InvalidJson, InvalidRequest
from llava_sessions.handler import dialects
from llava_sessions.handler.dialects.fields import short, type_name
from llava_sessions.handler.requests import CloseSession, Message, OneShot, OpenSession, Request, Turn  # noqa: F401
# The SageMaker session contract (headers, markers, the id rule, Expires) is the wire's.
from llava_sessions.wire import NEW_SESSION, SESSION_HEADER, SESSION_ID_MAX_LEN, is_valid_session_id, requested_session_id

_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def parse_request(
    body: bytes | bytearray | str, headers: Mapping[str, Any], config: ServingConfig, hint: str | None = None
) -> Request:
    """Validate one request; raise a SessionsError whose message says how to fix it.

    ``hint``: the dialect the route implies (``openai`` for ``/v1/chat/completions``)."""
    _check_content_type(headers)
    header = header_session(headers)
    payload = _load_json_object(body)
    return dialects.recognise(payload, hint).parse(payload, header, config)


def header_session(headers: Mapping[str, Any]) -> str | None:
    """The session header: None when absent or empty, ``NEW_SESSION``, or a checked id."""
    wanted = SESSION_HEADER.lower()
    # TorchServe keeps the client's spelling of header names, and mixes in
    # non-header entries, so only the matching names are looked at.
    values = [value for name, value in headers.items() if name.lower() == wanted]
    if not values:
        return None
    if not all(isinstance(value, str) for value in values):
        raise InvalidRequest(f"the {SESSION_HEADER} header must be text")
    distinct = {requested_session_id(value) for value in values}
    if len(distinct) > 1:
        raise InvalidRequest(
            f"the {SESSION_HEADER} header was sent more than once with different values; send it once"
        )
    (value,) = distinct
    if value == "":
        return None
    if value == NEW_SESSION:
        return NEW_SESSION
    return checked_session_id(value, f"the {SESSION_HEADER} header")


def checked_session_id(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} must be a string session id, got {type_name(value)}")
    if not is_valid_session_id(value):
        raise InvalidRequest(
            f"{where} is not a valid session id: use the id returned when the session was opened "
            f"(letters, digits and inner hyphens, at most {SESSION_ID_MAX_LEN} characters)"
        )
    return value


def _check_content_type(headers: Mapping[str, Any]) -> None:
    for name, value in headers.items():
        if isinstance(name, str) and name.lower() == "content-type" and isinstance(value, str):
            if value.strip().lower().startswith(_FORM_TYPES):
                raise InvalidRequest(
                    f"the body is sent as {value.split(';')[0].strip()[:60]}; send JSON with "
                    "Content-Type: application/json"
                )


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
        raise InvalidRequest(f"the request body must be a JSON object, got {type_name(payload)}")
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
            raise InvalidJson(f"duplicate key {short(key)} in a JSON object; send each field once")
        result[key] = value
    return result


