"""The SageMaker session contract on the wire, in one place. Standard library only.

Every module that reads or writes these rules imports them from here: the handler (protocol,
streaming, torchserve_handler), the router (session_routes, affinity_router), the client
(deploy/client.py), the local runtime (deploy/local_runtime.py), the bench and the load test.

- Session ids: SageMaker's ``SessionId`` pattern (InvokeEndpoint) and its length limit.
- Headers: the container's ``X-Amzn-SageMaker-Session-Id`` (an open's answer is
  ``<id>; Expires=YYYY-MM-DDTHH:MM:SSZ``), ``X-Amzn-SageMaker-Closed-Session-Id`` (a close's
  answer) and the runtime's ``X-Amzn-SageMaker-New-Session-Id`` (boto3's ``NewSessionId``); the
  ``NEW_SESSION`` marker and the ``CLOSE`` request type.
- Token streams: Text Generation Inference's server-sent events, ``data:<json>`` and a blank
  line, one per token; an error ends a stream with ``data:{"error": ..., "error_type": ...}``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

# --- session ids -----------------------------------------------------------------------

# SageMaker's SessionId pattern and length (InvokeEndpoint). NEW_SESSION does not match (its "_").
SESSION_ID_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
SESSION_ID_MAX_LEN = 256


def is_valid_session_id(value: object) -> bool:
    """Whether ``value`` is a string SageMaker accepts as a SessionId (no blanks stripped)."""
    return (
        isinstance(value, str)
        and len(value) <= SESSION_ID_MAX_LEN
        and SESSION_ID_PATTERN.fullmatch(value) is not None
    )


# --- headers and markers -----------------------------------------------------------------

SESSION_HEADER = "X-Amzn-SageMaker-Session-Id"
CLOSED_SESSION_HEADER = "X-Amzn-SageMaker-Closed-Session-Id"
# What the runtime API answers a client that opened a session (boto3: NewSessionId).
NEW_SESSION_HEADER = "X-Amzn-SageMaker-New-Session-Id"
# SessionId (and session header) value that asks for a new session; also the open's requestType.
NEW_SESSION = "NEW_SESSION"
# The requestType that closes the session named by the header.
CLOSE = "CLOSE"

# --- <id>; Expires=... -------------------------------------------------------------------

EXPIRES_ATTRIBUTE = "Expires"
EXPIRES_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # UTC, whole seconds
_EXPIRES_SHAPE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


def format_expires(epoch_seconds: float) -> str:
    """UTC time as SageMaker's Expires attribute wants it: ``YYYY-MM-DDTHH:MM:SSZ``.

    Fractions are dropped: a router then forgets the session no later than its worker does.
    """
    return time.strftime(EXPIRES_FORMAT, time.gmtime(math.floor(epoch_seconds)))


def format_session_header(session_id: str, expires_epoch: float) -> str:
    """``<id>; Expires=<UTC time>``: the session header of an open's answer (and NewSessionId).

    Raises ValueError for an id that breaks the rule, which also keeps CR/LF out of the header.
    """
    if not is_valid_session_id(session_id):
        raise ValueError("session_id does not match SageMaker's SessionId pattern")
    return f"{session_id}; {EXPIRES_ATTRIBUTE}={format_expires(expires_epoch)}"


def parse_session_header(value: object) -> tuple[str, float] | None:
    """``<id>; Expires=YYYY-MM-DDTHH:MM:SSZ`` as (id, epoch seconds); None when malformed.

    Inverse of ``format_session_header`` (to the second). Blanks around the parts and the
    attribute name's case are tolerated; other attributes are ignored. Malformed: not a string,
    an invalid id, no Expires or more than one, an Expires of another shape or no such date
    (e.g. February 30th).
    """
    if not isinstance(value, str):
        return None
    session_id, *attributes = (part.strip() for part in value.split(";"))
    if not is_valid_session_id(session_id):
        return None
    expires = [text for name, text in map(_attribute, attributes) if name == EXPIRES_ATTRIBUTE.lower()]
    if len(expires) != 1 or not _EXPIRES_SHAPE.fullmatch(expires[0]):
        return None
    try:
        moment = datetime.strptime(expires[0], EXPIRES_FORMAT).replace(tzinfo=UTC)
    except ValueError:  # the right shape but no such time
        return None
    return session_id, moment.timestamp()


def requested_session_id(value: str) -> str:
    """A request's session header as the client meant it: blanks stripped, and a pasted open
    answer (``<id>; Expires=...``, what the open's header carried) taken for its id."""
    value = value.strip()
    if ";" in value:
        parsed = parse_session_header(value)
        if parsed is not None:
            return parsed[0]
    return value


def _attribute(part: str) -> tuple[str, str]:
    name, _, text = part.partition("=")
    return name.strip().lower(), text.strip()


# --- token streams: TGI's server-sent events --------------------------------------------------

EVENT_CONTENT_TYPE = "text/event-stream"
EVENT_PREFIX = "data:"
EVENT_END = "\n\n"  # each event ends with a blank line
_PREFIX = EVENT_PREFIX.encode()
# The end of an OpenAI stream: not JSON, so parsers skip it (EventParser).
DONE = "[DONE]"
DONE_EVENT = EVENT_PREFIX + " " + DONE + EVENT_END
# error_type of an error event that names none.
DEFAULT_ERROR_TYPE = "INTERNAL_ERROR"


def event(payload: dict) -> str:
    """One server-sent event as TGI frames it: ``data:<json>`` and a blank line."""
    return EVENT_PREFIX + json.dumps(payload, ensure_ascii=False, separators=(", ", ": ")) + EVENT_END


def error_event(message: str, error_type: str) -> dict:
    """TGI's error event payload, the last event of a stream that failed after it started."""
    return {"error": message, "error_type": error_type}


def event_error(payload: dict) -> tuple[str, str] | None:
    """(error_type, message) of an error event; None for any other event."""
    if "error" not in payload:
        return None
    return str(payload.get("error_type") or DEFAULT_ERROR_TYPE), str(payload["error"])


class MalformedEvent(ValueError):
    """A ``data:`` line whose payload is not a JSON object."""


class EventParser:
    """Server-sent events out of byte chunks split anywhere: ``feed`` each chunk, then ``end``.

    Each ``data:`` line (one optional space after the colon, CRLF or LF) is one event. Blank
    lines, comments (``:...``), other SSE fields (``event:``, ``id:``) and OpenAI's closing
    ``data: [DONE]`` are skipped. A
    ``data:`` line that is not a JSON object raises MalformedEvent.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[dict]:
        """The events completed by ``chunk`` (a line is complete at its newline)."""
        return list(_each_parsed(self._lines(chunk)))

    def end(self) -> list[dict]:
        """The event on a last line that had no newline, if any."""
        return list(_each_parsed(self._rest()))

    def _lines(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += chunk
        lines = []
        start = 0
        while (newline := buffer.find(b"\n", start)) >= 0:
            lines.append(bytes(buffer[start:newline]))
            start = newline + 1
        del buffer[:start]
        return lines

    def _rest(self) -> list[bytes]:
        rest, self._buffer = bytes(self._buffer), bytearray()
        return [rest] if rest.strip() else []


def iter_events(chunks: Iterable[bytes]) -> Iterator[dict]:
    """Every event of a stream given as byte chunks split anywhere (see EventParser).

    Lazy: each event is yielded as soon as its line is complete, before later lines are parsed.
    """
    parser = EventParser()
    for chunk in chunks:
        yield from _each_parsed(parser._lines(chunk))
    yield from _each_parsed(parser._rest())


def _each_parsed(lines: list[bytes]) -> Iterator[dict]:
    for line in lines:
        parsed = _parse_line(line)
        if parsed is not None:
            yield parsed


def _parse_line(line: bytes) -> dict | None:
    line = line.rstrip(b"\r")
    if not line.startswith(_PREFIX):
        return None  # blank line, comment or another SSE field
    payload = line[len(_PREFIX):]
    if payload.startswith(b" "):
        payload = payload[1:]
    if payload.strip() == DONE.encode():
        return None  # OpenAI's end of stream: nothing more follows
    try:
        parsed = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedEvent(f"the stream sent an event that is not JSON: {payload[:80]!r}") from None
    if not isinstance(parsed, dict):
        raise MalformedEvent(f"the stream sent an event that is not a JSON object: {payload[:80]!r}")
    return parsed
