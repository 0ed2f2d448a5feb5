"""The tensors of a wave of turns: the executing half of the engine's step.

``start`` runs a wave's new tokens: two or more follow-ups on cached histories go into a decode
arena (runner.DecodeArena) with their history only and prefill there in one forward over their
rows, each history copied once, into the row it decodes in; the others (images, no cached KV)
prefill first on their own caches and join them there. Otherwise each turn prefills on its own:
a lone follow-up without images through the compiled step in its session's own buffers
(runner.prefill_in_place), the rest eagerly, each with one retry after other sessions give
memory back when the allocator fails all the same. ``decoder`` gives the turns that go on a
decoder: a lone compiled turn its session's own buffers (runner.InPlaceRow), else an arena when
the budget has room for it, else each turn on its own cache. ``join`` takes turns that arrive
while a wave decodes, as ``start`` shares. A failing turn goes to ``fail`` and leaves; the others go on.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from llava_sessions.handler.engine import generation, kv_cache
from llava_sessions.handler.engine.api import EngineCounters
from llava_sessions.handler.engine.kv_manager import KVManager
from llava_sessions.handler.engine.model_loader import LoadedModel
from llava_sessions.handler.engine.runner import (
    KEPT_ARENA_ROWS,
    DecodeArena,
    InPlaceRow,
    KeptArena,
    StepRunner,
    arena_bytes,
    arena_size,
)
from llava_sessions.handler.engine.scheduler import kv_growth_tokens
from llava_sessions.handler.engine.state import RunningTurn, cached_tokens, feed, is_out_of_memory

log = logging.getLogger(__name__)

Fail = Callable[[RunningTurn, Exception], None]


class Executor:
    def __init__(self, loaded: LoadedModel, runner: StepRunner, memory: KVManager, counters: EngineCounters,
                 fail: Fail, kept: KeptArena | None = None):
        """``kept``: the engine's kept decode arena (its bytes set aside from the budget), if any."""
        self.loaded, self.runner, self.kept = loaded, runner, kept
        self.memory, self.counters, self.fail = memory, counters, fail

    # --- prefill ----------------------------------------------------------------------

    def start(self, wave: list[RunningTurn]) -> tuple["ArenaDecoder | InPlaceDecoder | AloneDecoder | None",
                                                       list[RunningTurn], torch.Tensor | None]:
        """A wave's new tokens: (the decoder its turns share, or None when each prefilled on its
        own and the caller picks one; the turns prefilled; their next-token logits [B, V]). Two
        or more follow-ups on cached histories share a forward in their arena rows (``join``,
        after the others prefilled on their own caches). A turn that stopped at its first token
        is still in the decoder: ``keep`` lets it leave."""
        together = [running for running in wave if self._joins_prefill(running)]
        if len(together) < 2:
            return (None, *self.prefill(wave))
        rows, logits = self.prefill([running for running in wave if running not in together])
        decoder, joined, joined_logits = self.join(_NO_DECODER, rows, together, spare_rows=False)
        parts = [part for part in (logits, joined_logits) if part is not None]
        return decoder, rows + joined, torch.cat(parts) if parts else None

    def prefill(self, wave: list[RunningTurn]) -> tuple[list[RunningTurn], torch.Tensor | None]:
        """Each turn's new tokens on its own cache: (the turns prefilled, their next-token logits [B, V])."""
        prefilled, first_logits = [], []
        for running in wave:
            try:
                first_logits.append(self._prefill_or_give_back(running))
                prefilled.append(running)
            except Exception as error:
                self.fail(running, error)
        return prefilled, torch.cat(first_logits) if first_logits else None

    def _joins_prefill(self, running: RunningTurn) -> bool:
        """A follow-up on a cached history whose new tokens hold no image: it can share a forward."""
        return cached_tokens(running.state) > 0 and self.loaded.image_token_id not in feed(running)

    def _prefill_or_give_back(self, running: RunningTurn) -> torch.Tensor:
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
        needed = kv_growth_tokens(None, running.context, running.max_new, 0) * self.memory.kv_bytes_per_token
        if self.memory.give_back(needed, running.request.session_id):
            log.warning("out of memory during a prefill; sessions gave memory back, retrying once")
            try:
                return self._prefill(running)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                running.state.cache = None
        raise self.memory.refusal(first)

    def _prefill(self, running: RunningTurn) -> torch.Tensor:
        """Run what the session's cache lacks (history and this turn) on it; return the next-token
        logits [1, V]. Timed for the memory manager's copy-or-prefill cost model."""
        loaded, state = self.loaded, running.state
        full_ids = state.token_ids + running.turn_ids
        if state.cache is None:
            state.cache = generation.new_cache(loaded)
        running.cached = state.cache.get_seq_length()
        new = full_ids[running.cached:]
        # Room for this turn's tokens and what decoding may append (reserved at admission):
        # no copy per token, and none at all when the spare slots of the last turn suffice.
        kv_cache.reserve(state.cache, len(new), running.max_new - 1, running.headroom)
        image_rows = self._image_rows(state, full_ids, running.cached)
        with self.memory.prefill_timing() as sample:
            logits = self.runner.prefill_in_place(state.cache, new) if image_rows is None else None
            self.counters.prefills_compiled += logits is not None
            if logits is None:
                input_ids = torch.tensor([new], device=loaded.device)  # [1, T]
                logits = generation.prefill(loaded, input_ids, image_rows, state.cache)
            sample.amount = len(new)
        self.counters.prefill_tokens += len(new)
        self.counters.step_compiles = self.runner.compiles
        self.counters.cuda_graph_skips = self.runner.graph_skips
        return logits

    def _image_rows(self, state, full_ids: list[int], start: int) -> torch.Tensor | None:
        """Feature rows for the image tokens in full_ids[start:], in placeholder order."""
        image_id = self.loaded.image_token_id
        needed = sum(1 for t in full_ids[start:] if t == image_id)
        if needed == 0:
            return None
        first = sum(1 for t in full_ids[:start] if t == image_id)
        rows = torch.cat(state.features, dim=0)  # [n_images * tokens_per_image, H]
        return rows[first : first + needed]

    # --- decode -----------------------------------------------------------------------

    def decoder(self, rows: list[RunningTurn]) -> "InPlaceDecoder | ArenaDecoder | AloneDecoder":
        """A decoder for these prefilled turns. A lone turn, compiled without CUDA graphs, decodes
        in its session's own buffers. Otherwise an arena, reserved whole: a row that finishes gets
        its KV back (which its turn reserved) while the others still decode in the arena. No room
        for it: each turn decodes on its own cache."""
        if len(rows) == 1 and self.kept is None and self.runner.room_to_decode_in_place(
                rows[0].state.cache, rows[0].max_new - len(rows[0].answer)):
            return InPlaceDecoder(self, rows)
        return self._arena(rows) or AloneDecoder(self, rows)

    def join(self, decoder: "InPlaceDecoder | ArenaDecoder | AloneDecoder", live: list[RunningTurn],
             joined: list[RunningTurn], spare_rows: bool = True) -> tuple["InPlaceDecoder | ArenaDecoder | AloneDecoder",
                                                                          list[RunningTurn], torch.Tensor | None]:
        """Turns that join the ``live`` ones: (a decoder for every row, the joined turns prefilled,
        their next-token logits [J, V]). Follow-ups on cached histories (what joins, usually) go
        into the arena with their history and prefill there, in one forward over their rows: each
        history is copied once, into the row it decodes in (a new arena gets rows to spare for
        later joiners when ``spare_rows`` and the budget plainly has them). The others prefill on
        their own caches first, then join (``regroup``); so do the follow-ups when the budget has
        no room for an arena, or when their shared forward fails. A turn that stopped at its first
        token is still in the decoder: ``keep`` lets it leave."""
        if not all(self._joins_prefill(running) for running in joined):
            return self._join_one_at_a_time(decoder, live, joined)
        feeds = {running.slot: feed(running) for running in joined}  # before the histories move
        for running in joined:
            running.cached = cached_tokens(running.state)
        widest = max(len(tokens) for tokens in feeds.values())
        if not decoder.take(joined, widest):
            self.memory.unreserve(decoder.close(live))
            decoder = self._arena(live + joined, widest, spare_rows)
            if decoder is None:  # no room for an arena: each turn on its own cache
                rows, logits = self.prefill(joined)
                return self.decoder(live + rows), rows, logits
        prefilled = decoder.prefill(joined, feeds)
        if prefilled is not None:
            return (decoder, *prefilled)
        return self._join_one_at_a_time(decoder, live, joined)

    def _join_one_at_a_time(self, decoder, live: list[RunningTurn], joined: list[RunningTurn]):
        """``join`` for turns that prefill on their own caches first, then join (``regroup``)."""
        rows, logits = self.prefill(joined)
        return (self.regroup(decoder, live, rows) if rows else decoder), rows, logits

    def regroup(self, decoder: "InPlaceDecoder | ArenaDecoder | AloneDecoder", live: list[RunningTurn],
                joined: list[RunningTurn]) -> "InPlaceDecoder | ArenaDecoder | AloneDecoder":
        """A decoder for ``live`` and the ``joined`` turns (prefilled): ``decoder`` itself when it
        takes them in (an arena with free rows and slots for them), else a new one for every row,
        after the live turns left ``decoder`` with their KV (its arena's reservation returned)."""
        if decoder.take(joined):
            return decoder
        self.memory.unreserve(decoder.close(live))
        rows = live + joined
        return self._arena(rows, spare_rows=True) or AloneDecoder(self, rows)

    def _arena(self, rows: list[RunningTurn], widest: int = 0, spare_rows: bool = False) -> "ArenaDecoder | None":
        """An arena for these turns (those not prefilled yet will feed up to ``widest`` tokens
        first), reserved whole, or None when the budget has no room for it. ``spare_rows``:
        compiled, with rows to spare for turns that join later, when the budget plainly has them."""
        caches, remaining, _ = _arena_rows(rows, widest)
        lengths, reach = [cache.get_seq_length() for cache in caches.values()], list(remaining.values())
        compiled = self.runner.compiled
        if spare_rows and compiled and self.kept is None:
            if self.memory.reserve_if_free(arena_bytes(self.loaded, lengths, reach, True, min_rows=KEPT_ARENA_ROWS)):
                return ArenaDecoder(self, rows, widest, min_rows=KEPT_ARENA_ROWS)
        if self.kept is not None and self.kept.fits(*arena_size(self.loaded, lengths, reach, compiled)):
            return ArenaDecoder(self, rows, widest)  # its bytes are set aside already
        if self.memory.make_room(arena_bytes(self.loaded, lengths, reach, compiled), None, refuse=False):
            return ArenaDecoder(self, rows, widest)
        return None


class ArenaDecoder:
    """The turns decode together in one fixed-shape arena (runner.py), a token per turn per step."""

    def __init__(self, executor: Executor, rows: list[RunningTurn], widest: int = 0, min_rows: int = 1):
        """``widest``: the most tokens a turn not prefilled yet will feed first (``prefill``)."""
        self._executor = executor
        caches, remaining, rooms = _arena_rows(rows, widest)
        self._arena = DecodeArena(executor.loaded, caches, remaining, executor.runner, rooms, storage=executor.kept,
                                  min_rows=min_rows)

    def bytes_held(self) -> int:
        return self._arena.bytes_held()

    def take(self, joined: list[RunningTurn], widest: int = 0) -> bool:
        """Take turns into free rows of the arena, prefilled or with their history only (feeding
        up to ``widest`` tokens first): False (none taken) when they do not fit."""
        return self._arena.admit(*_arena_rows(joined, widest))

    def prefill(self, joined: list[RunningTurn], feeds: dict[int, list[int]]) -> tuple[list[RunningTurn], torch.Tensor] | None:
        """The turns that joined last, with their history only, feed their new tokens (``feeds``,
        by slot) in their rows: (the turns, their next-token logits [J, V]). None when the forward
        failed: they left the arena with their history (which it does not touch) and prefill again
        one at a time (``Executor.join``), as a shared prefill that fails does."""
        try:
            logits = self._arena.prefill(feeds)
        except Exception as error:
            log.warning("a prefill of %d joining turns in their arena rows failed (%s); each runs alone",
                        len(joined), type(error).__name__)
            self._arena.leave(finished=[running.slot for running in joined])
            return None
        self._executor.counters.prefill_tokens += sum(len(tokens) for tokens in feeds.values())
        return joined, logits

    def close(self, live: list[RunningTurn]) -> int:
        """The live turns leave with their KV; the bytes this arena held (its reservation)."""
        held = self._arena.bytes_held()
        self._arena.leave([running.slot for running in live])
        return held

    def step(self, live: list[RunningTurn]) -> tuple[list[RunningTurn], torch.Tensor | None]:
        """Feed each live turn its last token: (the turns, in the arena's row order; their logits)."""
        executor, by_slot = self._executor, {running.slot: running for running in live}
        rows = [by_slot[slot] for slot in self._arena.keys]
        try:
            logits = self._arena.step({running.slot: running.answer[-1] for running in rows})
        except Exception as error:  # the forward failed: every turn still in the arena fails
            for running in rows:
                executor.fail(running, error)
            self._arena.leave(failed=[running.slot for running in rows])
            return [], None
        executor.counters.decode_tokens += len(rows)
        executor.counters.step_compiles = executor.runner.compiles
        executor.counters.cuda_graph_skips = executor.runner.graph_skips
        return rows, logits

    def keep(self, going: list[RunningTurn], stepped: list[RunningTurn]) -> None:
        """The turns of the last step that do not go on leave: a finished one with its KV, a
        failed one (rolled back: its outcome is set) without."""
        kept = {running.slot for running in going}
        leaving = [running for running in stepped if running.slot not in kept]
        self._arena.leave([r.slot for r in leaving if r.outcome is None], [r.slot for r in leaving if r.outcome is not None])


class InPlaceDecoder:
    """A lone turn decodes in its session's own buffers, compiled (runner.InPlaceRow): no
    arena to fill and empty, and the KV stays where the next turn finds it."""

    def __init__(self, executor: Executor, rows: list[RunningTurn]):
        self._executor = executor
        self._row = InPlaceRow(executor.runner, rows[0].state.cache)

    def bytes_held(self) -> int:
        return 0

    def step(self, live: list[RunningTurn]) -> tuple[list[RunningTurn], torch.Tensor | None]:
        executor, [running] = self._executor, live
        try:
            logits = self._row.step(running.answer[-1])
        except Exception as error:
            executor.fail(running, error)
            return [], None
        executor.counters.decode_tokens += 1
        executor.counters.step_compiles = executor.runner.compiles
        return [running], logits

    def keep(self, going: list[RunningTurn], stepped: list[RunningTurn]) -> None:
        pass  # the KV is in the session's own buffers

    def take(self, joined: list[RunningTurn], widest: int = 0) -> bool:
        return False  # one row only: turns that join need an arena

    def close(self, live: list[RunningTurn]) -> int:
        return 0  # the KV is in the session's own buffers already


class AloneDecoder:
    """Each turn decodes on its session's own cache (no arena): when the budget has no room for one."""

    def __init__(self, executor: Executor, rows: list[RunningTurn]):
        self._executor = executor

    def bytes_held(self) -> int:
        return 0

    def step(self, live: list[RunningTurn]) -> tuple[list[RunningTurn], torch.Tensor | None]:
        executor, stepped, logits = self._executor, [], []
        for running in live:
            try:
                logits.append(generation.decode_one_token(executor.loaded, running.answer[-1], running.state.cache))
            except Exception as error:
                executor.fail(running, error)
                continue
            stepped.append(running)
        executor.counters.decode_tokens += len(stepped)
        return stepped, torch.cat(logits) if logits else None

    def keep(self, going: list[RunningTurn], stepped: list[RunningTurn]) -> None:
        pass  # nothing to hand back: each turn's KV is in its own cache

    def take(self, joined: list[RunningTurn], widest: int = 0) -> bool:
        return True  # each turn decodes on its own cache: any number join

    def prefill(self, joined: list[RunningTurn], feeds: dict[int, list[int]]) -> tuple[list[RunningTurn], torch.Tensor | None]:
        return self._executor.prefill(joined)  # on their own caches (they never left them)

    def close(self, live: list[RunningTurn]) -> int:
        return 0


class _NoDecoder:
    """Before a wave's first forward: no decoder holds its turns yet (Executor.start)."""

    def take(self, joined: list[RunningTurn], widest: int = 0) -> bool:
        return False

    def close(self, live: list[RunningTurn]) -> int:
        return 0


_NO_DECODER = _NoDecoder()


def _arena_rows(rows: list[RunningTurn], widest: int = 0) -> tuple[dict, dict, dict]:
    """An arena's view of turns, by slot: their caches, the tokens each may still feed
    (``_still_to_feed``), and the spare slots each cache gets back behind its KV (kv_cache's headroom)."""
    return ({running.slot: running.state.cache for running in rows},
            {running.slot: _still_to_feed(running, widest) for running in rows},
            {running.slot: kv_cache.most_spare(running.headroom) for running in rows})


def _still_to_feed(running: RunningTurn, widest: int) -> int:
    """Tokens a turn may still write into its row: what its cache lacks (none once prefilled;
    padded to ``widest`` when it prefills in the arena, DecodeArena.prefill), then every token of
    its answer but the last."""
    if running.answer:  # picked, not all fed yet
        return running.max_new - len(running.answer)
    return max(widest, len(feed(running)) + running.max_new - 1)
