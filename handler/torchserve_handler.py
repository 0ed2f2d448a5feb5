"""TorchServe adapter over the session engine: headers, JSON, status codes.

Four hooks, read top to bottom: ``initialize`` loads the engine once per worker;
per request ``decode_request`` parses headers and body, ``run`` calls the
engine, ``encode_response`` sets headers and renders JSON. ``handle`` is
TorchServe's entry point and only glues them together. A client mistake never
raises out of ``handle`` (that would fail the whole batch): it becomes a 4xx
JSON error for that request alone.
"""

from __future__ import annotations

import json
import logging
import os

from llava_sessions.config import ServingConfig
from llava_sessions.errors import InternalError, SessionsError
from llava_sessions.handler import image_sources, protocol
from llava_sessions.handler.replies import Reply, error_reply

log = logging.getLogger(__name__)

# Where build_archive puts the checkpoint inside the model archive.
ARCHIVE_MODEL_SUBDIR = "model"
# TorchServe's frontend fills this header on requests without a session id.
_TS_SEQUENCE_PREFIX = "ts-seq-"


class LlavaSessionHandler:
    def __init__(self):
        self.engine = None
        self.config: ServingConfig | None = None
        self.initialized = False

    # --- hook 1: once per worker --------------------------------------------

    def initialize(self, context) -> None:
        # Imported here so this module (and its tests) load without torch.
        from llava_sessions.handler.engine.engine import SessionEngine
        from llava_sessions.handler.engine.model_loader import load_model, resolve_device

        properties = context.system_properties
        yaml_section = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        self.config = ServingConfig.from_sources(yaml_section)
        source = self.config.model or os.path.join(properties["model_dir"], ARCHIVE_MODEL_SUBDIR)
        device = resolve_device(self.config.device, properties.get("gpu_id"))
        self.engine = SessionEngine(load_model(source, device, self.config.dtype), self.config)
        # Check often enough that a session outlives its TTL by at most a quarter of it.
        self.engine.start_expiry_sweeper(interval_s=min(5.0, self.config.session_ttl_s / 4))
        self.initialized = True

    # --- TorchServe's entry point -------------------------------------------

    def handle(self, data: list[dict], context) -> list[str]:
        bodies = []
        for idx, row in enumerate(data):
            sequence_id = context.get_sequence_id(idx)
            reply = self.handle_one(row, _client_headers(context, idx), sequence_id)
            if sequence_id and not self.engine.has_session(sequence_id):
                # The frontend's job group names no live session here (closed, failed open,
                # literal NEW_SESSION): end it so it neither pins a worker nor holds capacity.
                reply.end_sequence = sequence_id
            self._send(context, idx, reply)
            bodies.append(json.dumps(reply.body))
        return bodies

    def handle_one(self, row: dict, headers: dict, sequence_id: str | None) -> Reply:
        try:
            request = self.decode_request(row, headers)
            return self.encode_response(request, self.run(request, sequence_id))
        except SessionsError as error:
            return error_reply(error)
        except Exception:
            log.exception("request failed")
            return error_reply(InternalError("the server failed to process this request; it has been logged"))

    # --- hook 2: parse --------------------------------------------------------

    def decode_request(self, row: dict, headers: dict):
        body = row.get("body")
        if body is None:
            body = row.get("data", b"")
        if isinstance(body, str):
            body = body.encode("utf-8")
        if not isinstance(body, (bytes, bytearray)):
            # TorchServe already decoded it (TS_DECODE_INPUT_REQUEST unset); re-encode faithfully.
            body = json.dumps(body).encode("utf-8")
        return protocol.parse_request(bytes(body), headers, self.config)

    # --- hook 3: run on the engine -------------------------------------------

    def run(self, request, sequence_id: str | None):
        from llava_sessions.handler.engine.generation import SamplingParams

        if isinstance(request, protocol.OpenSession):
            images = image_sources.load_images(request.images, self.config)
            return self.engine.open_session(images, session_id=_frontend_session_id(sequence_id))
        if isinstance(request, protocol.Turn):
            images = image_sources.load_images(request.images, self.config)
            params = SamplingParams(request.max_new_tokens, request.temperature, request.top_p)
            return self.engine.turn(request.session_id, request.prompt, params, images=images)
        self.engine.close_session(request.session_id)
        return None

    # --- hook 4: render -------------------------------------------------------

    def encode_response(self, request, result) -> Reply:
        if isinstance(request, protocol.OpenSession):
            header = protocol.open_session_header_value(result.session_id, result.expires_at)
            return Reply(
                200,
                protocol.open_response(result.session_id, result.expires_at, request.style),
                {protocol.SESSION_HEADER: header},
            )
        if isinstance(request, protocol.Turn):
            body = protocol.turn_response(
                result.text,
                prompt_tokens=result.prompt_tokens,
                cached_tokens=result.cached_tokens,
                completion_tokens=result.completion_tokens,
                style=request.style,
            )
            return Reply(200, body)
        return Reply(
            200,
            protocol.close_response(request.session_id, request.style),
            {protocol.CLOSED_SESSION_HEADER: request.session_id},
        )

    def _send(self, context, idx: int, reply: Reply) -> None:
        context.set_response_status(reply.status, "", idx)
        context.set_response_content_type(idx, "application/json")
        for name, value in reply.headers.items():
            context.set_response_header(idx, name, value)
        if reply.end_sequence:
            # SequenceContinuousBatching reads this header and drops the job group.
            context.set_response_header(idx, context.header_key_sequence_end, reply.end_sequence)


def _client_headers(context, idx: int) -> dict:
    """The request's headers as the client sent them.

    When a request arrives without a session id, TorchServe's frontend mints
    ``ts-seq-<uuid>``, writes it under the mapped session header name and flags
    the sequence start: that value is the frontend's, not the client's.
    """
    headers = context.get_all_request_header(idx) or {}
    if str(headers.get(context.header_key_sequence_start, "")).lower() != "true":
        return headers
    minted = context.header_key_sequence_id.lower()
    return {k: v for k, v in headers.items() if str(k).lower() != minted}


def _frontend_session_id(sequence_id: str | None) -> str | None:
    """Reuse the sequence id TorchServe minted for this open, so its routing keeps later turns here.

    A ``ts-seq-<uuid4>`` id has 122 random bits. Anything else (the literal
    NEW_SESSION, or no sequence batching) gets a fresh id from the engine.
    """
    if sequence_id and sequence_id.startswith(_TS_SEQUENCE_PREFIX):
        return sequence_id
    return None

