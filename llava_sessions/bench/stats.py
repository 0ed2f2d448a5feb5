"""Arithmetic of the benchmark: medians, ratios, targets. Torch-free, unit-tested on its own."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

# Follow-up turns are turns 3, 4, ... (1-based): the first is the cold one, the second the first
# follow-up whose history is still short.
FIRST_FOLLOWUP_TURN = 3


def median(values: Iterable[float]) -> float:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def per_turn_medians(samples: Sequence[Sequence[float]]) -> list[float]:
    """samples[k] holds the repeats of turn k+1; returns one median per turn."""
    return [median(turn) for turn in samples]


def followup(per_turn: Sequence[float]) -> list[float]:
    """The values of turns >= FIRST_FOLLOWUP_TURN; all turns if there are fewer."""
    picked = list(per_turn[FIRST_FOLLOWUP_TURN - 1 :])
    return picked or list(per_turn)


def ratio(numerator: float, denominator: float) -> float:
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator <= 0 or numerator < 0:
        raise ValueError(f"cannot form the ratio {numerator} / {denominator}")
    return numerator / denominator


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median over positions of numerators[i] / denominators[i] (e.g. per-turn speedups)."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError("need two equally long, non-empty sequences")
    return median(ratio(n, d) for n, d in zip(numerators, denominators))


def decode_tps(total_s: float, ttft_s: float, new_tokens: int) -> float:
    """Tokens per second after the first: (N - 1) / (total - TTFT)."""
    if new_tokens < 2:
        raise ValueError("a decode rate needs at least 2 new tokens")
    return ratio(new_tokens - 1, total_s - ttft_s)


def sessions_fit(budget_bytes: float, bytes_per_session: float) -> int:
    if bytes_per_session <= 0:
        raise ValueError("bytes_per_session must be positive")
    return max(0, int(budget_bytes // bytes_per_session))


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    op: str  # ">=" or "<="
    value: float

    def met(self, measured: float) -> bool:
        return measured >= self.value if self.op == ">=" else measured <= self.value


# The table of targets: key, label, direction, CPU `small` value, GPU `llava-1.5-7b` value.
_TARGET_TABLE = (
    ("followup_ttft_speedup_vs_stateless", "follow-up TTFT speedup vs stateless", ">=", 8.0, 10.0),
    ("followup_ttft_speedup_vs_pixel_cache", "follow-up TTFT speedup vs pixel cache (AWS sample)", ">=", 6.0, 8.0),
    ("followup_ttft_vs_floor", "follow-up TTFT ours / floor", "<=", 1.5, 1.25),
    ("cold_open_vs_stateless", "cold open (opened with the question) / stateless turn 1", "<=", 1.1, 1.1),
    ("decode_tps_vs_bare", "decode tok/s ours / bare generate", ">=", 0.9, 0.95),
    ("concurrent8_tps_vs_single", "aggregate tok/s, 8 sessions / 1", ">=", 2.0, 3.0),
)
TARGETS = tuple(Target(key, label, op, cpu) for key, label, op, cpu, _gpu in _TARGET_TABLE)
GPU_TARGETS = tuple(Target(key, label, op, gpu) for key, label, op, _cpu, gpu in _TARGET_TABLE)
RATIO_KEYS = tuple(t.key for t in TARGETS)
RATIO_LABELS = {t.key: t.label for t in TARGETS}

# The targets hold for these runs only: (model shape, device type). A ratio of another run (the
# tiny preset, `small` on a GPU, a checkpoint of no preset's shape) is a figure, not a verdict.
TARGETS_BY_RUN = {("small", "cpu"): TARGETS, ("llava-1.5-7b", "cuda"): GPU_TARGETS}

# The compiled engine core's targets (issue 20): on a CPU `--compile on`, ratios from one run; on a
# GPU (compiled by default) absolute figures and ratios. A key names a ratio of the run or one of
# its absolute figures (absolute_figures). Judged only when the served step ran compiled.
STEP_TARGETS_BY_RUN = {
    ("small", "cpu"): (
        Target("decode_tps_vs_bare", "decode tok/s ours / bare generate", ">=", 1.8),
        Target("concurrent8_tps_vs_single", "aggregate tok/s, 8 sessions / 1", ">=", 3.0),
        Target("followup_ttft_vs_floor", "follow-up TTFT ours / the eager floor", "<=", 1.0),
        Target("cold_open_vs_stateless", "cold open / stateless turn 1", "<=", 1.1),
    ),
    ("llava-1.5-7b", "cuda"): (
        Target("decode_tps_1_session", "decode, one session (tokens/s)", ">=", 130.0),
        Target("decode_tps_8_sessions", "decode, 8 sessions aggregate (tokens/s)", ">=", 800.0),
        Target("followup_ttft_ms", "follow-up TTFT end to end (ms)", "<=", 15.0),
        Target("cold_open_ms", "cold open (ms)", "<=", 45.0),
        Target("followup_ttft_speedup_vs_stateless", "stateless / ours, turns 3-6", ">=", 4.0),
        Target("long_conversation_stateless_vs_ours", "stateless / ours, long conversation", ">=", 10.0),
    ),
}


def step_verdicts(shape: str | None, device_type: str, compiled: bool, figures: dict) -> dict | None:
    """{key: label, op, value, measured, met} of the compiled core's targets against ``figures``
    (the run's ratios and absolute figures; a figure the run lacks is judged None); None when the
    run has no such targets or its step did not run compiled."""
    targets = STEP_TARGETS_BY_RUN.get((shape, device_type))
    if targets is None or not compiled:
        return None
    judged = {}
    for t in targets:
        measured = figures.get(t.key)
        judged[t.key] = {"label": t.label, "op": t.op, "value": t.value, "measured": measured,
                         "met": None if measured is None else t.met(measured)}
    return judged


GPU_7B_HOT_SESSIONS_TARGET = 150  # 620-token sessions with KV on the GPU, 7B fp16 in 80 GB


def targets_for(shape: str | None, device_type: str) -> tuple[Target, ...] | None:
    """The targets of a run of a model of preset ``shape`` (None: no preset's shape) on
    ``device_type`` ("cpu", "cuda"); None when no targets are set for that run."""
    return TARGETS_BY_RUN.get((shape, device_type))


def targets_note(shape: str | None, device_type: str) -> str:
    """One line saying which targets a run is held to, or why none."""
    if targets_for(shape, device_type) is not None:
        return f"targets of {shape} on {device_type}"
    model = f"preset {shape}" if shape else "a model of no preset's shape"
    runs = " and ".join(f"{s} on {d}" for s, d in TARGETS_BY_RUN)
    return f"no targets for {model} on {device_type}: targets are set for {runs} only"


def verdicts(targets: Sequence[Target] | None, ratios: dict) -> dict | None:
    """{key: label, op, value, met} of each target against ``ratios``; None without targets."""
    if targets is None:
        return None
    return {t.key: {"label": t.label, "op": t.op, "value": t.value, "met": t.met(ratios[t.key])}
            for t in targets}


# Two greedy runs of one model that differ only in kernel shapes (a batched step, a longer KV
# buffer) round differently. Where the best two logits are closer than that rounding, the two
# runs may pick different tokens: a near tie. Within TIE_ULPS units of the dtype's precision at
# the logits' magnitude counts as one (fp16: 8 x 2^-10 x |logit|, about 0.04 at logit 5).
TIE_ULPS = 8


def tie_tolerance(eps: float, logit_scale: float) -> float:
    return TIE_ULPS * eps * max(1.0, abs(logit_scale))


def divergence_index(reference_prefix_texts: Sequence[str], other_text: str) -> int:
    """How many reference answer tokens the other answer agrees with before it goes its own way.

    reference_prefix_texts[j] is the text of the reference's first j tokens (j = 0..n). Returns the
    largest j whose text the other answer starts with (0 when they differ from the first token).
    """
    agreed = 0
    for j, prefix in enumerate(reference_prefix_texts):
        if other_text.startswith(prefix):
            agreed = j
    return agreed


# --- absolute figures -----------------------------------------------------------------------


def absolute_figures(ttft_ours: Sequence[float], decode_tps_ours: Sequence[float | None], sessions: int,
                     concurrent_tps: float, single_tps: float, long_conversation_ttft_s: float | None = None) -> dict:
    """The run's absolute figures under one name each, for the docs' tables to quote.

    ttft_ours: per-turn TTFT medians of ours (turn 1 is the cold open: one request opens with the
    image and asks); decode_tps_ours: per-turn decode rates (None where a turn has none);
    concurrent_tps / single_tps: answer tokens per second of ``sessions`` concurrent follow-up
    turns together, and of one session's follow-up turn alone (whole turns, their TTFT included).
    """
    if len(ttft_ours) < 2:
        raise ValueError("absolute figures need a follow-up turn")
    followup_s = median(ttft_ours[1:])
    return {
        # End to end (HTTP request to its one-token answer read), median over turns 2..K.
        "followup_ttft_s": followup_s,
        "followup_ttft_ms": followup_s * 1e3,
        "cold_open_s": float(ttft_ours[0]),
        "cold_open_ms": float(ttft_ours[0]) * 1e3,
        # One session: tokens after the first over the time after the first, median over turns.
        "decode_tps_1_session": median(v for v in decode_tps_ours if v is not None),
        # ``sessions`` sessions at once: every answer token over the wall time of the whole turns.
        f"decode_tps_{sessions}_sessions": float(concurrent_tps),
        # One session's whole follow-up turn, timed as the aggregate is (the N ÷ 1 ratio's denominator).
        "turn_tps_1_session": float(single_tps),
        "concurrent_sessions": sessions,
        "long_conversation_ttft_ms": None if long_conversation_ttft_s is None else long_conversation_ttft_s * 1e3,
    }


# --- the long conversation ------------------------------------------------------------------

LONG_HISTORY_TOKENS = 2500  # "about 2,500 tokens of history", capped to the model's context
LONG_IMAGES = 3
LONG_PROBE_TURNS = 3  # the last turns, each a one-token answer timed for TTFT
LONG_MAX_TURNS = 64


@dataclass(frozen=True)
class LongPlan:
    """A long conversation: ``full_turns`` answered in full, then ``probe_turns`` one-token turns.

    image_turns[j] is the 0-based turn that brings image j: the first is turn 0's, sent with the
    open; the others travel with a later full turn's request.
    """

    full_turns: int
    probe_turns: int
    image_turns: tuple[int, ...]
    limit_tokens: int  # the last turn's history (its whole prompt) stays within this
    planned_tokens: int  # the last turn's history if every full answer is answer_tokens long

    @property
    def turns(self) -> int:
        return self.full_turns + self.probe_turns

    def images_at(self, turn: int) -> int:
        return sum(1 for t in self.image_turns if t == turn)


def spread_images(images: int, full_turns: int) -> tuple[int, ...]:
    """The turns that bring each image, spread over the full turns; the first image opens turn 0."""
    return tuple(j * full_turns // images for j in range(images))


def plan_long_conversation(turn_tokens, image_tokens: int, max_context: int, answer_tokens: int,
                           closing_tokens: int = 1, target: int = LONG_HISTORY_TOKENS, images: int = LONG_IMAGES,
                           probes: int = LONG_PROBE_TURNS, max_turns: int = LONG_MAX_TURNS) -> LongPlan | None:
    """The longest conversation whose last turn's history fits ``min(target, max_context - answer_tokens)``.

    turn_tokens(k, n_images): the tokens of turn k's user part (question and template) with
    n_images images' placeholders, image tokens not counted; image_tokens: tokens per image.
    Full turns answer ``answer_tokens`` tokens, the probe turns one, each answer followed by
    ``closing_tokens``. The most images that fit (up to ``images``) with at least one full turn
    come first, then as many full turns as fit. None: not even one image and one turn fit.
    """
    limit = min(target, max_context - answer_tokens)

    def last_history(full: int, image_turns: tuple[int, ...]) -> int:
        total = len(image_turns) * image_tokens
        for k in range(full + probes):
            n = sum(1 for t in image_turns if t == k)
            total += turn_tokens(k, n)
            if k < full + probes - 1:  # every turn before the last, with its answer
                total += (answer_tokens if k < full else 1) + closing_tokens
        return total

    for n_images in range(images, 0, -1):
        best = None
        for full in range(1, max_turns - probes + 1):
            layout = spread_images(n_images, full)
            tokens = last_history(full, layout)
            if tokens > limit:
                break
            best = LongPlan(full, probes, layout, limit, tokens)
        if best is not None:
            return best
    return None


def long_conversation_summary(ours: Sequence[Sequence[float]], stateless: Sequence[Sequence[float]],
                              reduce=median) -> dict:
    """TTFT of the long conversation's probe turns: ours[i] and stateless[i] hold turn i's repeats.

    Each side is the median (or ``reduce``) over its probe turns' per-turn figures; the ratio is
    stateless over ours of those two.
    """
    if not ours or len(ours) != len(stateless):
        raise ValueError("need the same probe turns on both sides")
    per_turn_ours = [reduce(turn) for turn in ours]
    per_turn_stateless = [reduce(turn) for turn in stateless]
    ours_s, stateless_s = median(per_turn_ours), median(per_turn_stateless)
    return {
        "ttft_ours_s": ours_s,
        "ttft_stateless_s": stateless_s,
        "stateless_vs_ours": ratio(stateless_s, ours_s),
        "ttft_ours_per_turn_s": per_turn_ours,
        "ttft_stateless_per_turn_s": per_turn_stateless,
    }
