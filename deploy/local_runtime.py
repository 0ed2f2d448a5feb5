"""``llava-sessions local``: a development stand-in for the Amazon SageMaker runtime. Torch-free.

It starts N independent instances (each a ``ServingStack``: its own TorchServe and affinity
router, the whole container contract on a loopback port) and, in front of them, an HTTP server
speaking the sagemaker-runtime API, so unmodified boto3 works against it through ``endpoint_url=``::

    POST /endpoints/{EndpointName}/invocations                   InvokeEndpoint
    POST /endpoints/{EndpointName}/invocations-response-stream   InvokeEndpointWithResponseStream
    GET  /local/sessions                                         which instance holds which session (debug)

What it reproduces, and where that comes from:

- Request and response headers, status codes and error shapes: botocore's service model for
  sagemaker-runtime (2017-05-13). Errors carry ``x-amzn-ErrorType`` (how botocore's rest-json
  parser finds the code) and a JSON body with the shape's members, so ``ClientError`` has
  ``Error.Code == "ModelError"`` and ``OriginalStatusCode`` / ``OriginalMessage`` / ``LogStreamArn``.
- A container answer that is not 2xx becomes HTTP 424 ``ModelError`` whose message reads like
  SageMaker's ("Received client error (404) from primary with message ..."), with the log
  location pointing at the instance's TorchServe logs instead of CloudWatch.
- Sticky sessions (AWS "stateful sessions" guide): ``SessionId=NEW_SESSION`` goes to one instance
  (here: the one with the fewest open sessions); the container's ``X-Amzn-SageMaker-Session-Id:
  <id>; Expires=...`` answer binds the id to that instance until its Expires time and reaches the
  client as ``X-Amzn-SageMaker-New-Session-Id`` (boto3 ``NewSessionId``); the container's
  ``X-Amzn-SageMaker-Closed-Session-Id`` unbinds it and reaches the client (``ClosedSessionId``).
  ``NEW_SESSION`` is forwarded to the container literally, as the header value.
- No SessionId: stateless, the instance with the fewest outstanding requests.
- The streaming API's ``SessionId`` shape only admits existing ids (``wire.SESSION_ID_PATTERN``),
  so ``NEW_SESSION`` fails that validation with a 400
  ``ValidationError``, as the service's validation layer words it. Its response carries no session
  fields. Chunks are relayed as ``PayloadPart`` events as they arrive; a container error before the
  stream starts is the same 424 ``ModelError``; a stream that breaks off ends with a
  ``ModelStreamError`` event (``ErrorCode`` ``StreamBroken`` or ``ModelInvocationTimeExceeded``),
  which botocore raises while the caller iterates.
- Request body over 6 MB: HTTP 413 "HTTP content length exceeded N bytes." with no error type, as
  SageMaker's front door answers (botocore's code is then "413"). An endpoint name other than
  ``--endpoint-name``: 400 ``ValidationError`` "Endpoint X of account ... not found.".

Choices where SageMaker's behaviour is undocumented:

- A session whose instance is gone (its process died, ``kill_instance``) is unbound and its request
  goes to another live instance, which answers ``SESSION_NOT_FOUND`` (404, so 424 ``ModelError`` to
  the client). That is what lets a client reopen and replay. An id that was never bound (or has
  expired) is forwarded the same way rather than refused here.
- An instance is out of service when a connection to it is refused (the request then goes to
  another live instance, nothing having been sent) or after three failed health pings in a row; a
  later good ping brings it back, with its bindings, unless ``kill_instance`` retired it.
- A container answer that opens a session binds it even when the request did not say NEW_SESSION
  (e.g. a body-only open), so later requests naming it are routed right.

Not reproduced: authentication (SigV4 signatures are not checked), IAM, CloudWatch, production
variants other than ``AllTraffic``, target models or containers, explanations, async inference.
"""

from __future__ import annotations

import asyncio
import contextlib
import concurrent.futures
import logging
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from llava_sessions.connection_guard import ConnectionLimits
from llava_sessions.deploy import eventstream
from llava_sessions.http_proxy_server import HttpProxyServer
from llava_sessions.session_routes import SessionRoutes
from llava_sessions.wire import (
    CLOSED_SESSION_HEADER,
    NEW_SESSION,
    NEW_SESSION_HEADER,
    SESSION_HEADER,
    SESSION_ID_MAX_LEN,
    SESSION_ID_PATTERN,
    format_session_header,
    is_valid_session_id,
    parse_session_header,
)

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8080
# Two instances show sticky routing; each worker then gets its share of the cores (ServingStack),
# so a one-core host runs one.
DEFAULT_INSTANCES = min(2, len(os.sched_getaffinity(0)))
VARIANT = "AllTraffic"
ACCOUNT = "000000000000"  # there is no account; ARNs and messages need one
DEFAULT_REGION = "us-east-1"
SERVER = "llava-sessions-local (development stand-in for the Amazon SageMaker runtime; not AWS)"

# The payload limit of InvokeEndpoint is 6 MB; taken as 6 MiB here.
MAX_BODY_BYTES = 6 * 1024 * 1024
# SageMaker gives a container 60 s to answer a non-streamed invocation.
INVOCATION_TIMEOUT_S = 60.0
# A streamed answer may run long; this is the most time between two chunks.
STREAM_IDLE_TIMEOUT_S = 300.0
CONNECT_TIMEOUT_S = 5.0
HEALTH_INTERVAL_S = 5.0
HEALTH_TIMEOUT_S = 5.0
HEALTH_FAILURES = 3  # consecutive failed pings before an instance goes out of service

VARIANT_HEADER = "x-Amzn-Invoked-Production-Variant"
CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
STREAM_ACCEPT_HEADER = "X-Amzn-SageMaker-Accept"
STREAM_CONTENT_TYPE_HEADER = "X-Amzn-SageMaker-Content-Type"
ERROR_TYPE_HEADER = "x-amzn-ErrorType"
REQUEST_ID_HEADER = "x-amzn-RequestId"

# What reaches the container: SageMaker strips every request header the API does not define.
_FORWARDED = (
    "Content-Type",
    "Accept",
    CUSTOM_ATTRIBUTES_HEADER,
    "X-Amzn-SageMaker-Target-Model",
    "X-Amzn-SageMaker-Inference-Id",
)
# SageMaker's endpoint-name rule (the API's pattern; deploy/endpoint.py applies its own, shorter limit).
_ENDPOINT_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
# The SessionId shapes of botocore's model, as AWS words them in a ValidationError.
_SESSION_ID_SHAPE = SESSION_ID_PATTERN.pattern
_SESSION_ID_OR_NEW_SHAPE = f"^({NEW_SESSION})$|{SESSION_ID_PATTERN.pattern}"
_MAX_ENDPOINT_NAME = 63
_CREDENTIAL_REGION = re.compile(r"Credential=[^/,\s]+/\d{8}/([a-z0-9-]+)/")


class ApiError(Exception):
    """An error answer of the runtime API: status, ``x-amzn-ErrorType`` (None: no type) and body."""

    def __init__(self, status: int, code: str | None, message: str, **members: object):
        super().__init__(message)
        self.status, self.code, self.message, self.members = status, code, message, members

    def response(self) -> web.Response:
        headers = {ERROR_TYPE_HEADER: self.code} if self.code else {}
        body = {"Message" if self.code else "message": self.message, **self.members}
        return web.json_response(body, status=self.status, headers=headers)


def validation_error(message: str) -> ApiError:
    return ApiError(400, "ValidationError", message)


def _constraint_error(value: str, field: str, constraint: str) -> ApiError:
    """AWS's wording for a parameter that fails its shape's constraint."""
    return validation_error(
        f"1 validation error detected: Value '{value}' at '{field}' failed to satisfy constraint: {constraint}"
    )


@dataclass
class _Instance:
    index: int
    url: str  # base URL of the container contract (POST /invocations, GET /ping)
    log_dir: str | None
    in_service: bool = True
    retired: bool = False  # killed on purpose: never back in service
    outstanding: int = 0
    failed_pings: int = 0


@dataclass(frozen=True)
class _Session:
    """What the request says about sessions: none (stateless), NEW_SESSION, or an existing id."""

    value: str | None

    @property
    def is_new(self) -> bool:
        return self.value == NEW_SESSION

    @property
    def existing(self) -> str | None:
        return None if self.value in (None, NEW_SESSION) else self.value


class SageMakerRuntimeServer(HttpProxyServer):
    """The sagemaker-runtime API in front of instances that each speak the container contract.

    ``start()`` serves from a background thread and returns once it listens (``port`` 0 picks a
    free port); ``stop()`` stops it. Thread-safe to inspect (``bindings``, ``instance_status``)
    and to ``retire`` instances from any thread.
    """

    name = "sagemaker-runtime stand-in"

    def __init__(
        self,
        instance_urls: Sequence[str],
        *,
        host: str = LOOPBACK,
        port: int = DEFAULT_PORT,
        endpoint_name: str | None = None,
        log_dirs: Sequence[str | Path | None] | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        invocation_timeout_s: float = INVOCATION_TIMEOUT_S,
        stream_idle_timeout_s: float = STREAM_IDLE_TIMEOUT_S,
        health_interval_s: float = HEALTH_INTERVAL_S,
        clock: Callable[[], float] = time.time,
        limits: ConnectionLimits | None = None,
    ):
        if not instance_urls:
            raise ValueError("instance_urls must name at least one instance")
        if endpoint_name is not None and not is_valid_endpoint_name(endpoint_name):
            raise ValueError(f"{endpoint_name!r} is not a valid endpoint name ({_ENDPOINT_NAME.pattern}, at most 63)")
        log_dirs = list(log_dirs) if log_dirs is not None else [None] * len(instance_urls)
        if len(log_dirs) != len(instance_urls):
            raise ValueError("log_dirs must have one entry per instance")
        self.instances = [
            _Instance(i, url.rstrip("/"), None if d is None else str(d))
            for i, (url, d) in enumerate(zip(instance_urls, log_dirs))
        ]
        super().__init__(host, port, limits=limits)
        self.endpoint_name = endpoint_name
        self.max_body_bytes = max_body_bytes
        self.invocation_timeout_s = invocation_timeout_s
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self.health_interval_s = health_interval_s
        self.routes = SessionRoutes(len(self.instances), clock=clock)
        self._known: set[str] = set()  # ids ever bound; SessionRoutes says which still are
        self._lock = threading.Lock()
        self._next = 0  # round-robin tie-break
        self._health: asyncio.Task | None = None

    async def _started(self) -> None:
        if self.health_interval_s > 0:
            self._health = asyncio.create_task(self._health_loop())
        log.info("sagemaker-runtime stand-in on %s in front of %d instances", self.url, len(self.instances))

    async def _stopped(self) -> None:
        if self._health is not None:
            self._health.cancel()
            self._health = None

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[_api_errors], client_max_size=self.max_body_bytes + 1024)
        app.on_response_prepare.append(_stamp)
        app.router.add_post("/endpoints/{name}/invocations", self._invoke)
        app.router.add_post("/endpoints/{name}/invocations-response-stream", self._invoke_stream)
        app.router.add_get("/local/sessions", self._sessions)
        app.router.add_get("/", self._about)
        return app

    # --- instances and bindings ---------------------------------------------------

    def retire(self, index: int) -> None:
        """Take an instance out of service for good (it was killed)."""
        instance = self.instances[index]
        instance.retired = True
        self._out_of_service(instance, "retired")

    def bindings(self) -> dict[str, int]:
        """Live session bindings: id -> instance index (expired and closed ones are gone)."""
        with self._lock:
            known = list(self._known)
        bound = {}
        for session_id in known:
            index = self.routes.lookup(session_id)
            if index is None:
                with self._lock:
                    self._known.discard(session_id)
            else:
                bound[session_id] = index
        return bound

    def instance_status(self) -> list[dict]:
        bound = self.bindings()
        return [
            {
                "index": instance.index,
                "url": instance.url,
                "in_service": instance.in_service,
                "retired": instance.retired,
                "outstanding_requests": instance.outstanding,
                "sessions": sorted(sid for sid, index in bound.items() if index == instance.index),
            }
            for instance in self.instances
        ]

    def _live(self) -> list[_Instance]:
        live = [instance for instance in self.instances if instance.in_service]
        if not live:
            raise ApiError(
                503, "ServiceUnavailable",
                "No instance of this endpoint is in service (the local stand-in's instances stopped or fail "
                "their health checks); restart `llava-sessions local`.",
            )
        return live

    def _least(self, candidates: list[_Instance], key: Callable[[_Instance], tuple]) -> _Instance:
        n = len(self.instances)
        with self._lock:
            ordered = sorted(candidates, key=lambda inst: ((inst.index - self._next) % n))
            chosen = min(ordered, key=key)  # first of the least, round-robin among ties
            self._next = (chosen.index + 1) % n
        return chosen

    def _choose(self, session: _Session) -> _Instance:
        """Where this request goes (see the module docstring)."""
        existing = session.existing
        if existing is not None:
            index = self.routes.lookup(existing)
            if index is not None:
                if self.instances[index].in_service:
                    return self.instances[index]
                self.routes.unbind(existing)
                log.info("session %s: instance %d is gone; unbound", existing[:12], index)
        live = self._live()
        if session.is_new:
            counts = self.routes.counts()
            return self._least(live, lambda inst: (counts[inst.index], inst.outstanding))
        return self._least(live, lambda inst: (inst.outstanding,))

    def _out_of_service(self, instance: _Instance, reason: str) -> None:
        if instance.in_service:
            log.warning("instance %d out of service (%s)", instance.index, reason)
        instance.in_service = False

    def _record(self, instance: _Instance, upstream: aiohttp.ClientResponse) -> str | None:
        """Bind/unbind from the container's session headers; the client's NewSessionId, if any."""
        new_session = None
        opened = upstream.headers.get(SESSION_HEADER) or upstream.headers.get(NEW_SESSION_HEADER)
        if opened is not None and 200 <= upstream.status < 300:
            parsed = parse_session_header(opened)
            if parsed is None:
                log.warning("instance %d sent a malformed session header %r; not bound", instance.index, opened)
            else:
                session_id, expires_at = parsed
                self.routes.bind(session_id, instance.index, expires_at)
                with self._lock:
                    self._known.add(session_id)
                    prune = len(self._known) > 2 * len(self.routes) + 256
                if prune:  # forget expired ids now and then
                    self.bindings()
                new_session = format_session_header(session_id, expires_at)
                log.debug("session %s bound to instance %d", session_id[:12], instance.index)
        closed = upstream.headers.get(CLOSED_SESSION_HEADER)
        if closed is not None:
            self.routes.unbind(closed.strip())
            with self._lock:
                self._known.discard(closed.strip())
        return new_session

    async def _health_loop(self) -> None:
        timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
        while True:
            await asyncio.sleep(self.health_interval_s)
            for instance in self.instances:
                if instance.retired:
                    continue
                try:
                    async with self._client.get(f"{instance.url}/ping", timeout=timeout) as reply:
                        healthy = reply.status == 200
                except (TimeoutError, aiohttp.ClientError, OSError):
                    healthy = False
                if healthy:
                    instance.failed_pings = 0
                    if not instance.in_service:
                        log.warning("instance %d back in service", instance.index)
                    instance.in_service = True
                else:
                    instance.failed_pings += 1
                    if instance.failed_pings >= HEALTH_FAILURES:
                        self._out_of_service(instance, f"{instance.failed_pings} failed health checks")

    # --- handlers -------------------------------------------------------------

    async def _about(self, request: web.Request) -> web.Response:
        return web.Response(
            text=f"{SERVER}\nInvokeEndpoint: POST /endpoints/NAME/invocations\n"
            "InvokeEndpointWithResponseStream: POST /endpoints/NAME/invocations-response-stream\n"
            "Bindings: GET /local/sessions\n"
        )

    async def _sessions(self, request: web.Request) -> web.Response:
        bound = self.bindings()
        return web.json_response(
            {"endpoint_name": self.endpoint_name, "sessions": bound, "instances": self.instance_status()}
        )

    async def _invoke(self, request: web.Request) -> web.Response:
        name = self._endpoint(request)
        session = _session(request.headers, streaming=False)
        body = await self._read_body(request)
        headers = _forward_headers(request.headers, request.headers.get("Accept"), session)
        timeout = aiohttp.ClientTimeout(total=self.invocation_timeout_s, sock_connect=CONNECT_TIMEOUT_S)
        instance, upstream = await self._send(session, body, headers, timeout)
        try:
            async with upstream:
                try:
                    data = await upstream.read()
                except TimeoutError:
                    raise self._timed_out(name, request) from None
                except aiohttp.ClientError as exc:
                    raise self._no_answer(instance, name, request, exc) from None
                new_session = self._record(instance, upstream)
                if not 200 <= upstream.status < 300:
                    raise self._model_error(instance, name, request, upstream.status, data)
                reply = CIMultiDict({"Content-Type": upstream.headers.get("Content-Type", "application/octet-stream"),
                                     VARIANT_HEADER: VARIANT})
                _copy(upstream.headers, reply, CUSTOM_ATTRIBUTES_HEADER)
                if new_session is not None:
                    reply[NEW_SESSION_HEADER] = new_session
                _copy(upstream.headers, reply, CLOSED_SESSION_HEADER)
                return web.Response(status=200, body=data, headers=reply)
        finally:
            instance.outstanding -= 1

    async def _invoke_stream(self, request: web.Request) -> web.StreamResponse:
        name = self._endpoint(request)
        session = _session(request.headers, streaming=True)
        body = await self._read_body(request)
        headers = _forward_headers(request.headers, request.headers.get(STREAM_ACCEPT_HEADER), session)
        timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S, sock_read=self.stream_idle_timeout_s)
        instance, upstream = await self._send(session, body, headers, timeout)
        try:
            async with upstream:
                self._record(instance, upstream)  # no session fields go back on this API
                if not 200 <= upstream.status < 300:
                    try:
                        data = await upstream.read()
                    except TimeoutError:
                        raise self._timed_out(name, request) from None
                    except aiohttp.ClientError as exc:
                        raise self._no_answer(instance, name, request, exc) from None
                    raise self._model_error(instance, name, request, upstream.status, data)
                return await self._relay_events(request, instance, upstream)
        finally:
            instance.outstanding -= 1

    async def _relay_events(
        self, request: web.Request, instance: _Instance, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        headers = CIMultiDict({"Content-Type": eventstream.CONTENT_TYPE, VARIANT_HEADER: VARIANT})
        if "Content-Type" in upstream.headers:
            headers[STREAM_CONTENT_TYPE_HEADER] = upstream.headers["Content-Type"]
        _copy(upstream.headers, headers, CUSTOM_ATTRIBUTES_HEADER)
        reply = web.StreamResponse(status=200, headers=headers)
        await reply.prepare(request)
        failure = None
        while True:
            try:
                data, end_of_chunk = await upstream.content.readchunk()
            except TimeoutError:
                failure = eventstream.model_stream_error(
                    f"The model did not send the next part of its response within "
                    f"{self.stream_idle_timeout_s:.0f} seconds.",
                    eventstream.MODEL_INVOCATION_TIME_EXCEEDED,
                )
                break
            except (aiohttp.ClientError, ConnectionError) as exc:
                log.warning("stream from instance %d broken off: %s", instance.index, type(exc).__name__)
                failure = eventstream.model_stream_error(
                    f"The connection to the model on instance {instance.index} was closed before its response "
                    f"was complete ({type(exc).__name__}).",
                    eventstream.STREAM_BROKEN,
                )
                break
            if not data:
                if not end_of_chunk:  # (b"", False): the response is complete
                    break
                continue  # an empty HTTP chunk boundary
            if not await self._send_parts(reply, eventstream.payload_parts(data)):
                return reply
        await self._send_parts(reply, [failure] if failure is not None else [])
        with contextlib.suppress(ConnectionError):  # the client may hang up after the last event
            await reply.write_eof()
        return reply

    @staticmethod
    async def _send_parts(reply: web.StreamResponse, parts) -> bool:
        """False when the client has gone (it stopped reading): the rest of the stream is dropped."""
        try:
            for part in parts:
                await reply.write(part)
        except ConnectionError:
            log.debug("client left the stream early")
            return False
        return True

    # --- helpers ----------------------------------------------------------------

    def _endpoint(self, request: web.Request) -> str:
        name = request.match_info["name"]
        if not is_valid_endpoint_name(name):
            raise _constraint_error(
                name, "endpointName",
                f"Member must satisfy regular expression pattern: {_ENDPOINT_NAME.pattern}"
                if len(name) <= _MAX_ENDPOINT_NAME else
                f"Member must have length less than or equal to {_MAX_ENDPOINT_NAME}",
            )
        if self.endpoint_name is not None and name != self.endpoint_name:
            raise validation_error(f"Endpoint {name} of account {ACCOUNT} not found.")
        return name

    async def _read_body(self, request: web.Request) -> bytes:
        if (request.content_length or 0) > self.max_body_bytes:
            raise self._too_large()
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise self._too_large()
        return bytes(body)

    def _too_large(self) -> ApiError:
        return ApiError(413, None, f"HTTP content length exceeded {self.max_body_bytes} bytes.")

    async def _send(
        self, session: _Session, body: bytes, headers: CIMultiDict, timeout: aiohttp.ClientTimeout
    ) -> tuple[_Instance, aiohttp.ClientResponse]:
        """POST to the chosen instance; a refused connection takes it out of service and tries another.

        The returned instance's ``outstanding`` count includes this request: the caller decrements it.
        """
        while True:
            instance = self._choose(session)
            instance.outstanding += 1
            try:
                upstream = await self._client.post(
                    f"{instance.url}/invocations", data=body, headers=headers, timeout=timeout
                )
                return instance, upstream
            except aiohttp.ClientConnectorError as exc:  # nothing was sent: safe to go elsewhere
                instance.outstanding -= 1
                self._out_of_service(instance, f"connection failed: {exc.os_error or exc}")
            except TimeoutError:
                instance.outstanding -= 1
                raise self._timed_out(None, None) from None
            except aiohttp.ClientError as exc:
                instance.outstanding -= 1
                raise self._no_answer(instance, None, None, exc) from None

    def _model_error(self, instance: _Instance, name: str, request: web.Request, status: int, data: bytes) -> ApiError:
        text = data.decode("utf-8", errors="replace")
        kind = "client" if status < 500 else "server"
        region = _region(request)
        where = (f"the logs of instance {instance.index} in {instance.log_dir}" if instance.log_dir
                 else f"the logs of instance {instance.index}")
        return ApiError(
            424, "ModelError",
            f'Received {kind} error ({status}) from primary with message "{text}". '
            f"See {where} (the local stand-in for /aws/sagemaker/Endpoints/{name}) in account {ACCOUNT} "
            "for more information.",
            ErrorCode=f"{kind.upper()}_ERROR_FROM_MODEL",
            LogStreamArn=f"arn:aws:logs:{region}:{ACCOUNT}:log-group:/aws/sagemaker/Endpoints/{name}",
            OriginalMessage=text,
            OriginalStatusCode=status,
        )

    def _timed_out(self, name: str | None, request: web.Request | None) -> ApiError:
        return ApiError(
            424, "ModelError",
            "Your invocation timed out while waiting for a response from container primary "
            f"(the local limit is {self.invocation_timeout_s:.0f} s). Review the instance logs, resolve the "
            "issue, and try again.",
        )

    def _no_answer(self, instance: _Instance, name: str | None, request: web.Request | None,
                   exc: BaseException) -> ApiError:
        return ApiError(
            424, "ModelError",
            f"The container primary on instance {instance.index} closed the connection without a complete "
            f"response ({type(exc).__name__}).",
        )


def boto3_snippet(url: str) -> str:
    """Python that makes a sagemaker-runtime client for this stand-in. It checks no signature, but
    botocore signs every call and fails without credentials, so the snippet brings its own dummy ones."""
    return (f'boto3.client("sagemaker-runtime", endpoint_url="{url}", region_name="us-east-1", '
            f'aws_access_key_id="local", aws_secret_access_key="local")')


class LocalRuntime:
    """N instances of the serving stack behind a sagemaker-runtime stand-in; a context manager.

    ``start()`` starts every instance (in parallel) and returns once all are READY and the runtime
    listens at ``url``. ``kill_instance(i)`` kills one instance's processes as a crash would.
    """

    def __init__(
        self,
        archive: str | Path,
        run_dir: str | Path,
        *,
        instances: int = DEFAULT_INSTANCES,
        workers: int = 1,
        host: str = LOOPBACK,
        port: int = DEFAULT_PORT,
        endpoint_name: str | None = None,
        **server_options,
    ):
        if instances < 1 or workers < 1:
            raise ValueError("instances and workers must be at least 1")
        self.archive = Path(archive)
        self.run_dir = Path(run_dir)
        self.n_instances, self.workers = instances, workers
        self.host, self.port = host, port
        self.endpoint_name = endpoint_name
        self.server_options = server_options
        self.stacks: list = []
        self.server: SageMakerRuntimeServer | None = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def instance_urls(self) -> list[str]:
        return [stack.url for stack in self.stacks]

    def start(self, ready_timeout: float = 900.0) -> LocalRuntime:
        from llava_sessions.serving_stack import ServingStack

        self.stacks = [
            ServingStack(self.archive, self.run_dir / f"instance-{i}", workers=self.workers, port=0,
                         host_workers=self.n_instances * self.workers)
            for i in range(self.n_instances)
        ]
        pool = concurrent.futures.ThreadPoolExecutor(self.n_instances, thread_name_prefix="instance-start")
        try:
            futures = [pool.submit(stack.start, ready_timeout) for stack in self.stacks]
            for future in futures:
                future.result()
            self.server = SageMakerRuntimeServer(
                [stack.url for stack in self.stacks],
                host=self.host,
                port=self.port,
                endpoint_name=self.endpoint_name,
                log_dirs=[stack.log_dir for stack in self.stacks],
                **self.server_options,
            ).start()
        except BaseException:
            # Stop what runs, let the other starts finish (a stopped one fails fast), then stop
            # again what started meanwhile.
            self.stop()
            pool.shutdown(wait=True)
            self.stop()
            raise
        pool.shutdown(wait=True)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        stacks = [stack for stack in self.stacks]
        if stacks:
            with concurrent.futures.ThreadPoolExecutor(len(stacks), thread_name_prefix="instance-stop") as pool:
                for future in [pool.submit(_stop_quietly, stack) for stack in stacks]:
                    future.result()

    def kill_instance(self, index: int) -> None:
        """SIGKILL instance ``index``'s TorchServe (launcher, JVM, workers), stop its router, retire it.

        Its sessions are lost, as when a SageMaker instance dies; their next requests go to another
        instance, which answers SESSION_NOT_FOUND.
        """
        import os

        stack = self.stacks[index]
        pgid = stack.torchserve.pid
        if pgid is not None:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.server is not None:
            self.server.retire(index)
        _stop_quietly(stack)

    def sessions(self) -> dict[str, int]:
        """Session id -> the instance it is bound to."""
        return self.server.bindings() if self.server is not None else {}

    def alive(self) -> list[bool]:
        """Whether each instance's TorchServe is still running."""
        alive = []
        for stack in self.stacks:
            proc = getattr(stack.torchserve, "_proc", None)
            alive.append(proc is not None and proc.poll() is None)
        return alive

    def __enter__(self) -> LocalRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop_quietly(stack) -> None:
    try:
        stack.stop()
    except Exception:  # a stop that failed must not keep the others running
        log.exception("stopping an instance failed")


# --- request/response helpers ------------------------------------------------------


def is_valid_endpoint_name(name: str) -> bool:
    return len(name) <= _MAX_ENDPOINT_NAME and _ENDPOINT_NAME.fullmatch(name) is not None


def _session(headers: CIMultiDictProxy, *, streaming: bool) -> _Session:
    values = headers.getall(SESSION_HEADER, [])
    if not values or values[0] == "":
        return _Session(None)
    value = values[0]
    if len(value) > SESSION_ID_MAX_LEN:
        raise _constraint_error(value, "sessionId", f"Member must have length less than or equal to {SESSION_ID_MAX_LEN}")
    if streaming and not is_valid_session_id(value):
        # The streaming API's SessionId shape (SessionIdHeader) has no NEW_SESSION: a session
        # can only be opened through InvokeEndpoint.
        raise _constraint_error(value, "sessionId", f"Member must satisfy regular expression pattern: {_SESSION_ID_SHAPE}")
    if not streaming and value != NEW_SESSION and not is_valid_session_id(value):
        raise _constraint_error(value, "sessionId",
                                f"Member must satisfy regular expression pattern: {_SESSION_ID_OR_NEW_SHAPE}")
    return _Session(value)


def _forward_headers(headers: CIMultiDictProxy, accept: str | None, session: _Session) -> CIMultiDict:
    forwarded = CIMultiDict()
    for name in _FORWARDED:
        if name == "Accept":
            if accept:
                forwarded["Accept"] = accept
        elif name in headers:
            forwarded[name] = headers[name]
    if session.value is not None:
        forwarded[SESSION_HEADER] = session.value
    return forwarded


def _copy(source, target: CIMultiDict, name: str) -> None:
    if name in source:
        target[name] = source[name]


def _region(request: web.Request | None) -> str:
    """The region the client signed for (SigV4 credential scope), else us-east-1."""
    if request is not None:
        match = _CREDENTIAL_REGION.search(request.headers.get("Authorization", ""))
        if match:
            return match.group(1)
    return DEFAULT_REGION


async def _stamp(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER
    response.headers.setdefault(REQUEST_ID_HEADER, str(uuid.uuid4()))


@web.middleware
async def _api_errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except web.HTTPMethodNotAllowed:
        return ApiError(405, "UnknownOperationException", "this path takes POST only").response()
    except web.HTTPNotFound:
        return ApiError(
            404, "UnknownOperationException",
            "Unknown operation: the local runtime serves POST /endpoints/NAME/invocations and "
            "/endpoints/NAME/invocations-response-stream",
        ).response()


# --- the command ---------------------------------------------------------------------


