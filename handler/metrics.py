"""Session metrics through TorchServe's metrics API (Prometheus on the metrics port).

Every metric carries the model copy's name (llava-0, llava-1, ...): copies
share one TorchServe, and gauges without it would overwrite each other.
Timings are in seconds so Prometheus' default histogram buckets (5 ms to 10 s)
fit them. Counters are fed deltas of the engine's own exact counters. Gauges
are refreshed after each batch, so what the expiry sweeper frees between
requests shows at the next request, and sent only when they change.

Each metric is a log line the frontend parses, about 0.1 ms apiece: a thread
writes them, so they cost the request path only a queue put and are written
while the worker waits for its next batch.
"""

from __future__ import annotations

import queue
import threading
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
TTFT = "llava_time_to_first_token_seconds"
TPOT = "llava_time_per_output_token_seconds"

# Engine counter -> (metric, extra dimension values).
_COUNTER_SOURCES = {
    "prefill_tokens": (PREFILL_TOKENS, []),
    "decode_tokens": (DECODE_TOKENS, []),
    "sessions_closed": (SESSIONS_ENDED, ["closed"]),
    "sessions_expired": (SESSIONS_ENDED, ["expired"]),
    "sessions_evicted": (SESSIONS_ENDED, ["evicted"]),
    "kv_dropped": (MEMORY_STEPS, ["kv_dropped"]),
    "features_offloaded": (MEMORY_STEPS, ["features_offloaded"]),
    "features_restored": (MEMORY_STEPS, ["features_restored"]),
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
    (TTFT, "s", [], MetricTypes.HISTOGRAM),
    (TPOT, "s", [], MetricTypes.HISTOGRAM),
]


class SessionMetrics:
    def __init__(self, ts_metrics, model_name: str):
        self._metrics = ts_metrics
        self._model = model_name
        self._types = {}
        for name, unit, dimensions, metric_type in _DECLARATIONS:
            ts_metrics.add_metric_to_cache(name, unit, ["ModelName", *dimensions], metric_type)
            self._types[name] = metric_type
        self._last_counters: dict[str, int] = {}
        self._last_gauges: dict[tuple, float] = {}
        self._pending: queue.Queue = queue.Queue()
        threading.Thread(target=self._write_forever, name="session-metrics", daemon=True).start()

    def flush(self) -> None:
        """Wait until every metric observed so far has been written."""
        self._pending.join()

    def observe_turn(self, cached_tokens: int, ttft_s: float, time_per_output_token_s: float | None) -> None:
        self._emit(KV_CACHE_HITS if cached_tokens > 0 else KV_CACHE_MISSES, 1)
        self._emit(TTFT, ttft_s)
        if time_per_output_token_s is not None:
            self._emit(TPOT, time_per_output_token_s)

    def observe_engine(self, engine) -> None:
        """Gauges of what the engine holds now, and counter growth since the last call."""
        self._gauge(SESSIONS_OPEN, engine.session_count())
        for tier, held in engine.bytes_by_tier().items():
            self._gauge(SESSION_BYTES, held, [tier])
        counters = asdict(engine.counters)
        for field, (name, dimensions) in _COUNTER_SOURCES.items():
            if field not in counters:
                continue
            delta = counters[field] - self._last_counters.get(field, 0)
            if delta:
                self._emit(name, delta, dimensions)
        self._last_counters = counters

    def _gauge(self, name: str, value: float, dimensions: list[str] | None = None) -> None:
        key = (name, *(dimensions or []))
        if self._last_gauges.get(key) != value:
            self._last_gauges[key] = value
            self._emit(name, value, dimensions)

    def _emit(self, name: str, value: float, dimensions: list[str] | None = None) -> None:
        self._pending.put((name, value, [self._model, *(dimensions or [])]))

    def _write_forever(self) -> None:
        while True:
            name, value, dimension_values = self._pending.get()
            try:
                self._metrics.get_metric(name, self._types[name]).add_or_update(value, dimension_values)
            finally:
                self._pending.task_done()
