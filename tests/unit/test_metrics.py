"""Handler metrics through TorchServe's real metric cache: names, dimensions and exact deltas."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import ts
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from llava_sessions.handler.metrics import SessionMetrics


@dataclass
class Counters:
    prefill_tokens: int = 0
    decode_tokens: int = 0
    sessions_closed: int = 0
    sessions_expired: int = 0
    kv_offloaded: int = 0
    kv_restored: int = 0
    host_kv_recomputed: int = 0
    host_kv_dropped: int = 0


class FakeEngine:
    def __init__(self):
        self.counters = Counters()
        self.open = 0
        self.tiers = {"device_kv": 0, "device_features": 0, "host_kv": 0, "host_features": 0}

    def session_count(self):
        return self.open

    def bytes_by_tier(self):
        return dict(self.tiers)


def emitted(caplog) -> list[tuple[str, str, str]]:
    """(metric, value, dimensions) of every [METRICS] line logged."""
    lines = []
    for record in caplog.records:
        match = re.match(r"\[METRICS\](\w+)\.\w+:([\d.]+)\|#([^|]*)\|", record.getMessage())
        if match:
            lines.append(match.groups())
    caplog.clear()
    return lines


def make_metrics():
    cache = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    return SessionMetrics(cache, "llava-1")


def test_engine_gauges_and_counter_deltas(caplog):
    caplog.set_level(logging.INFO)
    metrics, engine = make_metrics(), FakeEngine()
    engine.open, engine.tiers["device_kv"] = 3, 4096
    engine.counters.prefill_tokens, engine.counters.sessions_expired = 40, 1
    metrics.observe_engine(engine)
    metrics.flush()
    first = emitted(caplog)
    assert ("llava_sessions_open", "3", "ModelName:llava-1") in first
    assert ("llava_session_bytes", "4096", "ModelName:llava-1,tier:device_kv") in first
    assert ("llava_prefill_tokens", "40", "ModelName:llava-1") in first
    assert ("llava_sessions_ended", "1", "ModelName:llava-1,reason:expired") in first

    engine.counters.prefill_tokens = 55  # counters are sent as growth, not totals
    engine.tiers["device_kv"] = 8192
    metrics.observe_engine(engine)
    metrics.flush()
    second = emitted(caplog)
    assert ("llava_prefill_tokens", "15", "ModelName:llava-1") in second
    assert not [m for m in second if m[0] == "llava_sessions_ended"]
    # gauges are sent when they change only
    assert ("llava_session_bytes", "8192", "ModelName:llava-1,tier:device_kv") in second
    assert not [m for m in second if m[0] == "llava_sessions_open"]


def test_the_host_kv_tier_and_its_steps(caplog):
    caplog.set_level(logging.INFO)
    metrics, engine = make_metrics(), FakeEngine()
    engine.tiers["host_kv"] = 39936
    engine.counters.kv_offloaded, engine.counters.kv_restored = 3, 2
    engine.counters.host_kv_recomputed, engine.counters.host_kv_dropped = 1, 4
    metrics.observe_engine(engine)
    metrics.flush()
    lines = emitted(caplog)
    assert ("llava_session_bytes", "39936", "ModelName:llava-1,tier:host_kv") in lines
    for step, count in (("kv_offloaded", 3), ("kv_restored", 2), ("host_kv_recomputed", 1), ("host_kv_dropped", 4)):
        assert ("llava_memory_budget_steps", str(count), f"ModelName:llava-1,step:{step}") in lines


def test_turn_timings_and_cache_hits(caplog):
    caplog.set_level(logging.INFO)
    metrics = make_metrics()
    metrics.observe_turn(cached_tokens=0, ttft_s=0.25, time_per_output_token_s=None)
    metrics.observe_turn(cached_tokens=120, ttft_s=0.03, time_per_output_token_s=0.01)
    metrics.flush()
    lines = emitted(caplog)
    names = [m[0] for m in lines]
    assert names.count("llava_kv_cache_misses") == 1 and names.count("llava_kv_cache_hits") == 1
    assert ("llava_time_to_first_token_seconds", "0.03", "ModelName:llava-1") in lines
    assert names.count("llava_time_per_output_token_seconds") == 1


def test_the_thread_writes_summed_counters_once_per_interval(caplog):
    """Requests only record; the writer thread sends five hits as one line of 5, each timing apart."""
    caplog.set_level(logging.INFO)
    cache = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics = SessionMetrics(cache, "llava-1", write_interval_s=0.05)
    for _ in range(5):
        metrics.observe_turn(cached_tokens=100, ttft_s=0.02, time_per_output_token_s=0.01)
    assert emitted(caplog) == []  # nothing written on the request path
    lines: list = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len([m for m in lines if m[0].startswith("llava_time_to")]) < 5:
        time.sleep(0.02)
        lines += emitted(caplog)
    assert [m for m in lines if m[0] == "llava_kv_cache_hits"] == [("llava_kv_cache_hits", "5", "ModelName:llava-1")]
    assert [m[0] for m in lines].count("llava_time_to_first_token_seconds") == 5
    assert [m[0] for m in lines].count("llava_time_per_output_token_seconds") == 5


def test_the_front_ends_metrics_config_declares_every_handler_metric_as_the_handler_does():
    """model-store/metrics.yaml registers each metric at start, with the handler's type and dimensions."""
    import yaml

    from llava_sessions.handler.metrics import _DECLARATIONS
    from llava_sessions.torchserve_process import METRICS_CONFIG

    config = yaml.safe_load(METRICS_CONFIG.read_text())
    declared = {
        (spec["name"], kind): list(spec["dimensions"])
        for kind, specs in config["model_metrics"].items()
        for spec in specs
    }
    for name, _unit, dimensions, metric_type in _DECLARATIONS:
        assert declared.get((name, metric_type.name.lower())) == ["ModelName", *dimensions], name
    # TorchServe's own front-end metrics are still there.
    assert {"Requests2XX", "ts_inference_requests_total"} <= {s["name"] for s in config["ts_metrics"]["counter"]}
