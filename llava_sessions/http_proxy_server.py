"""An aiohttp proxy server run from a background thread (or the main one). Torch-free.

The affinity router and the local SageMaker runtime are both this: an aiohttp application in
front of upstream HTTP servers, started from a test or a command, stopped cleanly. Subclasses
give the application (``_app``) and may run tasks beside it (``_started`` / ``_stopped``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
from typing import Callable

import aiohttp
from aiohttp import web

from llava_sessions.connection_guard import ConnectionLimits, GuardedAppRunner

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
# In-flight requests get this long to finish when the server stops.
SHUTDOWN_GRACE_S = 2.0
STOP_TIMEOUT_S = SHUTDOWN_GRACE_S + 3.0


class HttpProxyServer:
    name = "http-proxy"  # the thread's name and the log lines'

    def __init__(self, host: str, port: int, limits: ConnectionLimits | None = None):
        self.host, self.port = host, port
        self.connection_limits = limits if limits is not None else ConnectionLimits()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._client: aiohttp.ClientSession | None = None  # to the upstream servers
        self.failure: BaseException | None = None  # what stopped it, when it stopped on an error

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _app(self) -> web.Application:
        raise NotImplementedError

    async def _started(self) -> None:
        """Called once listening, on the server's loop."""

    async def _stopped(self) -> None:
        """Called on the server's loop before it closes."""

    # --- lifecycle ------------------------------------------------------------

    def start(self):
        """Serve from a background thread; returns once the socket listens (port 0 picks a free one)."""
        if self._thread is not None:
            raise RuntimeError(f"the {self.name} is already running")
        listening: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve_in_thread, args=(listening,), name=self.name, daemon=True)
        self._thread.start()
        try:
            listening.result(timeout=START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def run_forever(self) -> None:
        """Serve in this thread (the main one) until SIGINT or SIGTERM, or stop() from another thread."""
        asyncio.run(self._serve(on_listening=self._stop_on_signals))

    @property
    def running(self) -> bool:
        """Serving from its background thread (False once it stopped, on stop() or an error)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving: in-flight requests get SHUTDOWN_GRACE_S, the whole stop at most STOP_TIMEOUT_S."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop closed in between: already stopped
                pass
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(STOP_TIMEOUT_S)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve_in_thread(self, listening: concurrent.futures.Future) -> None:
        try:
            asyncio.run(self._serve(on_listening=lambda: listening.set_result(None)))
        except BaseException as exc:
            self.failure = exc
            if listening.done():
                log.exception("the %s stopped on an error", self.name)
            else:
                listening.set_exception(exc)

    async def _serve(self, on_listening: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),  # the upstream queues and refuses; we don't
            trust_env=False,
            auto_decompress=False,  # bytes pass through as the upstream encoded them
            skip_auto_headers=("Accept-Encoding", "User-Agent"),  # send only what the client sent
        )
        # auto_decompress off: a compressed request body reaches the handlers as sent, so they can
        # refuse it as a JSON error instead of aiohttp's decoder failing with a 400 or 500.
        # handler_cancellation: a client that hangs up cancels its handler's task, so nothing keeps
        # working (or holding a worker) for an answer nobody will read.
        runner = GuardedAppRunner(
            self._app(),
            limits=self.connection_limits,
            access_log=None,
            shutdown_timeout=SHUTDOWN_GRACE_S,
            auto_decompress=False,
            handler_cancellation=True,
        )
        try:
            await runner.setup()
            await web.TCPSite(runner, self.host, self.port).start()
            self.port = runner.addresses[0][1]
            await self._started()
            on_listening()
            await self._stopping.wait()
        finally:
            await self._stopped()
            await runner.cleanup()
            await self._client.close()

    def _stop_on_signals(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._loop.add_signal_handler(signum, self._stopping.set)
