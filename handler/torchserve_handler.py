"""TorchServe adapter over the session engine: headers, JSON, status codes.

Four hooks, read top to bottom: ``initialize`` loads the engine once per worker;
per request ``decode_request`` parses headers and body, ``run`` calls the
engine, ``encode_response`` sets headers and renders JSON. ``handle`` is
TorchServe's entry point and only glues them together. A client mistake never
raises out of ``handle`` (that would fail the whole batch): it becomes a 4xx
JSON error for that request alone. A turn with ``"stream": true`` sends one
event per token as it is generated (``handler/streaming.py``) to that request
alone; its last event is what ``handle`` returns for it.
"""

from __future__ import annotations

import json
import logging
import os
from http import HTTPStatus

from llava_sessions.config import ServingConfig
from llava_sessions.errors import InternalError, SessionsError
from llava_sessions.handler import image_sources, protocol, streaming
from llava_sessions.handler.replies import Reply, error_reply

log = logging.getLogger(__name__)

# Where build_archive puts the checkpoint inside the model archive.
ARCHIVE_MODEL_SUBDIR = "model"


class LlavaSessionHandler:
    def __init__(self):
        self.engine = None
        self.config: ServingConfig | None = None
        self.metrics = None  # SessionMetrics when TorchServe provides a metrics cache
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
        if getattr(context, "metrics", None) is not None:
            from llava_sessions.handler.metrics import SessionMetrics

            self.metrics = SessionMetrics(context.metrics, context.model_name)
        self.initialized = True

    # --- TorchServe's entry point -------------------------------------------

    def handle(self, data: list[dict], context) -> list[str]:
        bodies = []
        for idx, row in enumerate(data):
            headers = context.get_all_request_header(idx) or {}
            reply = self.handle_one(row, headers, streaming.TorchServeSink(context, idx))
            self._send(context, idx, reply)
            bodies.append(reply.render())
        if self.metrics is not None:
            self.metrics.observe_engine(self.engine)
        return bodies

    def handle_one(self, row: dict, headers: dict, sink=None) -> Reply:
        """One request; ``sink`` sends a streamed turn's chunks (None: nothing streams)."""
        stream = None
        try:
            request = self.decode_request(row, headers)
            stream = self._token_stream(request, sink)
            return self.encode_response(request, self.run(request, stream), stream)
        except SessionsError as error:
            return self._error_reply(error, stream)
        except Exception:
            log.exception("request failed")
            error = InternalError("the server failed to process this request; it has been logged")
            return self._error_reply(error, stream)

    def _token_stream(self, request, sink) -> streaming.TokenStream | None:
        """The token stream of a native turn that asked for one; the AWS sample's dialect never streams."""
        if sink is None or not isinstance(request, protocol.Turn):
            return None
        if not request.stream or request.style != protocol.NATIVE:
            return None
        loaded = self.engine.loaded
        special_ids = set(loaded.eos_token_ids) | set(loaded.tokenizer.all_special_ids)
        return streaming.TokenStream(loaded.tokenizer, special_ids, sink)

    @staticmethod
    def _error_reply(error: SessionsError, stream: streaming.TokenStream | None) -> Reply:
        """A JSON error with its status; once tokens went out, the stream's last event instead."""
        if stream is not None and stream.started:
            return stream.error_reply(error)
        return error_reply(error)

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

    def run(self, request, stream: streaming.TokenStream | None = None):
        from llava_sessions.handler.engine.generation import SamplingParams

        if isinstance(request, protocol.OpenSession):
            images = image_sources.load_images(request.images, self.config)
            return self.engine.open_session(images)
        if isinstance(request, protocol.Turn):
            images = image_sources.load_images(request.images, self.config)
            params = SamplingParams(request.max_new_tokens, request.temperature, request.top_p)
            on_token = stream.on_token if stream is not None else None
            result = self.engine.turn(request.session_id, request.prompt, params, images=images, on_token=on_token)
            if self.metrics is not None:
                self.metrics.observe_turn(result.cached_tokens, result.ttft_s, result.time_per_output_token_s)
            return result
        self.engine.close_session(request.session_id)
        return None

    # --- hook 4: render -------------------------------------------------------

    def encode_response(self, request, result, stream: streaming.TokenStream | None = None) -> Reply:
        if isinstance(request, protocol.OpenSession):
            header = protocol.open_session_header_value(result.session_id, result.expires_at)
            return Reply(
                200,
                protocol.open_response(result.session_id, result.expires_at, request.style),
                {protocol.SESSION_HEADER: header},
            )
        if isinstance(request, protocol.Turn):
            if stream is not None:
                return stream.final_reply(result)
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
        context.set_response_status(reply.status, HTTPStatus(reply.status).phrase, idx)
        context.set_response_content_type(idx, reply.content_type)
        for name, value in reply.headers.items():
            context.set_response_header(idx, name, value)

