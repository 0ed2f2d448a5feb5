"""The session engine: open a session with images, run turns on its cached state, close it.

A session keeps, on the worker's device: the projected image features (the
vision tower runs once per image), the token-exact history, and the KV cache of
everything already seen, so a follow-up turn prefills only its new tokens.
Knows nothing of TorchServe or HTTP.
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
    InvalidRequest,
    PromptTooLong,
    SessionBusy,
    SessionNotFound,
    TooManyImages,
    TooManySessions,
)
from llava_sessions.handler.engine import generation
from llava_sessions.handler.engine.generation import SamplingParams
from llava_sessions.handler.engine.model_loader import LoadedModel
from llava_sessions.handler.engine.prompt import Conversation, TurnFormatter
from llava_sessions.handler.engine.session_store import SessionStore, new_session_id

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


@dataclass
class _SessionState:
    """The tensors and history of one session."""

    features: list[torch.Tensor] = field(default_factory=list)  # each [tokens_per_image, H]
    pending_images: int = 0  # encoded, placeholders not yet in the history
    token_ids: list[int] = field(default_factory=list)
    conversation: Conversation = field(default_factory=Conversation)
    cache: DynamicCache | None = None  # KV of token_ids[:cache.get_seq_length()]

    def bytes_held(self) -> int:
        features = sum(f.numel() * f.element_size() for f in self.features)
        return features + generation.cache_bytes(self.cache)


class SessionEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: ServingConfig,
        clock: Callable[[], float] = time.time,
    ):
        self.loaded = loaded
        self.config = config
        self.clock = clock
        self.counters = EngineCounters()
        self.formatter = TurnFormatter(loaded.tokenizer, loaded.image_token_id, loaded.tokens_per_image)
        self._store = SessionStore(config.max_sessions_per_worker)
        self._states: dict[str, _SessionState] = {}
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
                self._add_images(state, images)
            except BaseException:
                self._store.remove(session_id)
                raise
            self._states[session_id] = state
            record.bytes_held = state.bytes_held()
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
                return self._run_turn(state, prompt, params, images, on_token)
            finally:
                record.busy = False
                record.bytes_held = state.bytes_held()
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

    def _run_turn(self, state, prompt, params, images, on_token) -> TurnResult:
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
        features_before, pending_before = len(state.features), state.pending_images
        try:
            self._add_images(state, images)
            answer, cached = self._generate(state, turn_ids, params, max_new, on_token)
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
        )

    def _generate(self, state, turn_ids, params, max_new, on_token) -> tuple[list[int], int]:
        """Prefill what the cache lacks, then decode; returns (answer ids, cached tokens)."""
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
        while True:
            token = generation.select_next_token(logits, params, None)
            answer.append(token)
            if on_token is not None:
                on_token(token)
            if token in loaded.eos_token_ids or len(answer) >= max_new:
                return answer, cached
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

    def _free(self, session_id: str) -> None:
        self._store.remove(session_id)
        self._states.pop(session_id, None)
        log.info("sessions: %d open, %d bytes held", len(self._store), self.bytes_held())

