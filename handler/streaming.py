"""Token streaming for one turn: TGI's event framing and the per-request TorchServe sink.

Events are framed (``llava_sessions.wire.event``) as Text Generation Inference frames them on
SageMaker, one per generated token, each followed by a blank line::

    data:{"token": {"id": 7, "text": " cat", "special": false}, "generated_text": null}

The last event also carries the whole answer, our usage and TGI's details::

    data:{"token": {...}, "generated_text": "...", "details": {"finish_reason": "eos_token",
          "generated_tokens": 12}, "usage": {"prompt_tokens": ..., "cached_tokens": ..., "completion_tokens": ...}}

An error after the stream started ends it with TGI's error event,
``data:{"error": "...", "error_type": "INTERNAL_ERROR"}``. An error before anything
was sent is an ordinary JSON error with its status (the adapter's business).

Each token's event is sent the moment the engine picks the token, so a stream's first
event leaves as soon as the prefill is done. The turn's last token (the engine says
which) rides on the final event, which the adapter returns from ``handle()``.
Torch-free; TorchServe is imported only when a chunk is sent.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Callable, Iterable, Mapping

from llava_sessions import wire
from llava_sessions.errors import SessionsError
from llava_sessions.handler import bundle
from llava_sessions.handler.engine.detokenizer import IncrementalDetokenizer
from llava_sessions.handler.replies import Reply, http_status

CONTENT_TYPE = wire.EVENT_CONTENT_TYPE

# The engine's finish reasons in TGI's words.
TGI_FINISH_REASON = {"stop": "eos_token", "length": "length"}


# --- events (framed by wire.event) --------------------------------------------------


def token_event(token_id: int, text: str, special: bool) -> dict:
    return {"token": {"id": token_id, "text": text, "special": special}, "generated_text": None}


def final_event(token: dict | None, result) -> dict:
    """The last event: its token (if any), the whole answer, details and usage of a TurnResult."""
    return {
        "token": token,
        "generated_text": result.text,
        "details": {
            "finish_reason": TGI_FINISH_REASON.get(result.finish_reason, result.finish_reason),
            "generated_tokens": result.completion_tokens,
        },
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "cached_tokens": result.cached_tokens,
            "completion_tokens": result.completion_tokens,
        },
    }


def error_event(error: SessionsError) -> dict:
    return wire.error_event(error.message, error.code)


# --- one streamed turn ------------------------------------------------------------


class TokenStream:
    """Turns the engine's token ids into events and hands them to ``send``, one chunk each.

    ``on_token`` is the engine's callback. ``started`` tells whether anything was sent:
    until then, an error may still be answered as a plain JSON error.
    """

    def __init__(self, tokenizer, special_ids: Iterable[int], send: Callable[[str], None]):
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self._special_ids = frozenset(special_ids)
        self._send = send
        self._pending: dict | None = None  # the last token's event, sent by final_reply
        self.started = False

    def on_token(self, token_id: int, last: bool) -> None:
        event = token_event(int(token_id), self._detokenizer.push(token_id), token_id in self._special_ids)
        if last:  # it goes with the answer, from final_reply
            self._pending = event
            return
        self._send(wire.event(event))
        self.started = True

    def final_reply(self, result) -> Reply:
        token = self._pending
        if token is not None:
            token["token"]["text"] += self._detokenizer.flush()
            token = token["token"]
        return Reply(200, wire.event(final_event(token, result)), content_type=CONTENT_TYPE)

    def error_reply(self, error: SessionsError) -> Reply:
        """The stream's last event. Its status never reaches the client (the headers went out
        with the first chunk) but is kept for logs and metrics."""
        return Reply(http_status(error), wire.event(error_event(error)), content_type=CONTENT_TYPE)


class TorchServeSink:
    """Sends chunks of request ``idx`` of a TorchServe batch, and nothing of the others.

    ``send_intermediate_predict_response`` writes one prediction per entry of its
    ``req_id_map``, so the map holds only this request's id: the other requests of the
    batch get their answers when ``handle()`` returns. Status, content type and the
    headers ride on the first chunk only (TorchServe sends the HTTP head with it); it
    also sets ``ts_stream_next: true`` on this request, which the final response turns
    to ``false``.
    """

    def __init__(self, context, idx: int, headers: Mapping[str, str] | None = None,
                 content_type: str = CONTENT_TYPE):
        self.context = context
        self.idx = idx
        self.headers = dict(headers or {})
        self.content_type = content_type
        self.chunks_sent = 0

    def __call__(self, text: str | bytes) -> None:
        from ts.handler_utils.utils import send_intermediate_predict_response

        if self.chunks_sent == 0:
            self.context.set_response_status(200, HTTPStatus.OK.phrase, self.idx)
            self.context.set_response_content_type(self.idx, self.content_type)
            for name, value in self.headers.items():
                self.context.set_response_header(self.idx, name, value)
        request_id = self.context.get_request_id(self.idx)
        send_intermediate_predict_response(
            {self.idx: text}, {self.idx: request_id}, "Intermediate response", 200, self.context
        )
        self.chunks_sent += 1


class BundleMemberSink:
    """Sends one bundle member's chunks as frames on its bundle's request (``handler/bundle.py``);
    the member's head (200, an event stream) goes with its first chunk."""

    def __init__(self, row: TorchServeSink, member: int):
        self.row = row
        self.member = member
        self.started = False

    def __call__(self, text: str) -> None:
        head = b"" if self.started else bundle.head_frame(self.member, 200, {}, CONTENT_TYPE)
        self.row(head + bundle.frame(self.member, bundle.DATA, text))
        self.started = True
