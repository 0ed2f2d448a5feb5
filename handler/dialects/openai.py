"""OpenAI Chat Completions: what LMI, TGI and vLLM containers take on ``/invocations``, and what
the ``openai`` client sends to ``/v1/chat/completions``. Recognised by ``messages``.

Request: ``messages`` (``system``/``developer`` first, then ``user``/``assistant``; content a
string or parts: ``text``, and ``image_url`` on user messages with a data URL, ``https://`` or
``s3://`` under the image allow-lists), ``max_tokens``/``max_completion_tokens``, ``temperature``,
``top_p``, ``stop``, ``stream``, ``stream_options.include_usage``; ``model``, ``user`` and ``n: 1``
are accepted (the endpoint serves one model; ``model`` is echoed), as are vLLM's ``top_k`` and
``repetition_penalty``.

Consecutive messages of one role are joined into one (texts by a blank line): a chat template
wants roles to alternate. A message's images come before its text, where LLaVA's templates put
them. The last message is the user's question; the messages before it are the conversation so
far. With a session, a body whose only message is that question continues the session as it is;
any earlier message makes the body the whole conversation, which the session reconciles with
what it holds (the engine keeps the longest common prefix and prefills the rest).
"""

from __future__ import annotations

from typing import Any

from llava_sessions import wire
from llava_sessions.errors import InvalidRequest, SessionsError
from llava_sessions.handler.dialects import fields
from llava_sessions.handler.dialects.base import Dialect, StreamEvents, answer_id, by_session, now
from llava_sessions.handler.requests import Message, Request, Turn
from llava_sessions.wire import NEW_SESSION

_FIELDS = (
    "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
    "stream_options", "n", "user", "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty",
    "logprobs",
)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH_REASON = {"stop": "stop", "length": "length", "deadline": "length"}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
               429: "rate_limit_error"}


class OpenAIChat(Dialect):
    name = "openai"

    def recognises(self, payload: dict) -> bool:
        return "messages" in payload

    def parse(self, payload: dict, header: str | None, config) -> Request:
        fields.check_fields(payload, _FIELDS, "chat completion")
        _check_unsupported(payload)
        messages = _conversation(payload.get("messages"), config)
        *history, question = messages
        turn = Turn(
            session_id="" if header in (None, NEW_SESSION) else header,
            prompt=question.text,
            max_new_tokens=_max_tokens(payload, config),
            temperature=fields.temperature(fields.given(payload.get("temperature"), 1.0)),
            top_p=fields.top_p(fields.given(payload.get("top_p"), 1.0)),
            images=question.images,
            stream=fields.flag(fields.given(payload.get("stream"), False), "stream"),
            dialect=self,
            top_k=fields.top_k(fields.given(payload.get("top_k"), 0)),
            repetition_penalty=fields.repetition_penalty(fields.given(payload.get("repetition_penalty"), 1.0)),
            stop=fields.stops(payload.get("stop")),
            history=tuple(history) if history or header in (None, NEW_SESSION) else None,
            include_usage=_include_usage(payload),
            model=_model(payload.get("model")),
        )
        return by_session(turn, header)

    # --- answers ------------------------------------------------------------------------

    def open_body(self, session_id: str, expires_at: float, first, turn) -> dict:
        return self.turn_body(first, turn)  # the session's id travels in the header

    def turn_body(self, result, turn) -> dict:
        return {
            "id": answer_id("chatcmpl"),
            "object": "chat.completion",
            "created": now(),
            "model": turn.model if turn is not None else "",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": FINISH_REASON.get(result.finish_reason, result.finish_reason),
                "logprobs": None,
            }],
            "usage": usage(result),
        }

    def error_body(self, error: SessionsError, status: int) -> dict:
        return {"error": _error(error, status)}

    def stream_events(self, turn: Turn) -> StreamEvents:
        return OpenAIEvents(turn)


class OpenAIEvents(StreamEvents):
    """``chat.completion.chunk`` events: the role first, a content delta per token, the finish
    reason, the usage when asked (``stream_options.include_usage``), then ``[DONE]``."""

    def __init__(self, turn: Turn):
        self._turn = turn
        self._id, self._created = answer_id("chatcmpl"), now()

    def first(self) -> str:
        return self._chunk({"role": "assistant", "content": ""})

    def token(self, token_id: int, text: str, special: bool) -> str | None:
        return self._chunk({"content": text}) if text else None

    def final(self, token_id: int | None, text: str, special: bool, result) -> str:
        events = [self._chunk({"content": text})] if text else []
        events.append(self._chunk({}, FINISH_REASON.get(result.finish_reason, result.finish_reason)))
        if self._turn.include_usage:
            events.append(wire.event({**self._head(), "choices": [], "usage": usage(result)}))
        return "".join(events) + wire.DONE_EVENT

    def error(self, error: SessionsError) -> str:
        return wire.event({"error": _error(error, 500)})

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        extra = {"usage": None} if self._turn.include_usage else {}
        return wire.event({**self._head(), "choices": [choice], **extra})

    def _head(self) -> dict:
        return {"id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self._turn.model}


def usage(result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def _error(error: SessionsError, status: int) -> dict:
    kind = _ERROR_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"message": error.message, "type": kind, "param": None, "code": error.code}


# --- parsing ------------------------------------------------------------------------------


def _check_unsupported(payload: dict) -> None:
    n = payload.get("n")
    if n not in (None, 1):
        raise InvalidRequest(f"n must be 1: this server answers with one choice, got {fields.short(n)}")
    for name in ("frequency_penalty", "presence_penalty"):
        value = payload.get(name)
        if value not in (None, 0, 0.0):
            raise InvalidRequest(
                f"{name} is not supported (send 0 or leave it out); repetition_penalty is, as in vLLM"
            )
    if payload.get("logprobs") not in (None, False):
        raise InvalidRequest("logprobs are not supported; leave logprobs out")
    if payload.get("user") is not None and not isinstance(payload["user"], str):
        raise InvalidRequest(f"user must be a string, got {fields.type_name(payload['user'])}")


def _max_tokens(payload: dict, config) -> int:
    given = [name for name in ("max_completion_tokens", "max_tokens") if payload.get(name) is not None]
    if not given:
        return config.default_max_new_tokens
    if len(given) == 2 and payload["max_tokens"] != payload["max_completion_tokens"]:
        raise InvalidRequest("max_tokens and max_completion_tokens differ; send one of them")
    return fields.max_new_tokens(payload[given[0]], config, given[0])


def _include_usage(payload: dict) -> bool:
    options = payload.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise InvalidRequest('stream_options takes only {"include_usage": true|false}')
    if not payload.get("stream"):
        raise InvalidRequest("stream_options needs \"stream\": true")
    return fields.flag(fields.given(options.get("include_usage"), False), "stream_options.include_usage")


def _model(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 256:
        raise InvalidRequest(f"model must be a string of at most 256 characters, got {fields.short(value)}")
    return value


def _conversation(value: Any, config) -> list[Message]:
    """The body's messages as a conversation: roles checked, same-role neighbours joined, the
    last one the user's question."""
    if not isinstance(value, list) or not value:
        raise InvalidRequest("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    merged: list[Message] = []
    for index, item in enumerate(value):
        message = _message(item, index, config)
        if merged and merged[-1].role == message.role:
            last = merged.pop()
            text = "\n\n".join(t for t in (last.text, message.text) if t)
            message = Message(message.role, text, last.images + message.images)
        merged.append(message)
    if any(m.role == "system" for m in merged[1:]):
        raise InvalidRequest("a system (or developer) message must come first; move it to the start of 'messages'")
    if merged[-1].role != "user":
        raise InvalidRequest("the last message must be the user's (role 'user'): it is the question to answer")
    images = tuple(ref for m in merged for ref in m.images)
    fields.checked_image_count(images, config)
    for m in merged:
        if m.role == "user" and not m.text.strip() and not m.images:
            raise InvalidRequest("a user message is empty; send text or an image_url part")
    return merged


def _message(item: Any, index: int, config) -> Message:
    where = f"messages[{index}]"
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where} must be an object with 'role' and 'content', got {fields.type_name(item)}")
    unknown = set(item) - {"role", "content", "name"}
    if unknown:
        names = ", ".join(sorted(fields.short(n) for n in unknown)[:3])
        raise InvalidRequest(f"{where} has unknown field(s) {names} (tool calls are not supported); "
                             "send 'role' and 'content'")
    role = _ROLES.get(item.get("role")) if isinstance(item.get("role"), str) else None
    if role is None:
        raise InvalidRequest(
            f"{where}.role must be 'system', 'developer', 'user' or 'assistant', got {fields.short(item.get('role'))}"
        )
    content = item.get("content")
    if isinstance(content, str):
        return Message(role, fields.text(content, f"{where}.content", config, allow_empty=role != "user"))
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of parts, got {fields.type_name(content)}")
    texts, images = [], []
    for k, part in enumerate(content):
        kind, value = _part(part, f"{where}.content[{k}]", config)
        if kind == "image" and role != "user":
            raise InvalidRequest(f"{where}: only user messages may carry images")
        (images if kind == "image" else texts).append(value)
    text = fields.text("\n".join(texts), f"{where}.content", config, allow_empty=True)
    return Message(role, text, tuple(images))


def _part(part: Any, where: str, config) -> tuple[str, str]:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise InvalidRequest(f"{where} must be an object with a 'type' ('text' or 'image_url')")
    kind = part["type"]
    if kind == "text":
        if set(part) - {"type", "text"}:
            raise InvalidRequest(f"{where}: a text part has 'type' and 'text' only")
        return "text", fields.text(part.get("text"), f"{where}.text", config, allow_empty=True)
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if isinstance(image, dict) and set(image) - {"url", "detail"}:
            raise InvalidRequest(f"{where}.image_url takes 'url' (and 'detail', ignored)")
        return "image", fields.image_ref(url, f"{where}.image_url.url")
    raise InvalidRequest(f"{where}.type must be 'text' or 'image_url', got {fields.short(kind)}")


OPENAI = OpenAIChat()
