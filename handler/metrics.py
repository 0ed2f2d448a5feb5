"""Session metrics through TorchServe's metrics API (Prometheus on the metrics port).

Every metric carries the model copy's name (llava-0, llava-1, ...): copies
share one TorchServe, and gauges without it would overwrite each other.
Timings are in seconds so Prometheus' default histogram buckets (5 ms to 10 s)
fit them. Counters are fed deltas of the engine's own exact counters. Gauges
are refreshed after each batch, so what the expiry sweeper frees between
requests shows at the next request, and sent only when they change.

Each metric is a log line that this worker formats and the frontend parses, on
the cores the next forward needs: written per request they added about 6 ms to
a 13 ms follow-up turn on 2 CPU cores. So a request only updates a dict; a
thread writes what was observed at most once every ``WRITE_INTERVAL_S``,
counters summed and gauges at their latest value (every histogram observation
is still written). Prometheus therefore lags by up to that interval.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict

from ts.metrics.metric_type_enum import MetricTypes

SESSIONS_OPEN = "llava_sessions_open"
SESSION_BYTES = "llava_session_bytes"
KV_CACHE_HITS = "llava_kv_cache_hits"
KV_CACHE_MISSES = "llava_kv_cache_misses"
PREFILL_TOKENS = "llava_prefill_tokens"
DECODE_TOKENS = "llava_decode_tokens"
SESSIONS_ENDED = "llava_sessions_ended"
MEMORY_STEPS = "llava_memory_budget_steps"
STEP_COMPILES = "llava_step_compiles"
CUDA_GRAPH_SKIPS = "llava_cuda_graph_skips"
BUNDLE_JOINS = "llava_bundle_joins"  # follow-ups that joined a running bundle, or were declined
TTFT = "llava_time_to_first_token_seconds"
TPOT = "llava_time_per_output_token_seconds"

WRITE_INTERVAL_S = 1.0

# Engine counter -> (metric, extra dimension values).
_COUNTER_SOURCES = {
    "prefill_tokens": (PREFILL_TOKENS, []),
    "decode_tokens": (DECODE_TOKENS, []),
    "sessions_closed": (SESSIONS_ENDED, ["closed"]),
    "sessions_expired": (SESSIONS_ENDED, ["expired"]),
    "sessions_evicted": (SESSIONS_ENDED, ["evicted"]),
    "kv_offloaded": (MEMORY_STEPS, ["kv_offloaded"]),
    "kv_restored": (MEMORY_STEPS, ["kv_restored"]),
    "host_kv_recomputed": (MEMORY_STEPS, ["host_kv_recomputed"]),
    "host_kv_dropped": (MEMORY_STEPS, ["host_kv_dropped"]),
    "kv_dropped": (MEMORY_STEPS, ["kv_dropped"]),
    "features_offloaded": (MEMORY_STEPS, ["features_offloaded"]),
    "features_restored": (MEMORY_STEPS, ["features_restored"]),
    "step_compiles": (STEP_COMPILES, []),
    "cuda_graph_skips": (CUDA_GRAPH_SKIPS, []),
    "turns_joined": (BUNDLE_JOINS, ["joined"]),
    "joins_declined": (BUNDLE_JOINS, ["declined"]),
}

_DECLARATIONS = [
    (SESSIONS_OPEN, "count", [], MetricTypes.GAUGE),
    (SESSION_BYTES, "bytes", ["tier"], MetricTypes.GAUGE),
    (KV_CACHE_HITS, "count", [], MetricTypes.COUNTER),
    (KV_CACHE_MISSES, "count", [], MetricTypes.COUNTER),
    (PREFILL_TOKENS, "count", [], MetricTypes.COUNTER),
    (DECODE_TOKENS, "count", [], MetricTypes.COUNTER),
    (SESSIONS_ENDED, "count", ["reason"], MetricTypes.COUNTER),
    (MEMORY_STEPS, "count", ["step"], MetricTypes.COUNTER),
    (STEP_COMPILES, "count", [], MetricTypes.COUNTER),
    (CUDA_GRAPH_SKIPS, "count", [], MetricTypes.COUNTER),
    (BUNDLE_JOINS, "count", ["outcome"], MetricTypes.COUNTER),
    (TTFT, "s", [], MetricTypes.HISTOGRAM),
    (TPOT, "s", [], MetricTypes.HISTOGRAM),
]


class SessionMetrics:
    def __init__(self, ts_metrics, model_name: str, write_interval_s: float = WRITE_INTERVAL_S):
        self._metrics = ts_metrics
        self._model = model_name
        self._interval = write_interval_s
        self._types = {}
        for name, unit, dimensions, metric_type in _DECLARATIONS:
            ts_metrics.add_metric_to_cache(name, unit, ["ModelName", *dimensions], metric_type)
            self._types[name] = metric_type
        self._last_counters: dict[str, int] = {}
        self._written_gauges: dict[tuple, float] = {}
        # Observed, not yet written; key: (metric, dimension values).
        self._lock = threading.Lock()
        self._counts: dict[tuple, float] = {}  # growth, summed
        self._gauges: dict[tuple, float] = {}  # the latest value
        self._samples: list[tuple[tuple, float]] = []  # histogram observations, each written
        self._write_lock = threading.Lock()  # one writer at a time: the thread or flush()
        self._observed = threading.Event()
        threading.Thread(target=self._write_forever, name="session-metrics", daemon=True).start()

    def flush(self) -> None:
        """Write every metric observed so far, now."""
        self._write_pending()

    def observe_turn(self, cached_tokens: int, ttft_s: float, time_per_output_token_s: float | None) -> None:
        with self._lock:
            self._add(KV_CACHE_HITS if cached_tokens > 0 else KV_CACHE_MISSES, 1)
            self._samples.append(((TTFT, self._model), ttft_s))
            if time_per_output_token_s is not None:
                self._samples.append(((TPOT, self._model), time_per_output_token_s))
        self._observed.set()

    def observe_engine(self, engine) -> None:
        """Gauges of what the engine holds now, and counter growth since the last call."""
        gauges = {(SESSIONS_OPEN, self._model): engine.session_count()}
        for tier, held in engine.bytes_by_tier().items():
            gauges[(SESSION_BYTES, self._model, tier)] = held
        counters = asdict(engine.counters)
        with self._lock:
            self._gauges.update(gauges)
            for field, (name, dimensions) in _COUNTER_SOURCES.items():
                if field not in counters:
                    continue
                delta = counters[field] - self._last_counters.get(field, 0)
                if delta:
                    self._add(name, delta, *dimensions)
            self._last_counters = counters
        self._observed.set()

    def _add(self, name: str, delta: float, *dimensions: str) -> None:
        key = (name, self._model, *dimensions)
        self._counts[key] = self._counts.get(key, 0) + delta

    def _write_forever(self) -> None:
        while True:
            self._observed.wait()
            time.sleep(self._interval)  # gather what the next requests observe into one write
            self._observed.clear()
            self._write_pending()

    def _write_pending(self) -> None:
        with self._write_lock:
            with self._lock:
                counts, gauges, samples = self._counts, self._gauges, self._samples
                self._counts, self._gauges, self._samples = {}, {}, []
            lines = list(counts.items())
            for key, value in gauges.items():
                if self._written_gauges.get(key) != value:  # gauges go out when they change
                    self._written_gauges[key] = value
                    lines.append((key, value))
            lines.extend(samples)
            for (name, *dimension_values), value in lines:
                self._metrics.get_metric(name, self._types[name]).add_or_update(value, dimension_values)
