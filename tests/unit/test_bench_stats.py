"""The benchmark's arithmetic: medians, ratios, follow-up selection, decode rate, sessions that fit."""

from __future__ import annotations

import math

import pytest

from llava_sessions.bench import stats


def test_median_and_per_turn_medians():
    assert stats.median([3, 1, 2]) == 2
    assert stats.median([4, 1, 3, 2]) == 2.5
    assert stats.per_turn_medians([[1.0, 5.0, 3.0], [2.0]]) == [3.0, 2.0]
    with pytest.raises(ValueError):
        stats.median([])


def test_followup_is_turns_from_the_third():
    assert stats.followup([10, 20, 30, 40]) == [30, 40]
    assert stats.followup([10, 20]) == [10, 20]  # too short: every turn


def test_ratio_and_median_ratio():
    assert stats.ratio(6, 2) == 3
    assert stats.median_ratio([8, 9, 30], [1, 3, 3]) == 8  # per-position 8, 3, 10
    for bad in ((1, 0), (1, -1), (-1, 1), (math.inf, 1), (1, math.nan)):
        with pytest.raises(ValueError):
            stats.ratio(*bad)
    with pytest.raises(ValueError):
        stats.median_ratio([1, 2], [1])


def test_decode_tps_counts_tokens_after_the_first():
    # 11 tokens in 1.2 s, the first after 0.2 s: 10 tokens in 1 s.
    assert stats.decode_tps(1.2, 0.2, 11) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        stats.decode_tps(1.0, 0.5, 1)
    with pytest.raises(ValueError):
        stats.decode_tps(0.4, 0.5, 8)  # noise: the full turn faster than its first token


def test_sessions_fit_and_targets():
    assert stats.sessions_fit(66e9, 330e6) == 200
    assert stats.sessions_fit(1, 2) == 0
    by_key = {t.key: t for t in stats.TARGETS}
    assert by_key["followup_ttft_speedup_vs_stateless"].met(8.0)
    assert not by_key["followup_ttft_speedup_vs_stateless"].met(7.9)
    assert by_key["followup_ttft_vs_floor"].met(1.5) and not by_key["followup_ttft_vs_floor"].met(1.6)
    assert len(stats.RATIO_KEYS) == 6


def test_seven_b_accounting_from_the_config():
    from llava_sessions.bench.runner import accounting_for
    from llava_sessions.tiny_model import PRESETS

    acc = accounting_for(PRESETS["llava-1.5-7b"], 2, 620)
    assert acc["kv_bytes_per_token"] == 2 * 32 * 32 * 128 * 2  # K and V, 32 layers, 4096 wide, fp16
    assert acc["feature_bytes"] == 576 * 4096 * 2
    assert acc["session_bytes"] == 576 * 4096 * 2 + 620 * 524288


def test_a_gpu_run_is_held_to_the_gpu_column():
    cpu = {t.key: t.value for t in stats.targets_for("small", "cpu")}
    gpu = {t.key: t.value for t in stats.targets_for("llava-1.5-7b", "cuda")}
    assert set(cpu) == set(gpu) == set(stats.RATIO_KEYS) == set(stats.RATIO_LABELS)
    assert gpu["followup_ttft_speedup_vs_stateless"] == 10 and cpu["followup_ttft_speedup_vs_stateless"] == 8
    assert gpu["followup_ttft_vs_floor"] == 1.25 and gpu["concurrent8_tps_vs_single"] == 3


@pytest.mark.parametrize(("shape", "device"), [("tiny", "cpu"), ("tiny", "cuda"), ("small", "cuda"),
                                               ("llava-1.5-7b", "cpu"), (None, "cpu"), (None, "cuda")])
def test_only_small_on_a_cpu_and_7b_on_a_gpu_have_targets(shape, device):
    assert stats.targets_for(shape, device) is None
    assert stats.verdicts(None, {}) is None
    note = stats.targets_note(shape, device)
    assert note.startswith("no targets for") and "small on cpu and llava-1.5-7b on cuda" in note
    assert ("no preset's shape" in note) is (shape is None)


def test_verdicts_say_which_targets_a_ratio_meets():
    ratios = dict.fromkeys(stats.RATIO_KEYS, 1.2)
    verdicts = stats.verdicts(stats.targets_for("small", "cpu"), ratios)
    assert set(verdicts) == set(stats.RATIO_KEYS)
    assert verdicts["followup_ttft_vs_floor"] == {"label": "follow-up TTFT ours / floor", "op": "<=",
                                                  "value": 1.5, "met": True}
    assert verdicts["followup_ttft_speedup_vs_stateless"]["met"] is False
    assert stats.targets_note("small", "cpu") == "targets of small on cpu"


def test_a_compiled_run_is_held_to_the_compiled_cores_targets():
    figures = {"decode_tps_vs_bare": 1.9, "concurrent8_tps_vs_single": 1.6, "followup_ttft_vs_floor": 1.2,
               "cold_open_vs_stateless": 1.07}
    cpu = stats.step_verdicts("small", "cpu", True, figures)
    assert {key: v["met"] for key, v in cpu.items()} == {
        "decode_tps_vs_bare": True, "concurrent8_tps_vs_single": False, "followup_ttft_vs_floor": False,
        "cold_open_vs_stateless": True}
    assert cpu["followup_ttft_vs_floor"]["value"] == 1.0 and cpu["followup_ttft_vs_floor"]["measured"] == 1.2
    # On the GPU absolute figures: a run with 4 sessions at once has no 8-session figure to judge.
    gpu = stats.step_verdicts("llava-1.5-7b", "cuda", True, {"decode_tps_1_session": 140.0, "followup_ttft_ms": 16.0})
    assert gpu["decode_tps_1_session"]["met"] is True and gpu["followup_ttft_ms"]["met"] is False
    assert gpu["decode_tps_8_sessions"] == {"label": "decode, 8 sessions aggregate (tokens/s)", "op": ">=",
                                            "value": 800.0, "measured": None, "met": None}
    # An eager step, or a run of no such targets, is not judged against them.
    assert stats.step_verdicts("small", "cpu", False, figures) is None
    assert stats.step_verdicts("tiny", "cpu", True, figures) is None


def _config(geometry, **changes):
    from types import SimpleNamespace

    vision = SimpleNamespace(image_size=geometry.image_size, patch_size=geometry.patch_size,
                             hidden_size=geometry.vision_hidden_size,
                             intermediate_size=geometry.vision_intermediate_size,
                             num_hidden_layers=geometry.vision_num_layers, num_attention_heads=geometry.vision_num_heads)
    text = SimpleNamespace(hidden_size=geometry.text_hidden_size, intermediate_size=geometry.text_intermediate_size,
                           num_hidden_layers=geometry.text_num_layers, num_attention_heads=geometry.text_num_heads,
                           num_key_value_heads=geometry.text_num_kv_heads, vocab_size=geometry.vocab_size)
    for key, value in changes.items():
        setattr(text, key, value)
    return SimpleNamespace(vision_config=vision, text_config=text)


def test_a_checkpoint_is_held_to_the_targets_of_the_preset_whose_shape_it_has():
    from llava_sessions.bench.runner import preset_of
    from llava_sessions.tiny_model import PRESETS

    for name, geometry in PRESETS.items():
        assert preset_of(_config(geometry)) == name
    assert preset_of(_config(PRESETS["small"], num_hidden_layers=5)) is None
    assert preset_of(_config(PRESETS["llava-1.5-7b"], num_key_value_heads=None)) == "llava-1.5-7b"  # = heads


def test_divergence_index_counts_the_reference_tokens_the_other_answer_agrees_with():
    prefixes = ["", "The", "The cat", "The cat sat"]
    assert stats.divergence_index(prefixes, "The cat sat") == 3
    assert stats.divergence_index(prefixes, "The cat ran") == 2
    assert stats.divergence_index(prefixes, "A dog") == 0


def test_a_near_tie_is_a_few_units_of_the_dtypes_precision_at_the_logits_scale():
    fp16_eps, fp32_eps = 2.0**-10, 2.0**-23
    assert stats.tie_tolerance(fp16_eps, 5.0) == pytest.approx(8 * 2**-10 * 5)  # about 0.04
    assert stats.tie_tolerance(fp16_eps, -0.1) == pytest.approx(8 * 2**-10)  # never below one unit of scale
    assert stats.tie_tolerance(fp32_eps, 5.0) < 1e-5


@pytest.mark.parametrize(("near_ties", "exit_code"), [(True, 0), (False, 1)])
def test_bench_fails_only_when_an_answer_parts_from_the_reference_away_from_a_near_tie(
    monkeypatch, capsys, near_ties, exit_code
):
    from llava_sessions import cli
    from llava_sessions.bench import runner

    parted = {"answers_match_reference": False, "answers_match_up_to_near_ties": near_ties,
              "mismatches": ["repeat 1 turn 2: answer 'a b' != 'a c'"], "dtype": "float16"}
    monkeypatch.setattr(runner, "run", lambda options, log: dict(parted))
    assert cli.main(["bench", "--preset", "tiny", "--json"]) == exit_code
    err = capsys.readouterr().err
    assert "repeat 1 turn 2" in err
    assert ("near tie" in err) is near_ties


def test_absolute_figures_name_the_follow_up_ttft_cold_open_and_both_decode_rates():
    figures = stats.absolute_figures([0.100, 0.020, 0.030, 0.010], [None, 300.0, 280.0, None], 8,
                                     concurrent_tps=900.0, single_tps=250.0, long_conversation_ttft_s=0.025)
    assert figures["followup_ttft_s"] == pytest.approx(0.020)  # median of turns 2..4, not 3..
    assert figures["followup_ttft_ms"] == pytest.approx(20.0)
    assert figures["cold_open_s"] == pytest.approx(0.100) and figures["cold_open_ms"] == pytest.approx(100.0)
    assert figures["decode_tps_1_session"] == pytest.approx(290.0)  # turns without a rate left out
    assert figures["decode_tps_8_sessions"] == 900.0 and figures["turn_tps_1_session"] == 250.0
    assert figures["concurrent_sessions"] == 8 and figures["long_conversation_ttft_ms"] == pytest.approx(25.0)
    other = stats.absolute_figures([0.1, 0.02], [None, 300.0], 4, concurrent_tps=500.0, single_tps=200.0)
    assert other["decode_tps_4_sessions"] == 500.0 and "decode_tps_8_sessions" not in other
    assert other["long_conversation_ttft_ms"] is None
    with pytest.raises(ValueError):
        stats.absolute_figures([0.1], [None], 8, concurrent_tps=1.0, single_tps=1.0)


def test_images_are_spread_over_the_full_turns_the_first_opening_the_session():
    assert stats.spread_images(3, 12) == (0, 4, 8)
    assert stats.spread_images(3, 2) == (0, 0, 1)  # fewer turns than images: a turn brings two
    assert stats.spread_images(1, 5) == (0,)


def _plan(image_tokens, max_context, answer=24, text=30, **kwargs):
    return stats.plan_long_conversation(lambda k, n: text, image_tokens, max_context, answer, **kwargs)


def _last_history(plan, image_tokens, answer=24, text=30, closing=1):
    """The plan's last turn's prompt, counted turn by turn."""
    answers = [answer] * plan.full_turns + [1] * plan.probe_turns
    return (len(plan.image_turns) * image_tokens + plan.turns * text
            + sum(a + closing for a in answers[:-1]))


@pytest.mark.parametrize(("image_tokens", "max_context", "images", "limit"), [
    (576, 4096, 3, 2500),  # llava-1.5-7b: the 2,500-token target
    (576, 2048, 3, 2024),  # small: the context less an answer
    (16, 512, 3, 488),  # tiny: short images, many turns
    (576, 1200, 1, 1176),  # room for one image only
])
def test_the_long_conversation_is_the_longest_that_fits(image_tokens, max_context, images, limit):
    plan = _plan(image_tokens, max_context)
    assert plan.limit_tokens == limit and len(plan.image_turns) == images
    assert plan.probe_turns == stats.LONG_PROBE_TURNS and plan.full_turns >= 1
    assert plan.planned_tokens == _last_history(plan, image_tokens) <= limit
    longer = stats.LongPlan(plan.full_turns + 1, plan.probe_turns,
                            stats.spread_images(images, plan.full_turns + 1), limit, 0)
    assert _last_history(longer, image_tokens) > limit  # one more full turn would not fit
    assert sum(plan.images_at(k) for k in range(plan.turns)) == images
    assert all(t < plan.full_turns for t in plan.image_turns)  # the timed turns bring no image


def test_no_long_conversation_where_one_image_and_one_turn_do_not_fit():
    assert _plan(576, 700) is None
    assert stats.plan_long_conversation(lambda k, n: 10 * (n + 1), 16, 512, 8, images=2, probes=1).turns > 2


def test_the_long_conversation_ratio_is_stateless_over_ours_of_the_medians():
    summary = stats.long_conversation_summary([[0.02, 0.03, 0.01], [0.04], [0.05]], [[0.5], [0.3], [0.4, 0.2]])
    assert summary["ttft_ours_per_turn_s"] == [0.02, 0.04, 0.05]
    assert summary["ttft_stateless_per_turn_s"] == [0.5, 0.3, pytest.approx(0.3)]
    assert summary["ttft_ours_s"] == 0.04 and summary["ttft_stateless_s"] == pytest.approx(0.3)
    assert summary["stateless_vs_ours"] == pytest.approx(0.3 / 0.04)
    best = stats.long_conversation_summary([[0.02, 0.01]], [[0.5, 0.4]], reduce=min)
    assert best["stateless_vs_ours"] == pytest.approx(40.0)
    with pytest.raises(ValueError):
        stats.long_conversation_summary([[0.1]], [])


def test_each_bench_preset_has_a_family_geometry_and_the_next_7b_its_real_shape(tmp_path, monkeypatch):
    """Bench presets name a family's geometry; the 7B-class ones are written in float16 under a
    name of their family, and a LLaVA-NeXT session is charged its image's own count."""
    from llava_sessions.bench import runner

    written = {}

    def write(out_dir, preset, dtype, init_device, family):
        written.update(out_dir=out_dir, preset=preset, dtype=str(dtype), family=family)
        return out_dir

    monkeypatch.setattr("llava_sessions.tiny_model.write_tiny_llava", write)
    monkeypatch.setenv("LLAVA_SESSIONS_HOME", str(tmp_path))
    runner.checkpoint_for(runner.Options(preset="llava-next-mistral-7b"))
    assert written["preset"] == "llava-next-mistral-7b" and written["family"] == "next"
    assert written["dtype"] == "torch.float16" and "llava-next-mistral-7b-next-seed0-float16" in str(written["out_dir"])
    runner.checkpoint_for(runner.Options(preset="onevision-0.5b"))  # on this CPU: float32
    assert written["family"] == "onevision" and written["dtype"] == "torch.float32"
    for preset, (family, _) in runner.BENCH_PRESETS.items():
        assert runner.geometry_for(preset).family == family
    next_7b = runner.geometry_for("llava-next-mistral-7b")
    acc = runner.accounting_for(next_7b, 2, 2928 + 44, image_tokens=2928)
    assert acc["kv_bytes_per_token"] == 131072  # 32 layers x 8 KV heads x 128 x K and V x 2 bytes
    assert acc["feature_bytes"] == 2928 * 4096 * 2

