"""The native dialect: the session contract of AWS's docs, plus a turn's own fields.

- open:  header absent, empty or ``NEW_SESSION``; body ``{"requestType": "NEW_SESSION",
  "images"?: [...], "prompt"?: ...}`` (a prompt is answered as the first turn, in one piece).
- turn:  header ``<id>``; body ``{"prompt", "max_new_tokens"?, "temperature"?, "top_p"?,
  "top_k"?, "repetition_penalty"?, "stop"?, "images"?, "stream"?, "rewind_to"?}`` (no
  ``requestType``). ``rewind_to: n`` answers after the session's first n turns, as if the later
  ones never happened (the KV of what is kept is reused).
- the same turn body with header ``NEW_SESSION`` opens a session with it as the first turn; with
  no header it is answered once and nothing is kept.
- close: header ``<id>``; body ``{"requestType": "CLOSE"}``.
"""

from __future__ import annotations

import dataclasses

from llava_sessions.errors import InvalidRequest
from llava_sessions.handler.dialects import fields
from llava_sessions.handler.dialects.base import NO_STREAMED_OPEN, Dialect, by_session
from llava_sessions.handler.requests import CloseSession, OpenSession, Request, Turn
from llava_sessions.wire import CLOSE, NEW_SESSION, SESSION_HEADER

GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop")
_OPEN_FIELDS = ("requestType", "images", "prompt", *GENERATION_FIELDS)
_TURN_FIELDS = ("prompt", *GENERATION_FIELDS, "images", "stream", "rewind_to")
_CLOSE_FIELDS = ("requestType",)


class Native(Dialect):
    name = "native"

    def recognises(self, payload: dict) -> bool:
        # Any native field (a turn missing its prompt is told so), or nothing at all.
        return not payload or bool(set(payload) & {"requestType", *_TURN_FIELDS})

    def parse(self, payload: dict, header: str | None, config) -> Request:
        if "requestType" not in payload:
            return self._turn(payload, header, config)
        request_type = payload["requestType"]
        if request_type == NEW_SESSION:
            return self._open(payload, header, config)
        if request_type == CLOSE:
            return self._close(payload, header)
        raise InvalidRequest(
            f"requestType must be {NEW_SESSION!r} or {CLOSE!r} (leave it out to send a turn), "
            f"got {fields.short(request_type)}"
        )

    def _open(self, payload: dict, header: str | None, config) -> OpenSession:
        if header not in (None, NEW_SESSION):
            raise InvalidRequest(
                f"requestType NEW_SESSION opens a new session, but the {SESSION_HEADER} header names one; "
                f"send SessionId={NEW_SESSION} to open, or leave requestType out to continue the session"
            )
        if "stream" in payload:
            raise InvalidRequest(NO_STREAMED_OPEN)
        fields.check_fields(payload, _OPEN_FIELDS, NEW_SESSION)
        first_turn = None
        if "prompt" in payload:
            first_turn = self.turn_of(payload, "", (), config)
        elif set(payload) & set(GENERATION_FIELDS):
            raise InvalidRequest("generation settings in a NEW_SESSION need a 'prompt' to apply to; add one or leave them out")
        return OpenSession(images=fields.image_refs(payload.get("images", []), config), dialect=self,
                           first_turn=first_turn)

    def _turn(self, payload: dict, header: str | None, config) -> Request:
        fields.check_fields(payload, _TURN_FIELDS, "turn")
        images = fields.image_refs(payload.get("images", []), config)
        if header is None or header == NEW_SESSION:
            if "rewind_to" in payload:
                raise InvalidRequest(f"rewind_to needs a session: send its id in the {SESSION_HEADER} header")
            # A one-shot's images are its question's; an open's are the session's, as at a NEW_SESSION.
            turn = self.turn_of(payload, "", images if header is None else (), config)
            return by_session(turn, header, images)
        turn = self.turn_of(payload, header, images, config)
        if "rewind_to" in payload:
            value = payload["rewind_to"]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidRequest(f"rewind_to must be a turn count (0 or more), got {fields.short(value)}")
            turn = dataclasses.replace(turn, rewind_to=value)
        return turn

    def _close(self, payload: dict, header: str | None) -> CloseSession:
        fields.check_fields(payload, _CLOSE_FIELDS, CLOSE)
        if header is None or header == NEW_SESSION:
            raise InvalidRequest(
                f"requestType CLOSE needs the session's id in the {SESSION_HEADER} header (boto3: SessionId=<id>)"
            )
        return CloseSession(session_id=header, dialect=self)

    def turn_of(self, payload: dict, session_id: str, images: tuple[str, ...], config,
                prompt_field: str = "prompt") -> Turn:
        """A turn from the native generation fields of ``payload``."""
        return Turn(
            session_id=session_id,
            prompt=fields.text(payload.get(prompt_field), prompt_field, config),
            max_new_tokens=fields.max_new_tokens(payload.get("max_new_tokens", config.default_max_new_tokens), config),
            temperature=fields.temperature(payload.get("temperature", 0.0)),
            top_p=fields.top_p(payload.get("top_p", 1.0)),
            images=images,
            stream=fields.flag(payload.get("stream", False), "stream") and self.streams,
            dialect=self,
            top_k=fields.top_k(payload.get("top_k", 0)),
            repetition_penalty=fields.repetition_penalty(payload.get("repetition_penalty", 1.0)),
            stop=fields.stops(payload.get("stop")),
        )


NATIVE = Native()
