"""TorchServeProcess: one archive registered as several single-worker copies, started and stopped cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from llava_sessions.archive import build_archive
from llava_sessions.torchserve_process import TorchServeError, TorchServeProcess, group_pids
from tests.fakes import write_echo_handler, write_fake_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ts")


@pytest.fixture(scope="module")
def checkpoint(workdir) -> Path:
    return write_fake_checkpoint(workdir / "ckpt")


@pytest.fixture(scope="module")
def archive(workdir, checkpoint) -> Path:
    handler = write_echo_handler(workdir / "echo_handler.py")
    return build_archive(checkpoint, workdir / "store", sessions_per_worker=4, session_ttl_s=120,
                         handler_file=handler)


@pytest.fixture(scope="module")
def server(workdir, archive):
    # TorchServe's defaults write ./logs (logs, config snapshots) and ./key_file.json.
    cwd_files = [Path.cwd() / name for name in ("logs", "key_file.json")]
    existed = [p.exists() for p in cwd_files]
    with TorchServeProcess(archive, workdir / "run-a", copies=2) as ts:
        ts.wait_ready(timeout=120)
        yield ts
    assert [p.exists() for p in cwd_files] == existed, "TorchServe wrote into the CWD"


def post(url: str, body: dict) -> dict:
    response = requests.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_each_copy_has_its_own_worker_and_endpoint(server):
    assert requests.get(f"{server.url}/ping", timeout=5).json() == {"status": "Healthy"}
    pids = server.worker_pids()
    assert len(set(pids)) == 2 and all(p > 0 for p in pids)
    for i, url in enumerate(server.backend_urls):
        for n in range(3):
            reply = post(url, {"n": n})
            # Bytes reach the handler undecoded (TS_DECODE_INPUT_REQUEST=false) and it parses them.
            assert reply == {"pid": pids[i], "model": f"llava-{i}", "body": {"n": n}}
    assert server.describe("llava-1")["minWorkers"] == 1


def test_management_and_inference_bind_loopback(server):
    properties = (server.run_dir / "config.properties").read_text()
    assert f"inference_address=http://127.0.0.1:{server.port}" in properties
    assert "management_address=http://127.0.0.1:" in properties
    assert "metrics_address=http://127.0.0.1:" in properties


def test_front_end_jvm_runs_with_the_request_path_settings(server):
    """config.properties' vmargs reach the JVM's command line (the launcher rewrites them)."""
    cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in group_pids(server.pid)]
    java = [args for args in cmdlines if b"org.pytorch.serve.ModelServer" in args]
    assert len(java) == 1, java
    assert b"-XX:TieredStopAtLevel=1" in java[0]
    # On a 2-CPU host a common pool of 1 makes CompletableFuture start a thread per request.
    parallelism = [arg for arg in java[0] if arg.startswith(b"-Djava.util.concurrent.ForkJoinPool.common.parallelism=")]
    assert len(parallelism) == 1 and int(parallelism[0].split(b"=")[1]) >= 2


def test_requests_leave_one_access_line_each_and_no_chatter(server):
    """Our log4j2.xml: lifecycle lines stay, each once; per-request lines are only the access log's."""
    logs = server.log_dir
    before = {name: _lines(logs / name) for name in ("ts_log.log", "access_log.log", "model_log.log")}
    for n in range(10):
        post(server.backend_urls[0], {"n": n})
    deadline = time.monotonic() + 10  # log4j writes asynchronously
    while time.monotonic() < deadline and len(_lines(logs / "access_log.log")) < len(before["access_log.log"]) + 10:
        time.sleep(0.1)
    assert len(_lines(logs / "access_log.log")) == len(before["access_log.log"]) + 10
    assert len(_lines(logs / "ts_log.log")) == len(before["ts_log.log"])
    assert len(_lines(logs / "model_log.log")) == len(before["model_log.log"])
    ts_log = _lines(logs / "ts_log.log")
    assert any("WORKER_MODEL_LOADED" in line for line in ts_log)
    assert len(ts_log) == len(set(ts_log)), "a line was written twice"


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def test_second_instance_runs_beside_the_first(server, archive, workdir):
    with TorchServeProcess(archive, workdir / "run-b") as other:
        other.wait_ready(timeout=120)
        assert other.port != server.port
        assert post(other.backend_urls[0], {"hi": 1})["body"] == {"hi": 1}
        assert requests.get(f"{server.url}/ping", timeout=5).status_code == 200
    assert (workdir / "run-b" / "logs" / "ts_log.log").is_file()


def test_stop_leaves_no_processes(workdir, archive):
    ts = TorchServeProcess(archive, workdir / "run-c").start()
    ts.wait_ready(timeout=120)
    pgid, workers = ts.pid, ts.worker_pids()
    assert len(group_pids(pgid)) >= 2 + len(workers)  # launcher, JVM, workers
    ts.stop(timeout=30)
    assert group_pids(pgid) == []
    assert all(not Path(f"/proc/{p}").exists() or _is_zombie(p) for p in workers)


def test_torchserve_stops_when_its_owner_is_killed(workdir, archive):
    """An owner that dies without stop() (SIGKILL: no finally, no atexit) takes TorchServe with it."""
    owner_code = (
        "import sys, time\n"
        "from llava_sessions.torchserve_process import TorchServeProcess\n"
        "ts = TorchServeProcess(sys.argv[1], sys.argv[2]).start()\n"
        "ts.wait_ready(timeout=120)\n"
        "print(ts.pid, ts.worker_pids()[0], flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", owner_code, str(archive), str(workdir / "run-d")],
                             stdout=subprocess.PIPE, text=True)
    pgid = None
    try:
        line = owner.stdout.readline()  # the owner prints once TorchServe is ready, or exits
        assert line, f"the owner exited with {owner.wait(30)} before TorchServe was ready"
        pgid, worker = (int(x) for x in line.split())
        assert worker in group_pids(pgid)
        owner.kill()
        owner.wait(10)
        deadline = time.monotonic() + 60
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert group_pids(pgid) == [], "TorchServe outlived its owner"
    finally:
        owner.kill()
        if pgid is not None and group_pids(pgid):
            os.killpg(pgid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_wait_ready_reports_the_log_when_workers_fail(tmp_path, checkpoint):
    broken = tmp_path / "broken_handler.py"
    broken.write_text(
        "class Broken:\n"
        "    def initialize(self, context):\n"
        "        raise RuntimeError('checkpoint unreadable')\n"
        "\n"
        "    def handle(self, data, context):\n"
        "        return data\n"
    )
    archive = build_archive(checkpoint, tmp_path / "store", sessions_per_worker=1, session_ttl_s=60,
                            handler_file=broken)
    with TorchServeProcess(archive, tmp_path / "run") as ts:
        with pytest.raises(TorchServeError, match="(?s)not READY.*checkpoint unreadable"):
            ts.wait_ready(timeout=8)
