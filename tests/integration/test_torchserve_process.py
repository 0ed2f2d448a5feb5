"""TorchServeProcess: one archive registered as several single-worker copies, started and stopped cleanly."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import llava_sessions.torchserve_process as tsp
from llava_sessions.archive import build_archive
from llava_sessions.torchserve_process import TorchServeError, TorchServeProcess, group_pids
from tests.fakes import copy_with, write_echo_handler, write_fake_checkpoint

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
    return build_archive(checkpoint, workdir / "store", max_sessions_per_worker=4, session_ttl_s=120,
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
    archive = build_archive(checkpoint, tmp_path / "store", max_sessions_per_worker=1, session_ttl_s=60,
                            handler_file=broken)
    with TorchServeProcess(archive, tmp_path / "run") as ts:
        with pytest.raises(TorchServeError, match="(?s)not READY.*checkpoint unreadable"):
            ts.wait_ready(timeout=8)


def test_a_worker_that_refuses_to_start_ends_the_wait_at_once_with_its_reason(tmp_path, tiny_model_dir):
    """A ConfigError at start (here a model family without an adapter) will not go away when
    TorchServe restarts the worker: wait_ready says why at once instead of waiting out its timeout."""
    checkpoint = copy_with(tiny_model_dir, tmp_path, "config.json", model_type="not_a_llava")
    archive = build_archive(checkpoint, tmp_path / "store", max_sessions_per_worker=1, session_ttl_s=60)
    with TorchServeProcess(archive, tmp_path / "run") as ts:
        started = time.monotonic()
        with pytest.raises(TorchServeError, match="refused to start: .*model_type 'not_a_llava'.*Supported model types"):
            ts.wait_ready(timeout=600)
        assert time.monotonic() - started < 120


# --- ports taken between being chosen and being bound ----------------------------------------


@pytest.fixture
def squatter():
    """A port someone else listens on (as another stack that chose the same free port would)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def launches(monkeypatch):
    """The process group of each launch; each launch first checks the ones before left nothing."""
    pgids: list[int] = []
    launch = TorchServeProcess._launch

    def checked_launch(self):
        assert all(group_pids(pgid) == [] for pgid in pgids), "a failed launch left processes behind"
        launch(self)
        pgids.append(self.pid)

    monkeypatch.setattr(TorchServeProcess, "_launch", checked_launch)
    return pgids


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == tsp.__name__ and r.levelno == logging.WARNING]


def test_a_port_taken_after_it_was_chosen_is_chosen_afresh(workdir, archive, squatter, launches, monkeypatch,
                                                           caplog):
    real_free_port, chosen = tsp._free_port, []

    def free_port(host):  # the second choice (the management port) is one someone else took since
        chosen.append(squatter if len(chosen) == 1 else real_free_port(host))
        return chosen[-1]

    monkeypatch.setattr(tsp, "_free_port", free_port)
    caplog.set_level(logging.WARNING, logger=tsp.__name__)
    with TorchServeProcess(archive, workdir / "run-race") as ts:
        assert ts.management_port == squatter
        ts.wait_ready(timeout=120)
        assert ts.attempts == 2 and len(launches) == 2
        ports = (ts.port, ts.management_port, ts.metrics_port, ts.grpc_inference_port, ts.grpc_management_port)
        assert squatter not in ports and ts.url.endswith(f":{ts.port}")
        assert post(ts.backend_urls[0], {"n": 1})["body"] == {"n": 1}
        assert ts.describe("llava-0")["workers"][0]["status"] == "READY"
        # The first launch's failure stays in the console log but is not this launch's.
        assert f"Failed to bind to address: http://127.0.0.1:{squatter}" in ts.console_log.read_text()
        assert "Failed to bind" not in ts.log_tail(1000)
    assert _warnings(caplog) == [f"TorchServe could not bind 127.0.0.1:{squatter} (taken since it was chosen); "
                                 "restarting on fresh ports, attempt 2 of 3"]
    assert all(group_pids(pgid) == [] for pgid in launches)


def test_ports_taken_at_every_try_give_up_after_bounded_attempts(tmp_path, archive, squatter, launches,
                                                                 monkeypatch, caplog):
    monkeypatch.setattr(tsp, "_free_port", lambda host: squatter)
    caplog.set_level(logging.WARNING, logger=tsp.__name__)
    with TorchServeProcess(archive, tmp_path / "run") as ts:
        with pytest.raises(TorchServeError, match=rf"could not bind 127\.0\.0\.1:{squatter}: the port is in use "
                                                  r"\(taken since it was chosen\); gave up after 3 attempts"):
            ts.wait_ready(timeout=120)
        assert ts.attempts == 3
    assert len(launches) == 3
    assert all(group_pids(pgid) == [] for pgid in launches)
    assert [m.rsplit(", ", 1)[1] for m in _warnings(caplog)] == ["attempt 2 of 3", "attempt 3 of 3"]


def test_a_taken_port_given_explicitly_is_reported_not_retried(tmp_path, archive, squatter, launches, caplog):
    caplog.set_level(logging.WARNING, logger=tsp.__name__)
    with TorchServeProcess(archive, tmp_path / "run", metrics_port=squatter) as ts:
        with pytest.raises(TorchServeError, match=rf"could not bind 127\.0\.0\.1:{squatter}: the port is in use "
                                                  r"\(it was given explicitly\)"):
            ts.wait_ready(timeout=120)
        assert ts.attempts == 1 and ts.metrics_port == squatter
    assert _warnings(caplog) == []
    assert all(group_pids(pgid) == [] for pgid in launches)


# --- what ended, and how ----------------------------------------------------------------------


def test_exit_report_names_the_killed_front_end(workdir, archive):
    with TorchServeProcess(archive, workdir / "run-jvm") as ts:
        ts.wait_ready(timeout=120)
        pgid, java = ts.pid, ts.frontend_pid
        assert b"org.pytorch.serve.ModelServer" in Path(f"/proc/{java}/cmdline").read_bytes()
        assert ts.exit_report(log_lines=0) == f"TorchServe is still running (launcher pid {pgid})"
        os.kill(java, signal.SIGKILL)
        assert ts.wait(timeout=60) == 0  # TorchServe's launcher drops the JVM's status: exits 0
        report = ts.exit_report()
        assert report.splitlines()[0] == (f"TorchServe's front end (Java, pid {java}) was killed by signal 9 "
                                          f"(SIGKILL); its launcher (pid {pgid}) then exited with code 0")
        assert "Last lines of TorchServe's log" in report and "WORKER_MODEL_LOADED" in report
        assert ts.poll_worker_changes() == []
    assert group_pids(pgid) == []


def test_exit_report_names_the_killed_launcher(workdir, archive):
    with TorchServeProcess(archive, workdir / "run-launcher") as ts:
        ts.wait_ready(timeout=120)
        pgid, java = ts.pid, ts.frontend_pid
        os.kill(pgid, signal.SIGKILL)  # the launcher alone: the JVM and its worker run on
        assert ts.wait(timeout=30) == -signal.SIGKILL
        assert ts.exit_report(log_lines=0) == (f"TorchServe's launcher (pid {pgid}) was killed by signal 9 "
                                               f"(SIGKILL); its front end (Java, pid {java}) is still running")
        assert java in group_pids(pgid)
    assert group_pids(pgid) == []


def test_exit_report_says_when_it_cannot_know(tmp_path, archive):
    """A torchserve that is not a Python script runs without the wrapper: the JVM's status is lost."""
    script = tmp_path / "torchserve"
    script.write_text(f'#!/bin/sh\nexec "{Path(sys.executable).parent / "torchserve"}" "$@"\n')
    script.chmod(0o755)
    with TorchServeProcess(archive, tmp_path / "run", torchserve=script) as ts:
        ts.wait_ready(timeout=120)
        pgid, java = ts.pid, ts.frontend_pid
        assert java in group_pids(pgid)
        os.kill(java, signal.SIGKILL)
        assert ts.wait(timeout=60) == 0
        assert ts.exit_report(log_lines=0) == (
            f"TorchServe's front end (Java, pid {java}) is gone, how it ended is not known (its exit status "
            f"went to the launcher); TorchServe's launcher (pid {pgid}) exited with code 0")
    assert group_pids(pgid) == []


def test_poll_worker_changes_reports_a_killed_worker_and_its_successor(workdir, archive):
    with TorchServeProcess(archive, workdir / "run-worker", copies=2) as ts:
        ts.wait_ready(timeout=120)
        assert ts.poll_worker_changes() == []
        victim, other = ts.worker_pids()
        os.kill(victim, signal.SIGKILL)
        messages: list[str] = []
        deadline = time.monotonic() + 60
        while not any("is back" in m for m in messages) and time.monotonic() < deadline:
            messages += ts.poll_worker_changes()
            time.sleep(0.2)
        successor, still = ts.worker_pids()
        assert successor != victim and still == other
        assert messages == [f"worker of llava-0 (pid {victim}) stopped; TorchServe is starting a new one",
                            f"worker of llava-0 is back (pid {successor})"]
        assert ts.poll_worker_changes() == []
        # A management API that does not answer (here: a stopped JVM) reports nothing.
        java = ts.frontend_pid
        os.kill(java, signal.SIGSTOP)
        try:
            assert ts.poll_worker_changes(timeout=0.5) == []
        finally:
            os.kill(java, signal.SIGCONT)
        assert ts.poll_worker_changes() == []


def test_serving_stack_watch_reports_worker_restarts_then_the_exit(workdir, archive):
    """What `serve` runs once ready (ServingStack.watch; the router plays no part in it)."""
    import threading
    import types

    from llava_sessions.serving_stack import ServingStack

    with TorchServeProcess(archive, workdir / "run-watch") as ts:
        ts.wait_ready(timeout=120)
        pgid, java, victim = ts.pid, ts.frontend_pid, ts.worker_pids()[0]
        events: list[str] = []

        def kill_java_once_the_worker_is_back():
            deadline = time.monotonic() + 60
            while not any("is back" in e for e in events) and time.monotonic() < deadline:
                time.sleep(0.1)
            os.kill(java, signal.SIGKILL)  # also after 60 s, so that watch() returns

        killer = threading.Thread(target=kill_java_once_the_worker_is_back, daemon=True)
        os.kill(victim, signal.SIGKILL)
        killer.start()
        report = ServingStack.watch(types.SimpleNamespace(torchserve=ts, router=None), events.append, interval=0.2)
        killer.join(10)
        assert events[0] == f"worker of llava-0 (pid {victim}) stopped; TorchServe is starting a new one"
        assert events[1].startswith("worker of llava-0 is back (pid ") and len(events) == 2
        assert report.splitlines()[0] == (f"TorchServe's front end (Java, pid {java}) was killed by signal 9 "
                                          f"(SIGKILL); its launcher (pid {pgid}) then exited with code 0")
    assert group_pids(pgid) == []
