"""The worker's session memory budget: bytes per tier, and which sessions give memory back.

Bookkeeping only, no tensors and no torch (the engine applies the plan to tensors).
A session's memory sits in tiers, from fastest to cheapest:

    hot    KV cache on the device (+ its features on the device)
    warm   image features on the device, no KV (the next turn rebuilds the KV with one prefill)
    cold   image features in host memory (brought back to the device at the next turn)
    gone   evicted: its next request gets SESSION_NOT_FOUND

The budget bounds the DEVICE bytes sessions hold (KV + device features). Host bytes
(cold features) are bounded by a separate, usually much larger, host allowance; where
the device *is* the host (CPU serving) that allowance is 0, so there is no cold tier.

When an operation needs device bytes that are not free, :func:`plan_room` chooses the
steps, least recently used sessions first, the cheapest kind of step over the whole
LRU order before the next kind:

    1. drop KV caches                  (costs the victim one prefill at its next turn)
    2. move features to host           (costs the victim one host->device copy)
    3. evict sessions                  (costs the victim its session)

"No room" is returned as a value (:class:`NoRoom`), decided before any step is taken,
so a refused request leaves every other session untouched.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Sequence

# Auto budget: the share of free memory sessions may hold (see ServingConfig.memory_budget_bytes).
CUDA_FREE_FRACTION = 0.9
CPU_AVAILABLE_FRACTION = 0.5
# Auto host allowance for cold features when serving on CUDA: this share of the host's
# MemAvailable, split between the GPUs (one worker per GPU shares the host).
HOST_AVAILABLE_FRACTION = 0.5


@dataclass(frozen=True)
class Holding:
    """What one session holds, per tier, in bytes."""

    session_id: str
    device_kv: int = 0
    device_features: int = 0
    host_features: int = 0

    @property
    def device(self) -> int:
        return self.device_kv + self.device_features


class StepKind(str, enum.Enum):
    DROP_KV = "drop_kv"
    OFFLOAD_FEATURES = "offload_features"
    EVICT = "evict"


@dataclass(frozen=True)
class Step:
    kind: StepKind
    session_id: str
    device_bytes_freed: int
    host_bytes_change: int = 0  # + when features move to host, - when an eviction frees host bytes


@dataclass(frozen=True)
class NoRoom:
    """Even evicting every other session would not free ``needed`` device bytes."""

    needed: int
    free: int
    reclaimable: int  # device bytes all other sessions hold
    budget: int


def plan_room(
    lru: Sequence[Holding],
    needed: int,
    *,
    budget: int,
    device_used: int,
    host_budget: int = 0,
    host_used: int = 0,
) -> list[Step] | NoRoom:
    """Steps that make ``needed`` device bytes free under ``budget``, or :class:`NoRoom`.

    ``lru`` lists the sessions that may give memory back, least recently used first
    (never the session asking). ``device_used`` / ``host_used`` are the bytes held now,
    reservations included. Offloading needs room under ``host_budget``; a session whose
    features do not fit on the host is evicted instead, unless evicting an older cold
    session makes host room for it (one eviction either way, the older session goes).
    """
    if needed < 0:
        raise ValueError(f"needed must be >= 0, got {needed}")
    free = budget - device_used
    if needed <= free:
        return []
    reclaimable = sum(h.device for h in lru)
    if free + reclaimable < needed:
        return NoRoom(needed=needed, free=free, reclaimable=reclaimable, budget=budget)

    steps: list[Step] = []
    offloaded_here: dict[str, Step] = {}
    kv = {h.session_id: h.device_kv for h in lru}
    dev_features = {h.session_id: h.device_features for h in lru}
    host_features = {h.session_id: h.host_features for h in lru}
    host_free = host_budget - host_used
    order = [h.session_id for h in lru]

    # 1. Drop KV caches, LRU first.
    for sid in order:
        if free >= needed:
            return steps
        if kv[sid] > 0:
            steps.append(Step(StepKind.DROP_KV, sid, kv[sid]))
            free += kv[sid]
            kv[sid] = 0

    def offload_pass() -> None:
        nonlocal free, host_free
        for sid in order:
            if free >= needed:
                return
            size = dev_features[sid]
            if size > 0 and size <= host_free:
                step = Step(StepKind.OFFLOAD_FEATURES, sid, size, host_bytes_change=size)
                steps.append(step)
                offloaded_here[sid] = step
                free += size
                host_free -= size
                host_features[sid] += size
                dev_features[sid] = 0

    # 2. Move features to host, LRU first, while the host has room.
    offload_pass()

    # 3. Evict, LRU first, one session at a time: a session still on the device, or an older
    #    cold session whose host bytes let a stuck warm session go to host instead (one
    #    eviction either way; the more recently used session survives).
    while free < needed:
        stuck = [dev_features[sid] for sid in order if dev_features[sid] > 0]
        # Feasibility was checked above, so a warm session is left whenever free < needed.
        assert stuck, "plan_room: feasibility check and eviction disagree"
        smallest_stuck = min(stuck)
        victim = next(
            sid
            for sid in order
            if dev_features[sid] > 0
            or (host_features[sid] > 0 and host_free + host_features[sid] >= smallest_stuck)
        )
        device_freed = dev_features[victim]
        moved = offloaded_here.pop(victim, None)
        if moved is not None:
            # Moved to host earlier in this plan: evict it from the device instead, no copy.
            steps.remove(moved)
            free -= moved.device_bytes_freed
            device_freed += moved.device_bytes_freed
            host_free += moved.host_bytes_change
            host_features[victim] -= moved.host_bytes_change
        steps.append(Step(StepKind.EVICT, victim, device_freed, -host_features[victim]))
        free += device_freed
        host_free += host_features[victim]
        dev_features[victim] = host_features[victim] = 0
        order.remove(victim)
        offload_pass()
    return steps


# --- the budget's size ------------------------------------------------------------


def auto_budget(free_bytes: int, fraction: float, activation_reserve: int) -> int:
    """floor(fraction * free_bytes) - activation_reserve (may be <= 0: the caller refuses it)."""
    return int(free_bytes * fraction) - activation_reserve


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Keys and values of one token in every layer."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def prefill_activation_bytes(tokens: int, hidden_size: int, intermediate_size: int, dtype_bytes: int) -> int:
    """Rough peak activations of one prefill of ``tokens`` tokens through one decoder layer.

    Residual, normed input, attention output and q (4 x H) plus the MLP's gate and up
    projections (2 x I), per token. Attention scores are not materialised by SDPA's fused
    kernels, and only the last position's logits are computed.
    """
    return tokens * (4 * hidden_size + 2 * intermediate_size) * dtype_bytes


def read_mem_available(meminfo_path: str = "/proc/meminfo") -> int:
    """The kernel's MemAvailable estimate in bytes; sysconf's free pages where there is no /proc."""
    try:
        with open(meminfo_path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    value, unit = line.split()[1:3]
                    if unit.lower() != "kb":
                        raise ValueError(f"unexpected unit {unit!r} in {meminfo_path}")
                    return int(value) * 1024
    except FileNotFoundError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
