"""Small real stand-ins shared by tests: an echo TorchServe handler and a fake checkpoint."""

from __future__ import annotations

import base64
import io
import json
import textwrap
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


def png_b64(image) -> str:
    """An image as the base64 PNG a client puts in "images"."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
