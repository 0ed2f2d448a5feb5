"""The session client: multi-turn chat with a stateful LLaVA endpoint through boto3.

::

    from llava_sessions.deploy.client import SessionClient

    client = SessionClient("my-endpoint", region="us-east-1")
    with client.open(images=["cat.png"]) as chat:
        print(chat.ask("What is in the picture?"))
        for piece in chat.stream("And the colours?"):
            print(piece, end="", flush=True)

What it does on the wire (README "Talking to it"; llava_sessions/wire.py holds the rules):

- ``open`` sends ``{"requestType": "NEW_SESSION", "images": [...]}`` through ``invoke_endpoint``
  with ``SessionId="NEW_SESSION"`` and reads ``NewSessionId`` (``<id>; Expires=<UTC time>``).
- ``ask(text)`` sends the native turn body with ``SessionId=<id>``; ``stream`` sends it with
  ``"stream": true`` through ``invoke_endpoint_with_response_stream`` and splits TGI's
  ``data:`` events out of the ``PayloadPart`` bytes.
- ``ask(messages=...)`` / ``stream(messages=...)`` send OpenAI's Chat Completions body
  (``{"messages", "max_tokens", "temperature", "top_p", "stream", "stream_options"}``) with
  ``SessionId=<id>``, the messages as they are, images as ``image_url`` parts (data URLs, or
  ``s3://`` / ``https://``); the answer is a ``chat.completion`` or ``chat.completion.chunk``
  events. Only the new user message continues the session; earlier messages make the body the
  whole conversation, which the server reconciles with what the session holds (it keeps the
  longest common prefix and prefills the rest). A conversation that departs from the session's
  (an edited message, a regenerated answer) is answered as a fresh session with it would answer,
  and ``history`` becomes that conversation. The open's images lead its first user message, where
  the session holds them, unless the messages carry them there already. The client's default is
  greedy on both paths (it sends ``"temperature": 0`` unless told otherwise).
- ``close`` sends ``{"requestType": "CLOSE"}`` and checks ``ClosedSessionId``.

A lost session. The client keeps the conversation (each turn's prompt, images and generation
settings, and the answer). When a turn finds the session gone (``SESSION_NOT_FOUND``: expiry, a
replaced instance, scale-in; or SageMaker's own "session expired/invalid" ValidationError):

- a session driven by ``messages`` is reopened in one request: the whole conversation and the
  turn as an OpenAI body with ``SessionId=NEW_SESSION`` (the server prefills it and answers; a
  stream, which an open cannot be, opens an empty session and streams the whole conversation in
  it). The earlier answers travel as they were given, so nothing diverges.
- a session driven only by native turns is replayed: a new session with the same images, every
  earlier prompt sent again, then the failed turn. The server generates those answers itself,
  token for token as it holds them; with greedy decoding (temperature 0, the default) they come
  out the same, and when one differs the client warns (``ReplayDivergenceWarning``), records it
  in ``Session.divergences`` and keeps the new answer, because that is what the new session holds.

Images too large for SageMaker's 6 MB request limit travel through S3 (``s3_staging``); the
endpoint must allow that bucket (``LLAVA_SESSIONS_S3_ALLOWED_BUCKETS``) and its role read it.

Torch-free: this module imports boto3 lazily and nothing heavy.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from llava_sessions import wire
from llava_sessions.errors import SessionsError
from llava_sessions.wire import CLOSE, NEW_SESSION

# SageMaker's InvokeEndpoint payload limit is 6 MB. The JSON body is kept under this
# many bytes (headers and rounding get the rest); larger images go through S3.
DEFAULT_MAX_BODY_BYTES = 5_500_000

_SESSION_LOST_HINT = re.compile(r"expired|invalid|not found|does not exist|unknown|no longer|closed", re.IGNORECASE)
_REMOTE_PREFIXES = ("s3://", "https://", "http://")


# --- errors --------------------------------------------------------------------


log = logging.getLogger(__name__)


def _short_id(session_id: str | None) -> str:
    """Enough of a session id to follow it in a log, not enough to use it."""
    return "none" if session_id is None else session_id[:12] + "..."


class SessionError(SessionsError):
    """An error from the endpoint (or about the session), with the container's stable code: the
    client's kind of the server's ``SessionsError`` (``except SessionsError`` catches both).

    ``code`` is the container's code (``SESSION_NOT_FOUND``, ``INVALID_IMAGE``, ... see the
    README's table) when the container answered; otherwise a code of the client's own
    (``REQUEST_TOO_LARGE``, ``SESSION_CLOSED``, ``STREAM_INCOMPLETE``, ``BAD_RESPONSE``) or
    SageMaker's (``ModelStreamError``'s ``ErrorCode``, ``ServiceUnavailable``, ...).
    ``status`` is the container's HTTP status when known. ``aws_code`` is the boto3 error code
    it came in (``ModelError``, ``ValidationError``, ...), if any.
    """

    def __init__(self, code: str, status: int | None, message: str, *, aws_code: str | None = None):
        super().__init__(message)
        self.args = (f"{code}" + (f" ({status})" if status is not None else "") + f": {message}",)
        self.code = code
        self.status = status
        self.aws_code = aws_code


class ReplayDivergenceWarning(UserWarning):
    """A replayed turn's answer differs from the answer the lost session had given."""


@dataclass(frozen=True)
class Divergence:
    turn: int  # 0-based index in the conversation
    before: str | None
    after: str


def error_from_client_error(exc: Exception) -> SessionError:
    """Map a botocore ClientError (ModelError, ValidationError, EventStreamError, ...) to a SessionError."""
    response = getattr(exc, "response", None) or {}
    error = response.get("Error") or {}
    aws_code = error.get("Code") or type(exc).__name__
    message = error.get("Message") or str(exc)
    if aws_code == "ModelError":
        status = _int_or_none(response.get("OriginalStatusCode", error.get("OriginalStatusCode")))
        original = response.get("OriginalMessage", error.get("OriginalMessage"))
        code, text = _container_error(original)
        if code is None:
            code = "MODEL_ERROR"
            text = original if original else message
        return SessionError(code, status, text, aws_code=aws_code)
    if aws_code == "ValidationError" and "session" in message.lower() and _SESSION_LOST_HINT.search(message):
        # SageMaker's own view of the SessionId (e.g. expired): the session is gone all the same.
        return SessionError("SESSION_NOT_FOUND", None, message, aws_code=aws_code)
    status = _int_or_none(response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    if status == 413 or aws_code == "413":  # SageMaker's front door: "HTTP content length exceeded"
        return SessionError("REQUEST_TOO_LARGE", 413, message, aws_code=aws_code)
    if aws_code == "ModelStreamError":
        return SessionError(error.get("ErrorCode") or response.get("ErrorCode") or aws_code, None, message,
                            aws_code=aws_code)
    return SessionError(aws_code, status, message, aws_code=aws_code)


def _container_error(original: Any) -> tuple[str | None, str]:
    """``{"error": {"code", "message"}}`` from the container's body, if it is one."""
    if not isinstance(original, str):
        return None, ""
    try:
        body = json.loads(original)
    except ValueError:
        return None, ""
    inner = body.get("error") if isinstance(body, dict) else None
    if isinstance(inner, dict) and isinstance(inner.get("code"), str):
        return inner["code"], str(inner.get("message", ""))
    return None, ""


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _is_session_lost(error: SessionError) -> bool:
    return error.code == "SESSION_NOT_FOUND"


# --- NewSessionId ------------------------------------------------------------------


def parse_new_session_id(value: Any) -> tuple[str, datetime | None]:
    """``<id>; Expires=YYYY-MM-DDTHH:MM:SSZ`` -> (id, expiry as an aware UTC datetime).

    Read by ``wire.parse_session_header``. A bare id (no attributes) is accepted with no expiry;
    anything else ill-formed is a SessionError ``BAD_RESPONSE``.
    """
    if not isinstance(value, str) or not value.strip():
        raise SessionError(
            "BAD_RESPONSE", None,
            f"the endpoint opened no session: its answer has no NewSessionId "
            f"({wire.NEW_SESSION_HEADER}). Is it a stateful-session container?",
        )
    if wire.is_valid_session_id(value.strip()):
        return value.strip(), None
    parsed = wire.parse_session_header(value)
    if parsed is None:
        raise SessionError(
            "BAD_RESPONSE", None,
            f"NewSessionId {value[:80]!r} is not '<session id>; Expires=YYYY-MM-DDTHH:MM:SSZ' "
            "(a valid session id, then its expiry in UTC)",
        )
    return parsed[0], datetime.fromtimestamp(parsed[1], UTC)


# --- TGI event stream --------------------------------------------------------------


def iter_events(chunks: Iterable[bytes]) -> Iterator[dict]:
    """TGI's server-sent events out of byte chunks split anywhere (``wire.iter_events``).

    A ``data:`` line that is not a JSON object is a SessionError ``BAD_RESPONSE``.
    """
    try:
        yield from wire.iter_events(chunks)
    except wire.MalformedEvent as exc:
        raise SessionError("BAD_RESPONSE", None, str(exc)) from None


def payload_chunks(body: Iterable[Mapping[str, Any]]) -> Iterator[bytes]:
    """The ``PayloadPart`` bytes of an InvokeEndpointWithResponseStream body, errors raised."""
    from botocore.exceptions import BotoCoreError, ClientError
    from urllib3.exceptions import HTTPError

    try:
        for event in body:
            if "PayloadPart" in event:
                yield event["PayloadPart"].get("Bytes", b"")
            elif "ModelStreamError" in event:
                error = event["ModelStreamError"]
                raise SessionError(error.get("ErrorCode") or "ModelStreamError", None,
                                   error.get("Message", "the model's stream failed"), aws_code="ModelStreamError")
            elif "InternalStreamFailure" in event:
                raise SessionError("InternalStreamFailure", None,
                                   event["InternalStreamFailure"].get("Message", "SageMaker's stream failed"),
                                   aws_code="InternalStreamFailure")
    except ClientError as exc:  # botocore raises EventStreamError for exception events
        raise error_from_client_error(exc) from exc
    except (BotoCoreError, HTTPError, OSError) as exc:  # connection reset, read timeout
        raise SessionError("STREAM_BROKEN", None, f"the stream broke off: {exc}") from exc


# --- images ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Image:
    """One image as the caller gave it: local bytes, or a remote reference passed through."""

    data: bytes | None = None
    ref: str | None = None
    name: str = "image"

    @property
    def key(self) -> str:
        """Identity for comparing conversations: content hash, or the reference itself."""
        return self.ref if self.ref is not None else "sha256:" + hashlib.sha256(self.data).hexdigest()

    @property
    def inline_size(self) -> int:
        return len(self.ref) if self.ref is not None else 4 * ((len(self.data) + 2) // 3)


def _load_image(value: Any) -> _Image:
    """Paths, bytes, PIL images, ``data:`` URLs; ``s3://`` / ``https://`` URLs pass through."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not data:
            raise ValueError("an image given as bytes is empty")
        return _Image(data=data, name="bytes")
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image, without importing PIL
        out = io.BytesIO()
        value.save(out, format="PNG")
        return _Image(data=out.getvalue(), name="PIL image")
    if isinstance(value, str) and value.startswith("data:"):
        return _Image(data=_decode_data_url(value), name="data: URL")
    if isinstance(value, str) and value.startswith(_REMOTE_PREFIXES):
        return _Image(ref=value, name=value)
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            shown = path if len(path) <= 200 else path[:197] + "..."
            raise FileNotFoundError(
                f"image file {shown!r} does not exist (give image content as bytes or a data: URL)"
            ) from None
        if not data:
            raise ValueError(f"image file {path!r} is empty")
        return _Image(data=data, name=path)
    raise TypeError(
        f"an image must be a path, bytes, a PIL image, a data: URL or an s3:// / https:// URL, "
        f"got {type(value).__name__}"
    )


def _decode_data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError("a data: URL image must be base64: data:image/png;base64,<data>")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a data: URL image holds invalid base64") from None
    if not data:
        raise ValueError("a data: URL image is empty")
    return data


def _as_image_list(images: Any) -> list:
    if images is None:
        return []
    if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike)) or hasattr(images, "save"):
        return [images]
    return list(images)


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", ".png", "image/png"),
    (b"\xff\xd8\xff", ".jpg", "image/jpeg"),
    (b"GIF8", ".gif", "image/gif"),
    (b"BM", ".bmp", "image/bmp"),
)


def _image_type(data: bytes) -> tuple[str, str]:
    for magic, ext, mime in _MAGIC:
        if data.startswith(magic):
            return ext, mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp", "image/webp"
    return ".bin", "application/octet-stream"


def _data_url_head(data: bytes) -> str:
    """``data:<type>;base64,`` for an image's bytes (the endpoint takes any ``image/`` type and
    reads the bytes)."""
    mime = _image_type(data)[1]
    return f"data:{mime if mime.startswith('image/') else 'image/octet-stream'};base64,"


def _as_url(ref: str) -> str:
    """An image reference as sent, as a URL: plain base64 becomes a data: URL (its type sniffed)."""
    if ref.startswith(("data:", "s3://", "https://")):
        return ref
    head = base64.b64decode(ref[:64] + "=" * (-len(ref[:64]) % 4), validate=False)
    return _data_url_head(head) + ref


def _split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"s3_staging must be an s3://bucket/prefix/ URI, got {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"s3_staging {uri!r} names no bucket")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


# --- messages (OpenAI Chat Completions) ---------------------------------------------------


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class _Message:
    """One message as the server reads it: consecutive messages of one role joined (texts by a
    blank line, a message's text parts by a newline, as handler/dialects/openai.py does)."""

    role: str  # "system" (also for "developer"), "user" or "assistant"
    text: str
    images: list[_Image]


@dataclass
class _Given:
    """The caller's messages: as they go on the wire (image parts' URLs still _Image objects, filled
    in by _chat_body) and as the server will read them (``conversation``)."""

    wire: list[dict]
    conversation: list[_Message]


def _read_messages(messages: Sequence[Mapping[str, Any]]) -> _Given:
    """Check the caller's messages and load their images; refused (ValueError) where they do not
    make a conversation that ends with the user's question."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    wire_messages: list[dict] = []
    conversation: list[_Message] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"messages[{index}] must be an object with 'role' and 'content'")
        role = _ROLES.get(message["role"]) if isinstance(message["role"], str) else None
        if role is None:
            raise ValueError(
                f"messages[{index}]: role must be 'system', 'developer', 'user' or 'assistant', got {message['role']!r}"
            )
        wire_message = dict(message)
        text, images, wire_message["content"] = _content(message.get("content"), index)
        if images and role != "user":
            raise ValueError(f"messages[{index}]: only user messages may carry images")
        wire_messages.append(wire_message)
        if conversation and conversation[-1].role == role:
            last = conversation[-1]
            last.text = "\n\n".join(t for t in (last.text, text) if t)
            last.images.extend(images)
        else:
            conversation.append(_Message(role, text, images))
    if any(m.role == "system" for m in conversation[1:]):
        raise ValueError("a system (or developer) message must come first")
    talk = conversation[1:] if conversation[0].role == "system" else conversation
    if not talk or talk[-1].role != "user":
        raise ValueError("the last message must be the user's: it is the question to answer")
    if talk[0].role != "user":
        raise ValueError("an assistant message must follow a user message")
    for message in talk:
        if message.role == "user" and not message.text.strip() and not message.images:
            raise ValueError("a user message is empty; give it text or an image_url part")
    return _Given(wire_messages, conversation)


def _content(content: Any, index: int) -> tuple[str, list[_Image], Any]:
    """(text, images, content for the wire): a string passes as it is; image_url parts take the
    image (anything ``images=`` accepts) as a loaded _Image, made a wire reference later."""
    if isinstance(content, str):
        return content, [], content
    if not isinstance(content, Sequence) or isinstance(content, (bytes, bytearray)):
        raise ValueError(f"messages[{index}].content must be a string or a list of parts")
    texts: list[str] = []
    images: list[_Image] = []
    parts: list[Any] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            text = part.get("text", "")
            if not isinstance(text, str):
                raise ValueError(f"messages[{index}]: a text part's text must be a string")
            texts.append(text)
            parts.append(dict(part))
        elif kind == "image_url":
            given = part.get("image_url")
            url = given.get("url") if isinstance(given, Mapping) else given
            if url is None or (isinstance(url, str) and not url):
                raise ValueError(f"messages[{index}]: an image_url part needs image_url.url")
            image = _load_image(url)
            images.append(image)
            options = {k: v for k, v in given.items() if k != "url"} if isinstance(given, Mapping) else {}
            parts.append({**part, "image_url": {**options, "url": image}})
        else:
            raise ValueError(f"messages[{index}]: parts must be {{'type': 'text'}} or {{'type': 'image_url'}}, got {kind!r}")
    return "\n".join(texts), images, parts


def _image_part(image: _Image) -> dict:
    return {"type": "image_url", "image_url": {"url": image}}


def _user_message(text: str, images: Sequence[_Image]) -> dict:
    """A user message for the wire: its images, then its text (where the server puts them)."""
    if not images:
        return {"role": "user", "content": text}
    parts = [_image_part(image) for image in images]
    if text:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def _chat_params(params: Mapping[str, Any], stream: bool) -> dict:
    """The session's generation settings in OpenAI's names. Greedy unless told otherwise, as on
    every path of this client (an OpenAI body would default to temperature 1)."""
    out: dict[str, Any] = {}
    if "max_new_tokens" in params:
        out["max_tokens"] = params["max_new_tokens"]
    out["temperature"] = params.get("temperature", 0)
    if "top_p" in params:
        out["top_p"] = params["top_p"]
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


# --- answers ----------------------------------------------------------------------------------


def _usage(value: Any) -> dict | None:
    """A turn's usage in one shape whatever the dialect: prompt_tokens, cached_tokens,
    completion_tokens (OpenAI's ``prompt_tokens_details.cached_tokens`` brought up)."""
    if not isinstance(value, Mapping):
        return None
    if "prompt_tokens_details" not in value and "total_tokens" not in value:
        return dict(value)
    details = value.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    return {"prompt_tokens": value.get("prompt_tokens"), "cached_tokens": cached,
            "completion_tokens": value.get("completion_tokens")}


def _answer(result: dict) -> tuple[str, dict | None, dict | None]:
    """(text, usage, details) of a turn's JSON answer: a ``chat.completion`` or a native one."""
    if "choices" in result:
        choices = result.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], Mapping) else {}
        message = choice.get("message")
        text = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(text, str):
            raise SessionError("BAD_RESPONSE", None, f"the chat completion has no message content: {str(result)[:200]}")
        return text, _usage(result.get("usage")), {"finish_reason": choice.get("finish_reason")}
    text = result.get("generated_text")
    if not isinstance(text, str):
        raise SessionError("BAD_RESPONSE", None, f"the turn's answer has no generated_text: {str(result)[:200]}")
    return text, _usage(result.get("usage")), None


def _event_failure(event: dict) -> tuple[str, str] | None:
    """(code, message) of a stream's error event: OpenAI's ``{"error": {"code", "message"}}`` or TGI's."""
    error = event.get("error")
    if isinstance(error, Mapping):
        code = error.get("code") or error.get("type") or wire.DEFAULT_ERROR_TYPE
        return str(code), str(error.get("message", ""))
    return wire.event_error(event)


# --- the conversation record --------------------------------------------------------------


@dataclass
class TurnRecord:
    """One turn of the conversation as the client keeps it (to reopen a lost session with it)."""

    prompt: str
    images: tuple[str, ...]  # as sent: base64, data: URLs, or s3:// / https:// references
    image_keys: tuple[str, ...]  # content identities, to recognise the same images again
    params: dict  # generation fields as sent (max_new_tokens, temperature, top_p)
    answer: str | None = None
    complete: bool = False  # False: still streaming (a turn not delivered whole leaves the history)
    usage: dict | None = None
    sources: tuple[_Image, ...] = field(default=(), repr=False, compare=False)  # the images as given


@dataclass
class _Planned:
    """A turn ready to send: its record, its body for the session as it is (streamed or not), and,
    for a whole conversation, the turns and system message the new turn follows."""

    turn: TurnRecord
    body: Callable[[bool], dict]
    earlier: list[TurnRecord] | None = None  # None: the turn follows the session's history
    system: str | None = None


# --- the client ----------------------------------------------------------------------------


class SessionClient:
    """Opens sessions on one SageMaker endpoint (or anything speaking its runtime API).

    ``runtime`` / ``s3``: ready boto3 clients to use instead of making them (tests).
    ``max_body_bytes``: requests are kept below this; bigger images go through ``s3_staging``.
    ``busy_wait_s``: how long a turn waits out ``SESSION_BUSY`` (the previous turn, e.g. a stopped
    stream, still generating) before giving up.
    ``unavailable_retry_s``: a turn answered WORKER_UNAVAILABLE (the worker died, timed out or was
    full; the turn did not run) is sent once more after this pause.
    """

    def __init__(
        self,
        endpoint_name: str,
        *,
        region: str | None = None,
        profile: str | None = None,
        endpoint_url: str | None = None,
        s3_staging: str | None = None,
        s3_endpoint_url: str | None = None,
        replay: bool = True,
        delete_staged: bool = True,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        busy_wait_s: float = 60.0,
        unavailable_retry_s: float = 1.0,
        max_recoveries: int = 3,
        read_timeout_s: float = 120.0,
        target_variant: str | None = None,
        runtime: Any = None,
        s3: Any = None,
    ):
        if not endpoint_name:
            raise ValueError("endpoint_name is required")
        self.endpoint_name = endpoint_name
        self.region = region
        self.profile = profile
        self.endpoint_url = endpoint_url
        self.s3_staging = s3_staging
        if s3_staging is not None:
            _split_s3_uri(s3_staging)
        self.s3_endpoint_url = s3_endpoint_url
        self.replay = replay
        self.delete_staged = delete_staged
        self.defaults = _generation_params(max_new_tokens, temperature, top_p)
        self.max_body_bytes = max_body_bytes
        self.busy_wait_s = busy_wait_s
        self.unavailable_retry_s = unavailable_retry_s
        self.max_recoveries = max_recoveries
        self.read_timeout_s = read_timeout_s
        self.target_variant = target_variant
        self._runtime = runtime
        self._s3 = s3

    # boto3 clients, made on first use ------------------------------------------------

    @property
    def runtime(self):
        if self._runtime is None:
            self._runtime = self._make_client("sagemaker-runtime", self.endpoint_url)
        return self._runtime

    @property
    def s3(self):
        if self._s3 is None:
            self._s3 = self._make_client("s3", self.s3_endpoint_url)
        return self._s3

    def _make_client(self, service: str, endpoint_url: str | None):
        import boto3
        from botocore import UNSIGNED
        from llava_sessions.deploy import aws

        region = self.region or os.environ.get("AWS_REGION")
        local = endpoint_url is not None and service == "sagemaker-runtime"
        if region is None and local and boto3.Session(profile_name=self.profile).region_name is None:
            region = "us-east-1"  # a local runtime does not care; boto3 needs one to sign
        config: dict[str, Any] = {"connect_timeout": 10}
        if service == "sagemaker-runtime":
            # A turn is not idempotent: never resend one on a timeout. No retries at all.
            config.update(read_timeout=self.read_timeout_s, retries={"total_max_attempts": 1})
            if local and boto3.Session(profile_name=self.profile).get_credentials() is None:
                config["signature_version"] = UNSIGNED  # a local runtime needs no credentials
        return aws.client(service, region, self.profile, endpoint_url=endpoint_url, **config)

    # sessions ----------------------------------------------------------------------------

    def open(
        self,
        images: Any = (),
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> Session:
        """Open a session about ``images`` (paths, bytes, PIL images, data:/s3:///https:// URLs)."""
        session = Session(self, [_load_image(image) for image in _as_image_list(images)],
                          {**self.defaults, **_generation_params(max_new_tokens, temperature, top_p)})
        try:
            session._open()
        except BaseException:
            session._delete_staged()
            raise
        return session

    # one request, with the SessionError mapping -------------------------------------------

    def _invoke(self, body: dict, session_id: str) -> dict:
        from botocore.exceptions import ClientError

        kwargs = self._invoke_kwargs(body, session_id)
        try:
            return self.runtime.invoke_endpoint(**kwargs)
        except ClientError as exc:
            raise error_from_client_error(exc) from exc

    def _invoke_stream(self, body: dict, session_id: str) -> dict:
        from botocore.exceptions import ClientError

        kwargs = self._invoke_kwargs(body, session_id)
        kwargs["Accept"] = wire.EVENT_CONTENT_TYPE
        try:
            return self.runtime.invoke_endpoint_with_response_stream(**kwargs)
        except ClientError as exc:
            raise error_from_client_error(exc) from exc

    def _hang_up(self) -> None:
        """Close the runtime client's connections, as a stopped user means: the server then
        stops a turn it was still running and does not keep it."""
        http_session = getattr(getattr(self._runtime, "_endpoint", None), "http_session", None)
        if http_session is not None and hasattr(http_session, "close"):
            http_session.close()

    def _invoke_kwargs(self, body: dict, session_id: str) -> dict:
        data = json.dumps(body, separators=(",", ":")).encode("utf-8")
        if len(data) > self.max_body_bytes:
            raise SessionError(
                "REQUEST_TOO_LARGE", None,
                f"the request is {len(data):,} bytes, over {self.max_body_bytes:,} (SageMaker allows 6 MB); "
                f"send a shorter prompt or fewer images per request",
            )
        kwargs = {"EndpointName": self.endpoint_name, "Body": data, "ContentType": "application/json",
                  "SessionId": session_id}
        if self.target_variant:
            kwargs["TargetVariant"] = self.target_variant
        return kwargs


def _generation_params(max_new_tokens, temperature, top_p) -> dict:
    params = {}
    if max_new_tokens is not None:
        params["max_new_tokens"] = max_new_tokens
    if temperature is not None:
        params["temperature"] = temperature
    if top_p is not None:
        params["top_p"] = top_p
    return params


class Session:
    """One open conversation. Not thread-safe: one turn at a time.

    ``history`` holds the conversation's turns (``system`` its system message, if ``messages``
    gave one); ``id`` and ``expires_at`` change when the session is reopened after a loss;
    ``reopened`` counts those, ``divergences`` lists replayed answers that came out different.
    """

    def __init__(self, client: SessionClient, images: list[_Image], params: dict):
        self.client = client
        self.params = params
        self.id: str | None = None
        self.expires_at: datetime | None = None
        self.history: list[TurnRecord] = []
        self.system: str | None = None
        self.reopened = 0
        self.divergences: list[Divergence] = []
        self.last_reopen_reason: str | None = None
        self.last_usage: dict | None = None
        self.last_details: dict | None = None
        self.closed = False
        self.staged: list[str] = []  # s3:// URIs this session uploaded
        self._staged_by_key: dict[str, str] = {}
        self._staging_id = uuid.uuid4().hex
        self._images = images
        self._image_refs: tuple[str, ...] = ()
        self._active_stream: TurnStream | None = None
        # Once driven by messages, the conversation is its messages' texts: a lost session is
        # reopened with the whole conversation in one request rather than replayed turn by turn.
        self._by_messages = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"expires {self.expires_at:{wire.EXPIRES_FORMAT}}" if self.expires_at else "open"
        return f"<Session {self.id} on {self.client.endpoint_name}: {len(self.history)} turns, {state}>"

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as close_error:  # never mask the error that ended the block
            warnings.warn(f"closing session {self.id} failed: {close_error}", RuntimeWarning, stacklevel=2)

    # turns -------------------------------------------------------------------------------

    def ask(
        self,
        text: str | None = None,
        *,
        images: Any = (),
        messages: Sequence[Mapping[str, Any]] | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> str:
        """Send one turn and return the answer (``last_usage`` holds its token counts).

        ``text`` (and ``images``): the next question, a native turn. ``messages``: OpenAI chat
        messages, sent as they are (images become ``image_url`` parts): only the new user
        message continues the session; a whole conversation is reconciled by the server, which
        answers it as a fresh session with that conversation would (an edited or regenerated
        history included), and ``history`` becomes that conversation.
        """
        return self._ask(self._plan(text, images, messages, max_new_tokens, temperature, top_p))

    def stream(
        self,
        text: str | None = None,
        *,
        images: Any = (),
        messages: Sequence[Mapping[str, Any]] | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> TurnStream:
        """Send one turn now (as ``ask`` does); iterate the result for the answer's token texts.

        Stopping early (``close()``, or starting the next turn) hangs up: the server stops the
        turn and does not keep it, and ``history`` stays as before it. Only answers delivered
        whole are part of the conversation.
        """
        turn_stream = TurnStream(self, self._plan(text, images, messages, max_new_tokens, temperature, top_p))
        turn_stream._start()
        self._active_stream = turn_stream
        return turn_stream

    def messages(self, images: bool = False) -> list[dict]:
        """The conversation so far, OpenAI style: text only, or with ``images`` each user message's
        images as ``image_url`` parts as they were sent (the open's lead the first), so that
        ``chat.ask(messages=chat.messages(images=True) + [...])`` is recognised as this session's."""
        out: list[dict] = [{"role": "system", "content": self.system}] if self.system is not None else []
        for index, turn in enumerate(self.history):
            refs = ((self._image_refs if index == 0 else ()) + turn.images) if images else ()
            parts = [{"type": "image_url", "image_url": {"url": _as_url(ref)}} for ref in refs]
            content = parts + [{"type": "text", "text": turn.prompt}] if parts else turn.prompt
            out.append({"role": "user", "content": content})
            if turn.answer is not None:
                out.append({"role": "assistant", "content": turn.answer})
        return out

    def close(self) -> None:
        """Close the session (idempotent) and delete what it staged on S3 (unless told not to)."""
        if self.closed:
            return
        self.closed = True
        if self._active_stream is not None:
            self._active_stream.close()
            self._active_stream = None
        try:
            if self.id is not None:
                try:
                    response = self.client._invoke({"requestType": CLOSE}, self.id)
                except SessionError as error:
                    if _is_session_lost(error):
                        return  # gone already (expired, instance replaced): closed all the same
                    raise
                closed_id = response.get("ClosedSessionId")
                if closed_id != self.id:
                    raise SessionError(
                        "BAD_RESPONSE", None,
                        f"closing session {self.id} was not confirmed (ClosedSessionId={closed_id!r})",
                    )
        finally:
            self._delete_staged()

    # internals: preparing a turn ---------------------------------------------------------------

    def _plan(self, text, images, messages, max_new_tokens, temperature, top_p) -> _Planned:
        if self.closed:
            raise SessionError("SESSION_CLOSED", None, f"session {self.id} is closed; open a new one")
        if self._active_stream is not None:
            self._active_stream.close()  # a stream left unread: hang up (its turn is not kept)
            self._active_stream = None
        params = {**self.params, **_generation_params(max_new_tokens, temperature, top_p)}
        if messages is None:
            if not isinstance(text, str) or not text.strip():
                raise ValueError("ask/stream need the prompt text (or messages=[...])")
            turn = self._new_turn(text, [_load_image(image) for image in _as_image_list(images)], params)
            return _Planned(turn, lambda stream: self._turn_body(turn.prompt, turn.images, params, stream))
        if text is not None or _as_image_list(images):
            raise ValueError("give either text (and images) or messages, not both")
        return self._plan_messages(_read_messages(messages), params)

    def _plan_messages(self, given: _Given, params: dict) -> _Planned:
        """The caller's messages as they go (the open's images leading the first user message of a
        whole conversation, where the session holds them), and the turns they make."""
        conversation, wire_messages = given.conversation, given.wire
        whole = len(conversation) > 1  # any earlier message: the whole conversation
        first_user = next(m for m in conversation if m.role == "user")
        open_keys = [image.key for image in self._images]
        if whole and open_keys:
            if [image.key for image in first_user.images[: len(open_keys)]] == open_keys:
                first_user.images = first_user.images[len(open_keys):]  # given already: the record leaves them out
            else:
                index = next(i for i, m in enumerate(wire_messages) if _ROLES.get(m["role"]) == "user")
                content = wire_messages[index]["content"]
                text_parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
                wire_messages[index] = {**wire_messages[index],
                                        "content": [_image_part(image) for image in self._images] + text_parts}
        body, refs = self._chat_body(wire_messages, params)
        self._by_messages = True

        def record(message: _Message, answer: str | None = None) -> TurnRecord:
            return TurnRecord(prompt=message.text, images=tuple(refs[i.key] for i in message.images),
                              image_keys=tuple(i.key for i in message.images), params=dict(params),
                              answer=answer, complete=answer is not None, sources=tuple(message.images))

        turn = record(conversation[-1])
        if not whole:
            return _Planned(turn, body)
        system = conversation[0].text if conversation[0].role == "system" else None
        talk = conversation[1:-1] if system is not None else conversation[:-1]
        earlier, reusing = [], system == self.system
        for index in range(0, len(talk), 2):
            made = record(talk[index], talk[index + 1].text)
            old = self.history[index // 2] if reusing and index // 2 < len(self.history) else None
            reusing = old is not None and old.complete and (old.prompt, old.image_keys, old.answer) == (
                made.prompt, made.image_keys, made.answer)
            earlier.append(old if reusing else made)  # a turn the session holds keeps its usage
        return _Planned(turn, body, earlier, system)

    def _new_turn(self, prompt: str, images: list[_Image], params: dict) -> TurnRecord:
        overhead = len(json.dumps(self._turn_body(prompt, (), params, stream=True)).encode("utf-8")) + 16
        refs = self._refs(images, overhead) if images else ()
        return TurnRecord(prompt=prompt, images=refs, image_keys=tuple(i.key for i in images), params=dict(params),
                          sources=tuple(images))

    def _turn_body(self, prompt: str, refs: tuple[str, ...], params: dict, stream: bool = False) -> dict:
        body: dict[str, Any] = {"prompt": prompt, **params}
        if refs:
            body["images"] = list(refs)
        if stream:
            body["stream"] = True
        return body

    def _chat_body(self, messages: list[dict], params: dict) -> tuple[Callable[[bool], dict], dict[str, str]]:
        """An OpenAI body for ``messages`` (image_url parts holding _Image objects): its images made
        wire references together (inline data URLs while the body stays under the limit, else
        S3), so the body fits. Returns (body for stream or not, reference by image key)."""
        slots: list[tuple[dict, _Image]] = []
        filled: list[dict] = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    url = part.get("image_url") if isinstance(part, Mapping) and part.get("type") == "image_url" else None
                    if isinstance(url, Mapping) and isinstance(url.get("url"), _Image):
                        image_url = {**url, "url": ""}
                        slots.append((image_url, url["url"]))
                        part = {**part, "image_url": image_url}
                    parts.append(part)
                message = {**message, "content": parts}
            filled.append(message)
        refs: dict[str, str] = {}
        if slots:
            probe = {"messages": filled, **_chat_params(params, stream=True)}
            overhead = len(json.dumps(probe, separators=(",", ":")).encode("utf-8")) + 16
            made = self._refs([image for _, image in slots], overhead, data_urls=True)
            for (image_url, image), ref in zip(slots, made):
                image_url["url"] = ref
                refs[image.key] = ref
        return (lambda stream: {"messages": filled, **_chat_params(params, stream)}), refs

    def _whole_body(self, planned: _Planned) -> Callable[[bool], dict]:
        """The turn with the whole conversation before it, as a chat body (a lost session's reopen)."""
        if planned.earlier is not None:
            return planned.body
        messages: list[dict] = [{"role": "system", "content": self.system}] if self.system is not None else []
        turns = [*self.history, planned.turn]
        for index, turn in enumerate(turns):
            messages.append(_user_message(turn.prompt, [*(self._images if index == 0 else ()), *turn.sources]))
            if turn is not planned.turn:
                messages.append({"role": "assistant", "content": turn.answer or ""})
        return self._chat_body(messages, planned.turn.params)[0]

    def _refs(self, images: list[_Image], extra_bytes: int, data_urls: bool = False) -> tuple[str, ...]:
        """Wire references: base64 inline (as data: URLs with ``data_urls``) while the body stays
        under the limit, else S3."""
        limit = self.client.max_body_bytes
        refs: list[str | None] = [image.ref if image.ref is not None else self._staged_by_key.get(image.key)
                                  for image in images]

        def inline_size(i: int) -> int:
            return images[i].inline_size + (len(_data_url_head(images[i].data)) if data_urls else 0)

        size = extra_bytes + sum(len(ref) + 3 for ref in refs if ref is not None)
        pending = [i for i, ref in enumerate(refs) if ref is None]
        size += sum(inline_size(i) + 3 for i in pending)
        # Largest first to S3 until the rest fits inline.
        for i in sorted(pending, key=inline_size, reverse=True):
            if size <= limit:
                break
            refs[i] = self._stage(images[i], size)
            size += len(refs[i]) - inline_size(i)
        return tuple(ref if ref is not None else
                     (_data_url_head(images[i].data) if data_urls else "") + base64.b64encode(images[i].data).decode("ascii")
                     for i, ref in enumerate(refs))

    def _stage(self, image: _Image, body_size: int) -> str:
        client = self.client
        if client.s3_staging is None:
            raise SessionError(
                "REQUEST_TOO_LARGE", None,
                f"{image.name} ({len(image.data):,} bytes) makes the request {body_size:,} bytes, over SageMaker's "
                f"6 MB limit: pass s3_staging='s3://bucket/prefix/' (CLI: --s3-staging) so large images travel "
                f"through S3, and allow that bucket on the endpoint (LLAVA_SESSIONS_S3_ALLOWED_BUCKETS)",
            )
        bucket, prefix = _split_s3_uri(client.s3_staging)
        ext, mime = _image_type(image.data)
        digest = hashlib.sha256(image.data).hexdigest()
        key = f"{prefix}{self._staging_id}/{digest[:24]}{ext}"
        client.s3.put_object(Bucket=bucket, Key=key, Body=image.data, ContentType=mime)
        uri = f"s3://{bucket}/{key}"
        self.staged.append(uri)
        self._staged_by_key[image.key] = uri
        return uri

    def _delete_staged(self) -> None:
        if not self.staged or not self.client.delete_staged:
            return
        by_bucket: dict[str, list[str]] = {}
        for uri in self.staged:
            bucket, _, key = uri[5:].partition("/")
            by_bucket.setdefault(bucket, []).append(key)
        for bucket, keys in by_bucket.items():
            for start in range(0, len(keys), 1000):
                self.client.s3.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True}
                )
        self.staged.clear()
        self._staged_by_key.clear()

    # internals: requests --------------------------------------------------------------------

    def _open(self) -> None:
        if not self._image_refs and self._images:
            self._image_refs = self._refs(self._images, len('{"requestType":"NEW_SESSION","images":[]}'))
        body: dict[str, Any] = {"requestType": NEW_SESSION}
        if self._image_refs:
            body["images"] = list(self._image_refs)
        response = self.client._invoke(body, NEW_SESSION)
        self.id, self.expires_at = parse_new_session_id(response.get("NewSessionId"))
        _drain(response)

    def _ask(self, planned: _Planned) -> str:
        try:
            response = self._with_recovery(lambda: self.client._invoke(planned.body(False), self.id),
                                           resend=lambda: self._resend(planned))
            result = _json_body(response)
        except KeyboardInterrupt:
            # Stopped waiting: hang up, so the server stops the turn and does not keep it either.
            self.client._hang_up()
            raise
        answer, usage, details = _answer(result)
        turn = planned.turn
        turn.answer, turn.complete, turn.usage = answer, True, usage
        if planned.earlier is not None:
            self.history, self.system = [*planned.earlier, turn], planned.system
        else:
            self.history.append(turn)
        self.last_usage, self.last_details = usage, details
        return answer

    def _with_recovery(self, send: Callable[[], Any], reason: str | None = None,
                       resend: Callable[[], Any] | None = None) -> Any:
        """Run one request; when the session is gone, reopen it and run the request again.

        ``reason``: the session is known to be gone already; recover before sending.
        ``resend``: for a session driven by messages, opens a new session with the whole
        conversation and sends the turn in it (``_resend``); others are replayed turn by turn.
        """
        replay = self.client.replay
        if reason is None and self.id is None:  # an earlier reopen failed halfway
            reason = "an earlier reopen failed"
        elif reason is None and self._expired() and replay:
            reason = "the session's Expires time has passed"
        if reason is not None and not replay:
            raise SessionError("SESSION_NOT_FOUND", None, f"the session is gone ({reason}) and replay is off")
        recoveries = 0
        while True:
            try:
                if reason is not None:
                    recoveries += 1
                    if resend is not None and self._by_messages:
                        return self._reopen(reason, resend)
                    self._recover(reason)
                    reason = None
                return self._busy_wait(send)
            except SessionError as error:
                if not _is_session_lost(error) or not replay or recoveries >= self.client.max_recoveries:
                    raise
                reason = f"{error.code}: {error.message}"

    def _busy_wait(self, send: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + self.client.busy_wait_s
        delay = 0.1
        retried_unavailable = False
        while True:
            try:
                return send()
            except SessionError as error:
                if error.code == "WORKER_UNAVAILABLE" and not retried_unavailable:
                    # The worker died, timed out or was full: the turn did not run. Sent once more,
                    # it runs, or finds its session gone with the worker (SESSION_NOT_FOUND: replay).
                    retried_unavailable = True
                    time.sleep(self.client.unavailable_retry_s)
                    continue
                if error.code != "SESSION_BUSY" or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _expired(self) -> bool:
        return self.expires_at is not None and datetime.now(UTC) >= self.expires_at

    def _reopen(self, reason: str, resend: Callable[[], Any]) -> Any:
        """A new session that holds the whole conversation, prefilled by the server in the
        request that asks the turn; the answer is the one a fresh session gives."""
        self.last_reopen_reason = reason
        self.id, self.expires_at = None, None
        try:
            response = resend()
        except BaseException:
            self._abandon_half_built()
            raise
        self.reopened += 1
        log.info("session lost (%s); reopened as %s with the whole conversation (%d turn(s))", reason,
                 _short_id(self.id), len(self.history))
        return response

    def _resend(self, planned: _Planned) -> Any:
        """The whole conversation and the turn in one open (SessionId NEW_SESSION), answered at once."""
        body = self._whole_body(planned)(False)
        response = self._busy_wait(lambda: self.client._invoke(body, NEW_SESSION))
        self.id, self.expires_at = parse_new_session_id(response.get("NewSessionId"))
        return response

    def _resend_stream(self, planned: _Planned) -> Any:
        """An open cannot stream: an empty session, then the whole conversation streamed in it."""
        body = self._whole_body(planned)(True)
        response = self.client._invoke({"requestType": NEW_SESSION}, NEW_SESSION)
        self.id, self.expires_at = parse_new_session_id(response.get("NewSessionId"))
        _drain(response)
        return self._busy_wait(lambda: self.client._invoke_stream(body, self.id))

    def _abandon_half_built(self) -> None:
        half_built, self.id, self.expires_at = self.id, None, None  # the next turn tries again
        if half_built is not None:
            try:
                self.client._invoke({"requestType": CLOSE}, half_built)
            except Exception:
                pass

    def _recover(self, reason: str) -> None:
        """A new session with the same images, and every earlier prompt sent again."""
        self.last_reopen_reason = reason
        self.id, self.expires_at = None, None
        try:
            self._open()
            self._replay()
        except BaseException:
            self._abandon_half_built()
            raise
        self.reopened += 1
        log.info("session lost (%s); reopened as %s and replayed %d turn(s)", reason, _short_id(self.id),
                 len(self.history))

    def _replay(self) -> None:
        for index, turn in enumerate(self.history):
            body = self._turn_body(turn.prompt, turn.images, turn.params)
            result = _json_body(self._busy_wait(lambda body=body: self.client._invoke(body, self.id)))
            answer = result.get("generated_text")
            if not isinstance(answer, str):
                raise SessionError("BAD_RESPONSE", None, f"a replayed turn's answer has no generated_text: {str(result)[:200]}")
            if turn.complete and answer != turn.answer:
                self.divergences.append(Divergence(index, turn.answer, answer))
                warnings.warn(
                    f"replaying turn {index} into a new session gave a different answer than before "
                    f"({_preview(turn.answer)} -> {_preview(answer)}); the new answer is kept"
                    + ("" if not turn.params.get("temperature") else " (the turn was sampled, temperature > 0)"),
                    ReplayDivergenceWarning, stacklevel=5,
                )
            turn.answer, turn.complete, turn.usage = answer, True, result.get("usage")


class TurnStream:
    """One streamed turn: iterate for token texts; then ``text``, ``usage``, ``details``."""

    def __init__(self, session: Session, planned: _Planned):
        self.session = session
        self.text: str | None = None
        self.usage: dict | None = None
        self.details: dict | None = None
        self.done = False
        self._pieces: list[str] = []
        self._planned = planned
        self._turn = planned.turn
        self._before: tuple[list[TurnRecord], str | None] | None = None
        self._response: dict | None = None
        self._events: Iterator[dict] | None = None
        self._finish_reason: str | None = None
        self._yielded = False
        self._restarts = 0

    def __iter__(self) -> TurnStream:
        return self

    def __enter__(self) -> TurnStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self, reason: str | None = None) -> None:
        session, planned = self.session, self._planned
        body = planned.body(True)
        try:
            self._response = session._with_recovery(
                lambda: session.client._invoke_stream(body, session.id), reason,
                resend=lambda: session._resend_stream(planned))
        except KeyboardInterrupt:
            self.done = True  # stopped waiting: hang up; the server does not keep the turn
            session.client._hang_up()
            raise
        self._events = iter_events(payload_chunks(self._response["Body"]))
        # The turn is in the history while it streams; it leaves again unless delivered whole (close, _fail).
        self._before = (session.history, session.system)
        if planned.earlier is not None:
            session.history, session.system = [*planned.earlier, self._turn], planned.system
        else:
            session.history = [*session.history, self._turn]

    def __next__(self) -> str:
        if self.done or self._events is None:
            raise StopIteration
        while True:
            try:
                event = next(self._events)
            except StopIteration:
                if self._finish_reason is not None:  # a chat stream's end without its usage chunk
                    self._finish("".join(self._pieces), None)
                    raise StopIteration from None
                self._fail(SessionError("STREAM_INCOMPLETE", None, "the stream ended before its final event"))
            except SessionError as error:
                if not self._yielded and _is_session_lost(error) and self._restart(error):
                    continue
                self._fail(error)
            failure = _event_failure(event)
            if failure is not None:
                error = SessionError(failure[0], None, failure[1])
                if not self._yielded and _is_session_lost(error) and self._restart(error):
                    continue
                self._fail(error)
            piece = self._chat_chunk(event) if "choices" in event else self._tgi_event(event)
            if piece:
                self._yielded = True
                self._pieces.append(piece)
                return piece
            if self.done:
                raise StopIteration

    def _tgi_event(self, event: dict) -> str:
        """TGI's token event (native turns); the last one carries ``generated_text``."""
        token = event.get("token") or {}
        piece = "" if token.get("special") else token.get("text") or ""
        final = event.get("generated_text")
        if isinstance(final, str):
            self._finish(final, _usage(event.get("usage")), event.get("details"))
        return piece

    def _chat_chunk(self, event: dict) -> str:
        """A ``chat.completion.chunk``: a content delta, the finish reason, or (no choices) the usage, last."""
        choices = event.get("choices") or []
        piece = ""
        if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
            choice = choices[0]
            delta = choice.get("delta")
            piece = (delta.get("content") if isinstance(delta, Mapping) else None) or ""
            if choice.get("finish_reason") is not None:
                self._finish_reason = choice["finish_reason"]
        usage = event.get("usage")
        if isinstance(usage, Mapping) and not choices:
            self._finish("".join(self._pieces) + piece, _usage(usage))
        return piece

    def _restart(self, error: SessionError) -> bool:
        """The session was gone before any token: reopen it and send the turn again."""
        session = self.session
        self._discard_turn()
        self._close_body()
        if not session.client.replay or self._restarts >= session.client.max_recoveries:
            return False
        self._restarts += 1
        self._start(reason=f"{error.code}: {error.message}")
        return True

    def _finish(self, final: str, usage: dict | None, details: dict | None = None) -> None:
        self.done = True
        self._close_body()
        self.text = final
        self.usage = usage
        self.details = details if details is not None or self._finish_reason is None else {
            "finish_reason": self._finish_reason}
        self._turn.answer, self._turn.complete, self._turn.usage = final, True, self.usage
        self.session.last_usage, self.session.last_details = self.usage, self.details

    def _fail(self, error: SessionError):
        # The server leaves the session as before a failed turn (or the session is gone):
        # the turn is not part of the conversation.
        self.done = True
        self._discard_turn()
        self._close_body()
        raise error

    def _discard_turn(self) -> None:
        session = self.session
        if session.history and session.history[-1] is self._turn and self._before is not None:
            session.history, session.system = self._before

    def read(self) -> str:
        """Consume the rest of the stream and return the whole answer."""
        for _ in self:
            pass
        return self.text if self.text is not None else "".join(self._pieces)

    def close(self) -> None:
        """Stop reading and hang up: the server stops the turn and leaves its session as before
        it, so the turn leaves the history too (``text`` stays None)."""
        if not self.done:
            self.done = True
            self._discard_turn()
        self._close_body()

    def _close_body(self) -> None:
        body = (self._response or {}).get("Body")
        if body is not None and hasattr(body, "close"):
            try:
                body.close()
            except Exception:
                pass


def _json_body(response: Mapping[str, Any]) -> dict:
    body = response.get("Body")
    data = body.read() if hasattr(body, "read") else body
    try:
        result = json.loads(data)
    except (TypeError, ValueError):
        raise SessionError("BAD_RESPONSE", None, f"the endpoint's answer is not JSON: {str(data)[:200]}") from None
    if not isinstance(result, dict):
        raise SessionError("BAD_RESPONSE", None, f"the endpoint's answer is not a JSON object: {str(result)[:200]}")
    return result


def _drain(response: Mapping[str, Any]) -> None:
    body = response.get("Body")
    if hasattr(body, "read"):
        body.read()


def _preview(text: str | None, limit: int = 40) -> str:
    if text is None:
        return "None"
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")
