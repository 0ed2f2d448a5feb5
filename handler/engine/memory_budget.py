"""The worker's session memory budget: bytes per tier, and which sessions give memory back.

Bookkeeping only, no tensors and no torch (kv_manager.py applies the plan to tensors).
A session's memory sits in tiers, from fastest to cheapest:

    hot     KV cache on the device (+ its features on the device)
    host    KV cache in host memory (copied back at the next turn, or rebuilt by a prefill
            when that is estimated faster: :class:`RestoreCosts`)
    warm    image features on the device, no KV (the next turn rebuilds the KV with one prefill)
    cold    image features in host memory (brought back to the device at the next turn)
    gone    evicted: its next request gets SESSION_NOT_FOUND

The budget bounds the DEVICE bytes sessions hold (KV + device features). Host bytes (host
KV and cold features) are bounded by a separate, usually much larger, host allowance; where
the device *is* the host (CPU serving) that allowance is 0 by default: no host tiers.

When an operation needs device bytes that are not free, :func:`plan_room` chooses the
steps, least recently used sessions first, the cheapest kind of step over the whole
LRU order before the next kind:

    1. KV caches off the device: to host while the host allowance has room, else dropped
       (host KV of older sessions is dropped to make host room for a more recent one)
    2. move features to host           (host KV is dropped first where the host needs room)
    3. evict sessions                  (frees their host bytes too)

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
# Auto host allowance for host KV and cold features when serving on CUDA: this share of the
# host's MemAvailable, split between the GPUs (one worker per GPU shares the host).
HOST_AVAILABLE_FRACTION = 0.5


@dataclass(frozen=True)
class Holding:
    """What one session holds, per tier, in bytes."""

    session_id: str
    device_kv: int = 0
    device_features: int = 0
    host_features: int = 0
    host_kv: int = 0

    @property
    def device(self) -> int:
        return self.device_kv + self.device_features

    @property
    def host(self) -> int:
        return self.host_kv + self.host_features


class StepKind(str, enum.Enum):
    OFFLOAD_KV = "offload_kv"  # device KV to host
    DROP_KV = "drop_kv"  # device KV dropped
    DROP_HOST_KV = "drop_host_kv"  # host KV dropped, for host room
    OFFLOAD_FEATURES = "offload_features"
    EVICT = "evict"


@dataclass(frozen=True)
class Step:
    kind: StepKind
    session_id: str
    device_bytes_freed: int
    # + when KV or features move to host (at most their device bytes), - when host KV is
    # dropped or an eviction frees host bytes
    host_bytes_change: int = 0


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
    reservations included. Moves to host need room under ``host_budget``: a KV that does
    not fit is dropped unless dropping older sessions' host KV makes room for it; features
    that do not fit, after every host KV was dropped for them, cost a session its place
    (the session itself, or an older cold one whose host bytes let it go to host instead).
    A move planned and then undone within the plan (its session evicted, its host KV
    dropped) becomes that step instead: no copy is made for nothing.
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
    moved_here: dict[str, dict[StepKind, Step]] = {}  # moves to host planned here, by session
    kv = {h.session_id: h.device_kv for h in lru}
    dev_features = {h.session_id: h.device_features for h in lru}
    host_features = {h.session_id: h.host_features for h in lru}
    host_kv = {h.session_id: h.host_kv for h in lru}
    host_free = host_budget - host_used
    order = [h.session_id for h in lru]

    def drop_host_kv(sid: str) -> None:
        nonlocal host_free
        held = host_kv[sid]
        moved = moved_here.get(sid, {}).pop(StepKind.OFFLOAD_KV, None)
        if moved is not None:  # moved to host in this plan: dropped from the device instead
            steps[steps.index(moved)] = Step(StepKind.DROP_KV, sid, moved.device_bytes_freed)
            held -= moved.host_bytes_change
        if held > 0:
            steps.append(Step(StepKind.DROP_HOST_KV, sid, 0, -held))
        host_free += host_kv[sid]
        host_kv[sid] = 0

    def host_room(size: int, droppable: Sequence[str]) -> bool:
        """Make ``size`` host bytes free, dropping the host KV of ``droppable`` (LRU first) if
        need be; False, and nothing dropped, when even all of it would not do."""
        if size <= host_free:
            return True
        if host_free + sum(host_kv[sid] for sid in droppable) < size:
            return False
        for sid in droppable:
            if host_free >= size:
                break
            if host_kv[sid] > 0:
                drop_host_kv(sid)
        return True

    def move_to_host(kind: StepKind, sid: str, size: int) -> None:
        nonlocal free, host_free
        step = Step(kind, sid, size, host_bytes_change=size)
        steps.append(step)
        moved_here.setdefault(sid, {})[kind] = step
        free += size
        host_free -= size

    # 1. KV caches off the device, LRU first: to host where it has room, else dropped.
    for i, sid in enumerate(order):
        if free >= needed:
            return steps
        size = kv[sid]
        if size == 0:
            continue
        if host_room(size, order[:i]):
            move_to_host(StepKind.OFFLOAD_KV, sid, size)
            host_kv[sid] += size
        else:
            steps.append(Step(StepKind.DROP_KV, sid, size))
            free += size
        kv[sid] = 0

    def offload_pass() -> None:
        for sid in order:
            if free >= needed:
                return
            size = dev_features[sid]
            if size > 0 and host_room(size, order):
                move_to_host(StepKind.OFFLOAD_FEATURES, sid, size)
                host_features[sid] += size
                dev_features[sid] = 0

    # 2. Move features to host, LRU first, while the host has room (host KV goes first).
    offload_pass()

    # 3. Evict, LRU first, one session at a time: a session still on the device, or an older
    #    cold session whose host bytes let a stuck warm session go to host instead (one
    #    eviction either way; the more recently used session survives).
    while free < needed:
        stuck = [dev_features[sid] for sid in order if dev_features[sid] > 0]
        # Feasibility was checked above, so a warm session is left whenever free < needed.
        assert stuck, "plan_room: feasibility check and eviction disagree"
        smallest_stuck = min(stuck)
        host_reclaimable = host_free + sum(host_kv.values())
        victim = next(
            sid
            for sid in order
            if dev_features[sid] > 0
            or (host_features[sid] > 0 and host_reclaimable + host_features[sid] >= smallest_stuck)
        )
        device_freed = dev_features[victim]
        for moved in moved_here.pop(victim, {}).values():
            # Moved to host earlier in this plan: evicted from the device instead, no copy.
            steps.remove(moved)
            free -= moved.device_bytes_freed
            device_freed += moved.device_bytes_freed
            host_free += moved.host_bytes_change
            held = host_kv if moved.kind is StepKind.OFFLOAD_KV else host_features
            held[victim] -= moved.host_bytes_change
        host_freed = host_features[victim] + host_kv[victim]
        steps.append(Step(StepKind.EVICT, victim, device_freed, -host_freed))
        free += device_freed
        host_free += host_freed
        dev_features[victim] = host_features[victim] = host_kv[victim] = 0
        order.remove(victim)
        offload_pass()
    return steps


# --- how a host KV comes back --------------------------------------------------

# Priors of RestoreCosts, before any measurement: a host->device copy at this rate (conservative:
# pinned PCIe copies and host memcpy both beat it), and a prefill this many times slower per token
# than copying the token's KV (on CUDA recompute is far slower than the copy; on a CPU closer).
COPY_BYTES_PER_S_PRIOR = 4e9
RECOMPUTE_OVER_COPY_PRIOR = {"cuda": 8.0, "cpu": 2.0}


@dataclass
class RestoreCosts:
    """Estimates for bringing a host KV back: copy it (seconds per byte) or re-prefill its tokens
    (seconds per token). Each rate is an exponential moving average of real operations (the
    first measurement replaces the prior); ``smoothing`` is a new measurement's weight, 0 keeps
    the rates as set."""

    copy_s_per_byte: float
    prefill_s_per_token: float
    smoothing: float = 0.2
    copies_measured: int = 0
    prefills_measured: int = 0

    @classmethod
    def prior(cls, kv_bytes_per_token: int, device_type: str) -> RestoreCosts:
        copy = 1.0 / COPY_BYTES_PER_S_PRIOR
        factor = RECOMPUTE_OVER_COPY_PRIOR.get(device_type, RECOMPUTE_OVER_COPY_PRIOR["cpu"])
        return cls(copy_s_per_byte=copy, prefill_s_per_token=factor * copy * max(1, kv_bytes_per_token))

    def observe_copy(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds >= 0:
            self.copy_s_per_byte = self._average(self.copy_s_per_byte, seconds / nbytes, self.copies_measured)
            self.copies_measured += 1

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds >= 0:
            self.prefill_s_per_token = self._average(
                self.prefill_s_per_token, seconds / tokens, self.prefills_measured
            )
            self.prefills_measured += 1

    def copy_faster(self, nbytes: int, tokens: int) -> bool:
        """Whether copying ``nbytes`` of KV back is estimated faster than prefilling its ``tokens``."""
        return self.copy_s_per_byte * nbytes < self.prefill_s_per_token * tokens

    def _average(self, current: float, sample: float, measured: int) -> float:
        if self.smoothing <= 0:
            return current
        weight = 1.0 if measured == 0 else self.smoothing
        return (1 - weight) * current + weight * sample


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
