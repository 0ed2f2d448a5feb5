"""Session-affinity router: an HTTP front on the container's port that keeps each session on its worker.

Each device runs its own TorchServe model (``llava-0``, ``llava-1``, ...) and a session lives in
one worker's memory, so every request of a session must reach the backend that opened it. Opens go
to the least-loaded backend; the backend's response headers say which session it opened
(``X-Amzn-SageMaker-Session-Id: <id>; Expires=...``) or closed; ``SessionRoutes`` remembers that.
Responses stream through chunk by chunk, so token streaming keeps its latency.

Torch-free: the container's front process imports nothing heavy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from llava_sessions.errors import (
    InvalidRequest,
    MethodNotAllowed,
    RequestTooLarge,
    RouteNotFound,
    SessionNotFound,
    SessionsError,
    WorkerUnavailable,
)
from llava_sessions.handler.protocol import (
    CLOSED_SESSION_HEADER,
    NEW_SESSION,
    SESSION_HEADER,
    is_valid_session_id,
)
from llava_sessions.handler.replies import error_reply
from llava_sessions.http_proxy_server import HttpProxyServer
from llava_sessions.session_routes import SessionRoutes, parse_session_header

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# Bodies smaller than this are looked into for an AWS-sample ``session_id``; larger ones are
# image-carrying opens, and parsing them would only cost time.
BODY_ID_SCAN_LIMIT = 1 * MiB
PING_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 5.0

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# The client library sets these for the upstream request itself; the session header is re-sent
# in canonical case (or left out for an open).
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect", SESSION_HEADER.lower()}
# TorchServe leaks its internal streaming marker to clients; no server software is named.
_NOT_RETURNED = HOP_BY_HOP | {"ts_stream_next", "server"}
EVENT_STREAM = "text/event-stream"
# What TorchServe's front end answers when the worker process went away during the request
# (killed, crashed, or killed by TorchServe itself past the model's responseTimeout).
_WORKER_DIED = "Worker died"


@dataclass(frozen=True)
class _Target:
    backend: int
    session_id: str | None  # None: the request opens a session


class AffinityRouter(HttpProxyServer):
    """Routes POST /invocations to the backend holding the session; GET /ping mirrors TorchServe's."""

    name = "affinity router"

    def __init__(
        self,
        backends: list[str],
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        ping_url: str,
        max_body_bytes: int = 8 * MiB,
        routes: SessionRoutes | None = None,
        request_timeout_s: float = 660,
    ):
        if not backends:
            raise ValueError("backends must name at least one inference URL")
        if routes is not None and routes.n_backends != len(backends):
            raise ValueError(f"routes is sized for {routes.n_backends} backends, got {len(backends)} URLs")
        super().__init__(host, port)
        self.backends = list(backends)
        self.ping_url = ping_url
        self.max_body_bytes = max_body_bytes
        self.routes = routes if routes is not None else SessionRoutes(len(backends))
        # A read timeout, not a total one: a long stream is fine while tokens keep coming.
        self._timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S, sock_read=request_timeout_s)

    async def _started(self) -> None:
        log.info("affinity router on %s in front of %d backends", self.url, len(self.backends))

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[_json_errors])
        app.on_response_prepare.append(_no_server_header)
        app.router.add_get("/ping", self._ping)
        app.router.add_post("/invocations", self._invocations)
        return app

    # --- handlers -------------------------------------------------------------

    async def _ping(self, request: web.Request) -> web.Response:
        healthy = await self._backend_healthy()
        return web.json_response(
            {"status": "Healthy" if healthy else "Unhealthy"}, status=200 if healthy else 503
        )

    async def _backend_healthy(self) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=PING_TIMEOUT_S)
            async with self._client.get(self.ping_url, timeout=timeout) as reply:
                return reply.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def _invocations(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request)
        target = self._route(request.headers, body)
        return await self._forward(request, body, target)

    async def _read_body(self, request: web.Request) -> bytes:
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise InvalidRequest(
                f"Content-Encoding {encoding[:40]!r} is not accepted; send the JSON body uncompressed "
                "(large images travel best as s3:// references)"
            )
        if (request.content_length or 0) > self.max_body_bytes:
            raise self._too_large()
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > self.max_body_bytes:  # chunked uploads announce no length
                raise self._too_large()
        return bytes(body)

    def _too_large(self) -> RequestTooLarge:
        return RequestTooLarge(
            f"the request body is over {self.max_body_bytes} bytes; send a smaller request "
            f"(pass images as URLs rather than inline base64)"
        )

    def _route(self, headers: CIMultiDictProxy, body: bytes) -> _Target:
        session_id = _header_session_id(headers)
        if session_id is None and len(body) < BODY_ID_SCAN_LIMIT:
            session_id = _body_session_id(body)
        if session_id is None:
            backend = self.routes.pick_backend()
            log.debug("open -> backend %d", backend)
            return _Target(backend, None)
        backend = self.routes.lookup(session_id)
        if backend is None:
            log.debug("session %s unknown", session_id[:8])
            raise SessionNotFound()
        log.debug("session %s -> backend %d", session_id[:8], backend)
        return _Target(backend, session_id)

    async def _forward(self, request: web.Request, body: bytes, target: _Target) -> web.StreamResponse:
        try:
            upstream = await self._client.post(
                self.backends[target.backend],
                data=body,
                headers=_upstream_headers(request.headers, target.session_id),
                timeout=self._timeout,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._unavailable(target, exc) from None
        async with upstream:
            self._record(target, upstream)
            if upstream.status == 404 and target.session_id is not None:
                return await self._relay_not_found(target, upstream)
            if upstream.status >= 500:
                return await self._relay_server_error(target, upstream)
            return await _relay_stream(request, upstream, target)

    async def _relay_not_found(self, target: _Target, upstream: aiohttp.ClientResponse) -> web.Response:
        """A worker that lost a session (restarted, expired) says so; stop routing to it."""
        try:
            payload = await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._unavailable(target, exc) from None
        if _error_code(payload) == SessionNotFound.code:
            self.routes.unbind(target.session_id)
            log.debug("session %s lost by backend %d", target.session_id[:8], target.backend)
        return web.Response(status=404, body=payload, headers=_downstream_headers(upstream.headers))

    async def _relay_server_error(self, target: _Target, upstream: aiohttp.ClientResponse) -> web.Response:
        """Our handler's own 5xx errors pass as they are; TorchServe's (``{"code", "type", "message"}``:
        the worker died, none is ready, the queue is full) become WORKER_UNAVAILABLE."""
        try:
            payload = await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._unavailable(target, exc) from None
        if _error_code(payload) is not None:
            return web.Response(status=upstream.status, body=payload, headers=_downstream_headers(upstream.headers))
        message = _torchserve_message(payload)
        log.warning("backend %d failed: %d %s", target.backend, upstream.status, message[:200])
        if _WORKER_DIED not in message:
            raise WorkerUnavailable(
                f"the model worker for this request could not take it ({upstream.status}: {message[:200]}); "
                "retry shortly"
            )
        if target.session_id is not None:
            self.routes.unbind(target.session_id)  # it lived in the worker's memory
        raise WorkerUnavailable(
            "the model worker stopped while answering this request (killed, or over its response "
            "timeout) and is restarting; the sessions it held are gone: open a new session"
        )

    def _record(self, target: _Target, upstream: aiohttp.ClientResponse) -> None:
        """Bookkeeping from the backend's session headers."""
        opened = upstream.headers.get(SESSION_HEADER)
        if opened is not None and 200 <= upstream.status < 300:
            parsed = parse_session_header(opened)
            if parsed is None:
                log.warning("backend %d sent a malformed %s header", target.backend, SESSION_HEADER)
            else:
                self.routes.bind(parsed[0], target.backend, parsed[1])
                log.debug("session %s bound to backend %d", parsed[0][:8], target.backend)
        closed = upstream.headers.get(CLOSED_SESSION_HEADER)
        if closed is not None:
            self.routes.unbind(closed.strip())

    def _unavailable(self, target: _Target, exc: BaseException) -> WorkerUnavailable:
        log.warning("backend %d unavailable: %s", target.backend, type(exc).__name__)
        return WorkerUnavailable(
            f"the model worker for this request did not answer ({type(exc).__name__}); "
            "retry shortly, and open a new session if this one is then not found"
        )


# --- routing helpers ------------------------------------------------------------


def _header_session_id(headers: CIMultiDictProxy) -> str | None:
    """The session named by the header; None for absent, empty or NEW_SESSION (an open)."""
    values = {value.strip() for value in headers.getall(SESSION_HEADER, [])}  # any name case
    if len(values) > 1:
        raise InvalidRequest(
            f"the {SESSION_HEADER} header was sent more than once with different values; send it once"
        )
    value = values.pop() if values else ""
    if value in ("", NEW_SESSION):
        return None
    return _checked_session_id(value, f"the {SESSION_HEADER} header")


def _body_session_id(body: bytes) -> str | None:
    """The AWS-sample dialect's ``session_id``, when the body is such a JSON object and names one."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # not JSON: the worker explains what is wrong
        return None
    if not isinstance(payload, dict) or "type" not in payload:
        return None
    session_id = payload.get("session_id")
    if not isinstance(session_id, str):  # null opens; other types the worker refuses
        return None
    return _checked_session_id(session_id, "session_id")


def _checked_session_id(value: str, where: str) -> str:
    if not is_valid_session_id(value):
        raise InvalidRequest(
            f"{where} is not a valid session id: use the id returned when the session was opened "
            "(letters, digits and inner hyphens, at most 256 characters)"
        )
    return value


def _torchserve_message(payload: bytes) -> str:
    """The message of TorchServe's own error body, else the body's start."""
    try:
        message = json.loads(payload).get("message")
    except (ValueError, AttributeError, RecursionError):
        message = None
    return message if isinstance(message, str) else payload[:200].decode("utf-8", errors="replace")


def _error_code(payload: bytes) -> str | None:
    try:
        error = json.loads(payload)["error"]
        return error["code"] if isinstance(error, dict) else None
    except (ValueError, TypeError, KeyError, RecursionError):
        return None


# --- relaying -----------------------------------------------------------------------


def _upstream_headers(headers: CIMultiDictProxy, session_id: str | None) -> CIMultiDict:
    dropped = _NOT_FORWARDED | _connection_tokens(headers)
    forwarded = CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in dropped)
    forwarded.setdefault("Content-Type", "application/json")
    if session_id is not None:
        forwarded[SESSION_HEADER] = session_id
    return forwarded


def _downstream_headers(headers: CIMultiDictProxy) -> CIMultiDict:
    dropped = _NOT_RETURNED | _connection_tokens(headers)
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in dropped)


def _connection_tokens(headers: CIMultiDictProxy) -> set[str]:
    """Headers named in Connection are hop-by-hop too."""
    return {token.strip().lower() for value in headers.getall("Connection", []) for token in value.split(",")}


async def _relay_stream(
    request: web.Request, upstream: aiohttp.ClientResponse, target: _Target
) -> web.StreamResponse:
    """Send each chunk on as it arrives.

    A token stream (text/event-stream) broken off upstream between two events (a killed worker:
    TorchServe sends whole events) ends with TGI's error event and a clean end, so event-reading
    clients see why. Any other response broken off upstream is broken off downstream: no
    terminating chunk, so the client sees a truncated response, not a complete one.
    """
    reply = web.StreamResponse(
        status=upstream.status, reason=upstream.reason, headers=_downstream_headers(upstream.headers)
    )
    await reply.prepare(request)
    events = upstream.headers.get("Content-Type", "").startswith(EVENT_STREAM)
    tail = b"\n\n"  # the end of what was sent: an event boundary when it ends with a blank line
    try:
        async for data, _ in upstream.content.iter_chunks():
            await reply.write(data)
            if data:
                tail = (tail + data)[-2:]
    except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as exc:
        log.warning("response from backend %d broken off mid-stream: %s", target.backend, type(exc).__name__)
        if not (events and tail == b"\n\n"):
            if request.transport is not None:
                request.transport.close()
            return reply
        error = WorkerUnavailable(
            "the model worker stopped in the middle of this answer (killed, or silent past its time limit); the turn "
            "is not part of the session, and a session the worker held is gone: open a new session"
        )
        with contextlib.suppress(ConnectionError):
            await reply.write(_error_event(error))
    with contextlib.suppress(ConnectionError):  # the client may hang up after the last chunk
        await reply.write_eof()
    return reply


def _error_event(error: SessionsError) -> bytes:
    """TGI's error event, framed as handler/streaming.py frames it."""
    payload = {"error": error.message, "error_type": error.code}
    return ("data:" + json.dumps(payload, ensure_ascii=False, separators=(", ", ": ")) + "\n\n").encode()


async def _no_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp names itself and its version in ``Server``; nothing here says what software runs."""
    response.headers.popall("Server", None)


@web.middleware
async def _json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error the router answers itself is JSON with a stable code."""
    try:
        return await handler(request)
    except SessionsError as error:
        return _error_response(error)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        error = MethodNotAllowed(f"this path takes {allowed} only")
        return _error_response(error, {"Allow": allowed})
    except web.HTTPNotFound:
        return _error_response(RouteNotFound("no such path; use POST /invocations or GET /ping"))


def _error_response(error: SessionsError, headers: dict[str, str] | None = None) -> web.Response:
    reply = error_reply(error)
    return web.json_response(reply.body, status=reply.status, headers={**reply.headers, **(headers or {})})
