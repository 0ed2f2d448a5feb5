"""The sessions' memory on one worker: the device budget, the host allowance and the tiers.

``KVManager`` owns the device budget (``memory_budget_bytes``), the host allowance
(``host_budget_bytes``), the reservation of the operation in progress, and the tier moves
on the sessions' tensors: KV to host, KV dropped, host KV dropped, features to host, eviction
(through the engine's callback). memory_budget.py plans the moves without torch; this module
applies them and records each session's bytes per tier on its SessionRecord. "No room" is a
value: ``make_room`` returns False (or, asked to refuse, raises OutOfMemoryBudget), decided
before any step is taken, so a refused request touches no session.

A host KV comes back at its session's next turn (``bring_back``) by copy when that is estimated
faster than prefilling its tokens again from the kept features and ids, else it is dropped and
the turn's prefill rebuilds it (memory_budget.RestoreCosts). Both rates are measured on the real
operations; on CUDA with events read once they are done, so measuring adds no host sync.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch

from llava_sessions.config import ServingConfig
from llava_sessions.errors import ConfigError, OutOfMemoryBudget
from llava_sessions.handler.engine import generation, memory_budget
from llava_sessions.handler.engine.kv_cache import AppendLayer
from llava_sessions.handler.engine.memory_budget import Holding, NoRoom, RestoreCosts, StepKind
from llava_sessions.handler.engine.model_loader import LoadedModel
from llava_sessions.handler.engine.session_store import SessionRecord, SessionStore

log = logging.getLogger(__name__)


@dataclass
class HostKV:
    """A session's KV cache in host memory (pinned on CUDA): per layer, keys and values
    [1, kv_heads, tokens, head_dim], exactly its tokens (no spare slots)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def tokens(self) -> int:
        return self.layers[0][0].shape[-2] if self.layers else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.layers for t in pair)


class KVManager:
    """Device budget, host allowance, reservation and tier moves of an engine's sessions.

    ``states`` is the engine's session id -> tensors map (``cache``, ``host_kv``, ``features``,
    ``features_on_host``, ``feature_bytes()``), read and changed in place; ``evict(session_id)``
    frees a session, ``expire()`` frees the expired ones. The engine's lock covers every call.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        config: ServingConfig,
        store: SessionStore,
        states: Mapping[str, object],
        counters,
        *,
        host_budget_bytes: int | None,
        evict: Callable[[str], None],
        expire: Callable[[], object],
    ):
        """``host_budget_bytes`` bounds host KV and cold features; None means auto: on CUDA half
        the host's MemAvailable split between the visible GPUs, on CPU 0 (the device is the host,
        so there are no host tiers and eviction follows dropping KV)."""
        self.loaded = loaded
        self.config = config
        self._store = store
        self._states = states
        self._counters = counters
        self._evict = evict
        self._expire = expire
        self.kv_bytes_per_token, self.feature_bytes_per_image_token, activation_reserve = sizes(loaded)
        self.memory_budget_bytes = self._resolve_budget(activation_reserve)
        self.host_budget_bytes = self._resolve_host_budget(host_budget_bytes)
        self.reserved = 0  # device bytes promised to the operation in progress
        self.costs = RestoreCosts.prior(self.kv_bytes_per_token, loaded.device.type)
        self._timings = _Timings(loaded.device)
        log.info(
            "session memory budget: %d device bytes (%d KV bytes per token, %d feature bytes per image token), "
            "%d host bytes for host KV and cold features",
            self.memory_budget_bytes, self.kv_bytes_per_token, self.feature_bytes_per_image_token,
            self.host_budget_bytes,
        )

    # --- room and reservations -------------------------------------------------------

    def make_room(self, needed: int, asking: str | None, refuse: bool = True) -> bool:
        """Free ``needed`` device bytes under the budget and reserve them: True.

        Other sessions give memory back, least recently used first (memory_budget.plan_room);
        sessions checked out by running turns (busy) never do. No room: OutOfMemoryBudget
        (counted), or False with ``refuse=False``; either way decided before any step is taken.
        """
        if self.reserve_if_free(needed):
            return True
        self._expire()  # memory nobody will ask for again goes first
        plan = memory_budget.plan_room(
            self._victims(asking),
            needed,
            budget=self.memory_budget_bytes,
            device_used=self._store.device_bytes() + self.reserved,
            host_budget=self.host_budget_bytes,
            host_used=self._store.host_bytes(),
        )
        if isinstance(plan, NoRoom):
            if not refuse:
                return False
            self._counters.memory_refusals += 1
            raise OutOfMemoryBudget(
                f"this request needs {needed} bytes of session memory; this worker's budget is "
                f"{self.memory_budget_bytes} bytes and other sessions could give back only "
                f"{plan.free + plan.reclaimable}. Ask for fewer new tokens or images, or retry later"
            )
        self.apply(plan)
        self.reserved += needed
        return True

    def free_bytes(self) -> int:
        """Device bytes of the budget neither held by sessions nor reserved for the running turns."""
        return self.memory_budget_bytes - self._store.device_bytes() - self.reserved

    def reserve_if_free(self, needed: int) -> bool:
        """Reserve ``needed`` device bytes if the budget has them free now; no session gives any back."""
        if needed <= self.free_bytes():
            self.reserved += needed
            return True
        return False

    def reserve_spare(self, needed: int) -> bool:
        """Reserve ``needed`` device bytes only if a quarter of the budget stays free after them:
        for what merely speeds a session up (spare KV slots), never at another session's cost."""
        if self.free_bytes() - needed >= self.memory_budget_bytes // 4:
            self.reserved += needed
            return True
        return False

    def set_aside(self, nbytes: int, what: str) -> None:
        """Take ``nbytes`` out of the sessions' budget for good (device memory the engine keeps)."""
        self.memory_budget_bytes -= nbytes
        log.info("session memory budget: %d bytes after setting %d aside for %s", self.memory_budget_bytes, nbytes, what)

    def unreserve(self, nbytes: int) -> None:
        """Part of the reservation is over (a decode arena freed while its turns go on elsewhere)."""
        self.reserved = max(0, self.reserved - nbytes)

    def release(self) -> None:
        """The operation in progress is over: its reservation goes (its tensors are accounted)."""
        self.reserved = 0

    def give_back(self, needed: int, asking: str) -> bool:
        """After a real allocator failure: other sessions give back ``needed`` device bytes as if
        none were free, in the budget's order; False (and nothing touched) when they hold too little."""
        budget = self.memory_budget_bytes
        plan = memory_budget.plan_room(
            self._victims(asking),
            min(needed, budget),
            budget=budget,
            device_used=budget,
            host_budget=self.host_budget_bytes,
            host_used=self._store.host_bytes(),
        )
        if isinstance(plan, NoRoom) or not plan:
            return False
        self.apply(plan)
        if self.loaded.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back for the retry's allocations
        return True

    def refusal(self, error_name: str) -> OutOfMemoryBudget:
        """The allocator failed even after other sessions gave memory back: the turn is refused."""
        self._counters.memory_refusals += 1
        log.warning("out of memory on %s: turn refused (%s)", self.loaded.device, error_name)
        return OutOfMemoryBudget(
            "the worker ran out of device memory for this turn, even after other sessions gave memory "
            "back; the session is as before the turn. Ask for fewer new tokens or images, or retry later"
        )

    def _victims(self, asking: str | None) -> list[Holding]:
        return [
            Holding(r.session_id, r.device_kv_bytes, r.device_feature_bytes, r.host_feature_bytes, r.host_kv_bytes)
            for r in self._store.lru_records()
            if r.session_id != asking and not r.busy
        ]

    # --- tier moves -------------------------------------------------------------------

    def apply(self, plan: list) -> None:
        """Carry out a plan of memory_budget steps on the sessions' tensors."""
        counters = self._counters
        for step in plan:
            record, state = self._store.lookup(step.session_id), self._states[step.session_id]
            if step.kind is StepKind.OFFLOAD_KV:
                if _offload_kv(state):
                    counters.kv_offloaded += 1
                else:  # no host copy (a layer kind it does not cover, or the copy failed): dropped
                    state.cache = None
                    counters.kv_dropped += 1
            elif step.kind is StepKind.DROP_KV:
                state.cache = None
                counters.kv_dropped += 1
            elif step.kind is StepKind.DROP_HOST_KV:
                state.host_kv = None
                counters.host_kv_dropped += 1
            elif step.kind is StepKind.OFFLOAD_FEATURES:
                state.features = [_to_host(f) for f in state.features]
                state.features_on_host = True
                counters.features_offloaded += 1
            else:
                self._evict(step.session_id)
                counters.sessions_evicted += 1
                log.info("memory budget: evicted a session")
                continue
            self.account(record, state)

    def bring_back(self, record: SessionRecord, state, context: int) -> None:
        """At a turn's start, once ``make_room`` reserved its worst case (as if it had no KV):
        cold features come back to the device, and a host KV by copy, with room for the turn's
        ``context`` tokens, when the copy is estimated faster than prefilling its tokens again;
        else the host KV is dropped and the turn's prefill rebuilds it."""
        moved = 0
        if state.features_on_host:
            state.features = [f.to(self.loaded.device, non_blocking=True) for f in state.features]
            state.features_on_host = False
            self._counters.features_restored += 1
            moved += state.feature_bytes()
        host = state.host_kv
        if host is not None:
            self._timings.collect()
            state.host_kv = None
            restored = None
            if self.costs.copy_faster(host.nbytes(), host.tokens):
                try:
                    with self._timings.measure(self.costs.observe_copy) as sample:
                        restored = self._restore_kv(host, context)
                        sample.amount = host.nbytes()
                except Exception as error:  # the prefill rebuilds it, with its own retry on OOM
                    log.warning("copying a host KV back failed (%s); the turn prefills it", type(error).__name__)
            if restored is not None:
                state.cache = restored
                self._counters.kv_restored += 1
                moved += generation.cache_bytes(restored)
            else:
                self._counters.host_kv_recomputed += 1
        self.account(record, state)
        # What came back is accounted on the session now: no longer the reservation's.
        self.reserved = max(0, self.reserved - moved)

    @contextlib.contextmanager
    def prefill_timing(self) -> Iterator[_Sample]:
        """Time a prefill for the cost model: set the yielded sample's ``amount`` to its new tokens."""
        with self._timings.measure(self.costs.observe_prefill) as sample:
            yield sample

    def _restore_kv(self, host: HostKV, context: int):
        """A device cache holding the host KV, with spare slots up to ``context`` tokens."""
        cache = generation.new_cache(self.loaded)
        length = host.tokens
        capacity = max(length, context)
        for layer, pair in zip(cache.layers, host.layers):
            buffers = []
            for tensor in pair:
                batch, heads, _, dim = tensor.shape
                buffer = torch.empty(batch, heads, capacity, dim, dtype=tensor.dtype, device=self.loaded.device)
                buffer[:, :, :length].copy_(tensor, non_blocking=True)
                buffers.append(buffer)
            layer.adopt(*buffers, length)
        return cache

    # --- accounting -------------------------------------------------------------------

    def account(self, record: SessionRecord, state) -> None:
        """Record the session's bytes per tier, measured on its tensors."""
        record.device_kv_bytes = generation.cache_bytes(state.cache)
        record.host_kv_bytes = state.host_kv.nbytes() if state.host_kv is not None else 0
        features = state.feature_bytes()
        record.host_feature_bytes = features if state.features_on_host else 0
        record.device_feature_bytes = 0 if state.features_on_host else features

    def tiers(self) -> dict[str, int]:
        """Accounted bytes by tier: KV and features on the device (the budget's), on host (the allowance's)."""
        records = self._store.lru_records()
        return {
            "device_kv": sum(r.device_kv_bytes for r in records),
            "device_features": sum(r.device_feature_bytes for r in records),
            "host_kv": sum(r.host_kv_bytes for r in records),
            "host_features": sum(r.host_feature_bytes for r in records),
        }

    # --- sizes --------------------------------------------------------------------------

    def feature_bytes(self, image_tokens: Sequence[int]) -> int:
        """Device bytes of images' features, from each image's token count (its feature rows)."""
        return sum(image_tokens) * self.feature_bytes_per_image_token

    @property
    def feature_bytes_per_image(self) -> int | None:
        """One image's feature bytes where every image takes the same count (LLaVA-1.5, SigLIP
        LLaVAs); None where the count depends on the image."""
        tokens = self.loaded.fixed_image_tokens
        return None if tokens is None else tokens * self.feature_bytes_per_image_token

    def _resolve_budget(self, activation_reserve: int) -> int:
        configured = self.config.memory_budget_bytes
        if configured > 0:
            return configured
        device = self.loaded.device
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            fraction, where = memory_budget.CUDA_FREE_FRACTION, f"free memory on {device}"
        else:
            free = memory_budget.read_mem_available()
            fraction, where = memory_budget.CPU_AVAILABLE_FRACTION, "the host's MemAvailable"
        budget = memory_budget.auto_budget(free, fraction, activation_reserve)
        if budget <= 0:
            raise ConfigError(
                f"no memory left for sessions: {fraction:.0%} of {where} ({free} bytes) minus "
                f"{activation_reserve} bytes reserved for one prefill's activations is {budget}. "
                "Use a smaller model or dtype, or set memory_budget_bytes"
            )
        return budget

    def _resolve_host_budget(self, requested: int | None) -> int:
        if requested is not None:
            if requested < 0:
                raise ConfigError(f"host_budget_bytes must be >= 0, got {requested}")
            return requested
        if self.loaded.device.type != "cuda":
            return 0  # the device is the host: moving tensors "to host" would free nothing
        share = memory_budget.read_mem_available() * memory_budget.HOST_AVAILABLE_FRACTION
        return int(share / max(1, torch.cuda.device_count()))


def sizes(loaded: LoadedModel) -> tuple[int, int, int]:
    """(KV bytes per token, feature bytes per image token, activation reserve of one full prefill).

    An image's features are one projected row per image token, as wide as the language model."""
    text = loaded.model.config.get_text_config()
    dtype_bytes = loaded.dtype.itemsize
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    per_token = memory_budget.kv_bytes_per_token(text.num_hidden_layers, kv_heads, head_dim, dtype_bytes)
    per_image_token = text.hidden_size * dtype_bytes
    reserve = memory_budget.prefill_activation_bytes(
        loaded.max_context, text.hidden_size, text.intermediate_size, dtype_bytes
    )
    return per_token, per_image_token, reserve


def _offload_kv(state) -> bool:
    """Move the session's KV cache to host memory, exactly its tokens; False (nothing moved) for a
    cache with layers other than AppendLayer, which a restore could not rebuild, or when the copy
    fails (the allocator may be short on either side: this runs when memory is scarce)."""
    cache = state.cache
    if cache is None or not all(isinstance(layer, AppendLayer) and layer.keys is not None for layer in cache.layers):
        return False
    try:
        host = HostKV([(_to_host(layer.keys), _to_host(layer.values)) for layer in cache.layers])
    except Exception as error:
        log.warning("moving a KV cache to host failed (%s); it is dropped instead", type(error).__name__)
        return False
    state.host_kv, state.cache = host, None
    return True


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, in pinned memory so it comes back with an async copy; on a
    CPU the tensor itself when it owns exactly its bytes, else a compact copy (a view of a larger
    KV buffer would keep the whole buffer)."""
    if tensor.device.type != "cuda":
        nbytes = tensor.numel() * tensor.element_size()
        owns_exactly = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == nbytes
        return tensor if owns_exactly else tensor.clone(memory_format=torch.contiguous_format)
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
    host.copy_(tensor)
    return host


@dataclass
class _Sample:
    amount: int = 0  # bytes or tokens, set by the timed block


class _Timings:
    """(amount, seconds) of device operations for the cost model. On CUDA each is timed with a pair
    of events and observed once its end event has passed (``collect``): no host sync."""

    MAX_PENDING = 16

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._pending: list[tuple[object, object, _Sample, Callable[[int, float], None]]] = []

    @contextlib.contextmanager
    def measure(self, observe: Callable[[int, float], None]) -> Iterator[_Sample]:
        """Time the block (nothing is observed if it raises); ``observe(amount, seconds)`` follows."""
        sample = _Sample()
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            yield sample
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending = self._pending[-(self.MAX_PENDING - 1):] + [(start, end, sample, observe)]
        else:
            started = time.perf_counter()
            yield sample
            observe(sample.amount, time.perf_counter() - started)

    def collect(self) -> None:
        """Observe the timed operations the device has finished."""
        waiting = []
        for start, end, sample, observe in self._pending:
            if end.query():
                observe(sample.amount, start.elapsed_time(end) / 1000.0)
            else:
                waiting.append((start, end, sample, observe))
        self._pending = waiting
