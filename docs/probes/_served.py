"""What the served probes share: the `serve` stack (one worker, the `small` preset, compiled) in a
process of its own, and a keep-alive client for its router and for TorchServe's own endpoint."""

import base64
import contextlib
import http.client
import io
import json
import multiprocessing
import tempfile
import time
import urllib.parse
from pathlib import Path

SESSION = "X-Amzn-SageMaker-Session-Id"


def noise_jpeg() -> tuple[bytes, str]:
    """The probes' picture: a 640x480 noise JPEG (quality 90), its bytes and their base64."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise((640, 480), 60).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue(), base64.b64encode(buffer.getvalue()).decode()


def _serve(work: Path, conn) -> None:
    from llava_sessions.archive import build_archive
    from llava_sessions.serving_stack import ServingStack
    from llava_sessions.tiny_model import write_tiny_llava

    write_tiny_llava(work / "model", preset="small")
    archive = build_archive(work / "model", work / "archive", max_sessions_per_worker=16, session_ttl_s=600,
                            handler_overrides={"compile": "on"})
    stack = ServingStack(archive, work / "run", workers=1, port=0).start(ready_timeout=900)
    try:
        conn.send((f"{stack.url}/invocations", stack.torchserve.backend_urls[0]))
        conn.recv()
    finally:
        stack.stop()


class Endpoint:
    def __init__(self, url: str):
        parts = urllib.parse.urlparse(url)
        self.conn, self.path = http.client.HTTPConnection(parts.hostname, parts.port), parts.path

    def post(self, body: dict, session: str) -> tuple[float, int, str | None]:
        """(seconds, status, the session header) of one JSON request."""
        started = time.perf_counter()
        self.conn.request("POST", self.path, json.dumps(body), {"Content-Type": "application/json", SESSION: session})
        reply = self.conn.getresponse()
        reply.read()
        return time.perf_counter() - started, reply.status, reply.getheader(SESSION)


@contextlib.contextmanager
def served_stack():
    """(router, worker endpoint, the folder holding the model) of a warm stack: TorchServe's Java
    path compiles as it runs, so 100 opens and closes go through it first."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    work = Path(tempfile.mkdtemp())
    process = context.Process(target=_serve, args=(work, child))
    process.start()
    try:
        router_url, worker_url = parent.recv()
        router, worker = Endpoint(router_url), Endpoint(worker_url)
        for _ in range(100):
            _, _, header = router.post({"requestType": "NEW_SESSION"}, "NEW_SESSION")
            router.post({"requestType": "CLOSE"}, header.split(";")[0])
        yield router, worker, work
    finally:
        parent.send("stop")
        process.join(120)
