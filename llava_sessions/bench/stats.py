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
