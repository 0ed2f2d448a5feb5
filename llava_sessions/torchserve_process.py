"""Run TorchServe 0.12 as a child process: start, wait for READY workers, stop. Torch-free.

Everything an instance writes (config, logs, pid file, sockets, temp files)
stays under its ``run_dir``, so instances on different ports run side by side
and nothing lands in the current directory.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Mapping

import requests

from llava_sessions.archive import TEMPLATE_DIR

CONFIG_TEMPLATE = TEMPLATE_DIR / "config.properties"
LOG_CONFIG = TEMPLATE_DIR / "log4j2.xml"  # the front end's logging: no per-request chatter
METRICS_CONFIG = TEMPLATE_DIR / "metrics.yaml"  # every metric declared up front (see its header)
LOOPBACK = "127.0.0.1"
POLL_INTERVAL_S = 0.25
HTTP_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 60
REQUEST_LOG_LINE = re.compile(r" (ACCESS_LOG|TS_METRICS) - ")
# How long TorchServe gets to stop on SIGTERM when its owner died, before SIGKILL.
ORPHAN_GRACE_S = 20
# Stops TorchServe's process group once the owner is gone: the owner holds the write end of this
# process's stdin, which the kernel closes however the owner exits (even SIGKILL), so ``cat`` sees
# EOF. Its own session, so the TERM it sends to TorchServe's group does not reach it. (No `--`
# before the negative pgid: dash's kill takes it for a pid.)
_OWNER_WATCH = (
    'cat >/dev/null; kill -TERM "-$1" 2>/dev/null || exit 0; '
    'sleep "$2"; kill -KILL "-$1" 2>/dev/null; exit 0'
)

class TorchServeError(RuntimeError):
    """TorchServe did not start, did not get ready, or could not be asked."""


class TorchServeProcess:
    """One TorchServe serving ``copies`` registrations of one archive; a context manager.

    Copy ``i`` is the model ``<model_prefix>-<i>`` with one worker on its own
    device; ``backend_urls[i]`` is its inference endpoint. ``port`` 0 (and
    ``management_port``/``metrics_port`` 0, the default) picks a free port.
    Inference binds ``host`` (loopback unless 0.0.0.0 is asked for);
    management, metrics and gRPC always bind loopback.
    """

    def __init__(
        self,
        archive: str | Path,
        run_dir: str | Path,
        *,
        copies: int = 1,
        model_prefix: str = "llava",
        host: str = LOOPBACK,
        port: int = 0,
        management_port: int = 0,
        metrics_port: int = 0,
        model_store: str | Path | None = None,
        config_template: str | Path = CONFIG_TEMPLATE,
        env: Mapping[str, str] | None = None,
        torchserve: str | Path | None = None,
        max_request_bytes: int | None = None,
    ):
        self.archive = Path(archive).resolve()
        self.run_dir = Path(run_dir).resolve()
        self.model_names = [f"{model_prefix}-{i}" for i in range(copies)]
        self.max_request_bytes = max_request_bytes  # None: config.properties' max_request_size
        self.host = host
        self.port = port or _free_port(host)
        self.management_port = management_port or _free_port(LOOPBACK)
        self.metrics_port = metrics_port or _free_port(LOOPBACK)
        # A .mar must sit in the model store; a directory may be anywhere.
        self.model_store = Path(model_store).resolve() if model_store else self.archive.parent
        self.config_template = Path(config_template)
        self.extra_env = dict(env or {})
        self.torchserve = str(torchserve or _default_torchserve())
        self.log_dir = self.run_dir / "logs"
        self.console_log = self.log_dir / "torchserve.out"
        self._proc: subprocess.Popen | None = None
        self._owner_watch: subprocess.Popen | None = None
        self._console: IO[bytes] | None = None

    # --- addresses ---------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the inference API (POST /invocations, GET /ping)."""
        host = LOOPBACK if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def backend_urls(self) -> list[str]:
        """Inference endpoint of each copy, in copy order."""
        return [f"{self.url}/predictions/{name}" for name in self.model_names]

    @property
    def metrics_url(self) -> str:
        """Prometheus metrics, TorchServe's and the handler's."""
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    @property
    def management_url(self) -> str:
        return f"http://{LOOPBACK}:{self.management_port}"

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> "TorchServeProcess":
        if self._proc is not None:
            raise TorchServeError("already started")
        tmp_dir = self.run_dir / "tmp"
        for d in (self.log_dir, tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._console = self.console_log.open("ab")
        self._proc = subprocess.Popen(
            self._command(),
            cwd=self.run_dir,
            env=self._child_env(tmp_dir),
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
            # Its own process group: stop() signals launcher, JVM and workers at once.
            start_new_session=True,
        )
        # Its own group also means nothing stops it when this process dies without stop() (killed,
        # or a signal Python does not turn into an exception): the watch does then.
        try:
            self._owner_watch = subprocess.Popen(
                ["sh", "-c", _OWNER_WATCH, "owner-watch", str(self._proc.pid), str(ORPHAN_GRACE_S)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until every worker of every copy is READY (/ping says Healthy before that)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._raise_if_exited()
            models = [self._describe_or_none(name) for name in self.model_names]
            if all(m is not None and _all_workers_ready(m) for m in models):
                return
            time.sleep(POLL_INTERVAL_S)
        raise TorchServeError(f"workers not READY after {timeout:.0f} s\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group, wait for JVM and workers to go, SIGKILL what is left."""
        if self._proc is None:
            return
        self._stop_owner_watch()
        pgid = self._proc.pid
        _signal_group(pgid, signal.SIGTERM)
        if not self._wait_group_gone(pgid, timeout):
            _signal_group(pgid, signal.SIGKILL)
            if not self._wait_group_gone(pgid, 10.0):
                raise TorchServeError(f"processes {group_pids(pgid)} survived SIGKILL")
        self._proc = None
        self._console.close()

    def __enter__(self) -> "TorchServeProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- inspection --------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Pid of the launcher, which is also the process group id."""
        return self._proc.pid if self._proc else None

    def wait(self) -> int:
        """Block until TorchServe exits; its exit code."""
        if self._proc is None:
            raise TorchServeError("not started")
        return self._proc.wait()

    def describe(self, model_name: str) -> dict[str, Any]:
        """The management API's description of one copy (workers, batch settings)."""
        model = self._describe_or_none(model_name)
        if model is None:
            raise TorchServeError(f"management API at {self.management_url} did not describe {model_name}")
        return model

    def worker_pids(self) -> list[int]:
        """The worker pid of each copy, in copy order (-1 while a worker restarts)."""
        pids = []
        for name in self.model_names:
            workers = self.describe(name)["workers"]
            pids.append(workers[0].get("pid", -1) if workers else -1)
        return pids

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The end of TorchServe's console log, without per-request lines (wait_ready's polls)."""
        try:
            text = self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no TorchServe log yet)"
        kept = [line for line in text.splitlines() if not REQUEST_LOG_LINE.search(line)]
        return "\n".join(kept[-lines:])

    # --- helpers -----------------------------------------------------------

    def _stop_owner_watch(self) -> None:
        """Stop the watch (sh and its cat) before stop() signals the group itself."""
        watch, self._owner_watch = self._owner_watch, None
        if watch is None:
            return
        _signal_group(watch.pid, signal.SIGKILL)
        watch.stdin.close()
        watch.wait()

    def _command(self) -> list[str]:
        return [
            self.torchserve,
            "--start",
            "--foreground",
            "--ncs",
            "--model-store",
            str(self.model_store),
            "--models",
            *(f"{name}={self.archive}" for name in self.model_names),
            "--ts-config",
            str(self.run_dir / "config.properties"),
            "--log-config",
            str(LOG_CONFIG),
            "--disable-token-auth",
        ]

    def _write_config(self) -> None:
        """Write run_dir/config.properties from the template with this run's addresses."""
        overrides = {
            "inference_address": f"http://{self.host}:{self.port}",
            "management_address": f"http://{LOOPBACK}:{self.management_port}",
            "metrics_address": f"http://{LOOPBACK}:{self.metrics_port}",
            # gRPC cannot be switched off; give each instance its own ports.
            "grpc_inference_port": str(_free_port(LOOPBACK)),
            "grpc_management_port": str(_free_port(LOOPBACK)),
            "model_store": str(self.model_store),
            "metrics_config": str(METRICS_CONFIG),
        }
        if self.max_request_bytes is not None:
            overrides["max_request_size"] = str(self.max_request_bytes)
        text = _override_properties(self.config_template.read_text(), overrides)
        (self.run_dir / "config.properties").write_text(text)

    def _child_env(self, tmp_dir: Path) -> dict[str, str]:
        # enable_envvars_config lets any inherited TS_* variable override the
        # per-run config (a stray TS_INFERENCE_ADDRESS would rebind 8080):
        # pass on only the ones set here.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
        env.update(
            LOG_LOCATION=str(self.log_dir),  # log4j2 and config snapshots, default ./logs
            METRICS_LOCATION=str(self.log_dir),
            TEMP=str(tmp_dir),  # java.io.tmpdir: model symlinks/extraction, worker sockets
            TMPDIR=str(tmp_dir),  # the launcher's .model_server.pid ("already running" check)
            TS_DISABLE_TOKEN_AUTHORIZATION="true",
            # Bodies reach the handler as raw bytes: our strict JSON parsing, not json.loads'.
            TS_DECODE_INPUT_REQUEST="false",
        )
        env.update(self.extra_env)
        return env

    def _describe_or_none(self, model_name: str) -> dict[str, Any] | None:
        try:
            resp = requests.get(f"{self.management_url}/models/{model_name}", timeout=HTTP_TIMEOUT_S)
        except requests.RequestException:
            return None
        if resp.status_code != 200:
            return None
        return resp.json()[0]

    def _raise_if_exited(self) -> None:
        if self._proc is None:
            raise TorchServeError("not started")
        code = self._proc.poll()
        if code is not None:
            raise TorchServeError(f"TorchServe exited with code {code}\n{self.log_tail()}")

    def _wait_group_gone(self, pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._proc.poll()  # reap the launcher, our own child
            if not group_pids(pgid):
                return True
            time.sleep(POLL_INTERVAL_S)
        return False


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, read from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in ("Z", "X"):
            pids.append(int(stat.parent.name))
    return pids


def _all_workers_ready(model: Mapping[str, Any]) -> bool:
    workers = model.get("workers", [])
    return len(workers) >= max(1, model.get("minWorkers", 1)) and all(
        w.get("status") == "READY" for w in workers
    )


def _override_properties(template: str, overrides: Mapping[str, str]) -> str:
    """Replace or append ``key=value`` lines of a .properties text."""
    lines, pending = [], dict(overrides)
    for line in template.splitlines():
        key, sep, value = line.partition("=")
        key = key.strip()
        if sep and not key.startswith(("#", "!")):
            line = f"{key}={pending.pop(key, value.strip())}"
        lines.append(line)
    lines += [f"{key}={value}" for key, value in pending.items()]
    return "\n".join(lines) + "\n"


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _default_torchserve() -> Path:
    """The torchserve script of this interpreter's environment, so workers use the same Python."""
    return Path(sys.executable).parent / "torchserve"
