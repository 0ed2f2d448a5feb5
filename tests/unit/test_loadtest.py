"""`llava-sessions loadtest`'s arithmetic, verdicts and time guard, without a server."""

from __future__ import annotations

import base64
import io
import json
import random
import re
import threading
import time

import pytest

from llava_sessions import cli, loadtest
from llava_sessions.loadtest import MIB, Check, Options

# --- percentiles -------------------------------------------------------------------------


def test_percentile_interpolates_between_closest_ranks():
    values = [4.0, 1.0, 3.0, 2.0]  # order does not matter
    assert loadtest.percentile(values, 0) == 1.0
    assert loadtest.percentile(values, 50) == 2.5
    assert loadtest.percentile(values, 90) == pytest.approx(3.7)
    assert loadtest.percentile(values, 100) == 4.0
    assert loadtest.percentile([7.0], 99) == 7.0


def test_percentile_matches_numpy_linear():
    numpy = pytest.importorskip("numpy")
    rng = random.Random(5)
    for n in (1, 2, 3, 10, 101, 1000):
        values = [rng.expovariate(20) for _ in range(n)]
        for q in (50, 90, 99, 99.9):
            assert loadtest.percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))


@pytest.mark.parametrize("values,q", [([], 50), ([1.0], -1), ([1.0], 100.5)])
def test_percentile_rejects_nonsense(values, q):
    with pytest.raises(ValueError):
        loadtest.percentile(values, q)


def test_latency_summary():
    summary = loadtest.latency_summary([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert summary["count"] == 100
    assert summary["p50_s"] == pytest.approx(0.0505)
    assert summary["p99_s"] == pytest.approx(0.09901)
    assert summary["max_s"] == 0.1 and summary["mean_s"] == pytest.approx(0.0505)
    assert loadtest.latency_summary([]) == {"count": 0, "p50_s": None, "p90_s": None, "p99_s": None,
                                            "max_s": None, "mean_s": None}


# --- verdicts ----------------------------------------------------------------------------


def test_rss_limit_is_the_larger_of_fraction_and_mib():
    assert loadtest.rss_limit(100 * MIB, 0.10, 64) == 164 * MIB  # small process: 64 MiB wins
    assert loadtest.rss_limit(2000 * MIB, 0.10, 64) == 2200 * MIB  # large process: 10% wins
    assert loadtest.rss_limit(100 * MIB, 0.0, 0) == 100 * MIB


def test_rss_checks_pass_within_margin_and_fail_beyond_it():
    before = {"worker llava-0": 400 * MIB, "router process": 50 * MIB}
    after = {"worker llava-0": 463 * MIB, "router process": 115 * MIB}
    checks = {c.name: c for c in loadtest.rss_checks(before, after, 0.10, 64)}
    assert checks["soak: RSS of worker llava-0"].passed is True  # +63 MiB <= +64 MiB
    assert checks["soak: RSS of router process"].passed is False  # +65 MiB > +64 MiB
    assert "limit 114.0" in checks["soak: RSS of router process"].detail


def test_rss_checks_fail_a_replaced_process_and_skip_when_nothing_was_measured():
    [gone] = loadtest.rss_checks({"worker llava-0": MIB}, {}, 0.1, 64)
    assert gone.passed is False and "replaced" in gone.detail
    [skipped] = loadtest.rss_checks({}, {}, 0.1, 64)
    assert skipped.passed is None and skipped.label == "SKIP"


def engine(sessions, **held):
    return {"sessions_open": sessions,
            "bytes": {"device_kv": 0, "device_features": 0, "host_kv": 0, "host_features": 0, **held},
            "gauges_seen": True}


def test_engine_checks_want_zero_sessions_and_the_same_bytes_in_every_tier():
    same = loadtest.engine_checks(engine(0, device_kv=10), engine(0, device_kv=10))
    assert [c.passed for c in same] == [True, True]
    still_open = loadtest.engine_checks(engine(0), engine(1, device_kv=4096))
    assert [c.passed for c in still_open] == [False, False]
    assert "device_kv 0 -> 4,096" in still_open[1].detail
    moved_tier = loadtest.engine_checks(engine(0, device_features=8), engine(0, host_features=8))
    assert [c.passed for c in moved_tier] == [True, False]  # features moved to host: not back to baseline


def test_engine_checks_skip_without_metrics_and_fail_when_the_gauges_are_missing():
    assert [c.passed for c in loadtest.engine_checks(None, None)] == [None, None]
    missing = engine(0) | {"gauges_seen": False}
    checks = loadtest.engine_checks(engine(0), missing)
    assert [c.passed for c in checks] == [False, False] and "no llava_sessions_open gauge" in checks[0].detail


def test_error_checks_count_5xx_and_transport_failures_but_not_4xx():
    ok = loadtest.error_checks("load", {"200": 40, "404": 1, "429": 2})
    assert [c.passed for c in ok] == [True, True]
    bad = loadtest.error_checks("soak", {"200": 40, "503": 1, "ConnectionError": 2, "ReadTimeout": 1})
    assert [c.passed for c in bad] == [False, False]
    assert bad[0].detail == "1 of 44 requests"
    assert "ConnectionError: 2" in bad[1].detail and "ReadTimeout: 1" in bad[1].detail


def test_growth_per_cycle_is_the_slope_over_the_second_half():
    leaking = [(c, 1000 + 7 * c) for c in range(0, 1001, 100)]
    assert loadtest.growth_per_cycle(leaking) == pytest.approx(7.0)
    # A one-off step early on (allocator warm-up) does not count; a flat second half is 0.
    stepped = [(0, 1000), (100, 9000)] + [(c, 9000) for c in range(200, 1001, 100)]
    assert loadtest.growth_per_cycle(stepped) == pytest.approx(0.0)
    assert loadtest.growth_per_cycle([]) is None and loadtest.growth_per_cycle([(5, 1)]) is None


# --- parsing -----------------------------------------------------------------------------

PROMETHEUS = """\
# HELP llava_sessions_open Torchserve prometheus gauge metric with unit: count
# TYPE llava_sessions_open gauge
llava_sessions_open{ModelName="llava-0",Level="Model",Hostname="h",} 2.0
llava_sessions_open{ModelName="llava-1",Level="Model",Hostname="h",} 1.0
llava_session_bytes{ModelName="llava-0",tier="device_kv",Hostname="h",} 4096.0
llava_session_bytes{ModelName="llava-1",tier="device_kv",Hostname="h",} 1024.0
llava_session_bytes{ModelName="llava-1",tier="host_features",Hostname="h",} 2.5E7
ts_queue_latency_microseconds{model_name="llava-0",} 12.0
"""


def test_engine_state_sums_the_model_copies():
    state = loadtest.engine_state(PROMETHEUS)
    assert state == {"sessions_open": 3.0, "gauges_seen": True,
                     "bytes": {"device_kv": 5120, "device_features": 0, "host_kv": 0, "host_features": 25_000_000}}
    assert loadtest.engine_state("# nothing yet\n")["gauges_seen"] is False


def test_png_is_a_decodable_image_of_the_asked_size():
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(loadtest.png_b64(48, 40, seed=3))))
    image.load()
    assert image.size == (48, 40) and image.mode == "RGB"
    assert loadtest.png_b64(8, 8, 1) != loadtest.png_b64(8, 8, 2)


def test_rss_bytes_reads_this_process():
    import os

    assert loadtest.rss_bytes(os.getpid()) > MIB
    assert loadtest.rss_bytes(2**31 - 1) is None


# --- the phases against a fake server ----------------------------------------------------


class FakeServer(loadtest.LoadClient):
    """Answers like the stack, after ``delay`` seconds per request; tracks which sessions are open."""

    def __init__(self, url="http://fake", timeout=1.0, delay=0.0, fail_every=0):
        super().__init__(url, timeout)
        self.delay, self.fail_every = delay, fail_every
        self.open_ids: set[str] = set()
        self.lock = threading.Lock()
        self.count = 0

    def call(self, recorder, kind, body, session_id=None, timeout=None):
        time.sleep(self.delay)
        with self.lock:
            self.count += 1
            if self.fail_every and self.count % self.fail_every == 0:
                recorder.add(loadtest.Sample(kind, "503", self.delay))
                return "503", None
            if body.get("requestType") == "NEW_SESSION":
                sid = f"sess-{self.count}"
                self.open_ids.add(sid)
                reply = {"session_id": sid}
            elif body.get("requestType") == "CLOSE":
                self.open_ids.discard(session_id)
                reply = {}
            else:
                reply = {"generated_text": "x", "usage": {"completion_tokens": 4}}
        recorder.add(loadtest.Sample(kind, "200", self.delay, reply.get("usage", {}).get("completion_tokens", 0)))
        return "200", reply


def fake_run(options, server):
    target = loadtest.Target(server.url, None, None)
    return loadtest._run_against(target, options, lambda m: None, "fake", lambda url, timeout: server)


def test_a_clean_fake_run_passes_with_memory_checks_skipped():
    server = FakeServer()
    result = fake_run(Options(sessions=4, turns=3, cycles=50, soak_threads=2), server)
    assert result["passed"] is True and result["aborted"] is False
    load = result["load"]
    assert load["requests"] == 4 * 5 and load["sessions_completed"] == 4 and load["completion_tokens"] == 4 * 3 * 4
    assert load["latency"]["turn"]["count"] == 12
    soak = result["soak"]
    assert soak["cycles_done"] == 50 and soak["status_counts"] == {"200": 100}
    assert {c["label"] for c in result["checks"]} == {"PASS", "SKIP"}
    assert server.open_ids == set()


def test_a_5xx_fails_the_run():
    result = fake_run(Options(sessions=2, turns=5, cycles=0), FakeServer(fail_every=5))
    assert result["passed"] is False and result["load"]["errors_5xx"] > 0
    assert any(c["name"] == "load: no 5xx" and c["passed"] is False for c in result["checks"])


def test_the_time_guard_stops_both_phases_cleanly_and_fails_the_run():
    server = FakeServer(delay=0.02)
    start = time.monotonic()
    result = fake_run(Options(sessions=3, turns=10_000, cycles=10_000, max_seconds=0.5), server)
    assert time.monotonic() - start < 5
    assert result["aborted"] is True and result["passed"] is False
    assert result["load"]["sessions_completed"] == 0
    assert result["load"]["latency"]["close"]["count"] == 3  # every conversation still closed its session
    assert "soak" not in result  # the guard had fired before it
    assert server.open_ids == set()
    assert [c["name"] for c in result["checks"] if not c["passed"]] == ["time guard"]
    assert "FAIL  time guard" in loadtest.report(result)


def test_the_report_has_a_line_per_check_and_an_overall_verdict():
    text = loadtest.report(fake_run(Options(sessions=2, turns=2, cycles=10, soak_threads=2), FakeServer()))
    assert "load: 2 sessions x 2 turns" in text and "soak: 10 of 10 open/close cycles" in text
    assert "PASS  load: no 5xx" in text and "SKIP  soak: sessions back to 0" in text
    assert text.splitlines()[-1].startswith("PASS (leak checks skipped)  overall")


def test_a_run_that_could_not_look_for_leaks_says_so_in_its_verdict_and_json():
    # --url with neither --metrics-url nor --management-url: no gauges, no worker pids.
    result = fake_run(Options(sessions=1, turns=1, cycles=10, soak_threads=2), FakeServer())
    assert result["passed"] is True
    assert result["leak_checks"] == "skipped"
    reasons = {s["check"]: s["reason"] for s in result["leak_checks_skipped"]}
    assert set(reasons) == {"soak: sessions back to 0", "soak: bytes held back to baseline", "soak: RSS"}
    assert "--metrics-url" in reasons["soak: sessions back to 0"] and "--management-url" in reasons["soak: RSS"]
    last = loadtest.report(result).splitlines()[-1]
    assert last.startswith("PASS (leak checks skipped)  overall (")
    assert "give --metrics-url with --url" in last and "give --management-url with --url" in last
    assert last.count("no metrics URL") == 1  # one reason per cause, not per check
    assert json.loads(json.dumps(result))["leak_checks"] == "skipped"


def test_a_run_without_a_soak_says_the_leak_checks_were_not_run():
    result = fake_run(Options(sessions=1, turns=1, cycles=0), FakeServer())
    assert result["passed"] is True and result["leak_checks"] == "not run"
    assert result["leak_checks_skipped"] == [{"check": "soak", "reason": "--cycles 0"}]
    assert loadtest.report(result).splitlines()[-1].startswith("PASS (leak checks not run)  overall")


def test_leak_checks_summary():
    made = [Check("soak: sessions back to 0", True, ""), Check("soak: RSS of worker", False, "+1 GiB")]
    assert loadtest.leak_checks(made) == {"leak_checks": "checked", "leak_checks_skipped": []}
    partly = [made[0], Check("soak: RSS", None, "no worker pids")]
    assert loadtest.leak_checks(partly) == {"leak_checks": "partly skipped",
                                            "leak_checks_skipped": [{"check": "soak: RSS", "reason": "no worker pids"}]}
    result = {"passed": True, "aborted": False, "wall_s": 1.0, **loadtest.leak_checks(made)}
    assert loadtest.verdict_line(result) == "PASS  overall (1.0 s)"
    result = {"passed": False, "aborted": True, "wall_s": 2.0, **loadtest.leak_checks(partly)}
    assert loadtest.verdict_line(result) == (
        "FAIL (some leak checks skipped)  overall (2.0 s, stopped by the time guard): no worker pids")


def test_loadtest_help_gives_each_default_once_in_one_style(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["loadtest", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in re.split(r"\n  (?=-)", text.split("options:", 1)[1]):
        flat = " ".join(option.split())
        assert flat.count("default") <= 1, flat
        assert not re.search(r"\(default \d", flat), flat  # "(default: 32)", as the formatter writes it
    flat = " ".join(text.split())
    assert "0 skips the soak (default: 10000)" in flat and "(default: 0.10)" in flat and "(default: 64)" in flat
    assert "without it the RSS checks are skipped" in flat


# --- the command -------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--sessions", "-1"], ["--soak-threads", "0"], ["--max-seconds", "0"],
                                  ["--metrics-url", "http://127.0.0.1:1/metrics"]])
def test_bad_options_exit_2_before_anything_starts(argv, capsys):
    assert cli.main(["loadtest", *argv]) == 2
    assert "llava-sessions loadtest:" in capsys.readouterr().err


def test_the_command_line_is_in_the_report():
    options = Options(url="http://127.0.0.1:8080", metrics_url="http://127.0.0.1:8082/metrics", cycles=300)
    assert options.command() == (
        "llava-sessions loadtest --url http://127.0.0.1:8080 --metrics-url http://127.0.0.1:8082/metrics "
        "--sessions 32 --turns 10 --max-new-tokens 8 --cycles 300 --soak-threads 4 --max-seconds 1800"
    )


def test_check_labels():
    assert [Check("x", v, "").label for v in (True, False, None)] == ["PASS", "FAIL", "SKIP"]


class ContextFills(FakeServer):
    """Answers PROMPT_TOO_LONG (400) from a session's third turn on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.turns_seen: dict[str, int] = {}

    def call(self, recorder, kind, body, session_id=None, timeout=None):
        if kind == "turn":
            with self.lock:
                self.turns_seen[session_id] = self.turns_seen.get(session_id, 0) + 1
                too_long = self.turns_seen[session_id] >= 3
            if too_long:
                recorder.add(loadtest.Sample(kind, "400", 0.0))
                return "400", None
        return super().call(recorder, kind, body, session_id, timeout)


def test_a_4xx_turn_ends_its_conversation_which_still_closes():
    server = ContextFills()
    result = fake_run(Options(sessions=3, turns=20, cycles=0), server)
    load = result["load"]
    assert load["status_counts"] == {"200": 3 * (1 + 2 + 1), "400": 3}  # one 400 each, not 18
    assert load["errors_4xx"] == 3 and load["sessions_completed"] == 0 and server.open_ids == set()
    failed = [c["name"] for c in result["checks"] if c["passed"] is False]
    assert failed == ["load: every conversation completed"]
