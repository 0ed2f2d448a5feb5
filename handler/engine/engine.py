"""The session engine: open a session with images, run turns on its cached state, close it.

A session keeps, on the worker's device: the projected image features (the
vision tower runs once per image), the token-exact history, and the KV cache of
everything already seen, so a follow-up turn prefills only its new tokens.
Knows nothing of TorchServe or HTTP.

Memory: the sessions' device bytes stay within ``memory_budget_bytes``. When a new
session's features or a turn's KV growth (reserved for the worst case before it runs)
would not fit, least recently used other sessions give memory back: KV caches first,
then features to host memory, then eviction (see memory_budget.py for the plan; this
module applies it to the tensors). No step changes a surviving session's answers: a
dropped KV is rebuilt with one prefill from the kept features and token ids.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from llava_sessions.config import ServingConfig
from llava_sessions.errors import (
    ConfigError,
    InvalidRequest,
    OutOfMemoryBudget,
    PromptTooLong,
    SessionBusy,
    SessionNotFound,
    TooManyImages,
    TooManySessions,
)
from llava_sessions.handler.engine import generation, memory_budget
from llava_sessions.handler.engine.generation import SamplingParams
from llava_sessions.handler.engine.model_loader import LoadedModel
from llava_sessions.handler.engine.prompt import Conversation, TurnFormatter
from llava_sessions.handler.engine.memory_budget import Holding, NoRoom, StepKind
from llava_sessions.handler.engine.session_store import SessionRecord, SessionStore, new_session_id

log = logging.getLogger(__name__)

TokenCallback = Callable[[int], None]


@dataclass(frozen=True)
class OpenedSession:
    session_id: str
    expires_at: float  # epoch seconds


@dataclass(frozen=True)
class TurnResult:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int  # the whole context this turn's answer was conditioned on
    cached_tokens: int  # of those, how many came from the session's KV cache
    completion_tokens: int
    finish_reason: str  # "stop" (eos) or "length"
    ttft_s: float  # from the turn's start (images, room, prefill) to its first token
    decode_s: float  # from the first token to the last

    @property
    def time_per_output_token_s(self) -> float | None:
        return self.decode_s / (self.completion_tokens - 1) if self.completion_tokens > 1 else None


@dataclass
class EngineCounters:
    """Exact counts, for tests and metrics."""

    vision_tower_runs: int = 0
    images_encoded: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    sessions_opened: int = 0
    sessions_closed: int = 0
    sessions_expired: int = 0
    # Memory budget: one per session and step taken, and requests refused for want of room.
    kv_dropped: int = 0
    features_offloaded: int = 0
    features_restored: int = 0
    sessions_evicted: int = 0
    memory_refusals: int = 0


@dataclass
class _SessionState:
    """The tensors and history of one session."""

    features: list[torch.Tensor] = field(default_factory=list)  # each [tokens_per_image, H]
    pending_images: int = 0  # encoded, placeholders not yet in the history
    token_ids: list[int] = field(default_factory=list)
    conversation: Conversation = field(default_factory=Conversation)
    cache: DynamicCache | None = None  # KV of token_ids[:cache.get_seq_length()]; always on the device
    features_on_host: bool = False  # cold: features in host memory until the next turn

    def feature_bytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features)

    def bytes_held(self) -> int:
        return self.feature_bytes() + generation.cache_bytes(self.cache)


class SessionEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: ServingConfig,
        clock: Callable[[], float] = time.time,
        host_budget_bytes: int | None = None,
    ):
        """``host_budget_bytes`` bounds cold (host) features; None means auto: on CUDA
        half the host's MemAvailable split between the visible GPUs, on CPU 0 (the device
        is the host, so there is no cold tier and eviction follows dropping KV)."""
        self.loaded = loaded
        self.config = config
        self.clock = clock
        self.counters = EngineCounters()
        self.formatter = TurnFormatter(loaded.tokenizer, loaded.image_token_id, loaded.tokens_per_image)
        self._store = SessionStore(config.max_sessions_per_worker)
        self._states: dict[str, _SessionState] = {}
        self.kv_bytes_per_token, self.feature_bytes_per_image, activation_reserve = _sizes(loaded)
        self.memory_budget_bytes = self._resolve_budget(activation_reserve)
        self.host_budget_bytes = self._resolve_host_budget(host_budget_bytes)
        self._reserved = 0  # device bytes promised to the operation in progress
        log.info(
            "session memory budget: %d device bytes (%d KV bytes per token, %d feature bytes per image), "
            "%d host bytes for cold features",
            self.memory_budget_bytes, self.kv_bytes_per_token, self.feature_bytes_per_image,
            self.host_budget_bytes,
        )
        # One turn at a time per worker; the expiry sweeper waits for it.
        self._lock = threading.RLock()
        self._sweeper: threading.Thread | None = None
        self._stop_sweeper = threading.Event()

    # --- the four operations ---------------------------------------------

    def open_session(self, images: Sequence = (), session_id: str | None = None) -> OpenedSession:
        if len(images) > self.config.max_images_per_session:
            raise TooManyImages(
                f"{len(images)} images sent; a session holds at most {self.config.max_images_per_session}"
            )
        with self._lock:
            session_id = session_id or new_session_id()
            if self._store.lookup(session_id) is not None:
                raise InvalidRequest("this session is already open; send turns to it or close it first")
            now = self.clock()
            self._expire(now)
            record = self._store.reserve(session_id, now, self.config.session_ttl_s)
            if record is None:
                raise TooManySessions(
                    f"this worker holds its maximum of {self._store.capacity} sessions; "
                    "close finished sessions or retry later"
                )
            state = _SessionState()
            try:
                self._make_room(len(images) * self.feature_bytes_per_image, session_id)
                self._add_images(state, images)
            except BaseException:
                self._store.remove(session_id)
                raise
            finally:
                self._reserved = 0
            self._states[session_id] = state
            self._account(record, state)
            self.counters.sessions_opened += 1
            return OpenedSession(session_id, record.expires_at)

    def turn(
        self,
        session_id: str,
        prompt: str,
        params: SamplingParams,
        images: Sequence = (),
        on_token: TokenCallback | None = None,
    ) -> TurnResult:
        with self._lock:
            record, state = self._checkout(session_id)
            try:
                return self._run_turn(session_id, state, prompt, params, images, on_token)
            finally:
                self._reserved = 0
                record.busy = False
                self._account(record, state)
                self._store.touch(record, self.clock())

    def close_session(self, session_id: str) -> None:
        with self._lock:
            record = self._store.lookup(session_id)
            if record is None or record.expires_at <= self.clock():
                raise SessionNotFound()
            self._free(session_id)
            self.counters.sessions_closed += 1

    def sweep_expired(self) -> int:
        with self._lock:
            return self._expire(self.clock())

    # --- observation -------------------------------------------------------

    def session_count(self) -> int:
        return len(self._store)

    def bytes_held(self) -> int:
        with self._lock:
            return sum(state.bytes_held() for state in self._states.values())

    def has_session(self, session_id: str) -> bool:
        return session_id in self._store

    def bytes_by_tier(self) -> dict[str, int]:
        """Bytes sessions hold: KV and features on the device (bounded by the budget), features on host."""
        with self._lock:
            records = self._store.lru_records()
            return {
                "device_kv": sum(r.device_kv_bytes for r in records),
                "device_features": sum(r.device_feature_bytes for r in records),
                "host_features": sum(r.host_feature_bytes for r in records),
            }

    def device_bytes_held(self) -> int:
        with self._lock:
            return self._store.device_bytes()

    # --- background expiry -------------------------------------------------

    def start_expiry_sweeper(self, interval_s: float = 5.0) -> None:
        """Free expired sessions even when no request names them again."""
        if self._sweeper is not None:
            return
        self._stop_sweeper.clear()

        def run() -> None:
            while not self._stop_sweeper.wait(interval_s):
                freed = self.sweep_expired()
                if freed:
                    log.info("expired %d session(s)", freed)

        self._sweeper = threading.Thread(target=run, name="session-expiry", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        self._stop_sweeper.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=10)
            self._sweeper = None

    # --- internals ---------------------------------------------------------

    def _checkout(self, session_id: str):
        now = self.clock()
        record = self._store.lookup(session_id)
        if record is None or record.expires_at <= now:
            if record is not None:
                self._expire(now)
            raise SessionNotFound()
        if record.busy:
            raise SessionBusy("a turn of this session is still running; wait for it to finish")
        record.busy = True
        return record, self._states[session_id]

    def _run_turn(self, session_id, state, prompt, params, images, on_token) -> TurnResult:
        started = time.perf_counter()
        total_images = len(state.features) + len(images)
        if total_images > self.config.max_images_per_session:
            raise TooManyImages(
                f"this turn would bring the session to {total_images} images; "
                f"a session holds at most {self.config.max_images_per_session}"
            )
        n_images = state.pending_images + len(images)
        turn_ids = self.formatter.user_turn_ids(state.conversation, prompt, n_images)
        context = len(state.token_ids) + len(turn_ids)
        if context + 1 > self.loaded.max_context:
            raise PromptTooLong(
                f"the conversation would be {context} tokens; this model's context is "
                f"{self.loaded.max_context}. Open a new session or ask a shorter question"
            )
        max_new = min(params.max_new_tokens, self.loaded.max_context - context)
        # Worst case before running: the KV grows by what it lacks plus every decoded token,
        # new images add features, and cold features come back to the device.
        cached = state.cache.get_seq_length() if state.cache is not None else 0
        needed = (context - cached + max_new) * self.kv_bytes_per_token
        needed += len(images) * self.feature_bytes_per_image
        if state.features_on_host:
            needed += state.feature_bytes()
        self._make_room(needed, session_id)
        if state.features_on_host:
            state.features = [f.to(self.loaded.device, non_blocking=True) for f in state.features]
            state.features_on_host = False
            self.counters.features_restored += 1
        features_before, pending_before = len(state.features), state.pending_images
        try:
            self._add_images(state, images)
            answer, cached, first_token_at = self._generate(state, turn_ids, params, max_new, on_token)
        except BaseException:
            # Leave the session as it was before this turn; the KV is rebuilt next turn.
            del state.features[features_before:]
            state.pending_images = pending_before
            state.cache = None
            raise
        text = self.loaded.tokenizer.decode(answer, skip_special_tokens=True)
        finish = "stop" if answer and answer[-1] in self.loaded.eos_token_ids else "length"
        state.token_ids.extend(turn_ids)
        state.token_ids.extend(answer)
        state.token_ids.extend(self.formatter.closing_ids(answer, self.loaded.eos_token_ids))
        state.conversation.messages.append(state.conversation.user_message(prompt, n_images))
        state.conversation.messages.append(Conversation.assistant_message(text))
        state.pending_images = 0
        return TurnResult(
            text=text,
            token_ids=tuple(answer),
            prompt_tokens=context,
            cached_tokens=cached,
            completion_tokens=len(answer),
            finish_reason=finish,
            ttft_s=first_token_at - started,
            decode_s=time.perf_counter() - first_token_at,
        )

    def _generate(self, state, turn_ids, params, max_new, on_token) -> tuple[list[int], int, float]:
        """Prefill what the cache lacks, then decode; returns (answer ids, cached tokens, first-token time)."""
        loaded = self.loaded
        full_ids = state.token_ids + turn_ids
        if state.cache is None:
            state.cache = generation.new_cache(loaded)
        cached = state.cache.get_seq_length()
        feed = full_ids[cached:]
        image_rows = self._image_rows(state, full_ids, cached)
        input_ids = torch.tensor([feed], device=loaded.device)  # [1, T]
        logits = generation.prefill(loaded, input_ids, image_rows, state.cache)
        self.counters.prefill_tokens += len(feed)
        answer: list[int] = []
        first_token_at = 0.0
        while True:
            token = generation.select_next_token(logits, params, None)
            answer.append(token)
            if len(answer) == 1:
                first_token_at = time.perf_counter()
            if on_token is not None:
                on_token(token)
            if token in loaded.eos_token_ids or len(answer) >= max_new:
                return answer, cached, first_token_at
            logits = generation.decode_one_token(loaded, token, state.cache)
            self.counters.decode_tokens += 1

    def _image_rows(self, state, full_ids: list[int], start: int) -> torch.Tensor | None:
        """Feature rows for the image tokens in full_ids[start:], in placeholder order."""
        image_id = self.loaded.image_token_id
        needed = sum(1 for t in full_ids[start:] if t == image_id)
        if needed == 0:
            return None
        first = sum(1 for t in full_ids[:start] if t == image_id)
        rows = torch.cat(state.features, dim=0)  # [n_images * tokens_per_image, H]
        return rows[first : first + needed]

    def _add_images(self, state: _SessionState, images: Sequence) -> None:
        if not images:
            return
        state.features.extend(generation.encode_images(self.loaded, list(images)))
        state.pending_images += len(images)
        self.counters.vision_tower_runs += 1
        self.counters.images_encoded += len(images)
        log.info("vision tower: encoded %d image(s)", len(images))

    def _expire(self, now: float) -> int:
        expired = [sid for sid in self._store.expired(now) if not self._store.lookup(sid).busy]
        for session_id in expired:
            self._free(session_id)
        self.counters.sessions_expired += len(expired)
        return len(expired)

    # --- memory budget -------------------------------------------------------

    def _make_room(self, needed: int, asking: str) -> None:
        """Free ``needed`` device bytes under the budget and reserve them, or raise OutOfMemoryBudget.

        Other sessions give memory back, least recently used first (memory_budget.plan_room).
        A refusal is decided before any step is taken, so it touches no session.
        """
        budget = self.memory_budget_bytes
        if needed <= budget - self._store.device_bytes() - self._reserved:
            self._reserved += needed
            return
        self._expire(self.clock())  # memory nobody will ask for again goes first
        victims = [
            Holding(r.session_id, r.device_kv_bytes, r.device_feature_bytes, r.host_feature_bytes)
            for r in self._store.lru_records()
            if r.session_id != asking and not r.busy
        ]
        plan = memory_budget.plan_room(
            victims,
            needed,
            budget=budget,
            device_used=self._store.device_bytes() + self._reserved,
            host_budget=self.host_budget_bytes,
            host_used=self._store.host_bytes(),
        )
        if isinstance(plan, NoRoom):
            self.counters.memory_refusals += 1
            raise OutOfMemoryBudget(
                f"this request needs {needed} bytes of session memory; this worker's budget is "
                f"{budget} bytes and other sessions could give back only {plan.free + plan.reclaimable}. "
                "Ask for fewer new tokens or images, or retry later"
            )
        for step in plan:
            record, state = self._store.lookup(step.session_id), self._states[step.session_id]
            if step.kind is StepKind.DROP_KV:
                state.cache = None
                self.counters.kv_dropped += 1
            elif step.kind is StepKind.OFFLOAD_FEATURES:
                state.features = [_to_host(f) for f in state.features]
                state.features_on_host = True
                self.counters.features_offloaded += 1
            else:
                self._free(step.session_id)
                self.counters.sessions_evicted += 1
                log.info("memory budget: evicted a session")
                continue
            self._account(record, state)
        self._reserved += needed

    def _account(self, record: SessionRecord, state: _SessionState) -> None:
        """Record the session's bytes per tier, measured on its tensors."""
        record.device_kv_bytes = generation.cache_bytes(state.cache)
        features = state.feature_bytes()
        record.host_feature_bytes = features if state.features_on_host else 0
        record.device_feature_bytes = 0 if state.features_on_host else features

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
            return 0  # the device is the host: moving features "to host" would free nothing
        share = memory_budget.read_mem_available() * memory_budget.HOST_AVAILABLE_FRACTION
        return int(share / max(1, torch.cuda.device_count()))

    def _free(self, session_id: str) -> None:
        self._store.remove(session_id)
        self._states.pop(session_id, None)
        log.info("sessions: %d open, %d bytes held", len(self._store), self.bytes_held())


def _sizes(loaded: LoadedModel) -> tuple[int, int, int]:
    """(KV bytes per token, feature bytes per image, activation reserve of one full prefill)."""
    text = loaded.model.config.get_text_config()
    dtype_bytes = loaded.dtype.itemsize
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    per_token = memory_budget.kv_bytes_per_token(text.num_hidden_layers, kv_heads, head_dim, dtype_bytes)
    per_image = loaded.tokens_per_image * text.hidden_size * dtype_bytes
    reserve = memory_budget.prefill_activation_bytes(
        loaded.max_context, text.hidden_size, text.intermediate_size, dtype_bytes
    )
    return per_token, per_image, reserve


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, in pinned memory so it comes back with an async copy."""
    if tensor.device.type != "cuda":
        return tensor.to("cpu")
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
    host.copy_(tensor)
    return host
