"""Token streaming for one turn: events in the turn's dialect, and the per-request TorchServe sink.

The dialect frames the events (handler/dialects/): native and TGI turns get TGI's, one per
generated token, each followed by a blank line::

    data:{"token": {"id": 7, "text": " cat", "special": false}, "generated_text": null}

with the whole answer, TGI's details and our usage on the last; OpenAI turns get
``chat.completion.chunk`` events ending with ``data: [DONE]``. An error after the stream
started ends it with the dialect's error event; an error before anything was sent is an
ordinary JSON error with its status (the adapter's business).

Each token's event is sent the moment the engine picks the token, so a stream's first event
leaves as soon as the prefill is done, except text that may be the start of one of the turn's
stop strings: it waits until the next token shows it is not (the engine stops at the token
that completes one, and the answer ends before it). The turn's last token (the engine says
which) rides on the final events, which the adapter returns from ``handle()``.
Torch-free; TorchServe is imported only when a chunk is sent.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Callable, Iterable, Mapping

from llava_sessions import wire
from llava_sessions.errors import SessionsError
from llava_sessions.handler import bundle
from llava_sessions.handler.dialects.base import StreamEvents
from llava_sessions.handler.engine.detokenizer import IncrementalDetokenizer
from llava_sessions.handler.replies import Reply, http_status

CONTENT_TYPE = wire.EVENT_CONTENT_TYPE


class TokenStream:
    """Turns the engine's token ids into the dialect's events and hands them to ``send``.

    ``on_token`` is the engine's callback. ``started`` tells whether anything was sent:
    until then, an error may still be answered as a plain JSON error.
    """

    def __init__(self, tokenizer, special_ids: Iterable[int], send: Callable[[str], None],
                 events: StreamEvents, stops: tuple[str, ...] = ()):
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self._special_ids = frozenset(special_ids)
        self._send = send
        self._events = events
        self._stops = stops
        self._text = ""  # the answer's text so far
        self._sent = 0  # how much of it went out
        self._last: int | None = None  # the last token, sent by final_reply
        self.started = False

    def on_token(self, token_id: int, last: bool) -> None:
        token_id = int(token_id)
        self._text += self._detokenizer.push(token_id)
        if last:  # it goes with the answer, from final_reply
            self._last = token_id
            return
        safe = len(self._text) - _held_back(self._text, self._stops)
        event = self._events.token(token_id, self._text[self._sent:safe], token_id in self._special_ids)
        self._sent = max(self._sent, safe)
        if event is None:
            return
        if not self.started:
            event = (self._events.first() or "") + event
        self._send(event)
        self.started = True

    def final_reply(self, result) -> Reply:
        """The last events: the answer's text not yet sent (the engine's text is the truth: it
        ends before a stop string), the finish and usage."""
        rest = result.text[self._sent:] if result.text.startswith(self._text[:self._sent]) else ""
        head = "" if self.started else (self._events.first() or "")
        special = self._last is not None and self._last in self._special_ids
        body = head + self._events.final(self._last, rest, special, result)
        return Reply(200, body, content_type=CONTENT_TYPE)

    def error_reply(self, error: SessionsError) -> Reply:
        """The stream's last event. Its status never reaches the client (the headers went out
        with the first chunk) but is kept for logs and metrics."""
        return Reply(http_status(error), self._events.error(error), content_type=CONTENT_TYPE)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return held


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

    def send_frames(self, frames: bytes) -> None:
        """This member's whole answer (or its end), framed, ahead of the bundle's final response."""
        self.row(frames)
