"""`llava-sessions loadtest`, shortened for CI: a real stack, 8 sessions × 3 turns and 300 cycles.

The full run (32 × 10, 10,000 cycles) is the same command with its defaults; its figures are in
the issue's closing note. A second test leaves one session open on purpose and expects the
leak check to catch it, so a passing check is not a vacuous one.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest

from llava_sessions import cli, loadtest
from llava_sessions.bench.served import StackProcess

pytestmark = pytest.mark.integration


def test_short_loadtest_passes_on_the_real_stack(tiny_model_dir):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["loadtest", "--model", str(tiny_model_dir), "--sessions", "8", "--turns", "3",
                         "--cycles", "300", "--max-seconds", "120", "--json"])
    assert code == 0, out.getvalue()[-4000:] + err.getvalue()[-3000:]
    result = json.loads(out.getvalue())
    assert result["passed"] is True and result["aborted"] is False

    load = result["load"]
    assert load["errors_5xx"] == 0 and load["errors_4xx"] == 0
    assert load["status_counts"] == {"200": 8 * (1 + 3 + 1)} and load["sessions_completed"] == 8
    assert [load["latency"][k]["count"] for k in ("open", "turn", "close")] == [8, 24, 8]
    assert 0 < load["latency"]["turn"]["p50_s"] <= load["latency"]["turn"]["p99_s"] <= load["latency"]["turn"]["max_s"]
    assert load["completion_tokens"] > 0 and load["tokens_per_s"] > 0

    soak = result["soak"]
    assert soak["cycles_done"] == 300 and soak["errors_5xx"] == 0 and soak["status_counts"] == {"200": 600}
    before, after = soak["engine"]["before"], soak["engine"]["after"]
    assert after["gauges_seen"] and before["sessions_open"] == 0 and after["sessions_open"] == 0
    assert after["bytes"] == before["bytes"]
    rss = soak["rss"]
    assert any(name.startswith("worker llava-0") for name in rss["before"]) and "router process" in rss["before"]
    for name, value in rss["before"].items():
        assert rss["after"][name] <= loadtest.rss_limit(value, rss["margin_fraction"], rss["margin_mib"]), name
    assert all(c["passed"] for c in result["checks"]), result["checks"]


class LeavesOneOpen(loadtest.LoadClient):
    """Skips the 20th close it is asked for (in the soak: the load phase is off, warm-up has 8)."""

    closes = 0
    leaked: str | None = None

    def call(self, recorder, kind, body, session_id=None, timeout=None):
        if body.get("requestType") == "CLOSE":
            type(self).closes += 1
            if type(self).closes == 20:
                type(self).leaked = session_id
                return "200", {}
        return super().call(recorder, kind, body, session_id, timeout)


def test_a_session_left_open_fails_the_leak_check(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="loadtest-leak-") as work, \
            StackProcess(tiny_model_dir, Path(work), "cpu") as stack:
        config = Path(work) / "run" / "config.properties"
        options = loadtest.Options(
            url=stack.url, sessions=0, cycles=60, settle_seconds=3,
            metrics_url=loadtest.config_property(config, "metrics_address") + "/metrics",
            management_url=loadtest.config_property(config, "management_address"),
        )
        result = loadtest.run(options, client_factory=LeavesOneOpen)
        checks = {c["name"]: c for c in result["checks"]}
        assert LeavesOneOpen.leaked is not None
        assert result["passed"] is False
        assert checks["soak: sessions back to 0"]["passed"] is False
        assert "0 before, 1 after" in checks["soak: sessions back to 0"]["detail"]
        assert checks["soak: bytes held back to baseline"]["passed"] is False
        assert checks["soak (with warm-up): no 5xx"]["passed"] is True
        assert "FAIL  soak: sessions back to 0" in loadtest.report(result)
