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
- ``ask`` sends the native turn body with ``SessionId=<id>``; ``stream`` sends it with
  ``"stream": true`` through ``invoke_endpoint_with_response_stream`` and splits TGI's
  ``data:`` events out of the ``PayloadPart`` bytes.
- ``close`` sends ``{"requestType": "CLOSE"}`` and checks ``ClosedSessionId``.

Replay. The client keeps the conversation (each turn's prompt, images and generation settings,
and the answer). When a turn finds the session gone (``SESSION_NOT_FOUND``: expiry, a replaced
instance, scale-in; or SageMaker's own "session expired/invalid" ValidationError), the client
opens a new session with the same images, sends every earlier prompt again, then retries the
failed turn. The server only accepts user prompts and generates the answers itself (there is
no way to hand it an assistant message), so earlier answers are regenerated, not injected.
With greedy decoding (temperature 0, the default) they come out the same; when one differs,
the client warns (``ReplayDivergenceWarning``), records it in ``Session.divergences`` and keeps
the new answer, because that is what the new session now holds.

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
from dataclasses import dataclass
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


def _split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"s3_staging must be an s3://bucket/prefix/ URI, got {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"s3_staging {uri!r} names no bucket")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


# --- messages (OpenAI style) -------------------------------------------------------------


@dataclass
class _MessageTurn:
    prompt: str
    images: list[_Image]
    answer: str | None = None


def _turns_from_messages(messages: Sequence[Mapping[str, Any]]) -> list[_MessageTurn]:
    """User messages become turns (consecutive ones merge); an assistant message is the answer to the turn before it."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    turns: list[_MessageTurn] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"messages[{index}] must be an object with 'role' and 'content'")
        role = message["role"]
        texts, images = _content_parts(message.get("content"), index)
        if role == "user":
            if turns and turns[-1].answer is None:
                turns[-1].prompt = "\n\n".join(t for t in (turns[-1].prompt, *texts) if t)
                turns[-1].images.extend(images)
            else:
                turns.append(_MessageTurn("\n\n".join(texts), images))
        elif role == "assistant":
            if not turns or turns[-1].answer is not None:
                raise ValueError(f"messages[{index}]: an assistant message must follow a user message")
            if images:
                raise ValueError(f"messages[{index}]: an assistant message cannot hold images")
            turns[-1].answer = "".join(texts)
        elif role in ("system", "developer"):
            raise ValueError(
                f"messages[{index}]: the endpoint has no system prompt; put the instructions in the first user message"
            )
        else:
            raise ValueError(f"messages[{index}]: role must be 'user' or 'assistant', got {role!r}")
    if turns[-1].answer is not None:
        raise ValueError("the last message must be the user's: it is the prompt to answer")
    for index, turn in enumerate(turns):
        if not turn.prompt.strip():
            raise ValueError(f"user turn {index} has no text; the endpoint needs a prompt with every turn")
    return turns


def _content_parts(content: Any, index: int) -> tuple[list[str], list[_Image]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, Sequence) or isinstance(content, (bytes, bytearray)):
        raise ValueError(f"messages[{index}].content must be a string or a list of parts")
    texts: list[str] = []
    images: list[_Image] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            if not isinstance(url, str) or not url:
                raise ValueError(f"messages[{index}]: an image_url part needs image_url.url")
            images.append(_load_image(url))
        else:
            raise ValueError(f"messages[{index}]: parts must be {{'type': 'text'}} or {{'type': 'image_url'}}, got {kind!r}")
    return texts, images


# --- the conversation record --------------------------------------------------------------


@dataclass
class TurnRecord:
    """One turn of the conversation as the client keeps it for replay."""

    prompt: str
    images: tuple[str, ...]  # as sent: base64 or s3:// / https:// references
    image_keys: tuple[str, ...]  # content identities, to recognise the same images again
    params: dict  # generation fields as sent (max_new_tokens, temperature, top_p)
    answer: str | None = None
    complete: bool = False  # False: still streaming (a turn not delivered whole leaves the history)
    usage: dict | None = None


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

    ``id`` and ``expires_at`` change when the session is reopened by a replay; ``reopened``
    counts those, ``divergences`` lists replayed answers that came out different.
    """

    def __init__(self, client: SessionClient, images: list[_Image], params: dict):
        self.client = client
        self.params = params
        self.id: str | None = None
        self.expires_at: datetime | None = None
        self.history: list[TurnRecord] = []
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
        """Send one turn and return the answer (``last_usage`` holds its token counts)."""
        prompt, new_images, params = self._prepare(text, images, messages, max_new_tokens, temperature, top_p)
        return self._ask_turn(prompt, new_images, params)

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
        """Send one turn now; iterate the result for the answer's token texts as they come.

        Stopping early (``close()``, or starting the next turn) hangs up: the server stops the
        turn and does not keep it, and it leaves ``history`` too. Only answers delivered whole
        are part of the conversation.
        """
        prompt, new_images, params = self._prepare(text, images, messages, max_new_tokens, temperature, top_p)
        turn_stream = TurnStream(self, prompt, new_images, params)
        turn_stream._start()
        self._active_stream = turn_stream
        return turn_stream

    def messages(self) -> list[dict]:
        """The conversation so far, OpenAI style (text only; images are not repeated)."""
        out: list[dict] = []
        for turn in self.history:
            out.append({"role": "user", "content": turn.prompt})
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

    def _prepare(self, text, images, messages, max_new_tokens, temperature, top_p):
        if self.closed:
            raise SessionError("SESSION_CLOSED", None, f"session {self.id} is closed; open a new one")
        if self._active_stream is not None:
            self._active_stream.close()  # a stream left unread: hang up (its turn is not kept)
            self._active_stream = None
        params = {**self.params, **_generation_params(max_new_tokens, temperature, top_p)}
        if messages is None:
            if not isinstance(text, str) or not text.strip():
                raise ValueError("ask/stream need the prompt text (or messages=[...])")
            return text, [_load_image(image) for image in _as_image_list(images)], params
        if text is not None or _as_image_list(images):
            raise ValueError("give either text (and images) or messages, not both")
        turns = _turns_from_messages(messages)
        for earlier in self._new_turns_from(turns[:-1]):
            self._ask_turn(earlier.prompt, earlier.images, params, expected=earlier.answer)
        return turns[-1].prompt, turns[-1].images, params

    def _new_turns_from(self, earlier: list[_MessageTurn]) -> list[_MessageTurn]:
        """Which of the messages' earlier turns the session still lacks.

        No earlier turns: the last user message is simply the next turn. Otherwise the messages
        must start with this session's whole conversation (same prompts and images); the rest
        are sent as turns before the last one.
        """
        if not earlier:
            return []
        known = self.history
        if len(earlier) < len(known):
            raise ValueError(
                f"messages hold {len(earlier)} earlier turn(s) but this session has {len(known)}: send the whole "
                f"conversation, or only the new user message"
            )
        for index, (message_turn, turn) in enumerate(zip(earlier, known)):
            if message_turn.prompt != turn.prompt or tuple(i.key for i in message_turn.images) != turn.image_keys:
                raise ValueError(
                    f"messages differ from this session's conversation at user turn {index}; the endpoint cannot "
                    f"rewrite history: open a new session for a different conversation"
                )
        for index, (message_turn, turn) in enumerate(zip(earlier, known)):
            if message_turn.answer is not None and turn.complete and message_turn.answer != turn.answer:
                warnings.warn(
                    f"messages give a different answer for turn {index} than the session holds; the endpoint "
                    f"cannot take assistant text, so the session's own answer stays in its context",
                    ReplayDivergenceWarning, stacklevel=4,
                )
        return earlier[len(known):]

    def _refs(self, images: list[_Image], extra_bytes: int) -> tuple[str, ...]:
        """Wire references: base64 inline while the body stays under the limit, else S3."""
        limit = self.client.max_body_bytes
        refs: list[str | None] = [image.ref if image.ref is not None else self._staged_by_key.get(image.key)
                                  for image in images]
        size = extra_bytes + sum(len(ref) + 3 for ref in refs if ref is not None)
        pending = [i for i, ref in enumerate(refs) if ref is None]
        size += sum(images[i].inline_size + 3 for i in pending)
        # Largest first to S3 until the rest fits inline.
        for i in sorted(pending, key=lambda i: images[i].inline_size, reverse=True):
            if size <= limit:
                break
            refs[i] = self._stage(images[i], size)
            size += len(refs[i]) - images[i].inline_size
        return tuple(ref if ref is not None else base64.b64encode(images[i].data).decode("ascii")
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

    def _turn_body(self, prompt: str, refs: tuple[str, ...], params: dict, stream: bool = False) -> dict:
        body: dict[str, Any] = {"prompt": prompt, **params}
        if refs:
            body["images"] = list(refs)
        if stream:
            body["stream"] = True
        return body

    def _new_turn(self, prompt: str, images: list[_Image], params: dict) -> TurnRecord:
        overhead = len(json.dumps(self._turn_body(prompt, (), params, stream=True)).encode("utf-8")) + 16
        refs = self._refs(images, overhead) if images else ()
        return TurnRecord(prompt=prompt, images=refs, image_keys=tuple(i.key for i in images), params=dict(params))

    def _ask_turn(self, prompt: str, images: list[_Image], params: dict, expected: str | None = None) -> str:
        turn = self._new_turn(prompt, images, params)
        try:
            response = self._with_recovery(
                lambda: self.client._invoke(self._turn_body(prompt, turn.images, params), self.id))
            result = _json_body(response)
        except KeyboardInterrupt:
            # Stopped waiting: hang up, so the server stops the turn and does not keep it either.
            self.client._hang_up()
            raise
        answer = result.get("generated_text")
        if not isinstance(answer, str):
            raise SessionError("BAD_RESPONSE", None, f"the turn's answer has no generated_text: {str(result)[:200]}")
        turn.answer, turn.complete, turn.usage = answer, True, result.get("usage")
        self.history.append(turn)
        self.last_usage, self.last_details = turn.usage, None
        if expected is not None and expected != answer:
            warnings.warn(
                f"messages give a different answer for turn {len(self.history) - 1} than the endpoint generated; "
                f"the endpoint cannot take assistant text, so its own answer stays in the session's context",
                ReplayDivergenceWarning, stacklevel=4,
            )
        return answer

    def _with_recovery(self, send: Callable[[], Any], reason: str | None = None) -> Any:
        """Run one request; when the session is gone, reopen, replay and run it again.

        ``reason``: the session is known to be gone already; recover before sending.
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

    def _recover(self, reason: str) -> None:
        """A new session with the same images, and every earlier prompt sent again."""
        self.last_reopen_reason = reason
        self.id, self.expires_at = None, None
        try:
            self._open()
            self._replay()
        except BaseException:
            half_built, self.id, self.expires_at = self.id, None, None  # the next turn tries again
            if half_built is not None:
                try:
                    self.client._invoke({"requestType": CLOSE}, half_built)
                except Exception:
                    pass
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

    def __init__(self, session: Session, prompt: str, images: list[_Image], params: dict):
        self.session = session
        self.text: str | None = None
        self.usage: dict | None = None
        self.details: dict | None = None
        self.done = False
        self._pieces: list[str] = []
        self._turn = session._new_turn(prompt, images, params)
        self._response: dict | None = None
        self._events: Iterator[dict] | None = None
        self._yielded = False
        self._restarts = 0

    def __iter__(self) -> TurnStream:
        return self

    def __enter__(self) -> TurnStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self, reason: str | None = None) -> None:
        session = self.session
        body = session._turn_body(self._turn.prompt, self._turn.images, self._turn.params, stream=True)
        try:
            self._response = session._with_recovery(
                lambda: session.client._invoke_stream(body, session.id), reason)
        except KeyboardInterrupt:
            self.done = True  # stopped waiting: hang up; the server does not keep the turn
            session.client._hang_up()
            raise
        self._events = iter_events(payload_chunks(self._response["Body"]))
        session.history.append(self._turn)  # it leaves again unless delivered whole (close, _fail)

    def __next__(self) -> str:
        if self.done or self._events is None:
            raise StopIteration
        while True:
            try:
                event = next(self._events)
            except StopIteration:
                self._fail(SessionError("STREAM_INCOMPLETE", None, "the stream ended before its final event"))
            except SessionError as error:
                if not self._yielded and _is_session_lost(error) and self._restart(error):
                    continue
                self._fail(error)
            failure = wire.event_error(event)
            if failure is not None:
                error = SessionError(failure[0], None, failure[1])
                if not self._yielded and _is_session_lost(error) and self._restart(error):
                    continue
                self._fail(error)
            token = event.get("token") or {}
            piece = token.get("text") or ""
            final = event.get("generated_text")
            if isinstance(final, str):
                self._finish(final, event)
                if piece and not token.get("special"):
                    self._yielded = True
                    self._pieces.append(piece)
                    return piece
                raise StopIteration
            if piece and not token.get("special"):
                self._yielded = True
                self._pieces.append(piece)
                return piece

    def _restart(self, error: SessionError) -> bool:
        """The session was gone before any token: reopen, replay and send the turn again."""
        session = self.session
        self._discard_turn()
        self._close_body()
        if not session.client.replay or self._restarts >= session.client.max_recoveries:
            return False
        self._restarts += 1
        self._start(reason=f"{error.code}: {error.message}")
        return True

    def _finish(self, final: str, event: dict) -> None:
        self.done = True
        self._close_body()
        self.text = final
        self.usage = event.get("usage")
        self.details = event.get("details")
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
        history = self.session.history
        if history and history[-1] is self._turn:
            history.pop()

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
