"""AppendLayer: the same keys and values as transformers' DynamicLayer, written in place."""

import torch
from transformers.cache_utils import DynamicLayer

from llava_sessions.handler.engine.kv_cache import (
    AppendLayer,
    cache_bytes,
    growth_tokens,
    make_room,
    new_cache,
    reserve,
    spare_tokens,
    trim,
)


def chunks(seed: int, sizes: list[int], batch: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, n, 8, generator=generator), torch.randn(batch, 3, n, 8, generator=generator))
            for n in sizes]


def test_appends_equal_concatenation_and_reuse_one_buffer():
    reference, layer = DynamicLayer(), AppendLayer()
    layer.room = 6
    buffers = set()
    for keys, values in chunks(0, [5, 1, 1, 1, 1, 1, 1, 3]):
        want = reference.update(keys, values)
        got = layer.update(keys, values)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        buffers.add(layer._key_buffer.data_ptr())
    # 5 tokens + room 6 took the six single tokens in place; the chunk of 3 grew it once more
    assert len(buffers) == 2
    assert layer.get_seq_length() == reference.get_seq_length() == 14


def test_tensors_replaced_from_outside_are_respected():
    layer = AppendLayer()
    layer.room = 10
    (k1, v1), (k2, v2), (k3, v3) = chunks(1, [4, 2, 1])
    layer.update(k1, v1)
    layer.update(k2, v2)
    layer.keys, layer.values = layer.keys[:, :, :3], layer.values[:, :, :3]  # a crop, as transformers does it
    keys, values = layer.update(k3, v3)
    assert torch.equal(keys, torch.cat([k1[:, :, :3], k3], dim=2))
    layer.keys, layer.values = layer.keys.clone(), layer.values.clone()  # e.g. offloaded and back
    keys, _ = layer.update(k3, v3)
    assert torch.equal(keys, torch.cat([k1[:, :, :3], k3, k3], dim=2))


def test_room_is_counted_while_held_and_trim_gives_it_back():
    cache = new_cache(_config())
    make_room(cache, 20)
    (keys, values), = chunks(2, [5], batch=1)
    for layer_idx in range(len(cache.layers)):
        cache.update(keys, values, layer_idx)
    per_token = 2 * len(cache.layers) * 3 * 8 * 4  # K and V, layers, heads x head_dim float32
    assert cache_bytes(cache) == 25 * per_token
    trim(cache, 0)
    assert cache_bytes(cache) == 5 * per_token
    assert torch.equal(cache.layers[0].keys, keys)


def test_reserve_grows_once_with_twice_the_headroom_and_trim_keeps_at_most_that():
    cache = new_cache(_config())
    (first, _), (second, _), (third, _) = [(k, v) for k, v in chunks(3, [5, 3, 2], batch=1)]
    reserve(cache, 5, 3, headroom=2)  # this turn: 5 prefilled + 3 decoded; then 2 x 2 spare
    _update_all(cache, first)
    buffer = cache.layers[0]._key_buffer.data_ptr()
    _update_all(cache, second)
    assert cache.layers[0]._key_buffer.data_ptr() == buffer and spare_tokens(cache) == 4
    trim(cache, 2)  # within what may stay: nothing moves
    assert cache.layers[0]._key_buffer.data_ptr() == buffer
    reserve(cache, 2, 0, headroom=2)  # the next turn fits the spare slots and leaves 2: no move
    _update_all(cache, third)
    assert cache.layers[0]._key_buffer.data_ptr() == buffer and spare_tokens(cache) == 2
    trim(cache, 0)  # more spare than may stay: the data moves into exactly its 10 slots
    per_token = 2 * len(cache.layers) * 3 * 8 * 4
    assert spare_tokens(cache) == 0 and cache_bytes(cache) == 10 * per_token
    assert torch.equal(cache.layers[1].keys, torch.cat([first, second, third], dim=2))
    assert spare_tokens(None) == 0


def test_a_turn_that_would_leave_too_few_spare_moves_after_its_feed_not_before():
    cache = new_cache(_config())
    (prefix, _), (feed, _), (step, _) = [(k, v) for k, v in chunks(4, [5, 2, 1], batch=1)]
    reserve(cache, 5, 0, headroom=2)
    _update_all(cache, prefix)  # 5 tokens, 4 spare
    buffer = cache.layers[0]._key_buffer.data_ptr()
    assert growth_tokens(cache, 2, 3, 2) == 2 + 3 + 4 - 4
    reserve(cache, 2, 3, headroom=2)  # 2 fit the 4 spare, but 2 + 3 would leave fewer than 2
    _update_all(cache, feed)
    assert cache.layers[0]._key_buffer.data_ptr() == buffer  # the feed (time to first token): in place
    _update_all(cache, step)  # the first decode step moves into 5 + 2 + 3 + 2 x 2 slots
    assert cache.layers[0]._key_buffer.data_ptr() != buffer and cache.layers[0]._key_buffer.shape[-2] == 14
    moved = cache.layers[0]._key_buffer.data_ptr()
    _update_all(cache, step)
    _update_all(cache, step)
    assert cache.layers[0]._key_buffer.data_ptr() == moved and spare_tokens(cache) == 4
    assert torch.equal(cache.layers[1].keys, torch.cat([prefix, feed, step, step, step], dim=2))
    assert growth_tokens(cache, 2, 0, 2) == 0  # 4 spare hold 2 and leave 2


def _update_all(cache, keys):
    for layer_idx in range(len(cache.layers)):
        cache.update(keys, keys, layer_idx)


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3, hidden_size=24,
                       head_dim=8, intermediate_size=32, vocab_size=10)
