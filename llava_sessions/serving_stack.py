"""The whole serving stack of one instance: TorchServe with a model copy per device, and the router.

Used by ``llava-sessions serve``, the container's entrypoint and the
integration tests, so all three run the same thing. Torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from llava_sessions.affinity_router import AffinityRouter, DrainReport
from llava_sessions.config import ENV_PREFIX, RouterConfig
from llava_sessions.handler import router_hop
from llava_sessions.torchserve_process import LOOPBACK, TorchServeProcess

CPU_THREADS_ENV = ENV_PREFIX + "CPU_THREADS"


class ServingStack:
    """``start()`` returns once every worker is READY and the router listens on ``host:port``."""

    def __init__(
        self,
        archive: str | Path,
        run_dir: str | Path,
        *,
        workers: int = 1,
        host: str = LOOPBACK,
        port: int = 8080,
        config: RouterConfig | None = None,
        host_workers: int | None = None,
        worker_env: dict[str, str] | None = None,
    ):
        """``config``: the router's limits (None: defaults and LLAVA_SESSIONS_* variables).
        ``host_workers``: model workers on this host in all (default ``workers``; ``local`` runs
        several stacks), so that CPU workers split the cores instead of fighting over them."""
        self.config = config or RouterConfig.from_sources()
        # Made per start: the workers honour the router's internal headers and bundles only with it.
        self.secret = router_hop.new_secret()
        env = {**(worker_env or {}), router_hop.SECRET_ENV: self.secret}  # worker_env: LLAVA_SESSIONS_* settings
        if CPU_THREADS_ENV not in os.environ:
            env[CPU_THREADS_ENV] = str(cpu_threads_per_worker(host_workers or workers))
        # TorchServe itself stays on loopback; only the router faces clients. Both refuse bodies
        # over max_request_bytes (the router first, with a JSON REQUEST_TOO_LARGE).
        self.torchserve = TorchServeProcess(
            archive, run_dir, copies=workers, max_request_bytes=self.config.max_request_bytes, env=env
        )
        self.host, self.port = host, port
        self.router: AffinityRouter | None = None

    @property
    def url(self) -> str:
        return self.router.url

    @property
    def log_dir(self) -> Path:
        return self.torchserve.log_dir

    def start(self, ready_timeout: float = 900.0) -> "ServingStack":
        self.torchserve.start()
        try:
            self.torchserve.wait_ready(timeout=ready_timeout)
            self.router = AffinityRouter(
                self.torchserve.backend_urls,
                host=self.host,
                port=self.port,
                ping_url=f"{self.torchserve.url}/ping",
                config=self.config,
                secret=self.secret,
                model_names=self.torchserve.model_names,
                served_model=self.torchserve.model_prefix,
            )
            self.router.start()
        except BaseException:
            self.stop()
            raise
        return self

    def drain(self) -> DrainReport:
        """New requests get 503; those in flight get ``config.drain_seconds``, then are ended cleanly."""
        if self.router is None:
            return DrainReport()
        return self.router.drain(self.config.drain_seconds)

    def watch(self, on_event: Callable[[str], None], interval: float = 1.0) -> str:
        """Block while TorchServe runs; return what ended and how, for ``serve`` to print.

        Every ``interval`` s asks TorchServe's management API about each copy's worker and calls
        ``on_event(message)`` for each restart ("worker of llava-0 (pid 4321) stopped; TorchServe
        is starting a new one", later "worker of llava-0 is back (pid 4400)"). Once TorchServe's
        launcher has exited, returns ``TorchServeProcess.exit_report()``: which component ended
        first and how ("TorchServe's front end (Java, pid 1234) was killed by signal 9 (SIGKILL);
        its launcher (pid 1200) then exited with code 0"), then the last lines of its log. Ctrl-C
        (KeyboardInterrupt) goes through to the caller. A router that stopped on an error is
        reported the same way.
        """
        torchserve = self.torchserve
        while torchserve.wait(timeout=interval) is None:
            if self.router is not None and not self.router.running:
                return f"the router stopped: {self.router.failure!r}; TorchServe is still running and is stopped now"
            for message in torchserve.poll_worker_changes():
                on_event(message)
        return torchserve.exit_report()

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
            self.router = None
        self.torchserve.stop()

    def __enter__(self) -> "ServingStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cpu_threads_per_worker(workers: int) -> int:
    """Each CPU worker's share of the cores this process may use, at least one."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, workers))
