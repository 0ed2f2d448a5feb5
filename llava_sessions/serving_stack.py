"""The whole serving stack of one instance: TorchServe with a model copy per device, and the router.

Used by ``llava-sessions serve``, the container's entrypoint and the
integration tests, so all three run the same thing. Torch-free.
"""

from __future__ import annotations

from pathlib import Path

from llava_sessions.affinity_router import AffinityRouter
from llava_sessions.torchserve_process import LOOPBACK, TorchServeProcess

# SageMaker caps InvokeEndpoint bodies at 6 MB; 8 MiB leaves SageMaker's limit the one clients meet.
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


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
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ):
        # TorchServe itself stays on loopback; only the router faces clients. Both refuse bodies
        # over max_request_bytes (the router first, with a JSON REQUEST_TOO_LARGE).
        self.torchserve = TorchServeProcess(archive, run_dir, copies=workers, max_request_bytes=max_request_bytes)
        self.host, self.port = host, port
        self.max_request_bytes = max_request_bytes
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
                max_body_bytes=self.max_request_bytes,
            )
            self.router.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
            self.router = None
        self.torchserve.stop()

    def __enter__(self) -> "ServingStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
