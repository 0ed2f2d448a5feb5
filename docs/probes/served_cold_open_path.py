"""Served (`serve` stack in a process of its own, one worker, the `small` preset, compiled): where a
cold open's time goes. Opens with a 640x480 JPEG and a question (one token) alternate between the
router and TorchServe's own endpoint for the worker (the router's hop skipped); straight to
TorchServe, a close of an unknown session times its round trip for a trivial body and for one
carrying the same base64 image in an extra field (refused by the handler before any work).
Usage:
    .venv/bin/python docs/probes/served_cold_open_path.py"""

import base64
import http.client
import io
import json
import multiprocessing
import statistics
import tempfile
import time
import urllib.parse
from pathlib import Path

SESSION = "X-Amzn-SageMaker-Session-Id"


def serve(work: Path, conn) -> None:
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
        started = time.perf_counter()
        self.conn.request("POST", self.path, json.dumps(body), {"Content-Type": "application/json", SESSION: session})
        reply = self.conn.getresponse()
        reply.read()
        return time.perf_counter() - started, reply.status, reply.getheader(SESSION)


def main() -> None:
    from PIL import Image

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=serve, args=(Path(tempfile.mkdtemp()), child))
    process.start()
    router_url, worker_url = parent.recv()
    router, worker = Endpoint(router_url), Endpoint(worker_url)
    buffer = io.BytesIO()
    Image.effect_noise((640, 480), 60).convert("RGB").save(buffer, "JPEG", quality=90)
    image = base64.b64encode(buffer.getvalue()).decode()
    unknown = "no-such-session-0123456789abcdef"
    try:
        for _ in range(100):  # TorchServe's Java path compiles as it runs
            _, _, header = router.post({"requestType": "NEW_SESSION"}, "NEW_SESSION")
            router.post({"requestType": "CLOSE"}, header.split(";")[0])
        times: dict[str, list[float]] = {"open via the router": [], "open straight to TorchServe": [],
                                         "trivial, straight": [], "image-sized body, straight": []}
        open_body = {"requestType": "NEW_SESSION", "images": [image], "prompt": "What is in the picture?",
                     "max_new_tokens": 1}
        for k in range(30):
            endpoint, name = (router, "open via the router") if k % 2 else (worker, "open straight to TorchServe")
            seconds, status, header = endpoint.post(open_body, "NEW_SESSION")
            assert status == 200
            times[name].append(seconds)
            router.post({"requestType": "CLOSE"}, header.split(";")[0])
            seconds, status, _ = worker.post({"requestType": "CLOSE"}, unknown)
            assert status == 404
            times["trivial, straight"].append(seconds)
            seconds, status, _ = worker.post({"requestType": "CLOSE", "padding": image}, unknown)
            assert status == 400
            times["image-sized body, straight"].append(seconds)
        print(f"base64 image: {len(image) // 1024} KB")
        for name, samples in times.items():
            print(f"{name:30s} {statistics.median(samples) * 1e3:6.2f} ms (median of {len(samples)})")
    finally:
        parent.send("stop")
        process.join(120)


if __name__ == "__main__":
    main()
