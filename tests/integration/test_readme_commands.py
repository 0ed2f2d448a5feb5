"""The README's two commands: `make test` is what CI runs, `make serve` serves the offline model."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SERVING = re.compile(r"serving .* at (http://127\.0\.0\.1:\d+)")


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
    assert re.search(r"^make test$", (REPO / ".ci" / "run").read_text(), re.MULTILINE)
    for target in ("serve", "test"):
        dry = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=30)
        assert dry.returncode == 0, dry.stderr


def read_lines_until(stream, pattern: re.Pattern, timeout: float) -> tuple[re.Match | None, list[str]]:
    """Read a process's output until a line matches, in a thread so the wait is bounded."""
    seen: list[str] = []
    found: list[re.Match] = []

    def reader():
        for line in stream:
            seen.append(line)
            match = pattern.search(line)
            if match:
                found.append(match)
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    return (found[0] if found else None), seen


def test_make_serve_answers_the_protocol_and_stops_cleanly_on_ctrl_c(tmp_path):
    env = {**os.environ, "LLAVA_SESSIONS_HOME": str(tmp_path / "home")}  # the default model is built fresh
    proc = subprocess.Popen(
        ["make", "-s", "serve", "ARGS=--port 0 --workers 1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        match, lines = read_lines_until(proc.stdout, SERVING, timeout=300)
        assert match, "".join(lines)[-3000:]
        url = match.group(1)
        assert "random weights" in match.string
        metrics = re.search(r"Prometheus metrics: (http://127\.0\.0\.1:\d+/metrics)", match.string)
        assert metrics and "llava_" in requests.get(metrics.group(1), timeout=30).text  # findable from outside

        buffer = io.BytesIO()
        Image.new("RGB", (50, 40), (0, 90, 200)).save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        headers = {"Content-Type": "application/json"}
        opened = requests.post(f"{url}/invocations", headers=headers, timeout=60,
                               data=json.dumps({"requestType": "NEW_SESSION", "images": [image]}))
        assert opened.status_code == 200
        sid = opened.json()["session_id"]
        assert opened.headers["X-Amzn-SageMaker-Session-Id"].startswith(f"{sid}; Expires=")
        headers["X-Amzn-SageMaker-Session-Id"] = sid
        turn = requests.post(f"{url}/invocations", headers=headers, timeout=60,
                             data=json.dumps({"prompt": "What is it?", "max_new_tokens": 4}))
        assert turn.status_code == 200 and turn.json()["usage"]["completion_tokens"] == 4
        closed = requests.post(f"{url}/invocations", headers=headers, timeout=60,
                               data=json.dumps({"requestType": "CLOSE"}))
        assert closed.headers["X-Amzn-SageMaker-Closed-Session-Id"] == sid
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground group
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    # make re-raises the SIGINT once its recipe is done; serve itself must have stopped cleanly.
    rest = proc.stdout.read()
    assert "llava-sessions: stopping" in rest, rest[-3000:]
    assert "Traceback" not in rest, rest[-3000:]
    deadline = time.monotonic() + 30
    while _torchserve_under(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _torchserve_under(tmp_path), "TorchServe outlived serve"


def _torchserve_under(root: Path) -> list[int]:
    """Live (non-zombie) processes whose command line mentions this test's directory."""
    pids = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if str(root).encode() not in (proc_dir / "cmdline").read_bytes():
                continue
            state = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            pids.append(int(proc_dir.name))
    return pids


def test_the_readmes_sample_image_ships_with_the_repo():
    readme = (REPO / "README.md").read_text()
    paths = set(re.findall(r"examples/[\w.-]+\.(?:png|jpg|jpeg)", readme))
    assert paths == {"examples/picture.png"}
    with Image.open(REPO / "examples" / "picture.png") as image:
        image.load()
        assert image.mode == "RGB" and min(image.size) >= 64
