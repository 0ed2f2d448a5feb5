"""Session-affinity router: an HTTP front on the container's port that keeps each session on its worker.

Each device runs its own TorchServe model (``llava-0``, ``llava-1``, ...) and a session lives in
one worker's memory, so every request of a session must reach the backend that opened it. Opens go
to the least-loaded backend; the backend's response headers say which session it opened
(``X-Amzn-SageMaker-Session-Id: <id>; Expires=...``) or closed; ``SessionRoutes`` remembers that.
Responses stream through chunk by chunk, so token streaming keeps its latency.

A worker runs one request at a time (TorchServe's batchSize 1). One that finds its worker idle
goes at once; those that arrive while it is busy join the running bundle of turns when they can
(a follow-up turn whose session is not in it: ``router_hop.JoinSender``), else go together as
the next bundle (``handler/bundle.py``). So a follow-up always goes as a bundle, of one if need
be, that later follow-ups can join.

The router is the trust boundary: a client cannot send what only the router sends its workers
(``handler/router_hop.py``: bundles, the internal headers). A client that goes away while its
turn waits or runs is dropped from the queue, or its worker is told to stop the turn, which then
leaves its session as before it. On ``drain`` (SIGTERM) it answers new requests 503, lets what is
in flight finish for a grace period, then ends each remaining answer cleanly.

Torch-free: the container's front process imports nothing heavy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from llava_sessions import wire
from llava_sessions.config import RouterConfig
from llava_sessions.errors import (
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    RequestTimeout,
    RequestTooLarge,
    RouteNotFound,
    SessionNotFound,
    SessionsError,
    TooManySessions,
    WorkerUnavailable,
)
from llava_sessions.handler import bundle, router_hop
from llava_sessions.handler.replies import error_reply
from llava_sessions.http_proxy_server import HttpProxyServer
from llava_sessions.session_routes import SessionRoutes
from llava_sessions.wire import (
    CLOSED_SESSION_HEADER,
    NEW_SESSION,
    SESSION_HEADER,
    is_valid_session_id,
    parse_session_header,
    requested_session_id,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# Bodies smaller than this are looked into for an AWS-sample ``session_id``; larger ones are
# image-carrying opens, and parsing them would only cost time.
BODY_ID_SCAN_LIMIT = 1 * MiB
PING_TIMEOUT_S = 2.0
# Most requests sent to a worker together (TorchServe's batchSize was 8 before the router batched).
MAX_BUNDLE = 8
# Room left in a bundle for each member's framing and headers.
BUNDLE_MEMBER_OVERHEAD = 4096
# Requests that may wait in the router for one worker (TorchServe's own job_queue_size default).
MAX_WAITING = 100
CONNECT_TIMEOUT_S = 5.0
# After a drain's grace, how long the cut answers get to be written.
CUT_WRITE_S = 5.0
RETRY_AFTER_S = "1"

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
_SHUTTING_DOWN = "this instance is shutting down"
EVENT_STREAM = wire.EVENT_CONTENT_TYPE
_EVENT_END = wire.EVENT_END.encode()
# What TorchServe's front end answers when the worker process went away during the request
# (killed, crashed, or killed by TorchServe itself past the model's responseTimeout).
_WORKER_DIED = "Worker died"


@dataclass(frozen=True)
class _Target:
    backend: int
    session_id: str | None  # None: the request opens a session


@dataclass
class _Exchange:
    """One client request on its way through the router, from its body to its answer."""

    request: web.Request
    body: bytes
    hop: router_hop.Hop  # its id at the worker (for cancellation) and when it arrived
    target: _Target | None = None
    # A request that found its worker busy waits to go with the next bundle: the response
    # once sent downstream, or the error to answer.
    answered: asyncio.Future | None = None
    downstream: "_Downstream | None" = None  # once its answer started going to the client
    upstream_sent: bool = False  # its worker may be running it
    cut: bool = False  # the drain's grace ran out: end it now


@dataclass
class DrainReport:
    finished: int = 0  # in flight when the drain began, and answered within the grace
    cut: int = 0  # ended at the grace's end: streams with an error event, the rest with a 503
    refused: int = 0  # arrived during the drain: 503


class _Gate:
    """Whether a worker has a request of ours in hand, and what waits for it to be free."""

    def __init__(self):
        self.busy = False
        self.waiting: list[_Exchange] = []
        self.running: _RunningBundle | None = None  # the bundle in the worker's hands, if it is one


@dataclass
class _RunningBundle:
    """A bundle at its worker: each member's answer by its index, those that joined it after its own."""

    bundle_id: str
    answers: list["_MemberAnswer"]
    own: int  # members sent in its body; those after them joined it

    def holds(self, session_id: str) -> bool:
        """Whether a member is a turn of this session (a second one waits for the next bundle)."""
        return any(answer.member.target.session_id == session_id for answer in self.answers)

    def joiners_not_taken(self) -> list[_Exchange]:
        """Joiners its worker never began to answer (no head frame came), still awaited."""
        return [answer.member for answer in self.answers[self.own:]
                if not answer.status and not answer.member.answered.done()]


class _TryElsewhere(Exception):
    """An open refused 429 TOO_MANY_SESSIONS by its worker: another worker may have room."""

    def __init__(self, response: web.Response):
        super().__init__("worker full")
        self.response = response


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
        config: RouterConfig | None = None,
        routes: SessionRoutes | None = None,
        request_timeout_s: float = 660,
        max_bundle: int = MAX_BUNDLE,
        max_waiting: int = MAX_WAITING,
        secret: str | None = None,
        model_names: list[str] | None = None,
        served_model: str | None = None,
        joining: bool = True,
    ):
        """``secret``: shared with the workers (router_hop.py; None: a new one, which no worker
        knows). ``model_names``: the TorchServe model of each backend, to tell a worker that a
        client went away (None: from the backend URLs' last segment). ``served_model``: the name
        ``/v1/models`` gives (None: the first model's). ``joining``: the workers take requests
        that join their running bundle (our handler does); without, a lone request goes as it
        came and others wait for the next bundle."""
        if not backends:
            raise ValueError("backends must name at least one inference URL")
        if routes is not None and routes.n_backends != len(backends):
            raise ValueError(f"routes is sized for {routes.n_backends} backends, got {len(backends)} URLs")
        self.config = config or RouterConfig()
        super().__init__(host, port, limits=self.config.connection_limits())
        self.backends = list(backends)
        self.ping_url = ping_url
        self.max_body_bytes = self.config.max_request_bytes
        self.secret = secret or router_hop.new_secret()
        self.model_names = model_names or [url.rstrip("/").rsplit("/", 1)[-1] for url in self.backends]
        self.served_model = served_model or self.model_names[0]
        self._started_at = time.time()
        self.routes = routes if routes is not None else SessionRoutes(len(backends))
        if max_bundle < 1 or max_waiting < 0:
            raise ValueError(f"max_bundle must be at least 1 and max_waiting at least 0, got {max_bundle}, {max_waiting}")
        self.max_bundle = max_bundle
        self.max_waiting = max_waiting
        self._gates = [_Gate() for _ in backends]
        # A read timeout, not a total one: a long stream is fine while tokens keep coming.
        self._timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S, sock_read=request_timeout_s)
        self._in_flight: dict[asyncio.Task, _Exchange] = {}
        self._drain: DrainReport | None = None  # set once draining
        self._cancels: router_hop.CancelSender | None = None
        self.joining = joining
        self._joins: router_hop.JoinSender | None = None

    async def _started(self) -> None:
        self._cancels = router_hop.CancelSender(self.secret)
        if self.joining:
            self._joins = router_hop.JoinSender(self.secret)
        log.info("affinity router on %s in front of %d backends", self.url, len(self.backends))

    async def _stopped(self) -> None:
        if self._cancels is not None:
            self._cancels.close()
        if self._joins is not None:
            self._joins.close()

    # --- drain (SIGTERM) ----------------------------------------------------------

    def drain(self, grace_s: float) -> DrainReport:
        """From another thread: refuse new requests (503), give those in flight ``grace_s`` to
        finish, then end the rest (a stream with TGI's error event and a clean end, anything
        else not yet answered with a JSON 503). Returns once every answer is ended."""
        if self._loop is None or self._loop.is_closed():
            return DrainReport()
        future = asyncio.run_coroutine_threadsafe(self._drain_in_loop(grace_s), self._loop)
        return future.result(grace_s + CUT_WRITE_S + 5)

    async def _drain_in_loop(self, grace_s: float) -> DrainReport:
        report = self._drain = self._drain or DrainReport()
        waiting = dict(self._in_flight)
        log.info("draining: %d request(s) in flight get up to %.1f s; new requests get 503", len(waiting), grace_s)
        if waiting:
            await asyncio.wait(list(waiting), timeout=grace_s)
        cut = {task: exchange for task, exchange in self._in_flight.items() if not task.done()}
        report.finished += sum(1 for task in waiting if task.done())
        for task, exchange in cut.items():
            exchange.cut = True
            task.cancel()
        if cut:
            await asyncio.wait(list(cut), timeout=CUT_WRITE_S)
        report.cut += len(cut)
        log.info("drained: %d finished in the grace, %d cut, %d new request(s) refused",
                 report.finished, report.cut, report.refused)
        return report

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[_json_errors])
        app.on_response_prepare.append(_no_server_header)
        app.router.add_get("/ping", self._ping)
        app.router.add_post("/invocations", self._invocations)
        # OpenAI's routes, for the openai client: the same answers, the body read as OpenAI's.
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        return app

    # --- handlers -------------------------------------------------------------

    async def _ping(self, request: web.Request) -> web.Response:
        if self._drain is not None:  # the load balancer should stop sending us requests
            return web.json_response({"status": "Draining"}, status=503)
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

    async def _models(self, request: web.Request) -> web.Response:
        """OpenAI's model list: the one model this endpoint serves (any name is accepted in a body)."""
        model = {"id": self.served_model, "object": "model", "created": int(self._started_at), "owned_by": "llava-sessions"}
        return web.json_response({"object": "list", "data": [model]})

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._invocations(request, dialect="openai")

    async def _invocations(self, request: web.Request, dialect: str | None = None) -> web.StreamResponse:
        if self._drain is not None:
            self._drain.refused += 1
            raise WorkerUnavailable(f"{_SHUTTING_DOWN}; retry (a session it held is gone once it stops)")
        _refuse_internal(request.headers)
        received_at = time.time()
        body = await self._read_body(request)
        exchange = _Exchange(request, body, router_hop.Hop(router_hop.new_request_id(), received_at, dialect))
        task = asyncio.current_task()
        self._in_flight[task] = exchange
        try:
            return await self._answer(exchange)
        except asyncio.CancelledError:
            # The client went away (aiohttp cancels the handler), or the drain cut it.
            if exchange.upstream_sent:
                self._cancel_at_worker(exchange)
            if not exchange.cut:
                log.debug("client gone before its answer ended")
                raise
            task.uncancel()
            return await self._cut_off(exchange)
        finally:
            del self._in_flight[task]

    async def _answer(self, exchange: _Exchange) -> web.StreamResponse:
        """Route and dispatch; an open that its worker has no room for is tried on the others."""
        exchange.target = self._route(exchange.request.headers, exchange.body)
        tried = set()
        while True:
            try:
                return await self._dispatch(exchange)
            except _TryElsewhere as full:
                tried.add(exchange.target.backend)
                backend = self.routes.pick_backend(exclude=tried)
                if backend is None:
                    return full.response
                log.debug("backend %d full; open tried on backend %d", exchange.target.backend, backend)
                exchange.target = _Target(backend, None)

    def _cancel_at_worker(self, exchange: _Exchange) -> None:
        """Tell the worker to stop this request's turn: its session stays as before it."""
        if self._cancels is not None and exchange.target is not None:
            self._cancels.cancel(self.model_names[exchange.target.backend], exchange.hop.request_id)

    async def _cut_off(self, exchange: _Exchange) -> web.StreamResponse:
        """End an answer that the drain's grace did not see finish."""
        error = WorkerUnavailable(f"{_SHUTTING_DOWN} and its grace period ended before this answer did; "
                                  "the turn is not part of the session")
        downstream = exchange.downstream
        if downstream is None or not downstream.reply.prepared:
            return _error_response(error, {"Retry-After": RETRY_AFTER_S})
        await downstream.broken_off(error)
        return downstream.reply

    # --- batching: one request in hand per worker, the rest together --------------------

    async def _dispatch(self, exchange: _Exchange) -> web.StreamResponse:
        """Straight to an idle worker (a follow-up as a bundle of one, which later ones can join);
        to a busy one into its running bundle, or with the next bundle (see handler/bundle.py)."""
        backend = exchange.target.backend
        gate = self._gates[backend]
        loop = asyncio.get_running_loop()
        if gate.busy:
            if self._join_running(gate, exchange):
                return await exchange.answered
            if len(gate.waiting) >= self.max_waiting:  # overload: say so now rather than queue without end
                raise WorkerUnavailable(
                    f"the model worker for this request has {len(gate.waiting)} requests waiting; retry shortly"
                )
            exchange.answered = loop.create_future()
            gate.waiting.append(exchange)
            # A client that hangs up (or a drain cut) cancels the future: it is then skipped.
            return await exchange.answered
        gate.busy = True
        if self._hosts_joiners(exchange):
            exchange.answered = loop.create_future()
            self._send(backend, [exchange])
            return await exchange.answered
        try:
            return await self._forward(exchange)
        finally:
            self._send_next(backend)

    def _hosts_joiners(self, exchange: _Exchange) -> bool:
        """Whether this request goes as a bundle that others may join: a follow-up (an open, or
        a one-shot, is read whole by the router when its worker refuses it for want of room)."""
        return self.joining and exchange.target.session_id is not None

    def _join_running(self, gate: _Gate, exchange: _Exchange) -> bool:
        """Send a follow-up to join the bundle its worker is running; False when it cannot (no
        bundle, or a full one, a second turn of a session in it or waiting, too big a body)."""
        running, session = gate.running, exchange.target.session_id
        if (running is None or self._joins is None or session is None or len(running.answers) >= self.max_bundle
                or running.holds(session) or any(w.target.session_id == session for w in gate.waiting)):
            return False
        member = len(running.answers)
        joiner = router_hop.Joiner(running.bundle_id, member, dict(self._upstream_headers(exchange)), exchange.body)
        if not self._joins.offer(self.model_names[exchange.target.backend], joiner):
            return False
        exchange.answered = asyncio.get_running_loop().create_future()
        exchange.upstream_sent = True  # its worker may take it: a hang-up is told there
        running.answers.append(_MemberAnswer(exchange))
        return True

    def _send_next(self, backend: int) -> None:
        """The worker is free: what waited goes now, together (within the size and count limits)."""
        gate = self._gates[backend]
        gate.waiting = [w for w in gate.waiting if not w.answered.done()]
        if not gate.waiting:
            gate.busy = False
            return
        taken, size = 0, 0
        for waiting in gate.waiting[: self.max_bundle]:
            size += len(waiting.body) + BUNDLE_MEMBER_OVERHEAD
            if taken and size > self.max_body_bytes:
                break
            taken += 1
        members, gate.waiting = gate.waiting[:taken], gate.waiting[taken:]
        self._send(backend, members)

    def _send(self, backend: int, members: list[_Exchange]) -> None:
        """Send to the idle worker, in a task of its own; a bundle takes joiners from now on."""
        running = None
        if len(members) > 1 or self._hosts_joiners(members[0]):
            running = _RunningBundle(router_hop.new_request_id(), [_MemberAnswer(m) for m in members], len(members))
        self._gates[backend].running = running
        asyncio.get_running_loop().create_task(self._send_waiting(backend, members, running))

    async def _send_waiting(self, backend: int, members: list[_Exchange], running: _RunningBundle | None) -> None:
        try:
            if running is None:
                [member] = members
                await _settle(member, lambda: self._forward(member))
            else:
                await self._forward_bundle(backend, running)
        except Exception:
            log.exception("relaying to backend %d failed", backend)
        finally:
            if running is not None:  # joiners it did not take go first in the next bundle
                self._gates[backend].running = None
                self._gates[backend].waiting[:0] = running.joiners_not_taken()
            for member in members:  # nobody waits forever
                _settle_error(member, InternalError("the router failed to relay this answer; it has been logged"))
            self._send_next(backend)

    async def _forward_bundle(self, backend: int, running: _RunningBundle) -> None:
        """Send the bundle; while it runs, requests may join it (``_join_running``). Those its
        worker did not take go first in the next bundle."""
        members = [answer.member for answer in running.answers[: running.own]]
        body = bundle.encode_request((self._upstream_headers(m), m.body) for m in members)
        headers = {"Content-Type": bundle.CONTENT_TYPE, bundle.BUNDLE_HEADER: str(len(members)),
                   router_hop.SECRET_HEADER: self.secret, router_hop.REQUEST_ID_HEADER: running.bundle_id}
        for member in members:
            member.upstream_sent = True
        try:
            async with self._client.post(self.backends[backend], data=body, headers=headers,
                                         timeout=self._timeout) as upstream:
                if upstream.status == 200:
                    await self._relay_bundle(upstream, running)
                    return
                payload = await upstream.read()  # TorchServe itself failed the bundle
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            for member in members:
                _settle_error(member, self._unavailable(member.target, exc))
            return
        for member in members:  # each member hears why, as a request of its own would
            await _settle(member, lambda: self._relay_error(member.target, upstream.status, upstream.headers, payload))

    async def _relay_bundle(self, upstream: aiohttp.ClientResponse, running: _RunningBundle) -> None:
        """Each member's frames to its client as they arrive (``handler/bundle.py``), joiners' too."""
        answers = running.answers  # grows as requests join
        reader = bundle.FrameReader()
        try:
            async for data, _ in upstream.content.iter_chunks():
                for frame in reader.feed(data):
                    if 0 <= frame.member < len(answers):
                        await self._on_frame(answers[frame.member], frame)
        except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as exc:
            log.warning("bundle from backend %d broken off: %s", answers[0].member.target.backend, type(exc).__name__)
        finally:
            not_taken = {id(member) for member in running.joiners_not_taken()}  # they go with the next bundle
            for answer in answers:  # those the bundle ended before their end
                if not answer.member.answered.done() and id(answer.member) not in not_taken:
                    await answer.broken_off()

    async def _on_frame(self, answer: "_MemberAnswer", frame: bundle.Frame) -> None:
        member = answer.member
        if member.answered.done():  # its client hung up, or it was answered
            return
        try:
            if frame.kind == bundle.HEAD:
                status, headers, content_type = frame.head()
                headers = CIMultiDict(headers)
                headers["Content-Type"] = content_type
                self._record(member.target, status, headers)
                answer.status, answer.headers = status, headers
                if not _relayed_after_reading(status, member.target):
                    await answer.start()
            elif frame.kind == bundle.DATA:
                await answer.write(frame.payload)
            elif frame.kind == bundle.END:
                if answer.downstream is None:
                    await _settle(member, lambda: self._relay_error(member.target, answer.status, answer.headers,
                                                                    bytes(answer.buffered)))
                else:
                    await answer.downstream.finish()
                    _settle_result(member, answer.downstream.reply)
        except ConnectionError:  # the client hung up: its answer is dropped, its turn stopped, the others go on
            self._cancel_at_worker(member)
            _settle_error(member, ConnectionResetError("client gone"))

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
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                async for chunk in request.content.iter_any():
                    body += chunk
                    if len(body) > self.max_body_bytes:  # chunked uploads announce no length
                        raise self._too_large()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {self.config.body_timeout_s:g} s; send it at once"
            ) from None
        except (ConnectionError, aiohttp.ClientPayloadError):
            log.debug("client gone while sending its body")
            raise asyncio.CancelledError from None  # nobody to answer: aiohttp ends it quietly
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

    async def _forward(self, exchange: _Exchange) -> web.StreamResponse:
        target = exchange.target
        exchange.upstream_sent = True
        try:
            upstream = await self._client.post(
                self.backends[target.backend],
                data=exchange.body,
                headers=self._upstream_headers(exchange),
                timeout=self._timeout,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._unavailable(target, exc) from None
        async with upstream:
            self._record(target, upstream.status, upstream.headers)
            if _relayed_after_reading(upstream.status, target):
                payload = await self._read_upstream(target, upstream)
                return self._relay_error(target, upstream.status, upstream.headers, payload)
            exchange.downstream = _Downstream(exchange.request, upstream.status, upstream.headers, upstream.reason)
            return await self._relay_stream(exchange, upstream)

    async def _relay_stream(self, exchange: _Exchange, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        """Send each chunk on as it arrives (see ``_Downstream`` for a stream broken off upstream)."""
        downstream = exchange.downstream
        await downstream.start()
        try:
            async for data, _ in upstream.content.iter_chunks():
                try:
                    await downstream.write(data)
                except ConnectionError:  # the client hung up mid-stream: stop its turn at the worker
                    log.debug("client gone mid-stream")
                    self._cancel_at_worker(exchange)
                    return downstream.reply
        except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as exc:
            log.warning("response from backend %d broken off mid-stream: %s", exchange.target.backend,
                        type(exc).__name__)
            await downstream.broken_off()
            return downstream.reply
        with contextlib.suppress(ConnectionError):  # the client may hang up after the last chunk
            await downstream.finish()
        return downstream.reply

    def _upstream_headers(self, exchange: _Exchange) -> CIMultiDict:
        """The client's end-to-end headers, the session header in canonical case, and the hop's."""
        headers = _upstream_headers(exchange.request.headers, exchange.target.session_id)
        headers.update(exchange.hop.headers(self.secret))
        return headers

    async def _read_upstream(self, target: _Target, upstream: aiohttp.ClientResponse) -> bytes:
        try:
            return await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._unavailable(target, exc) from None

    def _relay_error(self, target: _Target, status: int, headers, payload: bytes) -> web.Response:
        """A 404 or 5xx answer, read whole: a lost session is unbound; TorchServe's own failures
        become WORKER_UNAVAILABLE (raised); anything else passes as it is."""
        if status == 404 and target.session_id is not None:
            return self._relay_not_found(target, headers, payload)
        if status >= 500:
            return self._relay_server_error(target, status, headers, payload)
        response = web.Response(status=status, body=payload, headers=_downstream_headers(headers))
        if status == 429 and target.session_id is None and _error_code(payload) == TooManySessions.code:
            raise _TryElsewhere(response)
        return response

    def _relay_not_found(self, target: _Target, headers, payload: bytes) -> web.Response:
        """A worker that lost a session (restarted, expired) says so; stop routing to it."""
        if _error_code(payload) == SessionNotFound.code:
            self.routes.unbind(target.session_id)
            log.debug("session %s lost by backend %d", target.session_id[:8], target.backend)
        return web.Response(status=404, body=payload, headers=_downstream_headers(headers))

    def _relay_server_error(self, target: _Target, status: int, headers, payload: bytes) -> web.Response:
        """Our handler's own 5xx errors pass as they are; TorchServe's (``{"code", "type", "message"}``:
        the worker died, none is ready, the queue is full) become WORKER_UNAVAILABLE."""
        if _error_code(payload) is not None:
            return web.Response(status=status, body=payload, headers=_downstream_headers(headers))
        message = _torchserve_message(payload)
        log.warning("backend %d failed: %d %s", target.backend, status, message[:200])
        if _WORKER_DIED not in message:
            raise WorkerUnavailable(
                f"the model worker for this request could not take it ({status}: {message[:200]}); "
                "retry shortly"
            )
        if target.session_id is not None:
            self.routes.unbind(target.session_id)  # it lived in the worker's memory
        raise WorkerUnavailable(
            "the model worker stopped while answering this request (killed, or over its response "
            "timeout) and is restarting; the sessions it held are gone: open a new session"
        )

    def _record(self, target: _Target, status: int, headers) -> None:
        """Bookkeeping from the backend's session headers."""
        opened = headers.get(SESSION_HEADER)
        if opened is not None and 200 <= status < 300:
            parsed = parse_session_header(opened)
            if parsed is None:
                log.warning("backend %d sent a malformed %s header", target.backend, SESSION_HEADER)
            else:
                self.routes.bind(parsed[0], target.backend, parsed[1])
                log.debug("session %s bound to backend %d", parsed[0][:8], target.backend)
        closed = headers.get(CLOSED_SESSION_HEADER)
        if closed is not None:
            self.routes.unbind(closed.strip())

    def _unavailable(self, target: _Target, exc: BaseException) -> WorkerUnavailable:
        log.warning("backend %d unavailable: %s", target.backend, type(exc).__name__)
        return WorkerUnavailable(
            f"the model worker for this request did not answer ({type(exc).__name__}); "
            "retry shortly, and open a new session if this one is then not found"
        )


# --- routing helpers ------------------------------------------------------------


def _refuse_internal(headers: CIMultiDictProxy) -> None:
    """The router's trust boundary: what only the router tells its workers, no client may send."""
    for name in headers:
        if router_hop.is_internal(name):
            raise InvalidRequest(
                f"the {name[:60]} header is internal to this server (between its router and its workers); "
                "leave it out"
            )
    if headers.get("Content-Type", "").strip().lower().startswith(bundle.CONTENT_TYPE):
        raise InvalidRequest(
            "bundle framing is internal to this server; send one JSON request per call "
            "(Content-Type: application/json)"
        )


def _header_session_value(headers: CIMultiDictProxy) -> str:
    """The session header as the client meant it ("" when absent)."""
    values = {requested_session_id(value) for value in headers.getall(SESSION_HEADER, [])}  # any name case
    if len(values) > 1:
        raise InvalidRequest(
            f"the {SESSION_HEADER} header was sent more than once with different values; send it once"
        )
    return values.pop() if values else ""


def _header_session_id(headers: CIMultiDictProxy) -> str | None:
    """The session named by the header; None for absent, empty (a one-shot, or a body-only open)
    or NEW_SESSION (an open)."""
    value = _header_session_value(headers)
    if value in ("", NEW_SESSION):
        return None
    return _checked_session_id(value, f"the {SESSION_HEADER} header")


def _body_session_id(body: bytes) -> str | None:
    """The AWS-sample dialect's ``session_id``, when the body is such a JSON object and names one."""
    if b"session_id" not in body and b"\\u" not in body:
        # No such key, even \u-escaped: skip parsing (an open's inline image is most of a megabyte).
        return None
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
    """The stable code of our handler's error body, in any dialect's shape: ``{"error": {"code"}}``
    (native, OpenAI) or TGI's ``{"error": ..., "error_type"}``; None for TorchServe's own."""
    try:
        body = json.loads(payload)
        error = body["error"]
        code = error["code"] if isinstance(error, dict) else body["error_type"]
        return code if isinstance(code, str) else None
    except (ValueError, TypeError, KeyError, RecursionError):
        return None


# --- relaying -----------------------------------------------------------------------


def _upstream_headers(headers: CIMultiDictProxy, session_id: str | None) -> CIMultiDict:
    dropped = _NOT_FORWARDED | _connection_tokens(headers)
    forwarded = CIMultiDict(
        (name, value) for name, value in headers.items()
        if name.lower() not in dropped and not router_hop.is_internal(name)
    )
    forwarded.setdefault("Content-Type", "application/json")
    if session_id is not None:
        forwarded[SESSION_HEADER] = session_id
    elif _header_session_value(headers) == NEW_SESSION:  # an open; no header at all is a one-shot answer
        forwarded[SESSION_HEADER] = NEW_SESSION
    return forwarded


def _downstream_headers(headers: CIMultiDictProxy) -> CIMultiDict:
    dropped = _NOT_RETURNED | _connection_tokens(headers)
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in dropped)


def _connection_tokens(headers: CIMultiDictProxy) -> set[str]:
    """Headers named in Connection are hop-by-hop too."""
    return {token.strip().lower() for value in headers.getall("Connection", []) for token in value.split(",")}


class _Downstream:
    """One answer on its way to the client, chunk by chunk.

    A token stream (text/event-stream) broken off upstream between two events (a killed worker:
    TorchServe sends whole events) ends with TGI's error event and a clean end, so event-reading
    clients see why. Any other response broken off upstream is broken off downstream: no
    terminating chunk, so the client sees a truncated response, not a complete one.
    """

    def __init__(self, request: web.Request, status: int, headers, reason: str | None = None):
        self.request = request
        self.reply = web.StreamResponse(status=status, reason=reason, headers=_downstream_headers(headers))
        self.events = headers.get("Content-Type", "").startswith(EVENT_STREAM)
        self.tail = _EVENT_END  # the end of what was sent: an event boundary when it ends with a blank line

    async def start(self) -> None:
        await self.reply.prepare(self.request)

    async def write(self, data: bytes) -> None:
        if data:  # before the write's await: the bytes are in the transport once it starts
            self.tail = (self.tail + data)[-len(_EVENT_END):]
        await self.reply.write(data)

    async def finish(self) -> None:
        await self.reply.write_eof()

    async def broken_off(self, error: SessionsError | None = None) -> None:
        """End an answer whose rest will not come: an event stream between two events gets the
        error event and a clean end; anything else is cut (no terminating chunk)."""
        if not (self.events and self.tail == _EVENT_END):
            if self.request.transport is not None:
                self.request.transport.close()
            return
        error = error or WorkerUnavailable(
            "the model worker stopped in the middle of this answer (killed, or silent past its time limit); the turn "
            "is not part of the session, and a session the worker held is gone: open a new session"
        )
        with contextlib.suppress(ConnectionError):
            await self.reply.write(_error_event(error))
            await self.reply.write_eof()


class _MemberAnswer:
    """A bundle member's answer as its frames arrive: relayed as it comes, or (a 404 or 5xx, which
    the router looks into) buffered until its end."""

    def __init__(self, member: _Exchange):
        self.member = member
        self.status = 0
        self.headers: CIMultiDict = CIMultiDict()
        self.downstream: _Downstream | None = None
        self.buffered = bytearray()

    async def start(self) -> None:
        self.downstream = self.member.downstream = _Downstream(self.member.request, self.status, self.headers)
        await self.downstream.start()

    async def write(self, data: bytes) -> None:
        if self.downstream is None:
            self.buffered += data
        else:
            await self.downstream.write(data)

    async def broken_off(self) -> None:
        """The bundle ended before this answer did."""
        if self.downstream is None:
            _settle_error(self.member, WorkerUnavailable(
                "the model worker stopped before answering this request (killed, or over its response "
                "timeout); sessions it held are gone: open a new session if this one is then not found"
            ))
            return
        await self.downstream.broken_off()
        _settle_result(self.member, self.downstream.reply)


def _relayed_after_reading(status: int, target: _Target) -> bool:
    """Answers the router reads whole before relaying: a session's 404, an open's 429 (another
    worker may have room), and any 5xx."""
    if target.session_id is None:
        return status == 429 or status >= 500
    return status == 404 or status >= 500


async def _settle(waiting: _Exchange, answer: Callable[[], Any]) -> None:
    """Answer a waiting request with what ``answer()`` returns (or its awaitable gives), or its error."""
    try:
        response = answer()
        if asyncio.iscoroutine(response):
            response = await response
    except Exception as exc:
        _settle_error(waiting, exc)
    else:
        _settle_result(waiting, response)


def _settle_result(waiting: _Exchange, response: web.StreamResponse) -> None:
    if not waiting.answered.done():
        waiting.answered.set_result(response)


def _settle_error(waiting: _Exchange, error: BaseException) -> None:
    if not waiting.answered.done():
        waiting.answered.set_exception(error)


def _error_event(error: SessionsError) -> bytes:
    """TGI's error event, as the handler's streams end with one."""
    return wire.event(wire.error_event(error.message, error.code)).encode()


async def _no_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp names itself and its version in ``Server``; nothing here says what software runs."""
    response.headers.popall("Server", None)


@web.middleware
async def _json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error the router answers itself is JSON with a stable code."""
    try:
        return await handler(request)
    except SessionsError as error:
        # A 503 says when to come back (draining, or a worker busy or restarting).
        extra = {"Retry-After": RETRY_AFTER_S} if error.code == WorkerUnavailable.code else None
        return _error_response(error, extra)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        error = MethodNotAllowed(f"this path takes {allowed} only")
        return _error_response(error, {"Allow": allowed})
    except web.HTTPNotFound:
        return _error_response(RouteNotFound(
            "no such path; use POST /invocations, POST /v1/chat/completions, GET /v1/models or GET /ping"))


def _error_response(error: SessionsError, headers: dict[str, str] | None = None) -> web.Response:
    reply = error_reply(error)
    return web.json_response(reply.body, status=reply.status, headers={**reply.headers, **(headers or {})})
