"""Decode several sessions' turns together: one forward per step for all of them.

Each session keeps its own DynamicCache (their lengths differ). For the decode steps they are
gathered into one batched view: per layer, keys and values [B, kv_heads, L, head_dim] with
each row left-padded with zeros to the longest history, a 2-D attention mask [B, L + 1] that
hides the padding, and explicit ``position_ids`` [B, 1] holding each row's own next position
(padding must not shift the rotary positions). A row that finishes (eos, its token limit) or
fails leaves the view; a finished row's KV goes back, without padding, into its session's
own cache: exactly the tokens the one-session path would have cached.

A lone row decodes on its session's own cache, as the one-session path always did.

Memory (device bytes): while the view is built, each session's cache is emptied into it layer
by layer, so a session's KV is held once (in the view) and the view holds, beyond the
sessions' own KV, only the padding: ``padding_tokens()`` tokens of KV, which the engine
reserves under its budget before building the view. Like a lone session's DynamicCache, each
step's concatenation and each change of rows briefly hold one layer twice; that transient is
the same kind as the single-session path's and is not session memory.
"""

from __future__ import annotations

from typing import Hashable, Iterable

import torch
from transformers import DynamicCache

from llava_sessions.handler.engine import generation, kv_cache
from llava_sessions.handler.engine.model_loader import LoadedModel


def padding_tokens(lengths: list[int]) -> int:
    """Zero-padded KV positions a view of histories of these lengths holds."""
    return sum(max(lengths) - n for n in lengths) if lengths else 0


def move_into_view(view: DynamicCache, caches: list[DynamicCache], pads: list[int], capacity: int) -> None:
    """Move each session's KV into the empty ``view``: row i left-padded with pads[i] zeros, in
    buffers of ``capacity`` token slots [B, kv_heads, capacity, head_dim]. Each token is copied
    once, layer by layer, and each session's layer is emptied as soon as the view holds it.
    Padding is zeroed: the mask hides it, but stale memory could hold NaN (and 0 x NaN is NaN)."""
    longest = caches[0].get_seq_length() + pads[0]
    for layer_idx, layer in enumerate(view.layers):
        buffers = []
        for part in ("keys", "values"):
            like = getattr(caches[0].layers[layer_idx], part)
            buffer = like.new_empty(len(caches), like.shape[1], capacity, like.shape[3])
            for row, (cache, pad) in enumerate(zip(caches, pads)):
                buffer[row, :, :pad].zero_()
                buffer[row, :, pad:longest].copy_(getattr(cache.layers[layer_idx], part)[0])
            buffers.append(buffer)
        if isinstance(layer, kv_cache.AppendLayer):
            layer.adopt(*buffers, longest)
        else:  # a layer kind that does not append in place: it takes a copy
            layer.update(buffers[0][:, :, :longest], buffers[1][:, :, :longest])
        del buffers
        for cache in caches:
            cache.layers[layer_idx].reset()  # the session's KV now lives in the view


class BatchedDecode:
    """The decode state of B sessions; rows are named by caller-chosen keys."""

    def __init__(self, loaded: LoadedModel, rows: dict[Hashable, DynamicCache], remaining: dict[Hashable, int]):
        """``remaining``: how many more tokens each row may feed (the view keeps room for them)."""
        self.loaded = loaded
        self.keys = list(rows)
        self.remaining = dict(remaining)
        self.caches = [rows[k] for k in self.keys]
        lengths = [cache.get_seq_length() for cache in self.caches]
        if not lengths or min(lengths) == 0:
            raise ValueError("every row needs a non-empty cache (prefill first)")
        longest = max(lengths)
        self.pads = [longest - n for n in lengths]
        self.positions = list(lengths)  # each row's next position = its real length
        device = loaded.device
        self.mask = torch.ones(len(lengths), longest, dtype=torch.long, device=device)  # [B, L]
        for row, pad in enumerate(self.pads):
            self.mask[row, :pad] = 0
        self.shared = len(self.caches) == 1
        if self.shared:
            self.view = self.caches[0]  # one row: decode on the session's own cache, no copy
            return
        self.view = self._new_view()
        move_into_view(self.view, self.caches, self.pads, longest + max(self.remaining.values(), default=0))
        for cache in self.caches:
            kv_cache.make_room(cache, 0)  # rows come back unpadded and exact-sized

    def __len__(self) -> int:
        return len(self.keys)

    def bytes_held(self) -> int:
        """Device bytes of the batched view; 0 when it is a lone session's own cache."""
        return 0 if self.shared else generation.cache_bytes(self.view)

    def step(self, tokens: dict[Hashable, int]) -> dict[Hashable, torch.Tensor]:
        """Feed each row its token; return each row's next-token logits [1, V]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.keys), 1)], dim=1)  # [B, L + 1]
        if len(self.keys) == 1:
            # Alone (no padding left): exactly the one-session forward, default mask and positions.
            mask = position_ids = None
        else:
            mask = self.mask
            position_ids = torch.tensor([[p] for p in self.positions], device=self.loaded.device)  # [B, 1]
        logits = generation.decode_one_token(
            self.loaded, [tokens[k] for k in self.keys], self.view, attention_mask=mask, position_ids=position_ids
        )  # [B, V]
        self.positions = [p + 1 for p in self.positions]
        for k in self.keys:
            self.remaining[k] -= 1
        return {k: logits[row : row + 1] for row, k in enumerate(self.keys)}

    def leave(self, finished: Iterable[Hashable] = (), failed: Iterable[Hashable] = ()) -> None:
        """Rows leave the view: finished ones get their KV back, unpadded; failed ones lose it."""
        finished, failed = set(finished), set(failed)
        if not finished and not failed:
            return
        if self.shared:  # the session's own cache: nothing to copy
            self.keys, self.caches, self.pads, self.positions = [], [], [], []
            self.mask = self.mask[:0]
            return
        keep = [row for row, k in enumerate(self.keys) if k not in finished and k not in failed]
        cut = min((self.pads[row] for row in keep), default=0)  # padding no remaining row needs
        index = torch.tensor(keep, dtype=torch.long, device=self.loaded.device)
        for k in finished | failed:
            self.remaining.pop(k, None)
        new_view = self._new_view()
        for layer_idx, layer in enumerate(self.view.layers):
            for row, k in enumerate(self.keys):
                if k in finished:
                    pad = self.pads[row]
                    # update() concatenates onto the emptied layer: a copy, not a view of the batch.
                    self.caches[row].update(
                        layer.keys[row : row + 1, :, pad:], layer.values[row : row + 1, :, pad:], layer_idx
                    )
            if keep:
                new_view.update(
                    layer.keys.index_select(0, index)[:, :, cut:],
                    layer.values.index_select(0, index)[:, :, cut:],
                    layer_idx,
                )
            layer.reset()
        self.view = new_view
        self.mask = self.mask.index_select(0, index)[:, cut:]
        self.keys = [self.keys[row] for row in keep]
        self.caches = [self.caches[row] for row in keep]
        self.pads = [self.pads[row] - cut for row in keep]
        self.positions = [self.positions[row] for row in keep]

    def _new_view(self) -> DynamicCache:
        """An empty batched cache with room for the longest remaining row: steps write in place."""
        view = generation.new_cache(self.loaded)
        kv_cache.make_room(view, max(self.remaining.values(), default=0))
        return view
