"""The readable table and the optional plot. Torch-free."""

from __future__ import annotations

import importlib

from llava_sessions.bench import stats

STRATEGIES = (
    ("ours", "(a) ours, HTTP"),
    ("stateless", "(b) stateless"),
    ("pixel_cache", "(c) pixel cache"),
    ("floor", "(d) floor"),
)


def _gb(value: float) -> str:
    return f"{value / 1e9:.3f} GB" if value >= 1e8 else f"{value / 1e6:.2f} MB"


def table(result: dict) -> str:
    ttft = result["ttft_s"]
    conv = result["conversation"]
    lines = [
        f"llava-sessions bench: preset {result['preset']} ({result['dtype']}) on {result['machine']['device']}"
        f" - {result['machine']['gpu'] or result['machine']['cpu']}, torch {result['machine']['torch']}",
        f"{conv['turns']} turns, median of {conv['repeats']} repeats; questions {conv['question_tokens']} tokens;"
        f" answers {conv['answer_tokens']} tokens",
        "",
        "TTFT per turn (ms)",
        f"{'turn':>4} {'context':>7} {'new':>4} " + " ".join(f"{label:>16}" for _, label in STRATEGIES)
        + f" {'b/a':>6} {'c/a':>6} {'a/d':>6}",
    ]
    for k in range(conv["turns"]):
        a, b, c, d = (ttft[name][k] for name, _ in STRATEGIES)
        new = conv["context_tokens"][k] - conv["cached_tokens"][k]
        lines.append(
            f"{k + 1:>4} {conv['context_tokens'][k]:>7} {new:>4} "
            + " ".join(f"{v * 1e3:>16.1f}" for v in (a, b, c, d))
            + f" {b / a:>6.1f} {c / a:>6.1f} {a / d:>6.2f}"
        )
    lines.append(
        "(a) streamed, first event per turn (ms): "
        + ", ".join(f"{v * 1e3:.1f}" for v in result["ours_streamed_first_event_s"])
        + f"; follow-ups {result['followup_streamed_first_event_vs_ours']:.2f}x the one-token turn"
    )
    lines += ["", *_ratios(result), *step_target_lines(result)]
    cold = result["cold_open_s"]
    dec = result["decode_tps"]
    conc = result["concurrency"]
    lines += [
        "",
        f"cold open: ours open with the first question {cold['ours_open_with_question'] * 1e3:.1f} ms"
        f" (an image-only open {cold['ours_image_only_open'] * 1e3:.1f} ms),"
        f" stateless turn 1 {cold['stateless_turn1'] * 1e3:.1f} ms (medians of {cold['pairs']} pairs timed"
        f" back to back; the ratio is the pairs' median, the medians' ratio {cold['ratio_of_medians']:.2f})",
        "decode tok/s per turn: ours " + _fmt_list(dec["ours"]) + "; bare generate " + _fmt_list(dec["bare_generate"])
        + "; bare decode step " + _fmt_list(dec["floor_one_step"]),
        f"concurrency: {conc['sessions']} sessions {conc['concurrent_tps']:.1f} tok/s vs 1 session"
        f" {conc['single_tps']:.1f} tok/s",
    ]
    lines += ["", *absolute_lines(result), *long_conversation_lines(result)]
    mem = result["bytes_per_session"]
    fit = result["sessions_fit"]
    measured, seven = fit["measured"], fit["llava_1_5_7b_fp16_80gb"]
    lines += [
        f"bytes per session (engine accounting): after open {_gb(mem['after_open'])}, after each turn "
        + ", ".join(_gb(b) for b in mem["after_turn"])
        + f"; KV {mem['kv_bytes_per_token_measured']:.0f} B/token"
        + (" (= config accounting)" if mem["accounting_matches_measurement"] else ""),
        f"sessions of {fit['context_tokens']} tokens that fit: {measured['sessions']} here"
        f" ({_gb(measured['session_bytes'])} each in {_gb(measured['budget_bytes'])}: {measured['budget_source']});"
        f" llava-1.5-7b fp16 on 80 GB: {seven['sessions']} ({_gb(seven['session_bytes'])} each,"
        f" {seven['kv_bytes_per_token']} B/token, in {_gb(seven['budget_bytes'])})",
        "",
        "answers of (a) equal the reference: " + _agreement(result),
        "first token of (b)/(c)/(d) equals the reference: "
        + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in result["first_token_agrees_with_reference"].items()),
        f"command: {result['command']}",
        f"wall time: {result['wall_s']:.1f} s",
    ]
    return "\n".join(lines)


def _ratios(result: dict) -> list[str]:
    """The six ratios; with the target and its verdict beside each only where the run has targets
    (stats.TARGETS_BY_RUN: a tiny run is not held to the small preset's targets)."""
    targets = result.get("targets")
    note = result.get("targets_note") or (
        f"targets of {result['preset']} on {result['machine']['device']}" if targets else "no targets for this run")
    best = result.get("ratios_best_of_repeats") or {}
    lines = [f"ratios (follow-up = turns >= {stats.FIRST_FOLLOWUP_TURN}; {note})"]
    if targets:
        lines.append(f"  {'':<56} {'target':<7} {'median':>8}  {'verdict':<7}  {'best-of-R':>9}")
    else:
        lines.append(f"  {'':<56} {'median':>8}  {'best-of-R':>9}")
    for key in (targets or stats.RATIO_KEYS):
        other = best.get(key)
        other_text = f"{other:>9.2f}" if other is not None else f"{'-':>9}"
        if targets:
            target = targets[key]
            label = target.get("label") or stats.RATIO_LABELS.get(key, key)
            verdict = "met" if target["met"] else "NOT MET"
            lines.append(f"  {label:<56} {target['op'] + format(target['value'], 'g'):<7} {result[key]:>8.2f}"
                         f"  {verdict:<7}  {other_text}")
        else:
            lines.append(f"  {stats.RATIO_LABELS[key]:<56} {result[key]:>8.2f}  {other_text}")
    return lines + _long_ratio_line(result, bool(targets))


def step_target_lines(result: dict) -> list[str]:
    """The compiled core's targets (stats.STEP_TARGETS_BY_RUN) with their verdicts; none where the
    run has none (another preset or device, an eager step, an older result)."""
    targets = result.get("step_targets")
    if not targets:
        return []
    lines = ["", "the compiled step's targets:"]
    for target in targets.values():
        measured = target["measured"]
        verdict = "not measured" if measured is None else "met" if target["met"] else "NOT MET"
        value = f"{measured:>8.2f}" if measured is not None else f"{'-':>8}"
        lines.append(f"  {target['label']:<56} {target['op'] + format(target['value'], 'g'):<7} {value}  {verdict}")
    return lines


LONG_LABEL = "long conversation: TTFT stateless / ours"


def absolute_lines(result: dict) -> list[str]:
    """The absolute figures (stats.absolute_figures) with what each one times; none in older results."""
    figures = result.get("absolute")
    if not figures:
        return []
    n = figures["concurrent_sessions"]
    lines = [
        "absolute figures:",
        f"  follow-up TTFT, end to end over HTTP (median of turns 2-{result['conversation']['turns']})"
        f"  {figures['followup_ttft_ms']:.1f} ms",
        f"  cold open (one request: open with the image and ask)  {figures['cold_open_ms']:.1f} ms",
        f"  decode, one session (tokens after the first)  {figures['decode_tps_1_session']:.1f} tokens/s",
        f"  {n} sessions at once, aggregate (answer tokens / wall of the whole turns)"
        f"  {figures[f'decode_tps_{n}_sessions']:.1f} tokens/s (one session timed so:"
        f" {figures['turn_tps_1_session']:.1f})",
    ]
    if figures.get("long_conversation_ttft_ms") is not None:
        lines.append(f"  follow-up TTFT in the long conversation  {figures['long_conversation_ttft_ms']:.1f} ms")
    return lines


def long_conversation_lines(result: dict) -> list[str]:
    """The long-conversation scenario in one line ("not run" when it was not); none in older results."""
    if "long_conversation" not in result:
        return []
    long = result["long_conversation"]
    if long is None:
        return ["long conversation: not run"]
    timed = long["timed_turns"]
    return [
        f"long conversation: {long['history_tokens']} tokens of history ({long['images']} images, {long['turns']}"
        f" turns; at most {long['history_limit_tokens']}), TTFT of turns {timed[0]}-{timed[-1]}:"
        f" ours {long['ttft_ours_s'] * 1e3:.1f} ms, stateless {long['ttft_stateless_s'] * 1e3:.1f} ms;"
        f" stateless / ours {long['stateless_vs_ours']:.2f}",
    ]


def _long_ratio_line(result: dict, targets: bool) -> list[str]:
    """The long conversation's ratio beside the targeted ones (it has no target); absent in older results."""
    if "long_conversation_stateless_vs_ours" not in result:
        return []
    value = result["long_conversation_stateless_vs_ours"]
    best = (result.get("ratios_best_of_repeats") or {}).get("long_conversation_stateless_vs_ours")
    median_text = f"{value:>8.2f}" if value is not None else f"{'-':>8}"
    best_text = f"{best:>9.2f}" if best is not None else f"{'-':>9}"
    if targets:
        return [f"  {LONG_LABEL:<56} {'-':<7} {median_text}  {'':<7}  {best_text}"]
    return [f"  {LONG_LABEL:<56} {median_text}  {best_text}"]


def _agreement(result: dict) -> str:
    if result["answers_match_reference"]:
        return "yes"
    if result["answers_match_up_to_near_ties"]:
        ties = sum(1 for m in result["mismatch_analysis"] if m["near_tie"])
        return (f"up to near ties: {ties} answer(s) part at a token whose best two logits are within"
                f" {stats.TIE_ULPS} units of {result['dtype']} precision (see mismatch_analysis)")
    return "NO"


def _fmt_list(values) -> str:
    return "[" + ", ".join("-" if v is None else f"{v:.0f}" for v in values) + "]"


PLOT_INSTALL_HINT = ("install it with `pip install matplotlib` (or the bench extra: `pip install '.[bench]'` in a "
                     "checkout, `pip install 'llava-sessions[bench]'` otherwise), or leave out --plot")


def plot_unavailable() -> str | None:
    """Why --plot cannot draw here (matplotlib not importable), else None. Cheap enough to ask
    before a run, so that a missing matplotlib is said at once, not after the bench's minutes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        importlib.import_module("matplotlib.pyplot")
    except ImportError as exc:
        return f"--plot needs matplotlib, which cannot be imported ({exc}); {PLOT_INSTALL_HINT}"
    return None


def figure(result: dict):
    """The TTFT-per-turn figure of (a)-(d). The legend sits below the axes, outside them, so no
    line (the floor's, lowest, included) can be hidden under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = list(range(1, result["conversation"]["turns"] + 1))
    fig, ax = plt.subplots(figsize=(7, 5.2), layout="constrained")
    for name, label in STRATEGIES:
        ax.plot(turns, [v * 1e3 for v in result["ttft_s"][name]], marker="o", label=label)
    ax.plot(turns, [v * 1e3 for v in result["ours_streamed_first_event_s"]], marker="x", linestyle="--",
            color="C0", label="(a) ours, streamed: first event")
    ax.set_yscale("log")
    ax.set_xlabel("turn")
    ax.set_ylabel("time to first token (ms)")
    ax.set_xticks(turns)
    ax.set_title(f"TTFT per turn - preset {result['preset']} on {result['machine']['device']}")
    ax.grid(True, which="both", alpha=0.3)
    # "outside lower center": constrained layout shrinks the axes to make room under the x label.
    fig.legend(loc="outside lower center", ncols=3, frameon=False)
    return fig


def plot(result: dict, path: str) -> str | None:
    """Draw TTFT per turn for (a)-(d) into ``path``; returns a reason when it could not."""
    reason = plot_unavailable()
    if reason:
        return reason
    import matplotlib.pyplot as plt

    fig = figure(result)
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as exc:
        return f"could not write the plot to {path}: {exc}"
    finally:
        plt.close(fig)
    return None
