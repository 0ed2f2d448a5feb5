"""What a dialect is: a body in, the handler's requests out; a result, a stream event or an
error back in the dialect's own shape. Torch-free.

The session a request belongs to comes from the ``X-Amzn-SageMaker-Session-Id`` header, parsed
once (protocol.py) into ``header``: None when absent or empty, ``NEW_SESSION`` to open one, else
an id. What each dialect makes of it:

- an id: a turn of that session (or its close);
- ``NEW_SESSION``: open a session, answering the body's question as its first turn;
- none: a one-shot answer, nothing kept (the native ``requestType: NEW_SESSION`` body still opens).
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

from llava_sessions import wire
from llava_sessions.errors import InvalidRequest, SessionsError
from llava_sessions.handler.requests import OneShot, OpenSession, Request, Turn

NO_STREAMED_OPEN = (
    "an open answers its first question in one piece (SageMaker cannot stream an open); "
    "leave 'stream' out, or open first and stream the question as a turn"
)

# The engine's finish reasons in TGI's words (native streams use TGI's framing too).
TGI_FINISH_REASON = {"stop": "eos_token", "length": "length"}


def tgi_finish_reason(result) -> str:
    """TGI's finish reason: ``eos_token``, ``stop_sequence`` (a stop string), ``length``."""
    if getattr(result, "stop_sequence", False):
        return "stop_sequence"
    return TGI_FINISH_REASON.get(result.finish_reason, result.finish_reason)


class Dialect:
    """One way of asking. Subclasses parse; the encoders below are the native shapes."""

    name = ""
    streams = True  # whether a turn may ask for its tokens as a stream

    def recognises(self, payload: dict) -> bool:
        raise NotImplementedError

    def parse(self, payload: dict, header: str | None, config) -> Request:
        raise NotImplementedError

    # --- whole answers ------------------------------------------------------------------

    def open_body(self, session_id: str, expires_at: float, first, turn: Turn | None) -> Any:
        """The answer to an open; ``first`` is the TurnResult of its question (None without one)."""
        answer = {} if first is None else self.turn_body(first, turn)
        return {"session_id": session_id, "expires_at": wire.format_expires(expires_at), **answer}

    def turn_body(self, result, turn: Turn | None) -> Any:
        return {
            "generated_text": result.text,
            "finish_reason": result.finish_reason,
            "usage": usage(result),
        }

    def close_body(self, session_id: str) -> Any:
        return {"session_id": session_id, "closed": True}

    def error_body(self, error: SessionsError, status: int) -> Any:
        return error.to_dict()

    # --- streams ----------------------------------------------------------------------------

    def stream_events(self, turn: Turn) -> "StreamEvents":
        return TgiEvents()


def by_session(turn: Turn, header: str | None, images: tuple[str, ...] = ()) -> Request:
    """A question as the session header makes it: none, a one-shot answer; ``NEW_SESSION``, an
    open (with ``images``) that answers it in one piece; an id, a turn of that session."""
    if header is None:
        return OneShot(turn)
    if header == wire.NEW_SESSION:
        if turn.stream:
            raise InvalidRequest(NO_STREAMED_OPEN)
        return OpenSession(images=images, dialect=turn.dialect, first_turn=turn)
    return turn


class StreamEvents:
    """A streamed turn's events in a dialect's framing, each a ready-to-send string."""

    def first(self) -> str | None:
        """What goes before the first token's event (None: nothing)."""
        return None

    def token(self, token_id: int, text: str, special: bool) -> str | None:
        raise NotImplementedError

    def final(self, token_id: int | None, text: str, special: bool, result) -> str:
        """The last events: the last token's (its ``text``, None when the turn sent none) and the end."""
        raise NotImplementedError

    def error(self, error: SessionsError) -> str:
        return wire.event(wire.error_event(error.message, error.code))


class TgiEvents(StreamEvents):
    """Text Generation Inference's events, one per token; the last carries the answer and usage."""

    def token(self, token_id: int, text: str, special: bool) -> str | None:
        return wire.event({"token": _tgi_token(token_id, text, special), "generated_text": None})

    def final(self, token_id: int | None, text: str, special: bool, result) -> str:
        token = None if token_id is None else _tgi_token(token_id, text, special)
        return wire.event({
            "token": token,
            "generated_text": result.text,
            "details": {
                "finish_reason": tgi_finish_reason(result),
                "generated_tokens": result.completion_tokens,
            },
            "usage": usage(result),
        })


def _tgi_token(token_id: int, text: str, special: bool) -> dict:
    return {"id": token_id, "text": text, "special": special}


def usage(result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "cached_tokens": result.cached_tokens,
        "completion_tokens": result.completion_tokens,
    }


_ids = itertools.count()


def answer_id(prefix: str) -> str:
    """An id for one answer (OpenAI's ``chatcmpl-...``): unique across workers and restarts."""
    return f"{prefix}-{os.urandom(6).hex()}{next(_ids):x}"


def now() -> int:
    return int(time.time())
