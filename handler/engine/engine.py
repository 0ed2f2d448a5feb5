"""The session engine: open a session with images, run turns on its cached state, close it.

A session keeps, on the worker's device: the projected image features (the
vision tower runs once per image), the token-exact history, and the KV cache of
everything already seen, so a follow-up turn prefills only its new tokens.
Knows nothing of TorchServe or HTTP.

Memory: kv_manager.py keeps the sessions' device bytes within ``memory_budget_bytes``. When
a new session's features or a turn's KV growth (reserved for the worst case before it runs)
would not fit, least recently used other sessions give memory back: KV caches to host memory
(dropped when the host allowance has no room), then features to host memory, then eviction
(memory_budget.py plans, kv_manager.py applies). No step changes a surviving session's answers:
a host KV is copied back, or dropped when re-prefilling is estimated faster, and a dropped KV is
rebuilt with one prefill from the kept features and token ids. The budget is an estimate; when
the allocator fails all the same, a prefill gets one retry after the same steps free its worst
case, and a turn that still finds no memory is refused (OutOfMemoryBudget).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import torch
from transformers import DynamicCache

from llava_sessions.config import ServingConfig
from llava_sessions.errors import (
    InvalidRequest,
    PromptTooLong,
    SessionBusy,
    SessionNotFound,
    TooManyImages,
    TooManySessions,
    TurnCancelled,
)
from llava_sessions.handler.engine import batch_prefill, generation, kv_cache, sampling
from llava_sessions.handler.engine.kv_manager import HostKV, KVManager
from llava_sessions.handler.engine.runner import DecodeArena, StepRunner, arena_bytes
from llava_sessions.handler.engine.generation import SamplingParams
from llava_sessions.handler.engine.model_loader import LoadedModel
from llava_sessions.handler.engine.prompt import Conversation, TurnFormatter
from llava_sessions.handler.engine.session_store import SessionRecord, SessionStore, new_session_id

log = logging.getLogger(__name__)

# (token id, whether it is the turn's last): called as each token is picked.
TokenCallback = Callable[[int, bool], None]
# Whether the turn's client has gone away: asked before the turn starts and after each token.
CancelCheck = Callable[[], bool]


@dataclass(frozen=True)
class OpenedSession:
    session_id: str
    expires_at: float  # epoch seconds


@dataclass(frozen=True)
class TurnRequest:
    """One turn for ``SessionEngine.turns``.

    ``on_token`` gets each token of this turn as it is picked. When ``cancelled()`` turns true the
    turn stops at its next token and its session is left as before it (TurnCancelled). Past
    ``deadline`` (a ``time.monotonic()`` value) the turn stops and answers what it has, with
    finish reason "deadline"; the session keeps exactly that answer.
    """

    session_id: str
    prompt: str
    params: SamplingParams
    images: Sequence = ()
    on_token: TokenCallback | None = None
    cancelled: CancelCheck | None = None
    deadline: float | None = None


@dataclass(frozen=True)
class TurnResult:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int  # the whole context this turn's answer was conditioned on
    cached_tokens: int  # of those, how many came from the session's KV cache
    completion_tokens: int
    finish_reason: str  # "stop" (eos), "length" (max_new_tokens or the context) or "deadline"
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
    kv_offloaded: int = 0  # KV moved to host memory
    kv_restored: int = 0  # host KV copied back at its session's turn
    host_kv_recomputed: int = 0  # host KV not copied back at its turn (re-prefill estimated faster): prefilled
    host_kv_dropped: int = 0  # host KV dropped to make host room
    kv_dropped: int = 0  # KV dropped from the device
    features_offloaded: int = 0
    features_restored: int = 0
    sessions_evicted: int = 0
    memory_refusals: int = 0
    # Turns stopped because their client went away (undone), and turns cut by their deadline.
    turns_cancelled: int = 0
    turns_past_deadline: int = 0
    # Turns that waited for a later wave of their ``turns`` call (no room beside the earlier
    # ones), once per wave waited.
    turns_deferred: int = 0
    # Graphs of the compiled step: one per decode row bucket and one for follow-up prefills
    # (CUDA graphs: one per bucket of new tokens), and any recompile.
    step_compiles: int = 0
    # Follow-up prefills run by the compiled step in their session's spare KV slots.
    prefills_compiled: int = 0


@dataclass(frozen=True)
class SessionView:
    """One session in an ``EngineSnapshot``; the bytes are measured on its tensors."""

    history_tokens: int  # token ids in its history (``SessionEngine.session_history``)
    kv_tokens: int  # of those, how many its KV cache holds (0 without one)
    kv_bytes: int  # its KV cache on the device, spare slots included (0 without one)
    host_kv_bytes: int  # its KV cache in host memory until its next turn (0 without one)
    feature_bytes: int  # its image features, on the device or on host
    features_on_host: bool  # cold: features in host memory until its next turn
    images: int  # images whose features it holds
    busy: bool  # a turn of it is running
    expires_at: float  # epoch seconds


@dataclass(frozen=True)
class EngineSnapshot:
    """What an engine holds at one moment, taken under its lock (``SessionEngine.snapshot``); for
    tests and metrics. Torch-free. It names sessions by their full ids: never log it.

    ``sessions`` (least recently used first) measure each session's tensors, while the tier
    bytes are the engine's accounting per session, which the memory budget decides on: the two
    agree whenever no operation is between its steps.
    """

    sessions: Mapping[str, SessionView]
    device_kv: int  # bytes by tier, as accounted (``bytes_by_tier``)
    device_features: int
    host_kv: int
    host_features: int
    reserved: int  # device bytes promised to the operation in progress
    batch_view_bytes: int  # KV held by a batched decode in progress (its rows' KV and padding)
    memory_budget: int  # device bytes the sessions may hold
    host_budget: int  # host bytes their host KV and cold features may hold
    counters: EngineCounters  # a copy

    @property
    def session_count(self) -> int:
        return len(self.sessions)

    @property
    def tiers(self) -> dict[str, int]:
        """As ``SessionEngine.bytes_by_tier``."""
        return {"device_kv": self.device_kv, "device_features": self.device_features,
                "host_kv": self.host_kv, "host_features": self.host_features}

    @property
    def device_bytes(self) -> int:
        """Accounted device bytes of the sessions (``device_kv + device_features``)."""
        return self.device_kv + self.device_features


@dataclass
class _SessionState:
    """The tensors and history of one session."""

    features: list[torch.Tensor] = field(default_factory=list)  # each [tokens_per_image, H]
    pending_images: int = 0  # encoded, placeholders not yet in the history
    token_ids: list[int] = field(default_factory=list)
    conversation: Conversation = field(default_factory=Conversation)
    cache: DynamicCache | None = None  # KV of token_ids[:cache.get_seq_length()]; always on the device
    host_kv: HostKV | None = None  # or that KV in host memory until the next turn (kv_manager.py)
    features_on_host: bool = False  # cold: features in host memory until the next turn

    def feature_bytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features)

    def bytes_held(self) -> int:
        host_kv = self.host_kv.nbytes() if self.host_kv is not None else 0
        return self.feature_bytes() + generation.cache_bytes(self.cache) + host_kv


@dataclass
class _Running:
    """One turn of a batch, from its checks and reservation to its result."""

    slot: int
    request: TurnRequest
    record: SessionRecord
    state: _SessionState
    turn_ids: list[int]
    n_images: int
    context: int
    max_new: int
    features_before: int
    pending_before: int
    started: float
    headroom: int = 0  # spare KV slots reserved for after the turn (_grant_headroom)
    cached: int = 0
    answer: list[int] = field(default_factory=list)
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    stopped_by: str | None = None  # "cancelled" or "deadline" when the turn stopped early
    outcome: object = None  # the TurnResult or the exception, once known


def _reports_prefill_rate(prefill):
    """Wraps ``SessionEngine._prefill``: each one-turn prefill's new tokens and time go to the
    memory manager's cost model, which weighs re-prefilling a host KV against copying it back."""

    @functools.wraps(prefill)
    def timed(engine: SessionEngine, running: _Running) -> torch.Tensor:
        with engine._memory.prefill_timing() as sample:
            logits = prefill(engine, running)
            sample.amount = running.context - running.cached
        return logits

    return timed


class SessionEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: ServingConfig,
        clock: Callable[[], float] = time.time,
        host_budget_bytes: int | None = None,
    ):
        """``host_budget_bytes`` bounds host KV and cold features; None means auto: on CUDA
        half the host's MemAvailable split between the visible GPUs, on CPU 0 (the device
        is the host, so there are no host tiers and eviction follows dropping KV)."""
        self.loaded = loaded
        self.config = config
        self.clock = clock
        self.counters = EngineCounters()
        self.formatter = TurnFormatter(loaded.tokenizer, loaded.image_token_id, loaded.tokens_per_image)
        self._store = SessionStore(config.max_sessions_per_worker)
        self._states: dict[str, _SessionState] = {}
        self._memory = KVManager(
            loaded, config, self._store, self._states, self.counters, host_budget_bytes=host_budget_bytes,
            evict=self._free, expire=lambda: self._expire(self.clock()),
        )
        self.kv_bytes_per_token = self._memory.kv_bytes_per_token
        self.feature_bytes_per_image = self._memory.feature_bytes_per_image
        compiled = config.compile == "on" or (config.compile == "auto" and loaded.device.type == "cuda")
        self._runner = StepRunner(loaded, "on" if compiled else "off")
        self._batch_view_bytes = 0  # KV held by the batched decode view (sessions' KV + padding)
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
                self._memory.make_room(len(images) * self.feature_bytes_per_image, session_id)
                self._add_images(state, images)
            except BaseException:
                self._store.remove(session_id)
                raise
            finally:
                self._memory.release()
            self._states[session_id] = state
            self._memory.account(record, state)
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
        result = self.turns([TurnRequest(session_id, prompt, params, tuple(images), on_token)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def turns(self, requests: Sequence[TurnRequest]) -> list[TurnResult | Exception]:
        """Run turns of different sessions together; one result or exception per request, in order.

        Each request is checked, has its images encoded and its memory reserved on its own, in
        order; a failing request gets its error in its slot and does not disturb the others.
        Then each turn prefills on its own cache, and all of them decode together, one token
        per turn per fixed-shape step (runner.py). Greedy answers are those of ``turn`` alone.
        A second request for a session already in the call gets SessionBusy. A request that
        does not fit the memory budget beside the earlier ones runs after them, in a later
        wave; only one that does not fit even alone is refused (OutOfMemoryBudget).
        """
        results: list = [None] * len(requests)
        started = time.perf_counter()
        with self._lock:
            pending, seen = [], set()
            for slot, request in enumerate(requests):
                if request.session_id in seen:
                    results[slot] = SessionBusy(
                        "another turn of this session is in the same batch; send the next turn after its answer"
                    )
                else:
                    seen.add(request.session_id)
                    pending.append(slot)
            while pending:
                pending = self._run_wave(requests, pending, results, started)
        return results

    def warm_up(self) -> list[tuple[int, int]]:
        """Compile the decode step's shapes now (config.compile_warmup_s at most), before serving."""
        done = self._runner.warm_up(max_rows=8, seconds=self.config.compile_warmup_s)
        self.counters.step_compiles = self._runner.compiles
        return done

    @property
    def compiled(self) -> bool:
        """Whether decode steps run compiled (False after a compile failure fell back to eager)."""
        return self._runner.compiled

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
        """Bytes sessions hold: KV and features on the device (bounded by the budget), KV and
        features on host (bounded by the host allowance)."""
        with self._lock:
            return self._memory.tiers()

    @property
    def memory_budget_bytes(self) -> int:
        """Device bytes the sessions may hold."""
        return self._memory.memory_budget_bytes

    @property
    def host_budget_bytes(self) -> int:
        """Host bytes their host KV and cold features may hold."""
        return self._memory.host_budget_bytes

    @property
    def kv_manager(self) -> KVManager:
        """The sessions' memory: budget, tiers and the copy-or-prefill cost model (kv_manager.py)."""
        return self._memory

    def snapshot(self) -> EngineSnapshot:
        """Every session and the memory accounting at this moment, read-only (EngineSnapshot).

        Measures every session's tensors: for tests and occasional metrics, not per token. Safe
        from a turn's own ``on_token`` callback (the lock is reentrant).
        """
        with self._lock:
            views = {}
            order = self._store.lru_order()
            listed = set(order)
            # A state without a record would be a leak: listed (after the others) so its bytes show.
            for session_id in order + [sid for sid in self._states if sid not in listed]:
                record, state = self._store.lookup(session_id), self._states.get(session_id)
                if state is None:
                    state = _SessionState()  # reserved by an open in progress: nothing held yet
                views[session_id] = SessionView(
                    history_tokens=len(state.token_ids),
                    kv_tokens=_cached_tokens(state),
                    kv_bytes=generation.cache_bytes(state.cache),
                    host_kv_bytes=state.host_kv.nbytes() if state.host_kv is not None else 0,
                    feature_bytes=state.feature_bytes(),
                    features_on_host=state.features_on_host,
                    images=len(state.features),
                    busy=record is not None and record.busy,
                    expires_at=record.expires_at if record is not None else 0.0,
                )
            return EngineSnapshot(
                sessions=MappingProxyType(views),
                **self._memory.tiers(),
                reserved=self._memory.reserved,
                batch_view_bytes=self._batch_view_bytes,
                memory_budget=self.memory_budget_bytes,
                host_budget=self.host_budget_bytes,
                counters=dataclasses.replace(self.counters),
            )

    def session_history(self, session_id: str) -> tuple[int, ...]:
        """The token ids of an open session's history (what its next turn is conditioned on,
        before the turn's own tokens); for tests. Raises SessionNotFound. Touches nothing: the
        session's expiry and LRU place stay as they are."""
        with self._lock:
            state = self._states.get(session_id) if self._store.lookup(session_id) is not None else None
            if state is None:
                raise SessionNotFound()
            return tuple(state.token_ids)

    def device_bytes_held(self) -> int:
        with self._lock:
            return self._store.device_bytes()

    # --- background expiry -------------------------------------------------

    def start_expiry_sweeper(self, interval_s: float = 5.0, on_sweep: Callable[[], None] | None = None) -> None:
        """Free expired sessions even when no request names them again; ``on_sweep()`` is called
        after a sweep that freed any (metrics: the gauges change when memory is freed)."""
        if self._sweeper is not None:
            return
        self._stop_sweeper.clear()

        def run() -> None:
            while not self._stop_sweeper.wait(interval_s):
                freed = self.sweep_expired()
                if freed:
                    log.info("expired %d session(s)", freed)
                    if on_sweep is not None:
                        on_sweep()

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

    def _run_wave(self, requests, slots: list[int], results: list, started: float) -> list[int]:
        """Start the turns of ``slots`` that fit together and run them; return the slots deferred."""
        wave: list[_Running] = []
        deferred: list[int] = []
        try:
            for slot in slots:
                try:
                    running = self._start_turn(slot, requests[slot], started, may_defer=bool(wave))
                except Exception as error:
                    results[slot] = error
                    continue
                if running is None:
                    deferred.append(slot)
                    self.counters.turns_deferred += 1
                else:
                    wave.append(running)
            if len(wave) == 1:
                self._grant_headroom(wave[0])
            self._generate(wave)
        finally:
            self._memory.release()
            self._batch_view_bytes = 0
            for running in wave:
                if running.outcome is None:  # only when something other than an Exception propagates
                    self._roll_back(running)
                running.record.busy = False
                self._memory.account(running.record, running.state)
                self._store.touch(running.record, self.clock())
        for running in wave:
            results[running.slot] = running.outcome
        return deferred

    def _start_turn(self, slot: int, request: TurnRequest, started: float, may_defer: bool) -> _Running | None:
        """Check a turn, reserve its worst-case memory and encode its images; None: deferred (no room now)."""
        session_id, images = request.session_id, request.images
        if request.cancelled is not None and request.cancelled():  # gone while it waited: never starts
            raise TurnCancelled()
        record, state = self._checkout(session_id)
        try:
            total_images = len(state.features) + len(images)
            if total_images > self.config.max_images_per_session:
                raise TooManyImages(
                    f"this turn would bring the session to {total_images} images; "
                    f"a session holds at most {self.config.max_images_per_session}"
                )
            n_images = state.pending_images + len(images)
            turn_ids = self.formatter.user_turn_ids(state.conversation, request.prompt, n_images)
            context = len(state.token_ids) + len(turn_ids)
            if context + 1 > self.loaded.max_context:
                raise PromptTooLong(
                    f"the conversation would be {context} tokens; this model's context is "
                    f"{self.loaded.max_context}. Open a new session or ask a shorter question"
                )
            max_new = min(request.params.max_new_tokens, self.loaded.max_context - context)
            # Worst case before running: the KV grows by what it lacks plus every decoded token,
            # new images add features, and cold features come back to the device.
            cached = _cached_tokens(state)
            needed = len(images) * self.feature_bytes_per_image
            if state.features_on_host:
                needed += state.feature_bytes()
            needed += self._kv_growth_tokens(state.cache, context - cached, max_new, 0) * self.kv_bytes_per_token
            if not self._memory.make_room(needed, session_id, refuse=not may_defer):
                record.busy = False  # untouched; it runs in the next wave
                return None
            self._memory.bring_back(record, state, context)
            running = _Running(
                slot, request, record, state, turn_ids, n_images, context, max_new,
                features_before=len(state.features), pending_before=state.pending_images, started=started,
            )
            try:
                self._add_images(state, images)
            except BaseException:
                self._roll_back(running)
                raise
            return running
        except BaseException:
            record.busy = False
            self._memory.account(record, state)
            self._store.touch(record, self.clock())
            raise

    def _generate(self, wave: list[_Running]) -> None:
        """Prefill the turns (follow-ups of cached sessions in one forward, batch_prefill.py; the
        rest each on its own cache), then decode the unfinished ones together.

        Sets each turn's outcome; a turn that fails is rolled back alone (anything that is not
        an Exception propagates, and _run_wave rolls back every turn without an outcome).
        """
        joint = self._prefill_together([running for running in wave if self._joins_prefill(running)])
        prefilled, first_logits = [], []
        for running in wave:
            try:
                first_logits.append(joint[running.slot] if running.slot in joint else self._prefill_or_give_back(running))
                prefilled.append(running)
            except Exception as error:
                self._fail(running, error)
        decoding, _ = self._pick_all(prefilled, torch.cat(first_logits)) if prefilled else ([], [])
        if decoding:
            # The arena is reserved whole: a row that finishes gets its KV back (which its turn
            # reserved) while the others still decode in the arena. No room: each turn decodes
            # alone on its own cache.
            lengths = [running.state.cache.get_seq_length() for running in decoding]
            remaining = [running.max_new - len(running.answer) for running in decoding]
            arena = arena_bytes(self.loaded, lengths, remaining, bucketed=self._runner.compiled)
            if self._memory.make_room(arena, None, refuse=False):
                self._decode_together(decoding)
            else:
                for running in decoding:
                    self._decode_alone(running)
        for running in wave:
            if running.outcome is None:
                running.outcome = self._undo(running) if running.stopped_by == "cancelled" else self._finish(running)

    def _grant_headroom(self, running: _Running) -> None:
        """Spare KV slots after a lone turn (kv_headroom_tokens), so the session's next question
        appends in place: only from budget that is plainly free (a quarter of it stays so), so
        they never cost another session its memory; a batch's rows get none (its padding may need it)."""
        state, headroom = running.state, self.config.kv_headroom_tokens
        feed = running.context - _cached_tokens(state)
        extra = (self._kv_growth_tokens(state.cache, feed, running.max_new, headroom)
                 - self._kv_growth_tokens(state.cache, feed, running.max_new, 0)) * self.kv_bytes_per_token
        if headroom and self._memory.reserve_spare(extra):
            running.headroom = headroom

    @staticmethod
    def _kv_growth_tokens(cache: DynamicCache | None, feed: int, max_new: int, headroom: int) -> int:
        """The most token slots a turn can add to the session's KV: ``feed`` tokens prefilled and
        ``max_new - 1`` fed back by decoding, with ``headroom`` spare after (kv_cache.reserve).
        Counted as ``max_new``: the last token is never fed, one to spare."""
        return kv_cache.growth_tokens(cache, feed, max_new, headroom)

    def _joins_prefill(self, running: _Running) -> bool:
        """A follow-up on a cached history whose new tokens hold no image: it can share a forward."""
        return _cached_tokens(running.state) > 0 and self.loaded.image_token_id not in _feed(running)

    def _prefill_together(self, rows: list[_Running]) -> dict[int, torch.Tensor]:
        """One forward for two or more follow-ups; each turn's next-token logits [1, V] by slot.

        Empty (every turn prefills alone) when there are fewer than two, when the view's padding
        does not fit the budget's free bytes, or when the forward fails: then their caches were emptied,
        and the one-turn prefill rebuilds each from its token ids and features.
        """
        if len(rows) < 2:
            return {}
        caches = [running.state.cache for running in rows]
        cached = [cache.get_seq_length() for cache in caches]
        feeds = [_feed(running) for running in rows]
        extra = batch_prefill.extra_tokens(cached, [len(feed) for feed in feeds]) * self.kv_bytes_per_token
        if not self._memory.reserve_if_free(extra):  # a speed-up: it never costs another session memory
            return {}
        try:
            logits = batch_prefill.prefill_together(
                self.loaded, caches, feeds, [r.max_new - 1 + r.headroom for r in rows]
            )
        except Exception as error:
            log.warning("a prefill of %d turns together failed (%s); each runs alone", len(rows), type(error).__name__)
            for running in rows:
                running.state.cache = None
            return {}
        for running, n, feed in zip(rows, cached, feeds):
            running.cached = n
            self.counters.prefill_tokens += len(feed)
        return {running.slot: logits[row : row + 1] for row, running in enumerate(rows)}

    def _prefill_or_give_back(self, running: _Running) -> torch.Tensor:
        """Prefill; when the allocator runs out of memory all the same (the budget is an estimate:
        fragmentation, other processes), other sessions give back this turn's worst case in the
        budget's order and the prefill runs once more, on a fresh cache. No room to give back, or
        a second allocator failure: OutOfMemoryBudget, with the session as before the turn.
        """
        try:
            return self._prefill(running)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            # Only its name: the exception's traceback holds the failed forward's tensors.
            first = type(error).__name__
        running.state.cache = None  # a failed prefill may leave some layers longer than others
        running.headroom = 0  # the retry asks for nothing it does not need
        needed = self._kv_growth_tokens(None, running.context, running.max_new, 0) * self.kv_bytes_per_token
        if self._memory.give_back(needed, running.request.session_id):
            log.warning("out of memory during a prefill; sessions gave memory back, retrying once")
            try:
                return self._prefill(running)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                running.state.cache = None
        raise self._memory.refusal(first)

    @_reports_prefill_rate
    def _prefill(self, running: _Running) -> torch.Tensor:
        """Run what the session's cache lacks (history and this turn) on it; return the next-token logits."""
        loaded, state = self.loaded, running.state
        full_ids = state.token_ids + running.turn_ids
        if state.cache is None:
            state.cache = generation.new_cache(loaded)
        running.cached = state.cache.get_seq_length()
        feed = full_ids[running.cached:]
        # Room for this turn's tokens and what decoding may append (reserved in _start_turn):
        # no copy per token, and none at all when the spare slots of the last turn suffice.
        kv_cache.reserve(state.cache, len(feed), running.max_new - 1, running.headroom)
        image_rows = self._image_rows(state, full_ids, running.cached)
        logits = self._runner.prefill_in_place(state.cache, feed) if image_rows is None else None
        self.counters.prefills_compiled += logits is not None
        if logits is None:
            input_ids = torch.tensor([feed], device=loaded.device)  # [1, T]
            logits = generation.prefill(loaded, input_ids, image_rows, state.cache)
        self.counters.prefill_tokens += len(feed)
        self.counters.step_compiles = self._runner.compiles
        return logits

    def _pick_all(self, rows: list[_Running], logits: torch.Tensor) -> tuple[list[_Running], list[_Running]]:
        """Pick each row's next token from logits [B, V] (one copy of B ids to the host) and send
        it; (the rows that go on, the rows that failed and were rolled back)."""
        tokens = sampling.pick(logits, [running.request.params for running in rows], self.loaded.image_token_id)
        going, failed = [], []
        # In the turns' own order (an arena's rows move as others leave): callbacks stay in order.
        for running, token in sorted(zip(rows, tokens), key=lambda pair: pair[0].slot):
            try:
                if self._accept(running, token):
                    going.append(running)
            except Exception as error:
                self._fail(running, error)
                failed.append(running)
        return going, failed

    def _accept(self, running: _Running, token: int) -> bool:
        """The turn's next token: record it and send it; True while the turn goes on.

        A turn whose client is gone stops here, its token unsent (``_undo`` follows); one past its
        deadline stops with this token as its last.
        """
        request = running.request
        running.answer.append(token)
        running.last_token_at = time.perf_counter()
        if len(running.answer) == 1:
            running.first_token_at = running.last_token_at
        goes_on = token not in self.loaded.eos_token_ids and len(running.answer) < running.max_new
        if request.cancelled is not None and request.cancelled():
            running.stopped_by = "cancelled"
            return False
        if goes_on and request.deadline is not None and time.monotonic() >= request.deadline:
            running.stopped_by, goes_on = "deadline", False
        if request.on_token is not None:
            request.on_token(token, not goes_on)
        return goes_on

    def _decode_together(self, group: list[_Running]) -> None:
        """Decode the group's turns in one arena (runner.py), a token per turn per fixed-shape
        step, until all are done."""
        rows = {running.slot: running for running in group}
        arena = DecodeArena(
            self.loaded,
            {slot: running.state.cache for slot, running in rows.items()},
            {slot: running.max_new - len(running.answer) for slot, running in rows.items()},
            self._runner,
            {slot: kv_cache.most_spare(running.headroom) for slot, running in rows.items()},
        )
        self._batch_view_bytes = arena.bytes_held()
        while len(arena):
            live = [rows[slot] for slot in arena.keys]
            try:
                logits = arena.step({running.slot: running.answer[-1] for running in live})
            except Exception as error:  # the forward failed: every turn still in the arena fails
                for running in live:
                    self._fail(running, error)
                return
            self.counters.decode_tokens += len(live)
            self.counters.step_compiles = self._runner.compiles
            going, failed = self._pick_all(live, logits)
            finished = [running.slot for running in live if running not in going and running not in failed]
            arena.leave(finished, [running.slot for running in failed])

    def _decode_alone(self, running: _Running) -> None:
        """Decode one turn on its session's own cache (no arena): when the budget has no room for one."""
        while True:
            try:
                logits = generation.decode_one_token(self.loaded, running.answer[-1], running.state.cache)
            except Exception as error:
                self._fail(running, error)
                return
            self.counters.decode_tokens += 1
            going, _ = self._pick_all([running], logits)
            if not going:
                return

    def _finish(self, running: _Running) -> TurnResult:
        """Commit a finished turn to its session's history."""
        state, answer = running.state, running.answer
        # Between turns a session holds its tokens and at most the spare slots reserved for it.
        kv_cache.trim(state.cache, running.headroom)
        text = self.loaded.tokenizer.decode(answer, skip_special_tokens=True)
        if answer and answer[-1] in self.loaded.eos_token_ids:
            finish = "stop"
        else:
            finish = running.stopped_by or "length"
        self.counters.turns_past_deadline += finish == "deadline"
        state.token_ids.extend(running.turn_ids)
        state.token_ids.extend(answer)
        state.token_ids.extend(self.formatter.closing_ids(answer, self.loaded.eos_token_ids))
        state.conversation.messages.append(state.conversation.user_message(running.request.prompt, running.n_images))
        state.conversation.messages.append(Conversation.assistant_message(text))
        state.pending_images = 0
        return TurnResult(
            text=text,
            token_ids=tuple(answer),
            prompt_tokens=running.context,
            cached_tokens=running.cached,
            completion_tokens=len(answer),
            finish_reason=finish,
            ttft_s=running.first_token_at - running.started,
            decode_s=running.last_token_at - running.first_token_at,
        )

    def _fail(self, running: _Running, error: Exception) -> None:
        self._roll_back(running)
        if is_out_of_memory(error):  # during decoding: refused, never an internal error
            error = self._memory.refusal(type(error).__name__)
        running.outcome = error

    @staticmethod
    def _roll_back(running: _Running) -> None:
        """Leave the session as it was before this turn; the KV is rebuilt next turn."""
        state = running.state
        del state.features[running.features_before:]
        state.pending_images = running.pending_before
        state.cache = None

    def _undo(self, running: _Running) -> TurnCancelled:
        """A turn whose client went away: the session is as before it, the history's KV kept
        (cut back to the history), so the next turn prefills only its own tokens."""
        state = running.state
        cache = state.cache
        self._roll_back(running)
        if cache is not None:
            kv_cache.truncate(cache, min(len(state.token_ids), cache.get_seq_length()))
            kv_cache.trim(cache, running.headroom)
            state.cache = cache
        self.counters.turns_cancelled += 1
        return TurnCancelled()

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

    def _free(self, session_id: str) -> None:
        self._store.remove(session_id)
        self._states.pop(session_id, None)
        log.info("sessions: %d open, %d bytes held", len(self._store), self.bytes_held())


def _cached_tokens(state: _SessionState) -> int:
    """Tokens of the session's history its KV cache holds (0 without one)."""
    return state.cache.get_seq_length() if state.cache is not None else 0


def _feed(running: _Running) -> list[int]:
    """What a turn's prefill must run: the history its cache lacks, then the turn's own tokens."""
    return (running.state.token_ids + running.turn_ids)[_cached_tokens(running.state):]


def is_out_of_memory(error: BaseException) -> bool:
    """An allocator failure: CUDA's OutOfMemoryError, MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
