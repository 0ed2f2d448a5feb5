"""`llava-sessions bench` end to end on the tiny preset: real stack over HTTP plus the baselines."""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics

import pytest

from llava_sessions import cli
from llava_sessions.bench.runner import COLD_OPEN_PAIRS
from llava_sessions.bench.stats import RATIO_KEYS

pytestmark = pytest.mark.integration

TURNS = 3


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    """(exit code, stdout, stderr) of one run; the checkpoint and archive go to a temporary home."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAVA_SESSIONS_HOME", str(tmp_path_factory.mktemp("bench-home")))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["bench", "--preset", "tiny", "--turns", str(TURNS), "--repeats", "1", "--json"])
    return code, out.getvalue(), err.getvalue()


def test_bench_prints_one_json_object_with_the_ratios(bench_result):
    code, out, err = bench_result
    assert code == 0, err[-3000:]
    result = json.loads(out)
    for key in RATIO_KEYS:
        value = result[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert result["preset"] == "tiny"
    assert result["command"].startswith("llava-sessions bench --preset tiny --turns 3 --repeats 1")
    assert {"cpu", "torch", "gpu", "device"} <= set(result["machine"])


def test_the_served_answers_equal_the_reference(bench_result):
    result = json.loads(bench_result[1])
    assert result["answers_match_reference"] is True and result["mismatches"] == []
    assert result["answers_match_up_to_near_ties"] is True and result["mismatch_analysis"] == []
    conv = result["conversation"]
    assert len(conv["reference_answers"]) == TURNS
    # Every follow-up turn reused the history: only its new tokens were prefilled.
    assert conv["cached_tokens"][0] == 0
    assert all(0 < c < n for c, n in zip(conv["cached_tokens"][1:], conv["context_tokens"][1:]))


def test_per_turn_arrays_have_one_entry_per_turn(bench_result):
    result = json.loads(bench_result[1])
    for name in ("ours", "stateless", "pixel_cache", "floor"):
        values = result["ttft_s"][name]
        assert len(values) == TURNS and all(v > 0 for v in values), name
    streamed = result["ours_streamed_first_event_s"]
    assert len(streamed) == TURNS and all(v > 0 for v in streamed)
    assert result["followup_streamed_first_event_vs_ours"] > 0
    assert len(result["decode_tps"]["ours"]) == TURNS
    assert len(result["bytes_per_session"]["after_turn"]) == TURNS
    assert result["bytes_per_session"]["accounting_matches_measurement"] is True
    fit = result["sessions_fit"]
    assert fit["measured"]["sessions"] > 0
    assert fit["llava_1_5_7b_fp16_80gb"]["kv_bytes_per_token"] == 524288


def test_cold_opens_are_timed_in_pairs_with_the_stateless_first_turn(bench_result):
    result = json.loads(bench_result[1])
    samples = result["ttft_samples_s"]
    assert len(samples["ours"][0]) == len(samples["stateless"][0]) == COLD_OPEN_PAIRS  # --repeats 1
    assert all(len(turn) == 1 for turn in samples["ours"][1:] + samples["stateless"][1:])
    assert result["cold_open_s"]["pairs"] == COLD_OPEN_PAIRS
    # The ratio is taken pair by pair (each pair ran back to back), then the median.
    pairs = [ours / stateless for ours, stateless in zip(samples["ours"][0], samples["stateless"][0])]
    assert result["cold_open_vs_stateless"] == pytest.approx(statistics.median(pairs))
    medians = statistics.median(samples["ours"][0]) / statistics.median(samples["stateless"][0])
    assert result["cold_open_s"]["ratio_of_medians"] == pytest.approx(medians)
    # Turn 1's TTFT (a cold open, vision tower included) says nothing of its full turn's decoding.
    assert result["decode_tps"]["ours"][0] is None and result["decode_tps"]["ours"][1] > 0


def test_the_table_holds_only_runs_with_targets_to_them_and_says_how_answers_agree(bench_result):
    from llava_sessions.bench import report

    result = json.loads(bench_result[1])
    # Targets are set for the small preset on a CPU and the 7B on a GPU: a tiny run has none.
    assert result["targets"] is None and result["model_shape"] == "tiny"
    text = report.table(result)
    assert "follow-up TTFT ours / floor" in text and "NOT MET" not in text and "<=1.5" not in text
    assert set(RATIO_KEYS) <= set(result)
    assert "answers of (a) equal the reference: yes" in text
    parted = {**result, "answers_match_reference": False, "answers_match_up_to_near_ties": True,
              "mismatch_analysis": [{"where": "repeat 1 turn 2", "kind": "answer", "near_tie": True}]}
    assert "up to near ties: 1 answer(s)" in report.table(parted)
    parted["answers_match_up_to_near_ties"] = False
    assert "answers of (a) equal the reference: NO" in report.table(parted)


def test_the_absolute_figures_are_the_runs_own_numbers_under_one_name_each(bench_result):
    result = json.loads(bench_result[1])
    absolute = result["absolute"]
    ours = result["ttft_s"]["ours"]
    assert absolute["followup_ttft_s"] == pytest.approx(statistics.median(ours[1:]))
    assert absolute["followup_ttft_ms"] == pytest.approx(absolute["followup_ttft_s"] * 1e3)
    assert absolute["cold_open_ms"] == pytest.approx(result["cold_open_s"]["ours_open_with_question"] * 1e3)
    assert absolute["decode_tps_1_session"] == pytest.approx(
        statistics.median(v for v in result["decode_tps"]["ours"] if v is not None))
    assert absolute["concurrent_sessions"] == result["concurrency"]["sessions"] == 8
    assert absolute["decode_tps_8_sessions"] == result["concurrency"]["concurrent_tps"]
    assert absolute["turn_tps_1_session"] == result["concurrency"]["single_tps"]
    assert absolute["decode_tps_8_sessions"] / absolute["turn_tps_1_session"] == pytest.approx(
        result["concurrent8_tps_vs_single"])
    for key, value in absolute.items():
        assert isinstance(value, (int, float)) and value > 0, (key, value)


def test_the_long_conversation_fills_the_context_with_three_images_and_is_timed_on_both_sides(bench_result):
    result = json.loads(bench_result[1])
    long = result["long_conversation"]
    # tiny: 512 positions, 16 tokens an image; the history leaves room for a 24-token answer.
    assert long["images"] == 3 and long["image_turns"][0] == 1 and long["turns"] > 3
    assert long["history_limit_tokens"] == 512 - 24
    assert long["history_limit_tokens"] - 30 < long["history_tokens"] <= long["history_limit_tokens"]
    assert long["context_tokens"][-1] == long["history_tokens"]
    assert long["timed_turns"] == list(range(long["turns"] - 2, long["turns"] + 1))
    assert all(0 < c < n for c, n in zip(long["cached_tokens"], long["context_tokens"]))  # history kept
    assert long["answers_match_reference"] is True and long["stateless_first_token_agrees"] is True
    for side in ("ours", "stateless"):
        samples = long["ttft_samples_s"][side]
        assert len(samples) == 3 and all(len(turn) == 1 and turn[0] > 0 for turn in samples)  # --repeats 1
        assert long[f"ttft_{side}_s"] == pytest.approx(statistics.median(s[0] for s in samples))
    assert long["stateless_vs_ours"] == pytest.approx(long["ttft_stateless_s"] / long["ttft_ours_s"])
    assert result["long_conversation_stateless_vs_ours"] == long["stateless_vs_ours"]
    assert result["ratios_best_of_repeats"]["long_conversation_stateless_vs_ours"] == pytest.approx(
        long["stateless_vs_ours"])  # one repeat: the best is the median
    assert result["absolute"]["long_conversation_ttft_ms"] == pytest.approx(long["ttft_ours_s"] * 1e3)
    from llava_sessions.bench import report

    assert f"long conversation: {long['history_tokens']} tokens of history (3 images" in report.table(result)


def test_the_json_says_how_the_served_step_ran_as_its_worker_reports_it(bench_result):
    compile = json.loads(bench_result[1])["compile"]
    # On a CPU, compile "auto" is off: the worker compiled nothing and says so in its metrics.
    assert compile["setting"] == "auto" and compile["compiled"] is False and compile["cuda_graphs"] is False
    counts = dict(compile["worker_counts"])
    # Follow-ups of the concurrency burst that joined a running bundle: as many as timing allowed.
    assert isinstance(counts.pop("turns_joined"), int)
    assert counts == {"llava_step_compiles": 0, "llava_cuda_graph_skips": 0}


def test_workers_scaling_prints_each_configuration_and_its_ratios(tmp_path, monkeypatch):
    """Smoke run of `bench --workers-scaling` (ratios are the bench's business, not a test's)."""
    monkeypatch.setenv("LLAVA_SESSIONS_HOME", str(tmp_path / "home"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["bench", "--workers-scaling", "--preset", "tiny", "--concurrency", "2", "--turns", "1",
                         "--repeats", "1", "--max-new-tokens", "4", "--json"])
    assert code == 0, err.getvalue()[-3000:]
    result = json.loads(out.getvalue())
    assert [c["name"] for c in result["configurations"]] == [
        "one worker", "two workers", "two workers, every core each"]
    assert [c["workers"] for c in result["configurations"]] == [1, 2, 2]
    for config in result["configurations"]:
        assert config["tokens_per_s"] > 0 and config["opens_per_s"] > 0
        assert config["turn_rounds"][0]["tokens"] == 2 * 4  # every turn answered in full
    assert set(result["ratios"]) == {"cold_opens_two_workers_over_one", "cold_opens_two_workers_every_core_over_one",
                                     "follow_ups_two_workers_over_one", "follow_ups_two_workers_every_core_over_one"}
