"""The session engine: open a session with images, run turns on its cached state, close it.

A session keeps, on the worker's device: the projected image features (the
vision tower runs once per image), the token-exact history, and the KV cache of
everything already seen, so a follow-up turn prefills only its new tokens.
Knows nothing of TorchServe or HTTP.

A ``turns`` call runs in waves, each a loop of steps: schedule -> execute -> update.
scheduler.py admits the turns that fit the memory budget (the rest wait for the next wave),
picks each step's tokens and sends them, and commits finished turns; executor.py runs the
tensors (prefill, then fixed-shape decode steps in an arena, runner.py); kv_manager.py owns
the memory. This class holds the sessions and the public API.

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
import itertools
import logging
import threading
import time
from types import MappingProxyType
from typing import Callable, Sequence

import torch

from llava_sessions.config import ServingConfig
from llava_sessions.errors import InvalidRequest, SessionNotFound, TooManyImages, TooManySessions
from llava_sessions.handler.engine import generation
from llava_sessions.handler.engine.api import (  # noqa: F401 - the engine's public types, importable from here
    CancelCheck,
    EngineCounters,
    EngineSnapshot,
    ImageInput,
    Joiners,
    Message,
    OpenedSession,
    SessionView,
    TokenCallback,
    TurnRequest,
    TurnResult,
)
from llava_sessions.handler.engine.executor import Executor
from llava_sessions.handler.engine.generation import SamplingParams
from llava_sessions.handler.engine.kv_manager import KVManager
from llava_sessions.handler.engine.model_loader import LoadedModel
from llava_sessions.handler.engine.prompt import TurnFormatter
from llava_sessions.handler.engine.runner import (
    KEPT_ARENA_ROWS,
    MIN_KEPT_SLOTS,
    ArenaShape,
    KeptArena,
    StepRunner,
    kept_arena_slots,
)
from llava_sessions.handler.engine.scheduler import Scheduler, tell
from llava_sessions.handler.engine.session_store import SessionStore, new_session_id
from llava_sessions.handler.engine.history import ImageSlot, image_slots
from llava_sessions.handler.engine.state import RunningTurn, SessionState, cached_tokens
from llava_sessions.handler.engine.state import is_out_of_memory  # noqa: F401 - part of the engine's API

log = logging.getLogger(__name__)



class SessionEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: ServingConfig,
        clock: Callable[[], float] = time.time,
        host_budget_bytes: int | None = None,
        keep_arena: bool | None = None,
    ):
        """``host_budget_bytes`` bounds host KV and cold features; None means auto: on CUDA
        half the host's MemAvailable split between the visible GPUs, on CPU 0 (the device
        is the host, so there are no host tiers and eviction follows dropping KV).
        ``keep_arena``: decode in buffers kept for the engine's life (runner.KeptArena), set
        aside from the memory budget; None means auto: with CUDA graphs (compiled on CUDA)."""
        self.loaded = loaded
        self.config = config
        self.clock = clock
        self.counters = EngineCounters()
        self.formatter = TurnFormatter(loaded.tokenizer, loaded.image_token_id)
        self._store = SessionStore(config.max_sessions_per_worker)
        self._states: dict[str, SessionState] = {}
        self._memory = KVManager(
            loaded, config, self._store, self._states, self.counters, host_budget_bytes=host_budget_bytes,
            evict=self._free, expire=lambda: self._expire(self.clock()),
        )
        self.kv_bytes_per_token = self._memory.kv_bytes_per_token
        self.feature_bytes_per_image = self._memory.feature_bytes_per_image
        compiled = config.compile == "on" or (config.compile == "auto" and loaded.device.type == "cuda")
        self._runner = StepRunner(loaded, "on" if compiled else "off")
        self._scheduler = Scheduler(loaded, config, self.formatter, self._store, self._states, self._memory,
                                    self.counters, clock, self._add_images, self._expire)
        self._kept_arena = self._keep_arena(keep_arena)
        self._executor = Executor(loaded, self._runner, self._memory, self.counters, self._scheduler.fail,
                                  self._kept_arena)
        self._batch_view_bytes = 0  # bytes of the running decode arena (the turns' KV and its spare slots)
        # One turn at a time per worker; the expiry sweeper waits for it.
        self._lock = threading.RLock()
        self._sweeper: threading.Thread | None = None
        self._stop_sweeper = threading.Event()

    # --- the four operations ---------------------------------------------

    def open_session(self, images: Sequence = (), session_id: str | None = None, transient: bool = False) -> OpenedSession:
        """Open a session holding ``images`` (PIL images or ImageInput, each loaded and encoded
        now): they belong to its first user message, before that message's own. ``transient``:
        a session for one answer, closed right after it (a one-shot); it may go past
        ``max_sessions_per_worker``, which bounds the sessions a worker keeps, not the answers
        it gives (its memory is reserved under the budget as any session's)."""
        if len(images) > self.config.max_images_per_session:
            raise TooManyImages(
                f"{len(images)} images sent; a session holds at most {self.config.max_images_per_session}"
            )
        with self._lock, torch.inference_mode():
            session_id = session_id or new_session_id()
            if self._store.lookup(session_id) is not None:
                raise InvalidRequest("this session is already open; send turns to it or close it first")
            now = self.clock()
            self._expire(now)
            record = self._store.reserve(session_id, now, self.config.session_ttl_s, over_capacity=transient)
            if record is None:
                raise TooManySessions(
                    f"this worker holds its maximum of {self._store.capacity} sessions; "
                    "close finished sessions or retry later"
                )
            state = SessionState()
            try:
                slots = image_slots(self.loaded, state, images)
                self._memory.make_room(self._memory.feature_bytes([slot.tokens for slot in slots]), session_id)
                self._add_images(state, slots)
                state.open_images = len(slots)
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

    def turns(self, requests: Sequence[TurnRequest], joiners: Joiners | None = None) -> list[TurnResult | Exception]:
        """Run turns of different sessions together; one result or exception per request, in order.

        Each request is checked, has its images encoded and its memory reserved on its own, in
        order; a failing request gets its error in its slot and does not disturb the others.
        Then each turn prefills on its own cache, and all of them decode together, one token
        per turn per fixed-shape step (runner.py). Greedy answers are those of ``turn`` alone.
        A second request for a session already in the call gets SessionBusy. A request that
        does not fit the memory budget beside the earlier ones runs after them, in a later
        wave; only one that does not fit even alone is refused (OutOfMemoryBudget).

        ``joiners`` (api.Joiners): turns that arrive while the call's last wave decodes join it
        at a step's end, up to KEPT_ARENA_ROWS decoding at once; their outcomes go to their
        ``on_done``, not into the returned list.
        """
        results: list = [None] * len(requests)
        started = time.perf_counter()
        # Inference mode throughout: every KV buffer is then an inference tensor, as in the
        # compiled step's warm-up, so its graphs (which guard on that) serve the real turns.
        with self._lock, torch.inference_mode():
            pending = self._scheduler.distinct(requests, results)
            slots = itertools.count(len(requests))  # a joiner's slot: after the call's requests
            while pending:
                wave, pending = self._scheduler.admit(requests, pending, results, started)  # schedule
                try:
                    self._run(wave, later_waves=bool(pending), joining=None if pending or joiners is None else (joiners, slots))
                finally:
                    self._scheduler.release(wave)
                    self._batch_view_bytes = 0
                for running in wave:
                    if running.slot < len(results):
                        results[running.slot] = running.outcome
        return results

    def _run(self, wave: list[RunningTurn], later_waves: bool, joining=None) -> None:
        """A wave's steps, each schedule -> execute -> update, until every turn has its outcome.
        A turn that ends while others still run (here or in ``later_waves``) is committed and
        told at once (TurnRequest.on_done). ``joining``: (Joiners, slot counter) when turns may join."""
        decoder, rows, logits = self._executor.start(wave)  # execute: the turns' new tokens
        self._batch_view_bytes = decoder.bytes_held() if decoder is not None else 0
        decoding = self._scheduler.update(rows, logits)  # update: first tokens picked and sent
        if decoder is not None:  # follow-ups prefilled in an arena: those that stopped leave, with their KV
            decoder.keep(decoding, rows)
        if decoding:
            self._settle(rows, decoding, wave, others_run=True)
            if decoder is None:
                decoder = self._executor.decoder(decoding)  # schedule: an arena when the budget has room
            self._batch_view_bytes = decoder.bytes_held()
            while decoding:
                rows, logits = decoder.step(decoding)  # execute: a token per turn
                decoding = self._scheduler.update(rows, logits)  # update
                decoder.keep(decoding, rows)  # the others leave, finished ones with their KV
                self._settle(rows, decoding, wave, others_run=bool(decoding) or later_waves)
                if decoding and joining:
                    decoder, joined = self._join(joining, wave, decoder, decoding)
                    decoding = decoding + joined
        self._scheduler.complete(wave)
        self._scheduler.tell(wave, later_waves)

    def _join(self, joining, wave: list[RunningTurn], decoder, live: list[RunningTurn]) -> tuple[object, list[RunningTurn]]:
        """Turns that arrived while the wave decodes: admitted (each on its own, as ``turns`` admits),
        prefilled and given their first token. (The decoder for every row, the joined turns that go
        on decoding.) They join ``wave``."""
        joiners, slots = joining
        arrivals = joiners.arrivals()
        if not arrivals:
            return decoder, []
        started, admitted = time.perf_counter(), []
        for request in arrivals:
            try:
                running = None
                if len(live) + len(admitted) < KEPT_ARENA_ROWS:
                    running = self._scheduler.join(next(slots), request, started)
            except Exception as error:  # its own checks failed: that is its answer
                tell(request, error)
                continue
            if running is None:
                self.counters.joins_declined += 1
                joiners.declined(request)
                continue
            admitted.append(running)
            wave.append(running)
        if not admitted:
            return decoder, []
        # schedule and execute: the decoder takes them in (or a new one holds every row), they prefill
        decoder, rows, logits = self._executor.join(decoder, live, admitted)
        self._batch_view_bytes = decoder.bytes_held()
        going = self._scheduler.update(rows, logits)  # update: first tokens picked and sent
        decoder.keep(going, rows)  # those that stopped at their first token leave, with their KV
        log.debug("%d turn(s) joined %d decoding", len(admitted), len(live))
        self._settle(rows, going, wave, others_run=True)
        return decoder, going

    def _settle(self, stepped: list[RunningTurn], going: list[RunningTurn], wave: list[RunningTurn],
                others_run: bool) -> None:
        """The turns of the last step that stopped are committed (their KV is in their own caches
        again); every turn with an outcome is told while ``others_run``."""
        if not others_run:
            return  # the wave's end commits them, as the call returns
        kept = {running.slot for running in going}
        self._scheduler.complete([running for running in stepped if running.slot not in kept])
        self._scheduler.tell(wave, others_run)

    def warm_up(self) -> list[tuple[int, int]]:
        """Compile the decode step's shapes now (config.compile_warmup_s at most), before serving."""
        done = self._runner.warm_up(max_rows=KEPT_ARENA_ROWS, seconds=self.config.compile_warmup_s,
                                    kept=self._kept_arena)
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
                    state = SessionState()  # reserved by an open in progress: nothing held yet
                views[session_id] = SessionView(
                    history_tokens=len(state.token_ids),
                    kv_tokens=cached_tokens(state),
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
                kept_arena_bytes=self._kept_arena.bytes() if self._kept_arena is not None else 0,
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

    def _keep_arena(self, requested: bool | None) -> KeptArena | None:
        """The kept decode arena (runner.kept_arena_slots), its bytes set aside from the budget;
        None when not asked for, or when an eighth of the budget holds too few slots (each wave
        then allocates its own arena, as on a CPU)."""
        graphs = self._runner.compiled and self.loaded.device.type == "cuda"
        if not (graphs if requested is None else requested):
            return None
        shape = ArenaShape.of(self.loaded)
        slots = kept_arena_slots(self.loaded.max_context, self._memory.memory_budget_bytes, shape.bytes(1, 1))
        if not slots:
            log.warning("no kept decode arena: an eighth of the %d budget bytes holds fewer than %d slots a row",
                        self._memory.memory_budget_bytes, MIN_KEPT_SLOTS)
            return None
        with torch.inference_mode():  # inference tensors, as every KV buffer of the turns
            kept = KeptArena(self.loaded, KEPT_ARENA_ROWS, slots, static=graphs)
        self._memory.set_aside(kept.bytes(), "the kept decode arena")
        return kept

    def _add_images(self, state: SessionState, slots: Sequence[ImageSlot], held: Sequence | None = None) -> None:
        """Append images to the session's features and digests, in order: a slot the session
        holds reuses ``held[slot.held]`` (its features when the turn was planned; by default its
        features now), the others are encoded in one vision tower run, each digest once."""
        if not slots:
            return
        held = state.features if held is None else held
        new = {}
        for slot in slots:
            if slot.held is None:
                new.setdefault(slot.digest, slot.image)
        if new:
            encoded = dict(zip(new, generation.encode_images(self.loaded, list(new.values()))))
            self.counters.vision_tower_runs += 1
            self.counters.images_encoded += len(new)
            log.info("vision tower: encoded %d image(s)", len(new))
        features = [held[slot.held] if slot.held is not None else encoded[slot.digest] for slot in slots]
        state.features.extend(features)
        state.image_digests.extend(slot.digest for slot in slots)
        state.pending_images += len(slots)

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
