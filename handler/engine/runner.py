"""Decode running turns in fixed-shape steps over a KV arena allocated once.

The arena holds, per layer, keys and values [R, kv_heads, L, head_dim]: R rows (one per running
turn), L token slots. A row holds its session's KV from slot 0 and writes each new token at its
own position, so rows of different lengths share a step with no padding to move and no mask to
grow: attention reads the first ``Lb`` slots of every row, and a boolean mask made from the rows'
positions (slot <= position) hides what a row has not written. Eager, a step reads only the slots
the longest row has written. Compiled, it reads those rounded up to SLOT_ALIGN (CUDA_SLOT_ALIGN
with CUDA graphs, which record one graph per slot count; never past the arena, which is sized to
the longest reach of its rows), the rows come in buckets (powers of two) and the slot count is a
dynamic dimension of the graph, so there is one graph per row bucket, reused across sessions,
history lengths and rows joining and leaving; rows beyond the live ones feed a placeholder at
position 0 and are ignored. The arena is the engine's ``KeptArena`` when the rows fit it (views of buffers
allocated once), else its own buffers. (Slot buckets of powers of
two cost up to twice the attention: measured on 2 CPU cores, 8 rows over 1,024 slots took 12.1 ms
a step against 8.3 over 768; a dynamic slot dimension costs nothing measurable.)

    arena.keys[layer]: [R, H, L, D]     positions: [R] (the slot each row writes next)
    step: tokens [B, 1] at positions [B, 1] -> logits [B, V]; mask [B, 1, 1, Lb]

A step allocates nothing and syncs nothing with the host: the caller copies the B picked ids to
the host once (sampling.py). Rows join by copying their session's KV in (the session's cache is
emptied, so it is held once) and leave by copying it back out, exact-sized; the last row moves
into a leaving row's place, so the live rows stay rows 0..n-1 and the others are not touched.
Rows that join with their history only prefill their new tokens in their rows, in one eager
forward (``DecodeArena.prefill``): each history is copied once, into the row it decodes in.

``StepRunner`` wraps the step in ``torch.compile(fullgraph=True)``: inductor on a CPU, CUDA
graphs (``mode="reduce-overhead"``) on a GPU for decode steps in the engine's ``KeptArena`` (a
captured step may write its KV in place only at static addresses). A follow-up's prefill into its
session's spare slots is compiled too, never captured. A step that fails to compile or capture
falls back to eager once, with one log line.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Hashable

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from llava_sessions.handler.engine import generation, kv_cache
from llava_sessions.handler.engine.model_loader import LoadedModel

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
SLOT_ALIGN = 64  # compiled, a step reads a multiple of this many slots...
CUDA_SLOT_ALIGN = 256  # ...and with CUDA graphs of this many: one recording per bucket of slots
MAX_GRAPHS = 64  # compiled step graphs a worker may hold (one per row bucket, and recompiles)
MAX_COMPILED_FEED = 256  # a follow-up with more new tokens prefills eagerly


def _fits_in_place(cache: DynamicCache, tokens: int) -> bool:
    """Can a step write ``tokens`` more into the session's own buffers, every view short of the
    whole buffer (allocated_slots)? Buffers that cannot hold them move first into the bigger ones
    their turn planned (AppendLayer.make_room_for), the move an eager forward's append makes."""
    layers = cache.layers
    if cache.get_seq_length() == 0 or not all(isinstance(layer, kv_cache.AppendLayer) for layer in layers):
        return False
    for layer in layers:
        layer.make_room_for(tokens)
    return kv_cache.spare_tokens(cache) > tokens


def row_bucket(rows: int) -> int:
    for bucket in ROW_BUCKETS:
        if rows <= bucket:
            return bucket
    raise ValueError(f"at most {ROW_BUCKETS[-1]} rows decode together, got {rows}")


def aligned_slots(slots: int, limit: int, align: int = SLOT_ALIGN) -> int:
    """``slots`` rounded up to ``align``, capped at ``limit``."""
    return min(-(-slots // align) * align, max(limit, slots))


def slot_align(loaded: LoadedModel) -> int:
    return CUDA_SLOT_ALIGN if loaded.device.type == "cuda" else SLOT_ALIGN


class _ArenaLayer(CacheLayerMixin):
    """One layer's keys and values for one step bucket: views of the arena's buffers."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, where: "_StepCache"):
        super().__init__()
        self.keys, self.values, self.where = keys, values, where
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the buffers exist already
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: [B, H, T, D] -> row b's token t at slot positions[b, t]
        rows, slots = self.where.rows, self.where.slots  # [B, 1], [B, T]
        self.keys[rows, :, slots] = key_states.transpose(1, 2)  # indexed: [B, T, H, D]
        self.values[rows, :, slots] = value_states.transpose(1, 2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0  # positions are given explicitly; nothing asks

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2], 0

    def get_max_length(self) -> int:
        return self.keys.shape[-2]

    def get_max_cache_shape(self) -> int:
        return self.keys.shape[-2]


class _StepCache(Cache):
    """The arena as a transformers Cache for one (B, Lb) bucket; ``rows``/``slots`` say where a
    step writes (set by the step itself, so a compiled step traces them)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], dynamic_slots: bool = False):
        if dynamic_slots:  # one compiled graph for every slot count
            for tensor in keys + values:
                torch._dynamo.mark_dynamic(tensor, 2)
        self.rows: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        super().__init__(layers=[_ArenaLayer(k, v, self) for k, v in zip(keys, values)])


class StepRunner:
    """Runs decode steps, compiled or eager: one per engine, shared by its arenas, so a bucket's
    graph is compiled once. ``compile``: "on" or "off" (the engine resolves "auto")."""

    def __init__(self, loaded: LoadedModel, compile: str = "off"):
        self.loaded = loaded
        self.compiled = compile == "on"
        self.compiles = 0  # step graphs compiled: a bucket's first step, or a recompile
        self.graph_skips = 0  # on CUDA, compiled graphs that inductor ran without a CUDA graph
        self._steps: dict[bool, Callable] = {}  # by whether it is captured as CUDA graphs
        # Looked up outside a trace, for every module that takes a cache: a compiled step guards
        # on the lookup table, and a later first lookup would invalidate its graphs.
        for module in (loaded.model, loaded.model.model.language_model):
            generation.cache_argument(module, None)

    @torch.inference_mode()
    def warm_up(self, max_rows: int, seconds: float, kept: "KeptArena | None" = None) -> list[int]:
        """Compile the step before the worker says it is ready, until ``seconds`` have passed: a
        decode step of one row, the follow-up prefill, then the other row buckets, fewest rows
        first. The row buckets compiled; anything else compiles on first use (``compiles``
        counts it). Run in inference mode, as the engine's turns are: the graphs guard on it."""
        if not self.compiled:
            return []
        shape, started, done = ArenaShape.of(self.loaded), time.perf_counter(), []
        align = slot_align(self.loaded)
        slots = aligned_slots(min(2 * align, self.loaded.max_context), self.loaded.max_context, align)
        like = dict(dtype=self.loaded.dtype, device=self.loaded.device)
        for rows in [bucket for bucket in ROW_BUCKETS if bucket <= row_bucket(max_rows)]:
            if time.perf_counter() - started >= seconds or not self.compiled:
                break
            ids = torch.zeros(rows, 1, dtype=torch.long, device=self.loaded.device)
            positions = torch.zeros(rows, 1, dtype=torch.long, device=self.loaded.device)
            if kept is not None and kept.fits(rows, slots):  # the very views later steps use
                cache = kept.step_cache(rows, slots, dynamic_slots=True)
            else:  # views, as an arena's steps read (allocated_slots)
                buffers = [torch.zeros(rows, shape.kv_heads, allocated_slots(slots, True), shape.head_dim, **like)[:, :, :slots]
                           for _ in range(2 * shape.layers)]
                cache = _StepCache(buffers[::2], buffers[1::2], dynamic_slots=True)
            self.run(ids, positions, cache)
            done.append(rows)
            if rows == 1 and time.perf_counter() - started < seconds:  # a session of half the slots
                cache = generation.new_cache(self.loaded)
                for layer in cache.layers:
                    layer.adopt(*(torch.zeros(1, shape.kv_heads, slots, shape.head_dim, **like) for _ in range(2)),
                                slots // 2)
                self.prefill_in_place(cache, [0] * 17)
        log.info("step warm-up: decode row bucket(s) %s and the follow-up prefill compiled in %.0f s (limit %.0f s)",
                 done, time.perf_counter() - started, seconds)
        return done

    def run(self, ids: torch.Tensor, positions: torch.Tensor, cache: "_StepCache",
            last: torch.Tensor | None = None, graphs: bool = True) -> torch.Tensor:
        """ids [B, T] at positions [B, T] -> logits [B, V] of each row's token ``last`` [B]
        (default: the last column). ``graphs``: on CUDA, capture the step as CUDA graphs (its
        KV must then be at static addresses: KeptArena)."""
        if last is None:
            last = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
        if self.compiled:
            try:
                return self._run_compiled(ids, positions, cache, last, graphs and self.loaded.device.type == "cuda")
            except Exception as error:  # noqa: BLE001 - any compile or capture failure falls back
                log.warning("the compiled step failed (%s: %s); running eagerly from now on",
                            type(error).__name__, str(error)[:200])
                self.compiled = False
        return generation.step(self.loaded, ids, positions, cache, last)

    @torch.inference_mode()
    def prefill_in_place(self, cache: DynamicCache, feed: list[int]) -> torch.Tensor | None:
        """Compiled: a follow-up's new tokens (no images) on its session's own cache, written into
        the spare slots of its buffers (which first move into bigger ones, the move an eager
        prefill would make, when they cannot hold them); the last token's logits [1, V]. None
        when the step is not compiled or the tokens do not fit even so (no room was planned):
        the caller prefills eagerly. One graph for every feed and history length (both
        dimensions are dynamic). Never as CUDA graphs: a session's buffers have no static address."""
        layers = cache.layers
        if not self.compiled or not 2 <= len(feed) <= MAX_COMPILED_FEED or not _fits_in_place(cache, len(feed)):
            return None
        length, device = cache.get_seq_length(), self.loaded.device
        ids = torch.tensor([feed], device=device)  # [1, T]
        positions = torch.arange(length, length + len(feed), device=device)[None, :]  # [1, T]
        for tensor in (ids, positions):
            torch._dynamo.mark_dynamic(tensor, 1)
        # Attention reads the slots the history and the new tokens fill, not the spare ones behind
        # them: views of the buffers (their strides are symbolic too, so still one graph).
        end = length + len(feed)
        buffers = [layer.buffers() for layer in layers]
        step_cache = _StepCache([k[:, :, :end] for k, _ in buffers], [v[:, :, :end] for _, v in buffers],
                                dynamic_slots=True)
        logits = self.run(ids, positions, step_cache, graphs=False)
        for layer in layers:
            layer.advance(end)
        return logits

    @torch.inference_mode()
    def room_to_decode_in_place(self, cache: DynamicCache, steps: int) -> bool:
        """Compiled, and not as CUDA graphs (which want an arena's static addresses): can a lone
        turn decode ``steps`` tokens in its session's own buffers (``InPlaceRow``)? They move
        first into the buffer their turn planned (AppendLayer.make_room_for), as an eager step's
        append would at the turn's first decode step."""
        return self.compiled and self.loaded.device.type != "cuda" and _fits_in_place(cache, steps)

    def _run_compiled(self, ids, positions, cache, last, graphs: bool) -> torch.Tensor:
        step = self._steps.get(graphs)
        if step is None:
            # One graph per row bucket, and the prefill's: more than dynamo's default of 8 per function.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MAX_GRAPHS)
            loaded = self.loaded
            if graphs:
                def captured_step(i, p, c, n):
                    return generation.step(loaded, i, p, c, n)
                step = torch.compile(captured_step, fullgraph=True, dynamic=False, mode="reduce-overhead")
            else:
                def compiled_step(i, p, c, n):
                    return generation.step(loaded, i, p, c, n)
                step = torch.compile(compiled_step, fullgraph=True, dynamic=False)
            self._steps[graphs] = step
        started, before, skips = time.perf_counter(), graphs_compiled(), graph_skips()
        logits = step(ids, positions, cache, last)
        made = graphs_compiled() - before
        if made:
            self.compiles += made
            log.info("compiled the step for %d row(s) of %d token(s) in %.1f s",
                     ids.shape[0], ids.shape[1], time.perf_counter() - started)
        skipped = graph_skips() - skips
        if skipped:
            # Inductor runs a graph whose inputs it cannot capture (KV buffers written in place
            # without a static address) compiled but without a CUDA graph: say so, once per graph.
            self.graph_skips += skipped
            log.warning("CUDA graphs: %d step graph(s) run compiled without capture (see the inductor log)", skipped)
        return logits.clone()  # a CUDA graph's output is overwritten by its next replay


class InPlaceRow:
    """A lone turn's decode steps in its session's own buffers (after
    ``StepRunner.room_to_decode_in_place``): each token's KV written at the next slot, through the
    decode graph of one row. Its views of the buffers look like an arena's: the slots written,
    rounded up to SLOT_ALIGN, never the whole buffer; one view per bucket of slots."""

    def __init__(self, runner: StepRunner, cache: DynamicCache):
        self.runner, self.cache = runner, cache
        self._buffers = [layer.buffers() for layer in cache.layers]
        self._length = cache.get_seq_length()
        device = runner.loaded.device
        self._positions = torch.full((1, 1), self._length, dtype=torch.long, device=device)  # [1, 1]
        self._last = torch.zeros(1, dtype=torch.long, device=device)  # the step's one token: index 0
        self._view: _StepCache | None = None
        self._view_slots = 0

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Feed ``token``; its next-token logits [1, V]."""
        capacity = self._buffers[0][0].shape[-2]
        slots = aligned_slots(self._length + 1, capacity - 1, slot_align(self.runner.loaded))
        if slots != self._view_slots:
            self._view = _StepCache([k[:, :, :slots] for k, _ in self._buffers],
                                    [v[:, :, :slots] for _, v in self._buffers], dynamic_slots=True)
            self._view_slots = slots
        ids = torch.tensor([[token]], device=self._positions.device)  # [1, 1]
        logits = self.runner.run(ids, self._positions, self._view, self._last, graphs=False)
        self._length += 1
        self._positions += 1
        for layer in self.cache.layers:
            layer.advance(self._length)
        return logits


class DecodeArena:
    """The decode state of a group of prefilled turns; rows are named by caller-chosen keys.

    Built with each row's (prefilled) cache and how many more tokens it may feed; ``step``
    feeds every live row a token; ``leave`` lets rows go (finished ones get their KV back).
    """

    def __init__(self, loaded: LoadedModel, rows: dict[Hashable, DynamicCache], remaining: dict[Hashable, int],
                 runner: StepRunner, rooms: dict[Hashable, int] | None = None, storage: "KeptArena | None" = None,
                 min_rows: int = 1):
        """``rooms``: spare slots a finished row's cache gets behind its KV (kv_cache's headroom).
        ``storage``: the engine's kept arena, used when these rows fit it (``KeptArena.fits``);
        otherwise the arena allocates its own buffers, compiled at least ``min_rows`` rows."""
        if not rows:
            raise ValueError("an arena needs at least one row")
        self.loaded, self.runner = loaded, runner
        self.shape = ArenaShape.of(loaded)
        self.caches = dict(rows)
        self.rooms = dict(rooms or {})
        lengths = {key: cache.get_seq_length() for key, cache in rows.items()}
        if min(lengths.values()) == 0:
            raise ValueError("every row needs a non-empty cache (prefill first)")
        self.bucketed = runner.compiled
        self.rows, self.slots = arena_size(loaded, list(lengths.values()), [remaining[k] for k in rows], self.bucketed,
                                           min_rows)
        self.storage = storage if storage is not None and storage.fits(self.rows, self.slots) else None
        if self.storage is not None:  # views of the kept buffers: the same addresses and strides every wave
            self._keys, self._values = self.storage.keys, self.storage.values
            self.rows, self.slots = self.storage.rows, self.storage.slots  # all of it, for turns that join
        else:
            like = dict(dtype=loaded.dtype, device=loaded.device)
            buffer = (self.rows, self.shape.kv_heads, allocated_slots(self.slots, self.bucketed), self.shape.head_dim)
            self._keys = [torch.zeros(buffer, **like) for _ in range(self.shape.layers)]
            self._values = [torch.zeros(buffer, **like) for _ in range(self.shape.layers)]
        self._positions = torch.zeros(self.rows, dtype=torch.long, device=loaded.device)  # [R]
        self._last = torch.zeros(self.rows, dtype=torch.long, device=loaded.device)  # a step's one token: index 0
        self._caches: dict[tuple[int, int], _StepCache] = {}
        self.keys: list[Hashable] = []  # the live rows, in row order
        self._lengths: list[int] = []  # host mirror of their positions
        for key, cache in rows.items():
            self._join(key, cache)

    def __len__(self) -> int:
        return len(self.keys)

    def bytes_held(self) -> int:
        """Bytes of the buffers this arena allocated (0 in the kept arena: the engine holds those)."""
        if self.storage is not None:
            return 0
        return sum(b.numel() * b.element_size() for b in self._keys + self._values)

    @torch.inference_mode()
    def step(self, tokens: dict[Hashable, int]) -> torch.Tensor:
        """Feed each live row its token; the live rows' next-token logits [n, V], in row order."""
        n = len(self.keys)
        if self.bucketed:  # the slots the longest row reaches, in whole buckets of slots: one graph for all
            align = slot_align(self.loaded)
            batch, slots = row_bucket(n), aligned_slots(max(self._lengths) + 1, self.slots, align)
        else:
            batch, slots = n, max(self._lengths) + 1
        ids = torch.zeros(batch, 1, dtype=torch.long)
        ids[:n, 0] = torch.tensor([tokens[key] for key in self.keys])
        logits = self.runner.run(ids.to(self.loaded.device), self._positions[:batch, None],
                                 self._step_cache(batch, slots), self._last[:batch])
        self._positions[:n] += 1  # the live rows' next slots; the spare rows stay at 0
        self._lengths = [length + 1 for length in self._lengths]
        return logits[:n]

    @torch.inference_mode()
    def prefill(self, feeds: dict[Hashable, list[int]]) -> torch.Tensor:
        """Feed the last rows to join (with their history only) their new tokens, in one eager
        forward over those rows: their next-token logits [J, V], in row order.

        Row j's tokens go to its next slots, right-padded to the longest feed: the padding's KV
        lands in slots past the row's tokens, which its next step writes before any token reads
        them (a step writes its slot, then attends up to it). Nothing else is copied: each row's
        history is already in place. Eager, as a multi-token forward is compute on a CPU; a
        compiled one would need a graph per (rows, tokens) shape."""
        keys = list(feeds)
        first = len(self.keys) - len(keys)
        if first < 0 or self.keys[first:] != keys:
            raise ValueError("only the rows that joined last can be prefilled, in their row order")
        widest = max(len(feed) for feed in feeds.values())
        lengths = self._lengths[first:]
        if max(lengths) + widest > self.slots:
            raise ValueError(f"{widest} new tokens do not fit the arena's {self.slots} slots")
        device = self.loaded.device
        ids = torch.tensor([feed + feed[-1:] * (widest - len(feed)) for feed in feeds.values()], device=device)  # [J, T]
        positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(widest, device=device)  # [J, T]
        last = torch.tensor([len(feed) - 1 for feed in feeds.values()], device=device)  # [J]
        slots = max(lengths) + widest
        rows = slice(first, len(self.keys))
        view = _StepCache([k[rows, :, :slots] for k in self._keys], [v[rows, :, :slots] for v in self._values])
        logits = generation.step(self.loaded, ids, positions, view, last)
        for j, feed in enumerate(feeds.values()):
            self._lengths[first + j] += len(feed)
            self._positions[first + j] += len(feed)
        return logits

    def leave(self, finished=(), failed=()) -> None:
        """Rows leave: a finished one's KV goes back into its (emptied) cache, exact-sized; a failed
        one's is dropped. The last live row moves into each freed row."""
        for key in [*finished, *failed]:
            row = self.keys.index(key)
            if key in finished:
                self._copy_out(row, key)
            last = len(self.keys) - 1
            if row != last:
                self._move_row(last, row)
            self._positions[last] = 0
            self.keys[row], self._lengths[row] = self.keys[last], self._lengths[last]
            self.keys.pop()
            self._lengths.pop()

    def admit(self, rows: dict[Hashable, DynamicCache], remaining: dict[Hashable, int],
              rooms: dict[Hashable, int]) -> bool:
        """Prefilled rows join the live ones in free rows, if every one fits (a row and the
        slots for its reach); False and none joins otherwise."""
        reach = max(cache.get_seq_length() + max(1, remaining[key]) for key, cache in rows.items())
        if len(self.keys) + len(rows) > self.rows or reach > self.slots:
            return False
        for key, cache in rows.items():
            self.caches[key], self.rooms[key] = cache, rooms.get(key, 0)
            self._join(key, cache)
        return True

    def _join(self, key: Hashable, cache: DynamicCache) -> None:
        row, length = len(self.keys), cache.get_seq_length()
        for layer_idx, layer in enumerate(cache.layers):
            self._keys[layer_idx][row, :, :length].copy_(layer.keys[0])
            self._values[layer_idx][row, :, :length].copy_(layer.values[0])
            layer.reset()  # held once: the KV lives in the arena now
        self.keys.append(key)
        self._lengths.append(length)
        self._positions[row] = length

    def _step_cache(self, batch: int, slots: int) -> "_StepCache":
        cache = self._caches.get((batch, slots))
        if cache is None:
            if self.storage is not None:
                cache = self.storage.step_cache(batch, slots, dynamic_slots=self.bucketed)
            else:
                cache = _StepCache([k[:batch, :, :slots] for k in self._keys], [v[:batch, :, :slots] for v in self._values],
                                   dynamic_slots=self.bucketed)
            self._caches[(batch, slots)] = cache
        return cache

    def _copy_out(self, row: int, key: Hashable) -> None:
        cache, length, room = self.caches[key], self._lengths[row], self.rooms.get(key, 0)
        for layer_idx, layer in enumerate(cache.layers):
            keys = self._keys[layer_idx][row : row + 1, :, :length]
            values = self._values[layer_idx][row : row + 1, :, :length]
            layer.reset()
            if isinstance(layer, kv_cache.AppendLayer):  # a buffer of its own: the KV and its room
                buffers = [part.new_empty(*part.shape[:2], length + room, part.shape[3]) for part in (keys, values)]
                buffers[0][:, :, :length].copy_(keys)
                buffers[1][:, :, :length].copy_(values)
                layer.adopt(*buffers, length)
            else:
                layer.update(keys.clone(), values.clone())

    def _move_row(self, source: int, target: int) -> None:
        length = self._lengths[source]
        for buffer in self._keys + self._values:
            buffer[target, :, :length].copy_(buffer[source, :, :length])
        self._positions[target] = length


# The kept decode arena: rows a step decodes together (the router's bundles hold at most 8 turns),
# and at most this share of the session budget, so hot sessions keep most of it (with a 66 GB
# budget: llava-1.5-7b 1,792 slots a row, 7 GiB; LLaVA-NeXT-Mistral-7B, a quarter of the KV per
# token, 7,680 slots, room for a 672x672 image's 2,928 tokens).
KEPT_ARENA_ROWS = 8
KEPT_ARENA_SHARE = 8  # an eighth
MIN_KEPT_SLOTS = 512


def kept_arena_slots(max_context: int, budget_bytes: int, kv_bytes_per_token: int) -> int:
    """Slots a row of the kept arena gets: the model's context, or what an eighth of the budget
    holds for KEPT_ARENA_ROWS rows, in whole CUDA_SLOT_ALIGN buckets; 0 below MIN_KEPT_SLOTS."""
    fits = budget_bytes // KEPT_ARENA_SHARE // (KEPT_ARENA_ROWS * kv_bytes_per_token)
    slots = min(max_context, fits // CUDA_SLOT_ALIGN * CUDA_SLOT_ALIGN)
    return slots if slots >= MIN_KEPT_SLOTS else 0


class KeptArena:
    """Decode-arena buffers the engine keeps for its whole life: per layer, keys and values
    [rows, kv_heads, slots, head_dim], allocated once. A wave whose rows fit decodes in views of
    them ([:batch, :, :slots]), so every step sees the same addresses and strides: one compiled
    graph per row bucket whatever the wave, and with CUDA graphs a step that replays instead of
    re-recording. (Inductor captures a step that writes into its inputs only when their
    addresses are static; an arena allocated per wave would be run uncaptured.)"""

    def __init__(self, loaded: LoadedModel, rows: int, slots: int, static: bool):
        self.shape = ArenaShape.of(loaded)
        self.rows, self.slots, self.static = rows, slots, static
        like = dict(dtype=loaded.dtype, device=loaded.device)
        buffer = (rows, self.shape.kv_heads, allocated_slots(slots, True), self.shape.head_dim)
        self.keys = [torch.zeros(buffer, **like) for _ in range(self.shape.layers)]
        self.values = [torch.zeros(buffer, **like) for _ in range(self.shape.layers)]
        if static:  # the buffers and (step_cache) each view of them: a view may be traced as its base
            for tensor in self.keys + self.values:
                torch._dynamo.mark_static_address(tensor)

    def bytes(self) -> int:
        return self.shape.bytes(self.rows, allocated_slots(self.slots, True))

    def fits(self, rows: int, slots: int) -> bool:
        return rows <= self.rows and slots <= self.slots

    def step_cache(self, batch: int, slots: int, dynamic_slots: bool) -> "_StepCache":
        """The first ``batch`` rows and ``slots`` slots as a step's cache."""
        keys = [k[:batch, :, :slots] for k in self.keys]
        values = [v[:batch, :, :slots] for v in self.values]
        if self.static:
            for view in keys + values:  # the same address at every wave: CUDA graphs may write it
                torch._dynamo.mark_static_address(view)
        return _StepCache(keys, values, dynamic_slots=dynamic_slots)


class ArenaShape:
    """Per-token geometry of the language model's KV."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int):
        self.layers, self.kv_heads, self.head_dim, self.dtype_bytes = layers, kv_heads, head_dim, dtype_bytes

    @classmethod
    def of(cls, loaded: LoadedModel) -> "ArenaShape":
        text = loaded.model.config.get_text_config()
        heads = text.num_attention_heads
        return cls(text.num_hidden_layers, getattr(text, "num_key_value_heads", None) or heads,
                   getattr(text, "head_dim", None) or text.hidden_size // heads, loaded.dtype.itemsize)

    def bytes(self, rows: int, slots: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes * rows * slots


def arena_size(loaded: LoadedModel, lengths: list[int], remaining: list[int], bucketed: bool,
               min_rows: int = 1) -> tuple[int, int]:
    """(rows, slots) of a DecodeArena for rows of these lengths that may add these many tokens;
    bucketed, at least ``min_rows`` rows (free ones for turns that join it later)."""
    reach = min(max(n + max(1, r) for n, r in zip(lengths, remaining)), loaded.max_context)
    if not bucketed:
        return len(lengths), reach
    return row_bucket(max(len(lengths), min_rows)), aligned_slots(reach, loaded.max_context, slot_align(loaded))


def allocated_slots(slots: int, bucketed: bool) -> int:
    """Slots a DecodeArena of ``slots`` allocates a row. Compiled, one more than any step reads: a
    step's view is then never a whole buffer, so its strides are those of a view whatever the
    arena, and one graph per row bucket serves them all (a whole buffer would compile another)."""
    return slots + 1 if bucketed else slots


def arena_bytes(loaded: LoadedModel, lengths: list[int], remaining: list[int], bucketed: bool,
                min_rows: int = 1) -> int:
    """Device bytes a DecodeArena of these rows allocates."""
    rows, slots = arena_size(loaded, lengths, remaining, bucketed, min_rows)
    return ArenaShape.of(loaded).bytes(rows, allocated_slots(slots, bucketed))


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (a recompile counts too)."""
    from torch._dynamo.utils import counters

    return sum(counters["stats"].get(name, 0) for name in ("unique_graphs",))


def graph_skips() -> int:
    """Compiled graphs inductor has run without CUDA graph capture in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"].get("cudagraph_skips", 0)
