"""Run TorchServe 0.12 as a child process: start, wait for READY workers, stop. Torch-free.

Everything an instance writes (config, logs, pid file, sockets, temp files)
stays under its ``run_dir``, so instances on different ports run side by side
and nothing lands in the current directory.

Ports chosen here (``_free_port``: bind to port 0, read it, close) can be taken by
someone else before TorchServe binds them; ``wait_ready`` then restarts TorchServe on
fresh ports, a bounded number of times. And since TorchServe's ``torchserve``
launcher drops the exit status of its Java front end (it always exits 0), the
launcher runs under a small wrapper that records it, for ``exit_report``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Mapping

import requests

from llava_sessions.archive import TEMPLATE_DIR
from llava_sessions.config import START_REFUSAL_FILE_ENV

CONFIG_TEMPLATE = TEMPLATE_DIR / "config.properties"
LOG_CONFIG = TEMPLATE_DIR / "log4j2.xml"  # the front end's logging: no per-request chatter
METRICS_CONFIG = TEMPLATE_DIR / "metrics.yaml"  # every metric declared up front (see its header)
LOOPBACK = "127.0.0.1"
POLL_INTERVAL_S = 0.25
HTTP_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 60
REQUEST_LOG_LINE = re.compile(r" (ACCESS_LOG|TS_METRICS) - ")
# The front end prints this to stdout once every HTTP and gRPC port is bound (and never otherwise):
# workers can be READY on the management API a second before a late gRPC bind fails.
FRONT_END_STARTED = "Model server started."
# Java's bind failures, HTTP ("...address: http://127.0.0.1:8081") and gRPC ("...address /127.0.0.1:7070").
BIND_FAILURE = re.compile(r"Failed to bind to address:?\s+(?:[a-z]+://)?/?(?P<host>\S*?):(?P<port>\d+)\b")
ADDRESS_IN_USE = "Address already in use"
# Launches in all, the first included, when ports chosen here turn out taken.
MAX_START_ATTEMPTS = 3
WORKER_POLL_TIMEOUT_S = 2.0
# How much of the end of the console log log_tail reads at most.
LOG_TAIL_BYTES = 1 << 20
# The JVM exits with 128+signal after running its shutdown hooks on these.
JVM_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
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
# TorchServe's launcher (ts.model_server.start, what the `torchserve` script runs), run so that it
# records its Java front end's pid, and its exit status once it has reaped it, in the JSON file
# given as the first argument; the launcher itself drops that status and exits 0. Everything else
# is the launcher's own behaviour, its arguments and exit code included.
_LAUNCHER = """\
import json, os, subprocess, sys

status_path = sys.argv.pop(1)


def record(**fields):
    with open(status_path + '.tmp', 'w') as f:
        json.dump(fields, f)
    os.replace(status_path + '.tmp', status_path)


class FrontEnd(subprocess.Popen):
    def __init__(self, args, *rest, **kwargs):
        super().__init__(args, *rest, **kwargs)
        # Only the JVM: any other child the launcher might start is not the front end.
        self.front_end = isinstance(args, (list, tuple)) and os.path.basename(str(args[0])) == 'java'
        if self.front_end:
            record(pid=self.pid)

    def wait(self, timeout=None):
        code = super().wait(timeout)
        if self.front_end:
            record(pid=self.pid, returncode=code)
            print(f'llava-sessions: the front end (pid {self.pid}) ended, returncode {code}', flush=True)
        return code


subprocess.Popen = FrontEnd
from ts.model_server import start

sys.argv[0] = 'torchserve'
sys.exit(start())
"""

log = logging.getLogger(__name__)


# Ports TorchServe binds; 0 given (the default) means chosen here, and chosen afresh when taken.
_PORT_NAMES = ("port", "management_port", "metrics_port", "grpc_inference_port", "grpc_management_port")


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
        self.model_prefix = model_prefix  # the models' common name (each copy is <prefix>-<i>)
        self.model_names = [f"{model_prefix}-{i}" for i in range(copies)]
        self.max_request_bytes = max_request_bytes  # None: config.properties' max_request_size
        self.host = host
        self.port, self.management_port, self.metrics_port = port, management_port, metrics_port
        # gRPC cannot be switched off; each instance gets its own ports.
        self.grpc_inference_port = self.grpc_management_port = 0
        # The ports chosen here, not given: only those are chosen afresh when one is found taken.
        self._auto_ports = {name for name in _PORT_NAMES if not getattr(self, name)}
        self._choose_ports()
        # A .mar must sit in the model store; a directory may be anywhere.
        self.model_store = Path(model_store).resolve() if model_store else self.archive.parent
        self.config_template = Path(config_template)
        self.extra_env = dict(env or {})
        self.torchserve = str(torchserve or _default_torchserve())
        self.log_dir = self.run_dir / "logs"
        self.console_log = self.log_dir / "torchserve.out"
        self.frontend_status = self.run_dir / "frontend.json"  # written by _LAUNCHER
        self.start_refusal = self.run_dir / "start-refusal.txt"  # written by a worker that refuses to start
        self._launcher_python = _launcher_python(self.torchserve, default=torchserve is None)
        self._proc: subprocess.Popen | None = None
        self._owner_watch: subprocess.Popen | None = None
        self._console: IO[bytes] | None = None
        self._console_offset = 0  # where this launch's part of the console log begins
        self.attempts = 0  # launches since start(): 1, or more after ports were found taken
        self._frontend_pid: int | None = None
        self._workers_seen: dict[str, int | None] | None = None

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
        """Launch TorchServe; ``wait_ready`` then waits for it (and relaunches it if ports were taken)."""
        if self._proc is not None:
            raise TorchServeError("already started")
        self.attempts = 0
        self._launch()
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until every worker of every copy is READY (/ping says Healthy before that).

        When TorchServe exits because a port chosen here was taken after it was chosen
        (another process bound it in between), it is stopped and launched again with fresh
        ports, at most ``MAX_START_ATTEMPTS`` launches in all, within the same ``timeout``;
        ``url``, ``backend_urls`` and the other addresses then give the new ports. A taken
        port that was given explicitly is reported, not retried. Raises TorchServeError
        when TorchServe exits otherwise or is not ready in time, with the end of its log.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None:
                raise TorchServeError("not started")
            if self._proc.poll() is not None:
                self._relaunch_or_raise()  # a new launch gets the rest of the time
                continue
            refusal = self._start_refusal()
            if refusal:  # TorchServe would restart the worker for ever; the cause will not change
                raise TorchServeError(f"the model worker refused to start: {refusal}")
            models = [self._describe_or_none(name) for name in self.model_names]
            if all(m is not None and _all_workers_ready(m) for m in models) and self._front_end_started():
                self._workers_seen = {name: _serving_pid(m) for name, m in zip(self.model_names, models)}
                self._frontend_pid = self._find_frontend_pid()
                return
            if time.monotonic() >= deadline:
                raise TorchServeError(f"workers not READY after {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(POLL_INTERVAL_S)

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
        self._frontend_pid = None
        self._workers_seen = None
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

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until TorchServe's launcher exits; its exit code (None if ``timeout`` s pass first).

        The launcher exits 0 also when its Java front end was killed: ``exit_report`` says what
        ended and how.
        """
        if self._proc is None:
            raise TorchServeError("not started")
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def poll(self) -> int | None:
        """The launcher's exit code once it has exited, else None (cheap: no I/O)."""
        if self._proc is None:
            raise TorchServeError("not started")
        return self._proc.poll()

    @property
    def frontend_pid(self) -> int | None:
        """Pid of the Java front end (``org.pytorch.serve.ModelServer``), None if not known or not started."""
        if self._proc is None:
            return None
        return self._read_frontend_status().get("pid") or self._frontend_pid or self._find_frontend_pid()

    def exit_report(self, log_lines: int = 20) -> str:
        """What ended, and how, once ``wait()`` has returned: for ``serve`` to print.

        The first line names the component that ended first and how, for example
        "TorchServe's front end (Java, pid 1234) was killed by signal 9 (SIGKILL); its
        launcher (pid 1200) then exited with code 0", "... (Java, pid 1234) exited with code 1;
        ...", or "TorchServe's launcher (pid 1200) was killed by signal 9 (SIGKILL); its front
        end (Java, pid 1234) is still running". The front end's status comes from the wrapper
        the launcher runs under; where it is not known (a ``torchserve`` that is not a Python
        script) the line says so rather than guess. Then, unless ``log_lines`` is 0, the last
        ``log_lines`` lines of this launch's console log (no per-request lines).
        """
        summary = self._exit_summary()
        if not log_lines:
            return summary
        return f"{summary}\nLast lines of TorchServe's log ({self.console_log}):\n{self.log_tail(log_lines)}"

    def poll_worker_changes(self, timeout: float = WORKER_POLL_TIMEOUT_S) -> list[str]:
        """Worker restarts since the last call (or since ``wait_ready``), as messages for ``serve``.

        TorchServe starts a new worker when one dies. Each call asks the management API once
        per copy and compares each copy's READY worker with the one seen before:
        "worker of llava-0 (pid 4321) stopped; TorchServe is starting a new one", then (this
        or a later call) "worker of llava-0 is back (pid 4400)". Returns [] when nothing
        changed, when the management API does not answer within ``timeout`` (TorchServe
        itself going down is ``wait``'s business), or before the first baseline. Meant to be
        called every second or so while serving, e.g.::

            while (code := ts.wait(timeout=1.0)) is None:
                for message in ts.poll_worker_changes():
                    print(f"llava-sessions: {message}", file=sys.stderr)
            print(f"llava-sessions: {ts.exit_report()}", file=sys.stderr)
        """
        if self._proc is None or self._proc.poll() is not None:
            return []
        current: dict[str, int | None] = {}
        for name in self.model_names:
            model = self._describe_or_none(name, timeout=timeout)
            if model is None:
                return []
            current[name] = _serving_pid(model)
        seen, self._workers_seen = self._workers_seen, current
        if seen is None:
            return []
        messages = []
        for name, pid in current.items():
            before = seen.get(name)
            if before is not None and pid != before:
                messages.append(f"worker of {name} (pid {before}) stopped; TorchServe is starting a new one")
            if pid is not None and pid != before:
                messages.append(f"worker of {name} is back (pid {pid})")
        return messages

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
        """The end of this launch's console log, without per-request lines (wait_ready's polls).

        Earlier runs in the same run_dir, and launches that found their ports taken, append to
        the same file before it: they are left out.
        """
        text = self._console_text()
        if text is None:
            return "(no TorchServe log yet)"
        kept = [line for line in text.splitlines() if not REQUEST_LOG_LINE.search(line)]
        return "\n".join(kept[-lines:])

    # --- helpers -----------------------------------------------------------

    def _launch(self) -> None:
        tmp_dir = self.run_dir / "tmp"
        for d in (self.log_dir, tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self.frontend_status.unlink(missing_ok=True)
        self.start_refusal.unlink(missing_ok=True)
        self._console = self.console_log.open("ab")
        self._console_offset = self.console_log.stat().st_size
        self.attempts += 1
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

    def _relaunch_or_raise(self) -> None:
        """TorchServe exited before it was ready: launch it again on fresh ports if one it was
        given here was taken (and attempts are left), else raise TorchServeError."""
        failure = self._bind_failure()
        if failure is None:
            raise TorchServeError(f"TorchServe exited before it was ready: {self._exit_summary()}\n{self.log_tail()}")
        host, port = failure
        name = next((n for n in _PORT_NAMES if getattr(self, n) == port), None)
        if name is None or name not in self._auto_ports:
            why = "it was given explicitly" if name else "not a port it was given"
            raise TorchServeError(f"TorchServe could not bind {host}:{port}: the port is in use ({why})\n"
                                  f"{self.log_tail()}")
        if self.attempts >= MAX_START_ATTEMPTS:
            raise TorchServeError(
                f"TorchServe could not bind {host}:{port}: the port is in use (taken since it was chosen); "
                f"gave up after {self.attempts} attempts on freshly chosen ports\n{self.log_tail()}")
        log.warning("TorchServe could not bind %s:%d (taken since it was chosen); restarting on fresh ports, "
                    "attempt %d of %d", host, port, self.attempts + 1, MAX_START_ATTEMPTS)
        self.stop()  # what is left of the group: a worker may still be on its way out
        self._choose_ports(fresh=True)
        self._launch()

    def _choose_ports(self, fresh: bool = False) -> None:
        """Pick a free port for each port chosen here (all of them again when ``fresh``)."""
        for name in _PORT_NAMES:
            if name in self._auto_ports and (fresh or not getattr(self, name)):
                setattr(self, name, _free_port(self.host if name == "port" else LOOPBACK))

    def _console_text(self, head: bool = False) -> str | None:
        """This launch's part of the console log: its last LOG_TAIL_BYTES at most (its first, if ``head``)."""
        try:
            with self.console_log.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = self._console_offset if head else max(self._console_offset, size - LOG_TAIL_BYTES)
                f.seek(min(start, size))
                return f.read(LOG_TAIL_BYTES).decode(errors="replace")
        except FileNotFoundError:
            return None

    def _front_end_started(self) -> bool:
        """Whether this launch's front end has bound all its ports (it says so early in its log)."""
        return FRONT_END_STARTED in (self._console_text(head=True) or "")

    def _bind_failure(self) -> tuple[str, int] | None:
        """(host, port) of the address this launch's front end found in use, if that is why it ended."""
        text = self._console_text() or ""
        match = BIND_FAILURE.search(text)
        if match is None or ADDRESS_IN_USE not in text[match.start():]:
            return None
        return match["host"], int(match["port"])

    def _start_refusal(self) -> str:
        """Why a worker refused to start (its ConfigError), or ""."""
        try:
            return self.start_refusal.read_text(encoding="utf-8").strip().splitlines()[0]
        except (OSError, IndexError):
            return ""

    def _read_frontend_status(self) -> dict[str, int]:
        try:
            status = json.loads(self.frontend_status.read_text())
        except (OSError, ValueError):
            return {}
        return status if isinstance(status, dict) else {}

    def _find_frontend_pid(self) -> int | None:
        if self._proc is None:
            return None
        for pid in group_pids(self._proc.pid):
            try:
                if b"org.pytorch.serve.ModelServer" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                    return pid
            except OSError:
                continue
        return None

    def _exit_summary(self) -> str:
        """One line: which of launcher and front end ended first, and how (never a guess)."""
        if self._proc is None:
            return "TorchServe is not running (not started, or stopped)"
        code = self._proc.poll()
        launcher = f"TorchServe's launcher (pid {self._proc.pid})"
        if code is None:
            return f"TorchServe is still running (launcher pid {self._proc.pid})"
        status = self._read_frontend_status()
        java_pid = status.get("pid") or self._frontend_pid
        front_end = f"front end (Java, pid {java_pid})"
        if "returncode" in status:
            return (f"TorchServe's {front_end} {_how_it_ended(status['returncode'], jvm=True)}; "
                    f"its launcher (pid {self._proc.pid}) then {_how_it_ended(code)}")
        if java_pid is None:
            if self._launcher_python is not None:  # the wrapper records the pid as Java starts
                return f"{launcher} {_how_it_ended(code)} without starting the front end (Java)"
            return f"{launcher} {_how_it_ended(code)}"
        if _is_alive(java_pid):
            return f"{launcher} {_how_it_ended(code)}; its {front_end} is still running"
        if code < 0:
            return (f"{launcher} {_how_it_ended(code)}; its {front_end} is gone too "
                    f"(how it ended is not known)")
        return (f"TorchServe's {front_end} is gone, how it ended is not known (its exit status went to "
                f"the launcher); {launcher} {_how_it_ended(code)}")

    def _stop_owner_watch(self) -> None:
        """Stop the watch (sh and its cat) before stop() signals the group itself."""
        watch, self._owner_watch = self._owner_watch, None
        if watch is None:
            return
        _signal_group(watch.pid, signal.SIGKILL)
        watch.stdin.close()
        watch.wait()

    def _command(self) -> list[str]:
        if self._launcher_python is not None:
            launcher = [*self._launcher_python, "-c", _LAUNCHER, str(self.frontend_status)]
        else:  # not a Python script: run as is; the front end's exit status is then not known
            launcher = [self.torchserve]
        return [
            *launcher,
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
            "grpc_inference_port": str(self.grpc_inference_port),
            "grpc_management_port": str(self.grpc_management_port),
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
        env[START_REFUSAL_FILE_ENV] = str(self.start_refusal)
        env.update(self.extra_env)
        return env

    def _describe_or_none(self, model_name: str, timeout: float = HTTP_TIMEOUT_S) -> dict[str, Any] | None:
        try:
            resp = requests.get(f"{self.management_url}/models/{model_name}", timeout=timeout)
        except requests.RequestException:
            return None
        if resp.status_code != 200:
            return None
        return resp.json()[0]

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


def _serving_pid(model: Mapping[str, Any]) -> int | None:
    """Pid of a copy's (first) worker while it is READY, else None."""
    workers = model.get("workers") or []
    if not workers or workers[0].get("status") != "READY":
        return None
    pid = workers[0].get("pid", -1)
    return pid if isinstance(pid, int) and pid > 0 else None


def _how_it_ended(returncode: int, jvm: bool = False) -> str:
    if returncode < 0:
        return f"was killed by signal {-returncode} ({_signal_name(-returncode)})"
    if jvm and returncode - 128 in JVM_HANDLED_SIGNALS:
        # What the JVM returns after running its shutdown hooks on one of these signals.
        name = _signal_name(returncode - 128)
        return f"exited with code {returncode} (128+{returncode - 128}: the JVM's exit on {name})"
    return f"exited with code {returncode}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _is_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _launcher_python(torchserve: str, default: bool) -> list[str] | None:
    """The interpreter to run _LAUNCHER with: this one for the default ``torchserve`` (its
    neighbour), else that of a ``torchserve`` Python script's ``#!`` line; None when it is not one."""
    if default:
        return [sys.executable]
    try:
        with open(torchserve, "rb") as f:
            head = f.read(4096).decode(errors="replace")
    except OSError:
        return None
    first = head.splitlines()[0] if head else ""
    if not first.startswith("#!") or "ts.model_server" not in head:
        return None
    try:
        interpreter = shlex.split(first[2:])
    except ValueError:
        return None
    if not any(Path(arg).name.startswith("python") for arg in interpreter):
        return None  # e.g. pip's /bin/sh trampoline for long paths
    return interpreter


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
