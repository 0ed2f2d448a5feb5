"""``llava-sessions loadtest``: concurrent conversations, then open/close churn with a leak check.

Two phases, both bounded in count and in time (``--max-seconds``), against the real stack over
loopback HTTP: either one this command starts in a process of its own (the bench's
``StackProcess``, one worker, a free port) or a running server given by ``--url``.

1. **load**: ``--sessions`` conversations at once, one thread each: open with an image, ``--turns``
   turns, close. Every request's status and latency is recorded.
2. **soak**: ``--cycles`` open/close cycles on ``--soak-threads`` threads, after a short warm-up.
   Before and after, the engine's own accounting (``llava_sessions_open`` and
   ``llava_session_bytes{tier}`` on TorchServe's Prometheus port) and the host RSS of the worker
   processes and of the router's process are read. Sessions must be back to exactly 0, bytes held
   exactly at the baseline, RSS within the margin.

Exit status: 0 when every check passed, 1 when one failed (any 5xx or transport error, a leak, the
time guard), 2 when the run could not start. Torch-free at import; only resolving the default
offline model (writing it once) imports torch.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import re
import shlex
import struct
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from llava_sessions.bench.served import Client
from llava_sessions.wire import CLOSE, NEW_SESSION

MIB = 1024 * 1024
KINDS = ("open", "turn", "close")
TIERS = ("device_kv", "device_features", "host_kv", "host_features")
SESSIONS_OPEN = "llava_sessions_open"  # handler/metrics.py's names (that module imports TorchServe)
SESSION_BYTES = "llava_session_bytes"
METRICS_WRITE_INTERVAL_S = 1.0  # handler/metrics.py's WRITE_INTERVAL_S: how stale Prometheus may be
# RSS margin. A worker's RSS is not an exact ledger: glibc's malloc keeps freed arenas, PyTorch's
# CPU allocator and the tokenizer keep caches, and the first cycles after the load phase can touch
# pages the load phase did not. Those are one-off steps of a few MiB to a few tens of MiB, the same
# at 300 cycles as at 10,000; a leak grows with the count. 10% of a worker's RSS (a few hundred MiB
# for the tiny model, tens of GiB for a 7B one on the host side) or 64 MiB, whichever is larger,
# absorbs the steps; the exact check is the engine's byte accounting, and the report also gives
# the growth per cycle over the second half of the soak, which is ~0 without a leak.
DEFAULT_RSS_MARGIN_FRACTION = 0.10
DEFAULT_RSS_MARGIN_MIB = 64.0
PROMPTS = [
    "What is in the picture?",
    "What colour is it?",
    "Is there anything on the left side?",
    "Describe the top of the image.",
    "And the bottom?",
    "Is it bright or dark?",
    "How many shapes can you see?",
    "What is in the middle?",
    "Is there any text?",
    "Sum it up in one sentence.",
]


class LoadTestError(RuntimeError):
    """The run could not start (no server, no metrics, bad options)."""


# --- statistics and verdicts (pure) --------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default method)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_summary(seconds: Sequence[float]) -> dict:
    """count, p50/p90/p99/max and mean of a list of latencies (None for each figure when empty)."""
    if not seconds:
        return {"count": 0, "p50_s": None, "p90_s": None, "p99_s": None, "max_s": None, "mean_s": None}
    return {
        "count": len(seconds),
        "p50_s": percentile(seconds, 50),
        "p90_s": percentile(seconds, 90),
        "p99_s": percentile(seconds, 99),
        "max_s": max(seconds),
        "mean_s": sum(seconds) / len(seconds),
    }


def rss_limit(baseline_bytes: int, fraction: float, margin_mib: float) -> int:
    """The most RSS a process may hold after the soak: baseline + max(fraction × baseline, margin)."""
    return int(baseline_bytes + max(fraction * baseline_bytes, margin_mib * MIB))


@dataclass
class Check:
    name: str
    passed: bool | None  # None: not checked (nothing to read it from)
    detail: str

    @property
    def label(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]


def error_checks(phase: str, status_counts: Mapping[str, int]) -> list[Check]:
    """No 5xx and no transport failure (refused, reset, client timeout) in a phase."""
    server_errors = sum(n for status, n in status_counts.items() if status.isdigit() and int(status) >= 500)
    transport = sum(n for status, n in status_counts.items() if not status.isdigit())
    total = sum(status_counts.values())
    return [
        Check(f"{phase}: no 5xx", server_errors == 0, f"{server_errors} of {total} requests"),
        Check(f"{phase}: no transport errors", transport == 0,
              f"{transport} of {total} requests" + (f" ({_non_http(status_counts)})" if transport else "")),
    ]


def _non_http(status_counts: Mapping[str, int]) -> str:
    return ", ".join(f"{status}: {n}" for status, n in sorted(status_counts.items()) if not status.isdigit())


def engine_checks(baseline: dict | None, after: dict | None) -> list[Check]:
    """Sessions back to exactly 0, and bytes held per tier exactly at the baseline."""
    if baseline is None or after is None:
        reason = "no metrics URL (give --metrics-url with --url)"
        return [Check("soak: sessions back to 0", None, reason),
                Check("soak: bytes held back to baseline", None, reason)]
    if not after.get("gauges_seen", True):
        reason = f"no {SESSIONS_OPEN} gauge at the metrics URL, although sessions were opened"
        return [Check("soak: sessions back to 0", False, reason),
                Check("soak: bytes held back to baseline", False, reason)]
    sessions = after["sessions_open"]
    tiers = sorted(set(baseline["bytes"]) | set(after["bytes"]))
    moved = {t: (baseline["bytes"].get(t, 0), after["bytes"].get(t, 0)) for t in tiers
             if baseline["bytes"].get(t, 0) != after["bytes"].get(t, 0)}
    detail = ", ".join(f"{t} {b:,} -> {a:,}" for t, (b, a) in moved.items()) or (
        "every tier equal: " + ", ".join(f"{t} {after['bytes'].get(t, 0):,}" for t in tiers))
    return [
        Check("soak: sessions back to 0", sessions == 0,
              f"llava_sessions_open {baseline['sessions_open']:g} before, {sessions:g} after"),
        Check("soak: bytes held back to baseline", not moved, detail),
    ]


def rss_checks(before: Mapping[str, int], after: Mapping[str, int], fraction: float, margin_mib: float) -> list[Check]:
    """One check per process measured before and after: RSS within the margin."""
    checks = []
    for name in before:
        if name not in after:
            checks.append(Check(f"soak: RSS of {name}", False, "process gone or replaced during the soak"))
            continue
        limit = rss_limit(before[name], fraction, margin_mib)
        growth = after[name] - before[name]
        checks.append(Check(
            f"soak: RSS of {name}", after[name] <= limit,
            f"{before[name] / MIB:.1f} -> {after[name] / MIB:.1f} MiB ({growth / MIB:+.1f} MiB; "
            f"limit {limit / MIB:.1f} = +max({fraction:.0%}, {margin_mib:g} MiB))",
        ))
    if not before:
        checks.append(Check("soak: RSS", None, "no worker pids (give --management-url with --url, same host)"))
    return checks


def leak_checks(checks: Sequence[Check] | None, not_run_reason: str = "") -> dict:
    """Whether the soak's leak checks (engine accounting, RSS) were made.

    ``checks``: those checks, None when the soak did not run (``not_run_reason`` says why).
    Returns {"leak_checks": "checked" | "partly skipped" | "skipped" | "not run",
    "leak_checks_skipped": [{"check", "reason"}, ...]}: a run can pass without having looked
    for a leak at all (--url without --metrics-url / --management-url), and must say so.
    """
    if checks is None:
        return {"leak_checks": "not run", "leak_checks_skipped": [{"check": "soak", "reason": not_run_reason}]}
    skipped = [{"check": c.name, "reason": c.detail} for c in checks if c.passed is None]
    status = "checked" if not skipped else "skipped" if len(skipped) == len(checks) else "partly skipped"
    return {"leak_checks": status, "leak_checks_skipped": skipped}


def verdict_line(result: Mapping) -> str:
    """The last line of the report: PASS or FAIL, and which leak checks were not made, and why."""
    status = result.get("leak_checks", "checked")
    qualifier = {"checked": "", "partly skipped": " (some leak checks skipped)", "skipped": " (leak checks skipped)",
                 "not run": " (leak checks not run)"}[status]
    line = (f"{'PASS' if result['passed'] else 'FAIL'}{qualifier}  overall ({result['wall_s']:.1f} s"
            + (", stopped by the time guard)" if result["aborted"] else ")"))
    reasons = list(dict.fromkeys(s["reason"] for s in result.get("leak_checks_skipped") or []))
    return line + (": " + "; ".join(reasons) if status != "checked" and reasons else "")


def growth_per_cycle(trend: Sequence[tuple[int, int]]) -> float | None:
    """Least-squares slope (bytes per cycle) of total RSS over the second half of the soak's samples."""
    points = [p for p in trend if p[0] >= (trend[-1][0] / 2 if trend else 0)]
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else None


# --- Prometheus and /proc ------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            try:
                value = float(match.group(3))
            except ValueError:
                continue
            samples.append((match.group(1), dict(_LABEL.findall(match.group(2) or "")), value))
    return samples


def engine_state(text: str) -> dict:
    """Sessions open and bytes held per tier, summed over the model copies. Absent gauges are 0:
    a worker sends a gauge only once it changes."""
    sessions, seen = 0.0, False
    held = {tier: 0 for tier in TIERS}
    for name, labels, value in parse_prometheus(text):
        if name == SESSIONS_OPEN:
            sessions += value
            seen = True
        elif name == SESSION_BYTES:
            tier = labels.get("tier", "?")
            held[tier] = held.get(tier, 0) + int(value)
    return {"sessions_open": sessions, "bytes": held, "gauges_seen": seen}


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _proc_field(pid: int, key: str) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


# --- the server side -----------------------------------------------------------------


class Target:
    """Where the requests go, where metrics and worker pids come from."""

    def __init__(self, url: str, metrics_url: str | None, management_url: str | None):
        self.url, self.metrics_url, self.management_url = url.rstrip("/"), metrics_url, management_url

    def engine(self) -> dict | None:
        if not self.metrics_url:
            return None
        response = requests.get(self.metrics_url, timeout=10)
        response.raise_for_status()
        return engine_state(response.text)

    def worker_pids(self) -> dict[str, int]:
        """{model copy: worker pid} from the management API (a restarting worker is left out)."""
        if not self.management_url:
            return {}
        models = requests.get(f"{self.management_url}/models", timeout=10).json()["models"]
        pids = {}
        for model in sorted(m["modelName"] for m in models):
            for described in requests.get(f"{self.management_url}/models/{model}", timeout=10).json():
                for index, worker in enumerate(described.get("workers", [])):
                    if worker.get("pid", -1) > 0:
                        pids[f"worker {model}" + (f"#{index}" if index else "")] = int(worker["pid"])
        return pids

    def processes(self) -> dict[str, int]:
        """Processes whose RSS is judged: the workers, and the one that started TorchServe (the
        router's: ``serve`` and this command's own stack process). The front end's JVM is measured
        too, as ``jvm``, but its heap grows until a collection decides otherwise: reported only."""
        pids = self.worker_pids()
        group = _process_group(pids)
        if group is None:  # no workers, or not on this host
            return {}
        parent = _proc_field(group, "PPid")
        if parent and int(parent) > 1:
            pids["router process"] = int(parent)
        return pids

    def jvm_pid(self) -> int | None:
        group = _process_group(self.worker_pids())
        if group is None:
            return None
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == group and (stat.parent / "comm").read_text().strip() == "java":
                    return int(stat.parent.name)
            except (OSError, ValueError, IndexError):
                continue
        return None


def _process_group(pids: Mapping[str, int]) -> int | None:
    """TorchServe's process group (it runs in one of its own), from a worker's pid on this host."""
    for pid in pids.values():
        try:
            return os.getpgid(pid)
        except OSError:
            continue
    return None


def config_property(config: Path, key: str) -> str | None:
    """A setting of a TorchServe config.properties file, or None."""
    for line in config.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            return value.strip()
    return None


# --- the client side -----------------------------------------------------------------


class Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()
        self.fired = threading.Event()

    def remaining(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def expired(self) -> bool:
        if not self.fired.is_set() and self.remaining() <= 0:
            self.fired.set()
        return self.fired.is_set()


@dataclass
class Sample:
    kind: str
    status: str  # the HTTP status, or the exception's name when no answer came
    seconds: float
    completion_tokens: int = 0


class Recorder:
    def __init__(self):
        self._lock = threading.Lock()
        self.samples: list[Sample] = []

    def add(self, sample: Sample) -> None:
        with self._lock:
            self.samples.append(sample)

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.samples:
            counts[s.status] = counts.get(s.status, 0) + 1
        return dict(sorted(counts.items()))

    def latencies(self) -> dict[str, dict]:
        """Per kind, over the requests answered 200."""
        return {kind: latency_summary([s.seconds for s in self.samples if s.kind == kind and s.status == "200"])
                for kind in KINDS if any(s.kind == kind for s in self.samples)}


class LoadClient(Client):
    """The bench's client (thread-local connections, the session header), keeping every status."""

    def call(self, recorder: Recorder, kind: str, body: dict, session_id: str | None = None,
             timeout: float | None = None) -> tuple[str, dict | None]:
        """(status, the JSON reply of a 200 or None); the status is the exception's name when no
        answer came."""
        start = time.perf_counter()
        try:
            _, code, payload = self.send(body, session_id, timeout)
            reply = json.loads(payload) if code == 200 else None
            status = str(code)
        except (OSError, http.client.HTTPException, ValueError) as error:
            recorder.add(Sample(kind, type(error).__name__, time.perf_counter() - start))
            return type(error).__name__, None
        usage = (reply or {}).get("usage") or {}
        recorder.add(Sample(kind, status, time.perf_counter() - start, int(usage.get("completion_tokens", 0))))
        return status, reply


def png_b64(width: int, height: int, seed: int = 0) -> str:
    """A deterministic RGB PNG, written with the standard library only."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            rows += bytes(((x * 255 // max(1, width - 1) + seed * 37) % 256,
                           (y * 255 // max(1, height - 1) + seed * 91) % 256,
                           ((x + y) * 13 + seed * 151) % 256))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(bytes(rows))) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


# --- options and the run -------------------------------------------------------------


@dataclass
class Options:
    url: str | None = None
    metrics_url: str | None = None
    management_url: str | None = None
    model: str | None = None
    preset: str = "tiny"
    device: str = "auto"
    sessions: int = 32
    turns: int = 10
    max_new_tokens: int = 8
    cycles: int = 10_000
    soak_threads: int = 4
    max_seconds: float = 1800.0
    request_timeout: float = 120.0
    rss_margin_fraction: float = DEFAULT_RSS_MARGIN_FRACTION
    rss_margin_mib: float = DEFAULT_RSS_MARGIN_MIB
    settle_seconds: float = 15.0
    work_dir: Path | None = None

    def validate(self) -> None:
        if self.sessions < 0 or self.turns < 0 or self.cycles < 0:
            raise LoadTestError("--sessions, --turns and --cycles must be >= 0")
        if self.soak_threads < 1 or self.max_new_tokens < 1:
            raise LoadTestError("--soak-threads and --max-new-tokens must be >= 1")
        if self.max_seconds <= 0 or self.request_timeout <= 0:
            raise LoadTestError("--max-seconds and --request-timeout must be positive")
        if self.rss_margin_fraction < 0 or self.rss_margin_mib < 0:
            raise LoadTestError("the RSS margins must be >= 0")
        if self.url is None and (self.metrics_url or self.management_url):
            raise LoadTestError("--metrics-url and --management-url go with --url")

    def command(self) -> str:
        parts = ["llava-sessions", "loadtest"]
        if self.url:
            parts += ["--url", self.url]
            parts += ["--metrics-url", self.metrics_url] if self.metrics_url else []
            parts += ["--management-url", self.management_url] if self.management_url else []
        elif self.model:
            parts += ["--model", self.model]
        else:
            parts += ["--preset", self.preset]
        parts += ["--sessions", str(self.sessions), "--turns", str(self.turns),
                  "--max-new-tokens", str(self.max_new_tokens), "--cycles", str(self.cycles),
                  "--soak-threads", str(self.soak_threads), "--max-seconds", f"{self.max_seconds:g}"]
        return shlex.join(parts)


def run(options: Options, log: Callable[[str], None] = lambda message: None,
        client_factory: Callable[[str, float], LoadClient] = LoadClient) -> dict:
    """Both phases; the report as one dict (``passed`` says whether every check passed).

    Starts the stack in a process of its own unless ``options.url`` is given. ``client_factory``
    (url, request timeout) makes the client, so tests can misbehave on purpose.
    """
    options.validate()
    if options.url is not None:
        target = Target(options.url, options.metrics_url, options.management_url)
        return _run_against(target, options, log, "--url " + options.url, client_factory)
    import tempfile

    from llava_sessions.bench.served import ServerError, StackProcess

    model_dir = _model_dir(options)
    with tempfile.TemporaryDirectory(prefix="llava-loadtest-", dir=options.work_dir) as work:
        work_dir = Path(work)
        log(f"loadtest: starting the serving stack ({model_dir}, one worker, loopback)")
        try:
            with _sessions_per_worker(max(options.sessions, options.soak_threads)), \
                    StackProcess(model_dir, work_dir, options.device) as stack:
                config = work_dir / "run" / "config.properties"  # what start_stack's TorchServe runs with
                target = Target(stack.url, config_property(config, "metrics_address") + "/metrics",
                                config_property(config, "management_address"))
                log(f"loadtest: serving at {stack.url}")
                return _run_against(target, options, log, str(model_dir), client_factory)
        except ServerError as error:
            raise LoadTestError(str(error)) from None


def _model_dir(options: Options) -> Path:
    from llava_sessions import models

    if options.model:
        return models.resolve_model(options.model)
    return models.ensure_tiny_model(options.preset)


class _sessions_per_worker:
    """The bench's stack allows 32 sessions per worker; more concurrent sessions need the
    environment override the handler reads (LLAVA_SESSIONS_MAX_SESSIONS_PER_WORKER), set only
    while the stack's process is spawned, which inherits it."""

    NAME = "LLAVA_SESSIONS_MAX_SESSIONS_PER_WORKER"

    def __init__(self, needed: int):
        self.needed = needed

    def __enter__(self):
        self.saved = os.environ.get(self.NAME)
        if self.needed > 32 and self.saved is None:
            os.environ[self.NAME] = str(self.needed)
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop(self.NAME, None)


def _run_against(target: Target, options: Options, log, served: str, client_factory=None) -> dict:
    """Both phases against a ready server. The time guard starts here: a stack's start has its
    own limit (StackProcess' ready timeout), which a large checkpoint's load would eat into."""
    deadline = Deadline(options.max_seconds)
    started = time.monotonic()
    result: dict = {"command": options.command(), "served": served, "url": target.url,
                    "max_seconds": options.max_seconds}
    checks: list[Check] = []
    client = (client_factory or LoadClient)(target.url, options.request_timeout)
    if options.sessions:
        log(f"loadtest: load phase, {options.sessions} sessions x {options.turns} turns")
        result["load"] = load_phase(client, options, deadline)
        checks += error_checks("load", result["load"]["status_counts"])
        if result["load"]["sessions_completed"] != options.sessions and not deadline.expired():
            checks.append(Check("load: every conversation completed", False,
                                f"{result['load']['sessions_completed']} of {options.sessions}"))
    if options.cycles and not deadline.expired():
        log(f"loadtest: soak phase, {options.cycles} open/close cycles on {options.soak_threads} threads")
        result["soak"] = soak_phase(client, target, options, deadline, log)
        soak = result["soak"]
        with_warmup = dict(soak["status_counts"])
        for status, n in soak["warmup_status_counts"].items():
            with_warmup[status] = with_warmup.get(status, 0) + n
        checks += error_checks("soak (with warm-up)", with_warmup)
        leaks = engine_checks(soak["engine"]["before"], soak["engine"]["after"])
        leaks += rss_checks(soak["rss"]["before"], soak["rss"]["after"],
                            options.rss_margin_fraction, options.rss_margin_mib)
        checks += leaks
        result.update(leak_checks(leaks))
    else:
        result.update(leak_checks(None, "--cycles 0" if not options.cycles
                                  else "the time guard fired before the soak"))
    if deadline.expired():
        checks.append(Check("time guard", False, f"--max-seconds {options.max_seconds:g} passed; the run "
                            "stopped early and its figures cover only what was done"))
    result["checks"] = [asdict(c) | {"label": c.label} for c in checks]
    result["aborted"] = deadline.fired.is_set()
    result["passed"] = all(c.passed is not False for c in checks)
    result["wall_s"] = time.monotonic() - started
    return result


def load_phase(client: LoadClient, options: Options, deadline: Deadline) -> dict:
    recorder = Recorder()
    completed = []

    def conversation(index: int) -> None:
        if deadline.expired():
            return
        image = png_b64(48, 40, seed=index)
        _, reply = client.call(recorder, "open", {"requestType": NEW_SESSION, "images": [image]})
        if not reply:
            return
        sid = reply["session_id"]
        ok = True
        for k in range(options.turns):
            if deadline.expired():
                ok = False
                break
            body = {"prompt": PROMPTS[k % len(PROMPTS)], "max_new_tokens": options.max_new_tokens,
                    "temperature": 0, "top_p": 1}
            status, reply = client.call(recorder, "turn", body, sid)
            if reply is None:  # recorded; the rest of this conversation would only repeat it
                if status == "404":
                    return  # the session is gone: nothing to close
                ok = False
                break
        # Closed even after the guard fired, so the server is left as it was.
        ok = client.call(recorder, "close", {"requestType": CLOSE}, sid)[1] is not None and ok
        if ok:
            completed.append(index)

    start = time.perf_counter()
    with ThreadPoolExecutor(options.sessions, thread_name_prefix="load") as pool:
        list(pool.map(conversation, range(options.sessions)))
    wall = time.perf_counter() - start
    tokens = sum(s.completion_tokens for s in recorder.samples if s.kind == "turn")
    counts = recorder.status_counts()
    return {
        "sessions": options.sessions,
        "turns": options.turns,
        "max_new_tokens": options.max_new_tokens,
        "requests": len(recorder.samples),
        "status_counts": counts,
        "errors_5xx": sum(n for s, n in counts.items() if s.isdigit() and int(s) >= 500),
        "errors_4xx": sum(n for s, n in counts.items() if s.isdigit() and 400 <= int(s) < 500),
        "sessions_completed": len(completed),
        "latency": recorder.latencies(),
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "wall_s": wall,
    }


def soak_phase(client: LoadClient, target: Target, options: Options, deadline: Deadline, log) -> dict:
    image = png_b64(8, 8)
    warmup = min(options.cycles, max(8, options.cycles // 100))
    recorder, warm_recorder = Recorder(), Recorder()
    lock = threading.Lock()
    done = [0]

    def cycles(rec: Recorder, source) -> None:
        while not deadline.expired():
            with lock:
                if next(source, None) is None:
                    return
            _, reply = client.call(rec, "open", {"requestType": NEW_SESSION, "images": [image]})
            if reply:
                client.call(rec, "close", {"requestType": CLOSE}, reply["session_id"])
            with lock:
                done[0] += 1

    def churn(rec: Recorder, count: int, sample: Callable[[], None] | None = None) -> float:
        source = iter(range(count))
        start = time.perf_counter()
        with ThreadPoolExecutor(options.soak_threads, thread_name_prefix="soak") as pool:
            futures = [pool.submit(cycles, rec, source) for _ in range(options.soak_threads)]
            while wait(futures, timeout=1.0).not_done:
                if sample:
                    sample()
            for f in futures:
                f.result()
        return time.perf_counter() - start

    # Warm-up: the first open/close cycles after the load phase touch allocator paths it did not.
    churn(warm_recorder, warmup)
    engine_before = _settled_engine(client, target, options, Recorder(), want_zero=False)
    processes = target.processes()
    rss_before = {name: rss_bytes(pid) for name, pid in processes.items()}
    rss_before = {name: value for name, value in rss_before.items() if value is not None}
    jvm = target.jvm_pid()
    jvm_before = rss_bytes(jvm) if jvm else None

    done[0] = 0
    trend: list[tuple[int, int]] = [(0, sum(rss_before.values()))] if rss_before else []
    last_log = [time.monotonic()]

    def sample() -> None:
        if rss_before:
            values = [rss_bytes(pid) for name, pid in processes.items() if name in rss_before]
            if all(v is not None for v in values):
                trend.append((done[0], sum(values)))
        if time.monotonic() - last_log[0] >= 30:
            last_log[0] = time.monotonic()
            log(f"loadtest: soak {done[0]}/{options.cycles} cycles")

    wall = churn(recorder, options.cycles, sample)
    cycles_done = done[0]
    engine_after = _settled_engine(client, target, options, Recorder(), want_zero=True)
    processes_after = target.processes()
    rss_after = {name: rss_bytes(pid) for name, pid in processes_after.items()
                 if processes.get(name) == pid}  # a replaced worker is no longer the one measured
    rss_after = {name: value for name, value in rss_after.items() if value is not None}
    if rss_after and len(rss_after) == len(rss_before):
        trend.append((cycles_done, sum(rss_after.values())))
    counts = recorder.status_counts()
    slope = growth_per_cycle(trend)
    return {
        "cycles_requested": options.cycles,
        "cycles_done": cycles_done,
        "warmup_cycles": warmup,
        "threads": options.soak_threads,
        "requests": len(recorder.samples),
        "status_counts": counts,
        "warmup_status_counts": warm_recorder.status_counts(),
        "errors_5xx": sum(n for s, n in counts.items() if s.isdigit() and int(s) >= 500),
        "errors_4xx": sum(n for s, n in counts.items() if s.isdigit() and 400 <= int(s) < 500),
        "latency": recorder.latencies(),
        "wall_s": wall,
        "cycles_per_s": cycles_done / wall if wall > 0 else None,
        "engine": {"before": engine_before, "after": engine_after},
        "rss": {"before": rss_before, "after": rss_after, "pids": processes,
                "margin_fraction": options.rss_margin_fraction, "margin_mib": options.rss_margin_mib,
                "growth_per_cycle_second_half_bytes": slope, "trend": trend,
                "jvm_before": jvm_before, "jvm_after": rss_bytes(jvm) if jvm else None},
    }


def _settled_engine(client: LoadClient, target: Target, options: Options, recorder: Recorder,
                    want_zero: bool) -> dict | None:
    """The engine's gauges once they stop moving (and show 0 sessions, when that is expected).

    Gauges are refreshed after each batch and a worker writes them at most once a second, through
    TorchServe's log parsing, so the last close may not show yet: a harmless request (an open with
    an undecodable image, answered 400 by a worker) makes each worker refresh them once more, then
    this polls, further apart than a worker's writes, until two readings agree.
    """
    if not target.metrics_url:
        return None
    for _ in range(max(1, len(target.worker_pids()))):
        client.call(recorder, "probe", {"requestType": NEW_SESSION, "images": ["!!"]}, timeout=30)
    stop = time.monotonic() + options.settle_seconds
    previous = None
    while True:
        state = target.engine()
        if state == previous and (not want_zero or state["sessions_open"] == 0):
            return state
        if time.monotonic() >= stop:
            return state
        previous = state
        time.sleep(METRICS_WRITE_INTERVAL_S * 1.5)


# --- the report ----------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def report(result: dict) -> str:
    lines = [f"llava-sessions loadtest: {result['url']} ({result['served']})", f"command: {result['command']}", ""]
    for phase in ("load", "soak"):
        if phase not in result:
            continue
        data = result[phase]
        if phase == "load":
            lines.append(f"load: {data['sessions']} sessions x {data['turns']} turns, "
                         f"max_new_tokens {data['max_new_tokens']}: {data['requests']} requests in "
                         f"{data['wall_s']:.1f} s, {data['sessions_completed']} conversations completed")
            lines.append(f"  tokens: {data['completion_tokens']} generated, "
                         f"{(data['tokens_per_s'] or 0):.1f} tokens/s aggregate")
        else:
            lines.append(f"soak: {data['cycles_done']} of {data['cycles_requested']} open/close cycles "
                         f"(after {data['warmup_cycles']} warm-up) on {data['threads']} threads in "
                         f"{data['wall_s']:.1f} s, {(data['cycles_per_s'] or 0):.1f} cycles/s")
        lines.append(f"  statuses: {', '.join(f'{s}: {n}' for s, n in data['status_counts'].items()) or '-'}"
                     f"  (5xx: {data['errors_5xx']}, 4xx: {data['errors_4xx']})")
        lines.append("  latency ms      count      p50      p90      p99      max")
        for kind, summary in data["latency"].items():
            lines.append(f"    {kind:<10} {summary['count']:>8} {_ms(summary['p50_s']):>8} {_ms(summary['p90_s']):>8} "
                         f"{_ms(summary['p99_s']):>8} {_ms(summary['max_s']):>8}")
        if phase == "soak":
            before, after = data["engine"]["before"], data["engine"]["after"]
            if before and after:
                lines.append(f"  engine: sessions {before['sessions_open']:g} -> {after['sessions_open']:g}; bytes "
                             + ", ".join(f"{t} {before['bytes'].get(t, 0):,} -> {after['bytes'].get(t, 0):,}"
                                         for t in sorted(set(before["bytes"]) | set(after["bytes"]))))
            rss = data["rss"]
            for name in rss["before"]:
                after_value = rss["after"].get(name)
                lines.append(f"  RSS {name} (pid {rss['pids'].get(name)}): {rss['before'][name] / MIB:.1f} -> "
                             + (f"{after_value / MIB:.1f} MiB" if after_value is not None else "gone"))
            if rss["jvm_before"] and rss["jvm_after"]:
                lines.append(f"  RSS TorchServe JVM (reported, not judged): {rss['jvm_before'] / MIB:.1f} -> "
                             f"{rss['jvm_after'] / MIB:.1f} MiB")
            if rss["growth_per_cycle_second_half_bytes"] is not None:
                lines.append(f"  RSS trend over the second half: {rss['growth_per_cycle_second_half_bytes']:+.0f} "
                             "bytes per cycle (all judged processes)")
        lines.append("")
    for check in result["checks"]:
        lines.append(f"{check['label']}  {check['name']}: {check['detail']}")
    lines.append(verdict_line(result))
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------


