"""Prefill several sessions' new tokens in one forward, each on top of its own cached KV.

Follow-up turns of different sessions arrive together (a TorchServe batch) with a few dozen new
tokens each; one by one, their prefills cost a forward each (about 12 ms apiece for the `small`
preset on 2 CPU cores). Here they share one forward over a batched view, and each session's KV
goes back into its own cache: exactly the keys and values of its cached tokens and its new ones.

Layout of row i in the view, for B rows, longest history L and longest feed T (tokens: [B, T]):

    [ zeros: L - cached_i | cached KV: cached_i | hole: T - T_i | new KV: T_i ]

Every row's new tokens end at the same last position, so one logits row per session is the
last position's. The left padding and the hole are masked out (2-D attention mask [B, L + T]);
each new token gets its own position (cached_i + k), so the hole shifts no rotary position.
The hole's slots are fed a placeholder token; their keys and values are never attended to and
are cut out when the rows go back to their caches.

Memory (device bytes): each session's KV is moved into the view layer by layer, so it is held
once; the view adds ``extra_tokens()`` slots of padding and holes, which the engine reserves first.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from llava_sessions.handler.engine import generation, kv_cache
from llava_sessions.handler.engine.model_loader import LoadedModel


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


def extra_tokens(cached: list[int], feeds: list[int]) -> int:
    """KV slots the view holds beyond the sessions' own tokens: left padding plus holes."""
    if not cached:
        return 0
    longest, widest = max(cached), max(feeds)
    return sum(longest - n for n in cached) + sum(widest - t for t in feeds)


@torch.inference_mode()
def prefill_together(
    loaded: LoadedModel, caches: list[DynamicCache], feeds: list[list[int]], rooms: list[int]
) -> torch.Tensor:
    """Feed each session's tokens on its cache (none empty, no image tokens); return logits [B, V].

    Each cache ends up holding its history and its feed, with ``rooms[i]`` spare slots for what
    decoding appends. If the forward fails, the caches are left empty: the caller rebuilds them
    (the engine's prefill does, from token ids and features).
    """
    cached = [cache.get_seq_length() for cache in caches]
    if not caches or min(cached) == 0 or min(len(feed) for feed in feeds) == 0:
        raise ValueError("every row needs a cached history and at least one new token")
    device = loaded.device
    longest, widest = max(cached), max(len(feed) for feed in feeds)
    pads = [longest - n for n in cached]
    holes = [widest - len(feed) for feed in feeds]

    view = generation.new_cache(loaded)
    move_into_view(view, caches, pads, longest + widest)  # the forward appends T slots in place

    placeholder = feeds[0][0]
    input_ids = torch.tensor([[placeholder] * hole + feed for hole, feed in zip(holes, feeds)], device=device)  # [B, T]
    mask = torch.ones(len(caches), longest + widest, dtype=torch.long, device=device)  # [B, L + T]
    positions = torch.empty(len(caches), widest, dtype=torch.long, device=device)  # [B, T]
    for row, (pad, hole, n) in enumerate(zip(pads, holes, cached)):
        mask[row, :pad] = 0
        mask[row, longest : longest + hole] = 0
        positions[row, :hole] = n  # never attended to
        positions[row, hole:] = torch.arange(n, n + widest - hole, device=device)
    logits = generation.forward_rows(loaded, input_ids, view, mask, positions)  # [B, V]

    # Back into each session's own buffers, with its room: each token copied once, the hole cut out.
    for layer_idx, layer in enumerate(view.layers):
        for row, cache in enumerate(caches):
            pad, hole, n, fed = pads[row], holes[row], cached[row], len(feeds[row])
            buffers = []
            for tensor in (layer.keys, layer.values):  # [B, kv_heads, L + T, head_dim]
                buffer = tensor.new_empty(1, tensor.shape[1], n + fed + rooms[row], tensor.shape[3])
                buffer[0, :, :n].copy_(tensor[row, :, pad:longest])
                buffer[0, :, n : n + fed].copy_(tensor[row, :, longest + hole :])
                buffers.append(buffer)
            cache.layers[layer_idx].adopt(*buffers, n + fed)
        layer.reset()
    return logits
