"""Small real stand-ins shared by tests: an echo TorchServe handler, a fake checkpoint, image bytes,
a local HTTP server."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import socket
import struct
import textwrap
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# A real TorchServe handler class: echoes the body and which worker (pid) ran it.
ECHO_HANDLER = textwrap.dedent(
    '''
    import json
    import os


    class EchoHandler:
        def initialize(self, context):
            self.model_name = context.model_name
            self.initialized = True

        def handle(self, data, context):
            replies = []
            for idx, row in enumerate(data):
                body = row.get("body") or row.get("data")
                if isinstance(body, (bytes, bytearray)):
                    body = json.loads(body)
                context.set_response_content_type(idx, "application/json")
                replies.append(json.dumps({"pid": os.getpid(), "model": self.model_name, "body": body}))
            return replies
    '''
)


def write_echo_handler(path: Path) -> Path:
    path.write_text(ECHO_HANDLER)
    return path


def write_fake_checkpoint(path: Path) -> Path:
    """A directory shaped like a checkpoint (config, safetensors, tokenizer config) plus a stray file."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(path / "model.safetensors"))
    (path / "tokenizer_config.json").write_text("{}")
    (path / "notes.txt").write_text("not part of a checkpoint")
    return path


def copy_with(checkpoint: Path, tmp_path: Path, name: str, **changes) -> str:
    """A copy of ``checkpoint`` (in ``tmp_path``) with keys of its JSON file ``name`` changed."""
    import shutil

    target = Path(tmp_path) / "changed"
    shutil.copytree(checkpoint, target)
    path = target / name
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return str(target)


def png_b64(image) -> str:
    """An image as the base64 PNG a client puts in "images"."""
    return b64(encode(image))


def encode(image, fmt: str = "PNG", **params) -> bytes:
    """An image's file bytes in ``fmt`` (Pillow's save parameters pass through)."""
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int, pixel_data: bytes = b"") -> bytes:
    """A well-formed PNG header declaring width x height (8-bit RGB), with only ``pixel_data`` behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(pixel_data))
        + png_chunk(b"IEND", b"")
    )


def isolate_from_aws(monkeypatch, region: str = "us-east-1", also_unset: tuple[str, ...] = ()) -> None:
    """Fake credentials and a region; nothing of the developer's AWS set-up (profile, region,
    endpoint overrides, instance metadata) reaches the code under test."""
    endpoint_overrides = tuple(name for name in os.environ if name.startswith("AWS_ENDPOINT_URL"))
    for name in ("AWS_PROFILE", "AWS_REGION", "AWS_SESSION_TOKEN", *endpoint_overrides, *also_unset):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", region)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@contextlib.contextmanager
def local_http_server(
    handler: type[http.server.BaseHTTPRequestHandler],
    prepare: Callable[[http.server.ThreadingHTTPServer], None] | None = None,
) -> Iterator[http.server.ThreadingHTTPServer]:
    """A threaded HTTP server on 127.0.0.1 (a free port) served from a thread; stopped and joined on exit.

    ``prepare`` may change the server before it serves (wrap its socket in TLS, set attributes).
    """
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if prepare is not None:
        prepare(server)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def raw_post(port: int, body: bytes, **headers: str) -> socket.socket:
    """POST /invocations on a socket of its own, so a test can hang up whenever it likes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    sock.sendall(f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n{head}\r\n".encode() + body)
    return sock


def reset(sock: socket.socket) -> None:
    """Hang up as a killed client does: RST, not FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class GoneAfter:
    """A client that hangs up after receiving ``n`` tokens: a turn's ``on_token`` and ``cancelled``."""

    def __init__(self, n: int):
        self.n, self.received = n, 0

    def on_token(self, token: int, last: bool) -> None:
        self.received += 1

    def __call__(self) -> bool:
        return self.received >= self.n
