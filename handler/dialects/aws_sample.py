"""The AWS LLaVA sample's dialect (aws-samples/sagemaker-genai-hosting-examples, LLava/torchserve),
recognised by a ``type`` field:

- ``{"type": "start_session", "path": <image ref>, "session_id": null?}``
- ``{"type": "send_text_prompt", "session_id"?, "prompt_text", ...}``; it also takes the native
  generation fields; its answers are never streamed.
- ``{"type": "close_session", "session_id"?}``

The id may come from the body's ``session_id`` instead of the header; when both carry one they
must be equal. ``"session_id": null`` counts as absent. A body with both ``type`` and
``requestType`` is a sample body with an unknown field.
"""

from __future__ import annotations

import dataclasses

from llava_sessions.errors import InvalidRequest
from llava_sessions.handler.dialects import fields
from llava_sessions.handler.dialects.base import Dialect
from llava_sessions.handler.dialects.native import GENERATION_FIELDS, NATIVE
from llava_sessions.handler.requests import CloseSession, OpenSession, Request
from llava_sessions.wire import NEW_SESSION, SESSION_HEADER

_START_FIELDS = ("type", "path", "session_id")
_PROMPT_FIELDS = ("type", "session_id", "prompt_text", *GENERATION_FIELDS, "stream")
_CLOSE_FIELDS = ("type", "session_id")
_TYPES = ("start_session", "send_text_prompt", "close_session")
_OPEN_FIRST = (
    f'open a session first: send {{"type": "start_session", "path": ...}} with SessionId={NEW_SESSION}, '
    f"then send prompts with the session_id it returns"
)


class AwsSample(Dialect):
    name = "aws_sample"
    streams = False

    def recognises(self, payload: dict) -> bool:
        return "type" in payload

    def parse(self, payload: dict, header: str | None, config) -> Request:
        kind = payload["type"]
        if kind == "start_session":
            fields.check_fields(payload, _START_FIELDS, kind)
            if header not in (None, NEW_SESSION) or payload.get("session_id") is not None:
                raise InvalidRequest(
                    f"start_session opens a new session and the server chooses its id; leave session_id "
                    f"out (or null) and send SessionId={NEW_SESSION}"
                )
            return OpenSession(images=(fields.image_ref(payload.get("path"), "'path'"),), dialect=self)
        if kind == "send_text_prompt":
            fields.check_fields(payload, _PROMPT_FIELDS, kind)
            turn = NATIVE.turn_of(payload, self._session_id(payload, header), (), config, prompt_field="prompt_text")
            return dataclasses.replace(turn, dialect=self, stream=False)
        if kind == "close_session":
            fields.check_fields(payload, _CLOSE_FIELDS, kind)
            return CloseSession(session_id=self._session_id(payload, header), dialect=self)
        raise InvalidRequest(f"type must be one of {', '.join(_TYPES)}; got {fields.short(kind)}")

    @staticmethod
    def _session_id(payload: dict, header: str | None) -> str:
        from llava_sessions.handler.protocol import checked_session_id

        header_id = None if header == NEW_SESSION else header
        body_id = payload.get("session_id")
        if body_id is not None:
            body_id = checked_session_id(body_id, "session_id")
        if header_id is not None and body_id is not None and header_id != body_id:
            raise InvalidRequest(
                f"session_id in the body differs from the {SESSION_HEADER} header; send the same id in both"
            )
        session_id = header_id or body_id
        if session_id is None:
            raise InvalidRequest(f"{payload['type']} names no session; send session_id or SessionId=<id>, or {_OPEN_FIRST}")
        return session_id

    def open_body(self, session_id: str, expires_at: float, first, turn) -> dict:
        return {"session_id": session_id}

    def turn_body(self, result, turn) -> dict:
        return {"response_text": result.text}

    def close_body(self, session_id: str) -> dict:
        return {"success": True}


AWS_SAMPLE = AwsSample()
