"""TorchServe 0.12 session routing, as configured by model-store/, with an echo handler.

Run with -s to see the observed behaviour printed as FINDING lines.
"""

from __future__ import annotations

import json
import re
import tarfile
import textwrap
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from safetensors.numpy import save_file

from llava_sessions.archive import build_archive
from llava_sessions.errors import ConfigError
from llava_sessions.torchserve_process import TorchServeError, TorchServeProcess, group_pids

pytestmark = pytest.mark.integration

SESSION = "X-Amzn-SageMaker-Session-Id"
TS_SEQ = re.compile(r"^ts-seq-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
WORKERS = 2
SESSIONS_PER_WORKER = 4
CAPACITY = WORKERS * SESSIONS_PER_WORKER
# TorchServe frees a job group only after it has written the END response. A
# request sent at once may still find the old group (and is never answered) or
# a full table (503): about 1 in 100 tries here. So tests pause after a close.
SLOT_RELEASE_S = 0.2

# A real TorchServe handler class: echoes what it saw and which worker it ran in.
ECHO_HANDLER = textwrap.dedent(
    '''
    import json
    import os
    import time


    class EchoHandler:
        def initialize(self, context):
            self.initialized = True

        def handle(self, data, context):
            replies = []
            for idx, row in enumerate(data):
                body = row.get("body") or row.get("data")
                if isinstance(body, dict) and body.get("sleep"):
                    time.sleep(body["sleep"])
                seq_id = context.get_sequence_id(idx)
                headers = {
                    k: v for k, v in context.get_all_request_header(idx).items() if isinstance(v, str)
                }
                context.set_response_header(idx, "X-Amzn-SageMaker-Session-Id", seq_id)
                context.set_response_content_type(idx, "application/json")
                if isinstance(body, dict) and body.get("close"):
                    context.set_response_header(idx, context.header_key_sequence_end, seq_id)
                replies.append(json.dumps({
                    "pid": os.getpid(),
                    "seq_id": seq_id,
                    "start": context.get_request_header(idx, context.header_key_sequence_start),
                    "batch": len(data),
                    "body": body,
                    "headers": headers,
                }))
            return replies
    '''
)


def finding(what: str, value: object) -> None:
    print(f"FINDING {what}: {value}")


def make_checkpoint(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(path / "model.safetensors"))
    (path / "tokenizer_config.json").write_text("{}")
    (path / "notes.txt").write_text("not part of a checkpoint")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ts")


@pytest.fixture(scope="module")
def handler_file(workdir) -> Path:
    path = workdir / "echo_handler.py"
    path.write_text(ECHO_HANDLER)
    return path


@pytest.fixture(scope="module")
def checkpoint(workdir) -> Path:
    return make_checkpoint(workdir / "ckpt")


@pytest.fixture(scope="module")
def archive(workdir, checkpoint, handler_file) -> Path:
    return build_archive(
        checkpoint,
        workdir / "store",
        workers=WORKERS,
        sessions_per_worker=SESSIONS_PER_WORKER,
        session_ttl_s=120,
        handler_file=handler_file,
    )


@pytest.fixture(scope="module")
def server(workdir, archive):
    # TorchServe's defaults write ./logs (logs, config snapshots) and ./key_file.json.
    cwd_files = [Path.cwd() / name for name in ("logs", "key_file.json")]
    existed = [p.exists() for p in cwd_files]
    with TorchServeProcess(archive, workdir / "run-a", port=0) as ts:
        ts.wait_ready(timeout=60)
        yield ts
    assert [p.exists() for p in cwd_files] == existed, "TorchServe wrote into the CWD"


def invoke(
    ts: TorchServeProcess, body: dict, headers: dict | None = None, timeout: float = 30
) -> requests.Response:
    return requests.post(
        f"{ts.url}/invocations",
        data=json.dumps(body),
        headers={"Content-Type": "application/json", **(headers or {})},
        timeout=timeout,
    )


def close(ts: TorchServeProcess, session: str, **body) -> dict:
    """A turn whose handler sets the END header; returns once the slot is free."""
    closed = turn(ts, {"close": True, **body}, session=session)
    time.sleep(SLOT_RELEASE_S)
    return closed


def status_or_timeout(ts: TorchServeProcess, body: dict, headers: dict, timeout: float) -> int | str:
    try:
        return invoke(ts, body, headers, timeout).status_code
    except requests.Timeout:
        return "timeout"


def turn(ts: TorchServeProcess, body: dict, session: str | None = None, **headers) -> dict:
    if session is not None:
        headers[SESSION] = session
    resp = invoke(ts, body, headers)
    assert resp.status_code == 200, resp.text
    return {"reply": resp.json(), "headers": resp.headers}


# --- archive -------------------------------------------------------------------


def test_archive_layout_and_config(archive, checkpoint):
    names = sorted(p.relative_to(archive).as_posix() for p in archive.rglob("*") if p.is_file())
    assert names == [
        "MAR-INF/MANIFEST.json",
        "echo_handler.py",
        "model-config.yaml",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer_config.json",
    ]
    config = yaml.safe_load((archive / "model-config.yaml").read_text())
    assert config["minWorkers"] == config["maxWorkers"] == WORKERS
    assert config["batchSize"] == CAPACITY
    assert config["maxNumSequence"] == CAPACITY
    assert config["sequenceMaxIdleMSec"] == config["sequenceTimeoutMSec"] == 120_000
    assert config["handler"]["session_ttl_s"] == 120
    assert config["handler"]["max_sessions_per_worker"] == SESSIONS_PER_WORKER


def test_archive_rebuild_is_skipped_until_inputs_change(tmp_path, checkpoint, handler_file):
    def build(**overrides):
        return build_archive(
            checkpoint,
            tmp_path,
            workers=1,
            sessions_per_worker=2,
            session_ttl_s=60,
            handler_file=handler_file,
            handler_overrides=overrides or None,
        )

    first = build()
    stamp = (first / "MAR-INF/MANIFEST.json").stat().st_mtime_ns
    assert build() == first
    assert (first / "MAR-INF/MANIFEST.json").stat().st_mtime_ns == stamp
    build(max_new_tokens_limit=64, default_max_new_tokens=32)
    assert "max_new_tokens_limit: 64" in (first / "model-config.yaml").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".build-")] == []


@pytest.mark.parametrize("fmt, name", [("default", "llava.mar"), ("tgz", "llava.tar.gz")])
def test_archive_formats(tmp_path, checkpoint, handler_file, fmt, name):
    path = build_archive(
        checkpoint, tmp_path, workers=1, sessions_per_worker=1, session_ttl_s=60,
        handler_file=handler_file, fmt=fmt,
    )
    assert path.name == name
    if fmt == "default":
        members = zipfile.ZipFile(path).namelist()
    else:
        members = [m.split("/", 1)[1] for m in tarfile.open(path).getnames()]
    assert "model/model.safetensors" in members and "MAR-INF/MANIFEST.json" in members


def test_archive_refuses_pickle_only_checkpoints(tmp_path, handler_file):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ConfigError, match="only pickle weights"):
        build_archive(
            ckpt, tmp_path / "out", workers=1, sessions_per_worker=1, session_ttl_s=60,
            handler_file=handler_file,
        )


def test_archive_rejects_unknown_handler_settings(tmp_path, checkpoint, handler_file):
    with pytest.raises(ConfigError, match="unknown handler settings"):
        build_archive(
            checkpoint, tmp_path, workers=1, sessions_per_worker=1, session_ttl_s=60,
            handler_file=handler_file, handler_overrides={"max_sesions": 3},
        )


# --- TorchServe ------------------------------------------------------------------


def test_ready_and_described(server):
    assert requests.get(f"{server.url}/ping", timeout=5).json() == {"status": "Healthy"}
    model = server.describe()
    finding("describe", {k: model.get(k) for k in (
        "batchSize", "maxBatchDelay", "continuousBatching", "stateful", "sequenceMaxIdleMSec",
        "sequenceTimeoutMSec", "maxNumSequence", "maxSequenceJobQueueSize", "responseTimeout")})
    assert model["maxNumSequence"] == CAPACITY
    assert model["continuousBatching"] is True
    assert len(set(server.worker_pids())) == WORKERS


def test_turn_queued_behind_close_is_never_answered(server):
    """TorchServe drops a job still queued in a sequence that the handler ENDs."""
    sid = turn(server, {"open": 1})["headers"][SESSION]
    with ThreadPoolExecutor(2) as pool:
        closing = pool.submit(close, server, sid, sleep=1.0)
        time.sleep(0.3)
        queued = pool.submit(status_or_timeout, server, {"queued": 1}, {SESSION: sid}, 3.0)
        assert closing.result()["reply"]["seq_id"] == sid
        finding("turn queued behind CLOSE", queued.result())
        assert queued.result() == "timeout"
    assert turn(server, {"after": 1}, session=sid)["reply"]["start"] is None
    close(server, sid)  # free the slot for the next test


def test_session_routing(server):
    """The one long scenario: slots are shared, so the steps depend on each other."""
    pids = set(server.worker_pids())

    # A request without the header opens a sequence with TorchServe's own id.
    opened = [turn(server, {"turn": 0}) for _ in range(6)]
    ids = [o["headers"][SESSION] for o in opened]
    assert all(TS_SEQ.match(i) for i in ids), ids
    assert [o["reply"]["seq_id"] for o in opened] == ids
    assert all(o["reply"]["start"] == "true" for o in opened)
    owner = {i: o["reply"]["pid"] for i, o in zip(ids, opened)}
    assert set(owner.values()) <= pids
    finding("sequences per worker pid for 6 opens", _count(owner.values()))

    # Interleaved follow-ups stay on the worker that served the open.
    for n in range(1, 4):
        for i in ids:
            t = turn(server, {"turn": n}, session=i)
            assert (t["reply"]["seq_id"], t["reply"]["pid"]) == (i, owner[i])
            assert t["reply"]["start"] is None
            assert t["headers"][SESSION] == i

    # CLOSE: the handler sets the END header; TorchServe frees the job group.
    closed = close(server, ids[0])
    finding("END response headers seen by the client", dict(closed["headers"]))
    again = [turn(server, {"after_close": k}, session=ids[0]) for k in range(4)]
    finding(
        "same id after END (seq_id, start flag, pid; owner before was %d)" % owner[ids[0]],
        [(a["reply"]["seq_id"], a["reply"]["start"], a["reply"]["pid"]) for a in again],
    )
    assert all(a["reply"]["seq_id"] == ids[0] for a in again)
    assert len({a["reply"]["pid"] for a in again}) == 1

    # The literal NEW_SESSION is taken as an ordinary sequence id.
    news = [turn(server, {"new": k}, session="NEW_SESSION") for k in range(3)]
    finding(
        "NEW_SESSION literal (seq_id, start, pid, response session header)",
        [(n["reply"]["seq_id"], n["reply"]["start"], n["reply"]["pid"], n["headers"][SESSION]) for n in news],
    )
    assert {n["reply"]["seq_id"] for n in news} == {"NEW_SESSION"}
    assert len({n["reply"]["pid"] for n in news}) == 1

    # Header names match case-sensitively: a lower-case name is not the session id.
    lower = turn(server, {"lower": 1}, **{SESSION.lower(): ids[1]})
    finding("lower-case header name (seq_id, start, headers seen)", (
        lower["reply"]["seq_id"], lower["reply"]["start"],
        {k: v for k, v in lower["reply"]["headers"].items() if "session" in k.lower()},
    ))
    assert lower["reply"]["seq_id"] != ids[1] and TS_SEQ.match(lower["reply"]["seq_id"])

    # Now 5 + reopened + NEW_SESSION + lower-case = 8 = capacity.
    over = invoke(server, {"over": 1})
    finding("new sequence over maxNumSequence", (over.status_code, over.text.strip()))
    assert over.status_code == 503
    assert turn(server, {"still": 1}, session=ids[2])["reply"]["pid"] == owner[ids[2]]

    # Closing one frees a slot at once; an empty header value opens a new sequence.
    close(server, ids[3])
    empty = turn(server, {"empty": 1}, session="")
    finding("empty header value (seq_id, start)", (empty["reply"]["seq_id"], empty["reply"]["start"]))
    assert TS_SEQ.match(empty["reply"]["seq_id"])


def test_second_instance_runs_beside_the_first(server, archive, workdir):
    with TorchServeProcess(archive, workdir / "run-b", port=0) as other:
        other.wait_ready(timeout=60)
        assert other.port != server.port
        assert turn(other, {"hi": 1})["reply"]["body"] == {"hi": 1}
        assert requests.get(f"{server.url}/ping", timeout=5).status_code == 200
    assert (workdir / "run-b" / "logs" / "ts_log.log").is_file()


def test_stop_leaves_no_processes(workdir, archive):
    ts = TorchServeProcess(archive, workdir / "run-c", port=0).start()
    ts.wait_ready(timeout=60)
    pgid, workers = ts.pid, ts.worker_pids()
    assert len(group_pids(pgid)) >= 2 + len(workers)  # launcher, JVM, workers
    ts.stop(timeout=30)
    assert group_pids(pgid) == []
    assert all(not Path(f"/proc/{p}").exists() or _is_zombie(p) for p in workers)


def _count(values) -> dict:
    counts: dict = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


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
    archive = build_archive(
        checkpoint, tmp_path / "store", workers=1, sessions_per_worker=1, session_ttl_s=60,
        handler_file=broken,
    )
    with TorchServeProcess(archive, tmp_path / "run", port=0) as ts:
        with pytest.raises(TorchServeError, match="(?s)not READY.*checkpoint unreadable"):
            ts.wait_ready(timeout=8)
