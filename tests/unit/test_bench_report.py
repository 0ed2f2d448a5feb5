"""`llava-sessions bench`'s table, plot and options, on recorded results (no run)."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest

from llava_sessions import cli
from llava_sessions.bench import report, runner, stats

RECORDED = Path(__file__).resolve().parents[2] / "docs" / "bench-cpu-small.json"


@pytest.fixture
def recorded():
    """A real `bench --preset small` result (CPU), as the docs keep it."""
    return json.loads(RECORDED.read_text())


def _ratio_lines(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ratios ("))
    return lines[start:start + 2 + len(stats.RATIO_KEYS)]


def test_a_small_cpu_run_is_shown_against_its_targets(recorded):
    ratios = _ratio_lines(report.table(recorded))
    assert "targets of small on cpu" in ratios[0] and "verdict" in ratios[1]
    floor = next(line for line in ratios if "follow-up TTFT ours / floor" in line)
    assert "<=1.5" in floor and floor.split()[-2] == "met"
    assert any("NOT MET" in line for line in ratios)  # 7.90 against >=8 in the recorded run


def test_a_compiled_run_shows_the_compiled_steps_targets(recorded):
    compiled = json.loads(RECORDED.with_name("bench-cpu-small-compiled.json").read_text())
    figures = {**compiled, **compiled["absolute"]}
    result = {**compiled, "step_targets": stats.step_verdicts("small", "cpu", True, figures)}
    lines = report.table(result).splitlines()
    start = lines.index("the compiled step's targets:")
    block = lines[start + 1:start + 5]
    decode = next(line for line in block if "decode tok/s ours / bare generate" in line)
    assert ">=1.8" in decode and f"{compiled['decode_tps_vs_bare']:.2f}" in decode
    assert decode.endswith("met") == (compiled["decode_tps_vs_bare"] >= 1.8)
    assert "the compiled step's targets:" not in report.table(recorded)  # an eager run: no such block


def test_a_run_without_targets_shows_its_ratios_with_no_target_or_verdict(recorded):
    result = {**recorded, "preset": "tiny", "model_shape": "tiny", "targets": None,
              "targets_note": stats.targets_note("tiny", "cpu")}
    text = report.table(result)
    ratios = _ratio_lines(text)
    assert "no targets for preset tiny on cpu" in ratios[0]
    assert "target" not in ratios[1] and "verdict" not in ratios[1]
    for key in stats.RATIO_KEYS:
        line = next(line for line in ratios if stats.RATIO_LABELS[key] in line)
        assert f"{result[key]:.2f}" in line
    assert "NOT MET" not in text and " met " not in text and ">=8" not in text and "<=1.5" not in text


def test_bench_json_of_a_run_without_targets_says_null(monkeypatch, capsys, recorded):
    result = {**recorded, "targets": None, "targets_note": "no targets for preset tiny on cpu"}
    monkeypatch.setattr(runner, "run", lambda options, log: copy.deepcopy(result))
    assert cli.main(["bench", "--preset", "tiny", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["targets"] is None and printed["targets_note"] == "no targets for preset tiny on cpu"
    assert all(isinstance(printed[key], float) for key in stats.RATIO_KEYS)


def _no_run(options, log):
    raise AssertionError("the bench ran although --plot could not be drawn")


def test_plot_without_matplotlib_exits_2_before_the_bench_runs(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(runner, "run", _no_run)
    assert cli.main(["bench", "--preset", "tiny", "--plot", str(tmp_path / "ttft.png")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install matplotlib" in err and ".[bench]" in err
    assert not (tmp_path / "ttft.png").exists()


def test_plot_into_a_missing_folder_exits_2_before_the_bench_runs(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(runner, "run", _no_run)
    assert cli.main(["bench", "--preset", "tiny", "--plot", str(tmp_path / "nowhere" / "ttft.png")]) == 2
    assert "--plot" in capsys.readouterr().err


def test_the_plot_legend_sits_outside_the_data_area(recorded, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    # Many turns, the lines spread over the whole height: no spot inside the axes is free.
    turns = 12
    result = copy.deepcopy(recorded)
    result["conversation"]["turns"] = turns
    for i, (name, _) in enumerate(report.STRATEGIES):
        result["ttft_s"][name] = [0.01 * (i + 1) * (1 + (k % 3)) for k in range(turns)]
    result["ours_streamed_first_event_s"] = [0.2 - 0.01 * k for k in range(turns)]
    fig = report.figure(result)
    try:
        fig.canvas.draw()
        (ax,), (legend,) = fig.axes, fig.legends
        assert len(legend.get_texts()) == len(report.STRATEGIES) + 1
        legend_box, data_box = legend.get_window_extent(), ax.get_window_extent()
        assert not legend_box.overlaps(data_box), (legend_box, data_box)
        figure_box = fig.bbox
        assert figure_box.x0 <= legend_box.x0 and legend_box.x1 <= figure_box.x1  # not cut off
        assert figure_box.y0 <= legend_box.y0 and legend_box.y1 <= figure_box.y1
    finally:
        plt.close(fig)
    assert report.plot(result, str(tmp_path / "ttft.png")) is None
    assert (tmp_path / "ttft.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_bench_help_gives_each_default_once_in_one_style(capsys):
    text = _help(["bench"], capsys)
    for option in re.split(r"\n  (?=-)", text.split("options:", 1)[1]):
        flat = " ".join(option.split())
        assert flat.count("default") <= 1, flat
        assert not re.search(r"\(default \d", flat), flat  # "(default: 6)", as the formatter writes it
    flat = " ".join(text.split())
    assert "at least 2 (default: 6)" in flat and "(default: small)" in flat and "pip install" in flat


def _with_new_fields(recorded: dict, long_ran: bool = True) -> dict:
    """The recorded run with the absolute figures and a long conversation added (synthetic numbers)."""
    result = copy.deepcopy(recorded)
    result["absolute"] = stats.absolute_figures(
        result["ttft_s"]["ours"], result["decode_tps"]["ours"], 8, concurrent_tps=466.0, single_tps=290.0,
        long_conversation_ttft_s=0.025 if long_ran else None)
    result["long_conversation"] = {
        "history_tokens": 2018, "turns": 7, "images": 3, "ttft_ours_s": 0.025, "ttft_stateless_s": 0.4,
        "stateless_vs_ours": 16.0, "history_limit_tokens": 2024, "timed_turns": [5, 6, 7],
    } if long_ran else None
    result["long_conversation_stateless_vs_ours"] = 16.0 if long_ran else None
    result["ratios_best_of_repeats"]["long_conversation_stateless_vs_ours"] = 17.5 if long_ran else None
    return result


def test_the_table_gives_the_absolute_figures_and_the_long_conversation(recorded):
    text = report.table(_with_new_fields(recorded))
    absolute = recorded["ttft_s"]["ours"]
    followup_ms = stats.median(absolute[1:]) * 1e3
    assert f"follow-up TTFT, end to end over HTTP (median of turns 2-6)  {followup_ms:.1f} ms" in text
    assert f"cold open (one request: open with the image and ask)  {absolute[0] * 1e3:.1f} ms" in text
    decode = stats.median(v for v in recorded["decode_tps"]["ours"] if v is not None)
    assert f"decode, one session (tokens after the first)  {decode:.1f} tokens/s" in text
    assert "8 sessions at once, aggregate" in text and "466.0 tokens/s (one session timed so: 290.0)" in text
    assert "follow-up TTFT in the long conversation  25.0 ms" in text
    assert ("long conversation: 2018 tokens of history (3 images, 7 turns; at most 2024), TTFT of turns 5-7:"
            " ours 25.0 ms, stateless 400.0 ms; stateless / ours 16.00") in text
    # Its ratio sits under the targeted ones, with no target of its own.
    ratios = report.table(_with_new_fields(recorded)).splitlines()
    start = next(i for i, line in enumerate(ratios) if line.startswith("ratios ("))
    line = ratios[start + 2 + len(stats.RATIO_KEYS)]
    assert report.LONG_LABEL in line and line.split()[-2:] == ["16.00", "17.50"] and "met" not in line


def test_the_table_says_when_the_long_conversation_did_not_run_and_reads_older_results(recorded):
    text = report.table(_with_new_fields(recorded, long_ran=False))
    assert "long conversation: not run" in text and "in the long conversation" not in text
    line = next(line for line in text.splitlines() if report.LONG_LABEL in line)
    assert line.split()[-2:] == ["-", "-"]
    old = report.table(recorded)  # recorded before these fields existed
    assert "absolute figures" not in old and "long conversation" not in old


def test_no_long_conversation_reaches_the_run_and_its_command(monkeypatch, capsys, recorded):
    seen = []

    def fake_run(options, log):
        seen.append(options)
        return copy.deepcopy(recorded)

    monkeypatch.setattr(runner, "run", fake_run)
    assert cli.main(["bench", "--preset", "tiny", "--json"]) == 0
    assert cli.main(["bench", "--preset", "tiny", "--no-long-conversation", "--json"]) == 0
    capsys.readouterr()
    assert [o.long_conversation for o in seen] == [True, False]
    assert "--no-long-conversation" not in seen[0].command()
    assert seen[1].command().endswith("--device auto --no-long-conversation")
