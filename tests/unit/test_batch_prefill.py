"""Several sessions' new tokens in one forward: the same logits and KV as prefilling each alone."""

from __future__ import annotations

import pytest
import torch

from llava_sessions.handler.engine import batch_prefill, generation, kv_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def history(loaded, ids: list[int]):
    """A session's cache holding ``ids`` (text only)."""
    cache = generation.new_cache(loaded)
    generation.prefill(loaded, torch.tensor([ids]), None, cache)
    return cache


def test_rows_prefilled_together_equal_each_prefilled_alone(loaded_tiny):
    generator = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(5, 1000, (n,), generator=generator).tolist()  # no special or image ids
    histories, feeds, rooms = [text(5), text(14), text(9)], [text(3), text(1), text(7)], [0, 4, 2]

    alone, alone_logits = [], []
    for ids, feed in zip(histories, feeds):
        cache = history(loaded_tiny, ids)
        alone_logits.append(generation.prefill(loaded_tiny, torch.tensor([feed]), None, cache))
        alone.append(cache)
    caches = [history(loaded_tiny, ids) for ids in histories]
    logits = batch_prefill.prefill_together(loaded_tiny, caches, feeds, rooms)

    assert logits.shape[0] == 3
    for row, (cache, reference) in enumerate(zip(caches, alone)):
        assert torch.allclose(logits[row], alone_logits[row][0], atol=1e-5)
        assert torch.argmax(logits[row]) == torch.argmax(alone_logits[row][0])
        assert cache.get_seq_length() == len(histories[row]) + len(feeds[row])  # padding and hole cut out
        assert kv_cache.spare_tokens(cache) == rooms[row]
        for layer, want in zip(cache.layers, reference.layers):
            assert torch.allclose(layer.keys, want.keys, atol=1e-5)
            assert torch.allclose(layer.values, want.values, atol=1e-5)


def test_the_view_adds_left_padding_and_holes_only():
    # histories 5, 14, 9 -> padding 9 + 0 + 5; feeds 3, 1, 7 -> holes 4 + 6 + 0
    assert batch_prefill.extra_tokens([5, 14, 9], [3, 1, 7]) == 24
    assert batch_prefill.extra_tokens([], []) == 0


def test_rows_without_history_or_tokens_are_refused(loaded_tiny):
    empty = generation.new_cache(loaded_tiny)
    with pytest.raises(ValueError):
        batch_prefill.prefill_together(loaded_tiny, [empty, empty], [[7], [8]], [0, 0])
