"""Connection-level limits for our aiohttp servers, and JSON answers to aiohttp's own errors. Torch-free.

aiohttp on its own keeps a silent connection open for an hour, lets partial headers trickle in
for as long (slowloris), accepts any number of connections, and answers a malformed request with
text/plain that echoes the request's bytes (which may hold a session id). ``GuardedAppRunner``
runs an application like ``web.AppRunner`` but under ``ConnectionLimits``, and answers every
error it raises itself in the product's JSON shape, ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, fields
from http import HTTPStatus
from typing import Any

from aiohttp import http_exceptions, web, web_protocol

from llava_sessions.errors import (
    BadHttpRequest,
    ConfigError,
    InternalError,
    RequestTimeout,
    SessionsError,
    TooManyConnections,
)
from llava_sessions.handler.replies import error_reply

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    # A connection with no request in progress this long is closed: keep-alive idle, and a new
    # connection that sends nothing.
    idle_timeout_s: float = 75.0
    # From the first byte of a request (arriving while the connection is idle) to its complete
    # headers; past it the client gets a 408 and the connection closes. The body is not timed here.
    header_timeout_s: float = 10.0
    # Open client connections; one more gets a 503 at once and is closed.
    max_connections: int = 1000

    def __post_init__(self) -> None:
        for name in ("idle_timeout_s", "header_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                default = next(f.default for f in fields(self) if f.name == name)
                raise ConfigError(
                    f"ConnectionLimits.{name} must be a finite number of seconds > 0, got {value!r}; "
                    f"use e.g. {default}"
                )
        count = self.max_connections
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise ConfigError(
                f"ConnectionLimits.max_connections must be a whole number > 0, got {count!r}; use e.g. 1000"
            )


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections obey ``limits``; takes the same keyword arguments, except
    ``keepalive_timeout`` (that is ``limits.idle_timeout_s``)."""

    def __init__(self, app: web.Application, *, limits: ConnectionLimits, **kwargs: Any):
        if "keepalive_timeout" in kwargs:
            raise TypeError("GuardedAppRunner takes the keep-alive timeout from limits.idle_timeout_s")
        super().__init__(app, keepalive_timeout=limits.idle_timeout_s, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        # AppRunner starts the application and builds aiohttp's Server from the runner's and the
        # application's handler arguments; we build ours from the same parts.
        plain = await super()._make_server()
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            limits=self.limits,
            **plain._kwargs,
        )


class GuardedServer(web.Server):
    """aiohttp's low-level server, counting its connections and making ``GuardedRequestHandler``s."""

    def __init__(self, handler: Any, *, limits: ConnectionLimits, **kwargs: Any):
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.open_connections = 0  # admitted and not yet lost
        self._refusing = False  # at the cap: logged once per spell of refusals
        self.request_factory = self._marking_dispatch(self.request_factory)

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)

    def admits_another(self) -> bool:
        if self.open_connections < self.limits.max_connections:
            self._refusing = False
            return True
        if not self._refusing:
            self._refusing = True
            log.warning(
                "%d client connections open, the most allowed: refusing new ones with 503 until one closes",
                self.open_connections,
            )
        return False

    def connection_made(self, handler: web_protocol.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open_connections += 1

    def connection_lost(self, handler: web_protocol.RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.open_connections -= 1

    @staticmethod
    def _marking_dispatch(request_factory):
        # aiohttp calls the request factory once a request's headers are complete, just before
        # it runs the handler: from here the request is in progress, the app's concern.
        def make_request(message, payload, protocol, writer, task):
            protocol.request_dispatched(payload)
            return request_factory(message, payload, protocol, writer, task)

        return make_request


class GuardedRequestHandler(web_protocol.RequestHandler):
    """One client connection: refused at the cap, closed when its headers are late, and answering
    aiohttp's own errors in JSON."""

    __slots__ = ("_admitted", "_header_timer", "_request_body", "_response_pending", "_server")

    def __init__(self, manager: GuardedServer, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._server = manager
        self._admitted = False
        self._response_pending = False  # between complete headers and the response's end
        self._request_body: Any = None  # the last dispatched request's payload (a StreamReader)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._server.admits_another():
            # Never registered with aiohttp: no handler task, nothing to shut down.
            transport.write(_raw_error_response(
                TooManyConnections("the server holds its maximum number of connections; retry in a second"),
                {"Retry-After": "1"},
            ))
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        if self._admitted:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._header_timer is None and self.transport is not None and self._awaiting_headers():
            self._header_timer = self._loop.call_later(self._server.limits.header_timeout_s, self._headers_late)
            # keep_alive(True) cancels aiohttp's idle timer (the connection is idle, so its keep-alive
            # flag is already True): the header timer owns the deadline until the request is dispatched,
            # and aiohttp re-arms the idle timer after the response. Otherwise a request that starts
            # just before the idle deadline would be cut off mid-headers without an answer.
            self.keep_alive(True)
        super().data_received(data)

    def request_dispatched(self, payload: Any) -> None:
        self._cancel_header_timer()
        self._response_pending = True
        self._request_body = payload

    def log_access(self, request: web.BaseRequest, response: web.StreamResponse, time: float | None) -> None:
        # aiohttp calls this once a response is finished (written to its end, or the client left).
        self._response_pending = False
        super().log_access(request, response, time)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (400) or whose handler failed (500, or
        504 for a TimeoutError): JSON, never echoing request bytes. The connection closes after it."""
        if status < 500:
            # Routine on a public port (scanners, TLS on a plain port): one line, not a traceback.
            log.debug("malformed HTTP request from %s: %s", request.remote, type(exc).__name__)
            error: SessionsError = BadHttpRequest(_parser_error_message(exc))
        else:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            error = InternalError("the server failed to handle the request; retry, and report it if it persists")
        if request.writer.output_size > 0:
            # Part of a response is out: another one cannot follow. aiohttp closes the connection.
            raise ConnectionError("the response had started; cannot send an error response after it")
        reply = error_reply(error)
        response = _Unnamed(
            status=reply.status, text=reply.render(), content_type=reply.content_type, headers=reply.headers
        )
        response.force_close()
        return response

    def _awaiting_headers(self) -> bool:
        """Bytes arriving now start a request's headers: no request in progress, and the last
        one's body (the handler may have answered before reading it) has all arrived."""
        body = self._request_body
        return not self._response_pending and (body is None or body.is_eof())

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport is None or not self._awaiting_headers():
            return
        log.debug("closed a connection from %s: request headers took over %ss", self.peername,
                  self._server.limits.header_timeout_s)
        self.transport.write(_raw_error_response(RequestTimeout(
            f"the request's headers did not arrive within {self._server.limits.header_timeout_s} s; "
            "send the request line and headers at once"
        )))
        self.force_close()  # as aiohttp closes an idle connection: the transport flushes, then closes

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None


_PARSER_PROBLEMS: tuple[tuple[type[BaseException], str], ...] = (
    # Most specific first: BadHttpMethod is a BadStatusLine, every one of them a BadHttpMessage.
    (http_exceptions.BadHttpMethod, "bad method in the request line"),
    (http_exceptions.BadStatusLine, "bad request line"),
    (http_exceptions.InvalidURLError, "bad request target"),
    (http_exceptions.LineTooLong, "request line or a header too long"),
    (http_exceptions.InvalidHeader, "bad header"),
    (http_exceptions.PayloadEncodingError, "bad body framing"),
)


def _parser_error_message(exc: BaseException | None) -> str:
    # aiohttp's own message quotes the offending bytes; ours names only the kind of problem.
    problem = next((text for kind, text in _PARSER_PROBLEMS if isinstance(exc, kind)), "bad header or framing")
    return f"malformed HTTP request ({problem}); send a valid HTTP/1.1 request"


def _raw_error_response(error: SessionsError, extra_headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, for the moments aiohttp has no
    request to answer through (a refused connection, headers that never completed)."""
    reply = error_reply(error)
    body = reply.render().encode()
    headers = {
        "Content-Type": f"{reply.content_type}; charset=utf-8",
        "Content-Length": str(len(body)),
        "Connection": "close",
        **reply.headers,
        **(extra_headers or {}),
    }
    head = f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


class _Unnamed(web.Response):
    """A response that names no server software (the router's own responses drop ``Server`` in an
    ``on_response_prepare`` hook, which aiohttp does not run for a request it could not parse)."""

    async def _write_headers(self) -> None:  # aiohttp adds Server just before this
        self.headers.popall("Server", None)
        await super()._write_headers()
