"""Which turns run, and what their outputs mean: the scheduling half of the engine's step.

``admit`` starts the turns that fit the memory budget now (checks, worst-case reservation,
images encoded) and defers the rest to a later wave: "no room" comes back from the memory
manager as a value and becomes a deferral, or a refusal for a turn that would not fit even
alone. ``update`` takes a step's logits, picks each turn's next token on the device and sends
it; ``complete`` commits finished turns to their sessions' histories and undoes cancelled ones;
``release`` hands every turn's session back, whatever happened. The tensors are the executor's.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping, Sequence

from transformers import DynamicCache

from llava_sessions.config import ServingConfig
from llava_sessions.errors import PromptTooLong, SessionBusy, SessionNotFound, TurnCancelled
from llava_sessions.handler.engine import kv_cache, sampling
from llava_sessions.handler.engine.api import EngineCounters, TurnRequest, TurnResult
from llava_sessions.handler.engine.detokenizer import IncrementalDetokenizer
from llava_sessions.handler.engine.kv_manager import KVManager
from llava_sessions.handler.engine.model_loader import LoadedModel
from llava_sessions.handler.engine.prompt import Conversation, TurnFormatter
from llava_sessions.handler.engine.session_store import SessionStore
from llava_sessions.handler.engine.history import cut_kv, plan_turn, replace_history
from llava_sessions.handler.engine.state import RunningTurn, SessionState, cached_tokens, is_out_of_memory

log = logging.getLogger(__name__)


class Scheduler:
    """Turns in and out of a ``SessionEngine.turns`` call; the engine's lock covers every call."""

    def __init__(self, loaded: LoadedModel, config: ServingConfig, formatter: TurnFormatter, store: SessionStore,
                 states: Mapping[str, SessionState], memory: KVManager, counters: EngineCounters,
                 clock: Callable[[], float], add_images: Callable[[SessionState, Sequence], None],
                 expire: Callable[[float], int]):
        self.loaded, self.config, self.formatter = loaded, config, formatter
        self._store, self._states, self._memory, self._counters = store, states, memory, counters
        self._clock, self._add_images, self._expire = clock, add_images, expire

    # --- schedule ---------------------------------------------------------------------

    def distinct(self, requests: Sequence[TurnRequest], results: list) -> list[int]:
        """The requests' slots, one per session: a second turn of a session gets SessionBusy."""
        pending, seen = [], set()
        for slot, request in enumerate(requests):
            if request.session_id in seen:
                results[slot] = SessionBusy(
                    "another turn of this session is in the same batch; send the next turn after its answer"
                )
            else:
                seen.add(request.session_id)
                pending.append(slot)
        return pending

    def admit(self, requests: Sequence[TurnRequest], slots: list[int], results: list,
              started: float) -> tuple[list[RunningTurn], list[int]]:
        """Start the turns of ``slots`` that fit together: (the wave, the slots deferred to a later
        one). A turn that fails its checks gets its error in ``results`` and starts nothing."""
        wave: list[RunningTurn] = []
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
                    self._counters.turns_deferred += 1
                else:
                    wave.append(running)
            if len(wave) == 1:
                self.grant_headroom(wave[0])
        except BaseException:
            self.release(wave)
            raise
        return wave, deferred

    def _start_turn(self, slot: int, request: TurnRequest, started: float, may_defer: bool) -> RunningTurn | None:
        """Check a turn, reserve its worst-case memory and encode its images; None: deferred (no room now).

        A turn that rewinds its session or brings a history (history.plan_turn) replaces the
        session's history here, after its reservation: the ids and KV it keeps, then its own
        ids. The turn's RunningTurn keeps what was replaced, for ``roll_back``.
        """
        session_id = request.session_id
        if request.cancelled is not None and request.cancelled():  # gone while it waited: never starts
            raise TurnCancelled()
        record, state = self._checkout(session_id)
        try:
            # Each image's placeholder count: the rows of those the session holds, and the
            # adapter's count for new ones (generation.encode_images checks it).
            plan = plan_turn(self.loaded, self.formatter, self.config.max_images_per_session, state, request)
            keep = plan.keep(state)
            context = keep + len(plan.turn_ids)
            if context + 1 > self.loaded.max_context:
                raise PromptTooLong(
                    f"the conversation would be {context} tokens; this model's context is "
                    f"{self.loaded.max_context}. Open a new session or ask a shorter question"
                )
            max_new = min(request.params.max_new_tokens, self.loaded.max_context - context)
            # Worst case before running: the KV grows by what it lacks (from where the turn cuts
            # it) plus every decoded token, added images add features (a held one reused in a
            # new place too: each place is accounted), and cold features come back.
            needed = self._memory.feature_bytes([slot.tokens for slot in plan.images])
            if state.features_on_host:
                needed += state.feature_bytes()
            growth = kv_growth_tokens(state.cache, context - min(cached_tokens(state), keep), max_new, 0)
            needed += growth * self._memory.kv_bytes_per_token
            if not self._memory.make_room(needed, session_id, refuse=not may_defer):
                record.busy = False  # untouched; it runs in the next wave
                return None
            if plan.history is not None:
                cut_kv(state, keep)  # before bring_back: a host KV comes back only as far as it is kept
            self._memory.bring_back(record, state, context)
            running = RunningTurn(
                slot, request, record, state, plan.turn_ids, plan.n_images, context, max_new,
                features_before=len(state.features), pending_before=state.pending_images, started=started,
            )
            held = state.features  # the features the plan's held images index (on the device now)
            try:
                if plan.history is not None:
                    running.saved = replace_history(state, plan.history)
                    running.features_before = len(state.features)
                self._add_images(state, plan.images, held)
            except BaseException:
                roll_back(running)
                raise
            return running
        except BaseException:
            record.busy = False
            self._memory.account(record, state)
            self._store.touch(record, self._clock())
            raise

    def join(self, slot: int, request: TurnRequest, started: float) -> RunningTurn | None:
        """Start a turn that asks to join the running call (api.Joiners): its RunningTurn, or None
        when it cannot now (its session has a turn running, or no memory room beside the running
        turns), nothing touched. A turn that fails its checks raises its error."""
        record = self._store.lookup(request.session_id)
        if record is not None and record.busy:
            return None
        running = self._start_turn(slot, request, started, may_defer=True)
        if running is not None:
            running.joined = True
            self._counters.turns_joined += 1
        return running

    def _checkout(self, session_id: str):
        now = self._clock()
        record = self._store.lookup(session_id)
        if record is None or record.expires_at <= now:
            if record is not None:
                self._expire(now)
            raise SessionNotFound()
        if record.busy:
            raise SessionBusy("a turn of this session is still running; wait for it to finish")
        record.busy = True
        return record, self._states[session_id]

    def grant_headroom(self, running: RunningTurn) -> None:
        """Spare KV slots after a lone turn (kv_headroom_tokens), so the session's next question
        appends in place: only from budget that is plainly free (a quarter of it stays so), so
        they never cost another session its memory; a batch's rows get none (its padding may need it)."""
        state, headroom = running.state, self.config.kv_headroom_tokens
        feed = running.context - cached_tokens(state)
        extra = (kv_growth_tokens(state.cache, feed, running.max_new, headroom)
                 - kv_growth_tokens(state.cache, feed, running.max_new, 0)) * self._memory.kv_bytes_per_token
        if headroom and self._memory.reserve_spare(extra):
            running.headroom = headroom

    # --- update -----------------------------------------------------------------------

    def update(self, rows: list[RunningTurn], logits) -> list[RunningTurn]:
        """Pick each row's next token from a step's logits [B, V] (one copy of B ids to the host)
        and send it; the rows that go on. A row whose callback fails is rolled back alone."""
        if not rows:
            return []
        # Only turns with a repetition penalty or stop strings have controls (made at their first pick).
        controls = [controls_for(running, self.loaded.tokenizer, logits) for running in rows]
        seen = [c.seen if c is not None else None for c in controls]
        tokens = sampling.pick(logits, [running.request.params for running in rows], self.loaded.image_token_id,
                               seen=seen)
        for control, token in zip(controls, tokens):
            if control is not None:
                control.saw(token)
        going = []
        # In the turns' own order (an arena's rows move as others leave): callbacks stay in order.
        for running, token in sorted(zip(rows, tokens), key=lambda pair: pair[0].slot):
            try:
                if self._accept(running, token):
                    going.append(running)
            except Exception as error:
                self.fail(running, error)
        return going

    def _accept(self, running: RunningTurn, token: int) -> bool:
        """The turn's next token: record it and send it; True while the turn goes on.

        A turn whose client is gone stops here, its token unsent (``_undo`` follows); one past its
        deadline stops with this token as its last.

        A turn with stop strings stops at the token whose text completes the first of them in the
        answer's text (decoded with skip_special_tokens): that token is the last ``on_token`` gets,
        with last=True, and the last of the result's token_ids; the result's text ends before the
        stop string (``_finish``). A token's text is what the incremental detokenizer gives for it,
        so a token that ends inside a UTF-8 character completes nothing until the one that finishes
        the character. A stop string completed by the token that also reaches max_new_tokens stops
        the turn as "stop". A streamer that must not show the stop string holds back any text that
        could begin one until a later token rules it out or the turn ends.
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
        control = turn_controls(running)
        if control is not None and control.stops is not None and control.stops.push(token):
            running.stopped_by, goes_on = "stop", False
        elif goes_on and request.deadline is not None and time.monotonic() >= request.deadline:
            running.stopped_by, goes_on = "deadline", False
        if request.on_token is not None:
            request.on_token(token, not goes_on)
        return goes_on

    def fail(self, running: RunningTurn, error: Exception) -> None:
        """The turn failed: its session is as before it; an allocator failure is a refusal."""
        roll_back(running)
        if is_out_of_memory(error):  # during decoding: refused, never an internal error
            error = self._memory.refusal(type(error).__name__)
        running.outcome = error

    def complete(self, wave: list[RunningTurn]) -> None:
        """Every turn of ``wave`` without an outcome is done: committed, or undone when cancelled
        (mid-wave: turns that stopped at this step, their KV back in their own caches)."""
        for running in wave:
            if running.outcome is None:
                running.outcome = self._undo(running) if running.stopped_by == "cancelled" else self._finish(running)

    def tell(self, wave: list[RunningTurn], others_run: bool) -> None:
        """While other turns of the call still run, give each turn of ``wave`` whose outcome is
        known its outcome, once (TurnRequest.on_done): its answer need not wait for theirs. A turn
        that joined the call is told in any case (the call's return value does not hold it)."""
        for running in wave:
            if running.outcome is None or running.told or not (others_run or running.joined):
                continue
            running.told = True
            tell(running.request, running.outcome)

    def release(self, wave: list[RunningTurn]) -> None:
        """Hand the wave's sessions back (a turn without an outcome, when something other than an
        Exception propagated, is rolled back) and end its reservation."""
        self._memory.release()
        for running in wave:
            if running.outcome is None:
                roll_back(running)
            running.record.busy = False
            self._memory.account(running.record, running.state)
            self._store.touch(running.record, self._clock())

    def _finish(self, running: RunningTurn) -> TurnResult:
        """Commit a finished turn to its session's history.

        A turn stopped by a stop string answers, and records in its conversation, its text cut
        before the stop string (clients send that text back as the conversation); its history
        keeps every token it generated, the stop string's too, closed as an answer cut short is.
        """
        state, answer = running.state, running.answer
        # Between turns a session holds its tokens and at most the spare slots reserved for it.
        kv_cache.trim(state.cache, running.headroom)
        text = self.loaded.tokenizer.decode(answer, skip_special_tokens=True)
        if running.stopped_by == "stop":
            text = text_before_stop(text, turn_controls(running).stops)
        if answer and answer[-1] in self.loaded.eos_token_ids:
            finish = "stop"
        else:
            finish = running.stopped_by or "length"
        self._counters.turns_past_deadline += finish == "deadline"
        state.token_ids.extend(running.turn_ids)
        state.token_ids.extend(answer)
        state.token_ids.extend(self.formatter.closing_ids(answer, self.loaded.eos_token_ids))
        state.conversation.messages.append(state.conversation.user_message(running.request.prompt, running.n_images))
        state.conversation.messages.append(Conversation.assistant_message(text))
        state.turn_ends.append(len(state.token_ids))
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
            stop_sequence=finish == "stop" and running.stopped_by == "stop",
        )

    def _undo(self, running: RunningTurn) -> TurnCancelled:
        """A turn whose client went away: the session is as before it, the history's KV kept
        (cut back to what the turn kept of the history), so the next turn prefills only the rest."""
        state = running.state
        cache = state.cache
        kept = len(state.token_ids)  # a rewind or a history may have cut it: the KV holds only these
        roll_back(running)
        if cache is not None:
            kv_cache.truncate(cache, min(kept, cache.get_seq_length()))
            kv_cache.trim(cache, running.headroom)
            state.cache = cache
        self._counters.turns_cancelled += 1
        return TurnCancelled()


def tell(request: TurnRequest, outcome) -> None:
    """A turn's outcome to its ``on_done``, if it has one."""
    if request.on_done is None:
        return
    try:
        request.on_done(outcome)
    except Exception:  # the outcome stands; the call's return value has it too (unless it joined)
        log.exception("a turn's on_done callback failed")


def roll_back(running: RunningTurn) -> None:
    """Leave the session as it was before this turn, a history it cut or replaced restored; the
    KV is rebuilt next turn."""
    state = running.state
    if running.saved is not None:
        running.saved.restore(state)
        running.saved = None
    else:
        del state.features[running.features_before:]
        del state.image_digests[running.features_before:]
        state.pending_images = running.pending_before
    state.cache = None


def kv_growth_tokens(cache: DynamicCache | None, feed: int, max_new: int, headroom: int) -> int:
    """The most token slots a turn can add to the session's KV: ``feed`` tokens prefilled and
    ``max_new - 1`` fed back by decoding, with ``headroom`` spare after (kv_cache.reserve).
    Counted as ``max_new``: the last token is never fed, one to spare."""
    return kv_cache.growth_tokens(cache, feed, max_new, headroom)


# --- sampling controls: repetition penalty and stop strings (SamplingParams) --------------


class StopStrings:
    """Finds the first of a turn's stop strings in its answer's text as its tokens come.

    Each token's text comes from the incremental detokenizer (never a broken character, nor a
    leading space the token would not have in the whole answer), and only where a stop string
    could end is searched: the token's new text and the (longest stop string - 1) characters
    before it, which is all that is kept. Per token: the detokenizer's two decodes of a few ids.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.stops = stops
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self._keep = max(len(stop) for stop in stops) - 1
        self._tail = ""  # the answer's text from character _offset on
        self._offset = 0
        self.found: int | None = None  # where the first stop string starts in the answer's text

    def push(self, token: int) -> bool:
        """Add the answer's next token; True when its text completes a stop string."""
        new = self._detokenizer.push(token)
        if not new:
            return False
        before = len(self._tail)
        tail = self._tail + new
        # Not found before: an occurrence ends in the new text, so starts at most len - 1 before it.
        starts = [at for stop in self.stops if (at := tail.find(stop, max(0, before - len(stop) + 1))) >= 0]
        if starts:
            self.found = self._offset + min(starts)
            return True
        cut = max(0, len(tail) - self._keep)
        self._tail, self._offset = tail[cut:], self._offset + cut
        return False


class TurnControls:
    """A turn's state for its repetition penalty (``seen``: bool [V] on the device) and its stop
    strings (``stops``), made at its first pick; a turn that uses neither has none."""

    def __init__(self, running: RunningTurn, tokenizer, vocab: int, device):
        params = running.request.params
        # Every id of the context the answer is conditioned on (history and this turn's prompt),
        # as transformers' generate penalises its input_ids.
        self.seen = (sampling.seen_mask(running.state.token_ids + running.turn_ids, vocab, device)
                     if params.repetition_penalty != 1.0 else None)
        self.stops = StopStrings(tokenizer, params.stop) if params.stop else None

    def saw(self, token: int) -> None:
        """The turn picked ``token``: penalised from the next pick on (a device write, no sync)."""
        if self.seen is not None:
            self.seen[token] = True


def controls_for(running: RunningTurn, tokenizer, logits) -> TurnControls | None:
    """The turn's controls, made at its first pick (the logits [B, V] give V and the device);
    None for a turn with neither a repetition penalty nor stop strings."""
    params = running.request.params
    if params.repetition_penalty == 1.0 and not params.stop:
        return None
    control = turn_controls(running)
    if control is None:
        # Kept on the turn itself, so it goes when the turn does, however it ends.
        control = running.controls = TurnControls(running, tokenizer, logits.shape[-1], logits.device)
    return control


def turn_controls(running: RunningTurn) -> TurnControls | None:
    return running.controls


def text_before_stop(text: str, stops: StopStrings) -> str:
    """The answer's text cut before the first stop string in it (the earliest start among them)."""
    starts = [at for stop in stops.stops if (at := text.find(stop)) >= 0]
    # Where the whole decode and the detokenizer's pieces disagree, the detokenizer's place.
    return text[: min(starts)] if starts else text[: stops.found]
