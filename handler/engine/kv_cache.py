"""A session's KV cache that appends in place instead of re-concatenating every step.

transformers' DynamicLayer grows by ``torch.cat`` on every forward, so each decoded token
copies the whole history: O(history) per token, and for a batched view of B sessions
O(B x history) per step (it was half the time of an 8-session decode on CPU). AppendLayer
keeps ``keys``/``values`` [B, kv_heads, L, head_dim] as views of a buffer with ``room``
spare token slots behind them, so a step writes one token. Everything that reads or replaces
``keys``/``values`` keeps working: a layer whose tensors were replaced from outside (crop,
offload, a decode arena writing rows back) moves into a fresh buffer at its next update.

The room is what the engine has already reserved for the turn (its remaining tokens). With a
``headroom`` of h, a lone turn leaves its session between h and 2h spare slots (``reserve``,
``trim``): a layer that would end the turn with fewer than h moves into a buffer with 2h spare
behind the turn's tokens, so the next question (up to h tokens) prefills in place and the one
after it usually does too. A move copies the whole history (about 1.5 ms of a 13 ms turn at
1,000 tokens on 2 CPU cores), so it is made at the turn's first decode step, after its first
token, never during a follow-up's prefill while the spare slots hold it: a user waiting for
a first token does not wait for a copy. The spare slots are real bytes: ``cache_bytes``
counts them.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class AppendLayer(DynamicLayer):
    def __init__(self):
        super().__init__()
        self.reserved_end = 0  # when the layer next grows: to at least this many tokens...
        self.room = 0  # ...plus this many spare slots
        self.grow_from: int | None = None  # set by reserve: grow at the first update from this length
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: [B, kv_heads, T, head_dim]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._appendable(end, key_states) or (self.grow_from is not None and length >= self.grow_from):
            self._regrow(length, max(end, self.reserved_end) + self.room, key_states, value_states)
            self.grow_from = None
        self._key_buffer[:, :, length:end].copy_(key_states)
        self._value_buffer[:, :, length:end].copy_(value_states)
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()

    def adopt(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        """Take these buffers [B, kv_heads, capacity, head_dim] as storage, holding ``length`` tokens
        (whoever filled them copied each token once; nothing is copied here, the spare slots are
        zeroed: clear_spare)."""
        for buffer in (key_buffer, value_buffer):
            clear_spare(buffer, length)
        self.dtype, self.device = key_buffer.dtype, key_buffer.device
        self._key_buffer, self._value_buffer = key_buffer, value_buffer
        self.keys, self.values = key_buffer[:, :, :length], value_buffer[:, :, :length]
        self.is_initialized = True
        self.forget_plan()

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers [B, kv_heads, capacity, head_dim], spare slots included: for a
        step that writes its tokens into the spare slots itself (runner.prefill_in_place)."""
        if not self._appendable(self.get_seq_length(), self.keys):
            raise ValueError("this layer's keys and values are not the start of its buffers")
        return self._key_buffer, self._value_buffer

    def advance(self, length: int) -> None:
        """The first ``length`` slots of the buffers now hold tokens (written by such a step)."""
        if length > self._key_buffer.shape[-2]:
            raise ValueError(f"{length} tokens do not fit a buffer of {self._key_buffer.shape[-2]} slots")
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]

    def forget_plan(self) -> None:
        """No growth planned: the next move, if one is needed, makes room for exactly its tokens."""
        self.reserved_end = self.room = 0
        self.grow_from = None

    def spare(self) -> int:
        """Token slots that can still be appended in place."""
        if self.keys is None or not self._appendable(self.get_seq_length(), self.keys):
            return 0
        return self._key_buffer.shape[-2] - self.get_seq_length()

    def trim(self, keep: int) -> None:
        """Keep at most ``keep`` spare slots: more, and the data moves into a buffer of its size + keep."""
        self.forget_plan()
        if self._key_buffer is None or self.spare() <= keep:
            return
        length = self.get_seq_length()
        self._move(length, length + keep)

    def make_room_for(self, feed: int) -> None:
        """Move now, if ``feed`` tokens would not leave a spare slot in place, into the buffer the
        next update would move into (``reserve``'s plan): for steps that write their tokens into
        the buffer themselves (runner's compiled prefill and lone-turn decode) instead of through
        ``update``. The same copy, made before the forward instead of inside it."""
        if self.keys is None or self.spare() > feed:
            return
        length = self.get_seq_length()
        self._move(length, max(length + feed, self.reserved_end) + self.room)
        self.grow_from = None

    def _move(self, length: int, capacity: int) -> None:
        """The first ``length`` tokens into fresh buffers of ``capacity`` slots."""
        self._regrow(length, capacity, self.keys, self.values)
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]

    def bytes_held(self) -> int:
        """Bytes of the buffers (room included), or of the tensors when there are none."""
        tensors = (self._key_buffer, self._value_buffer) if self._key_buffer is not None else (self.keys, self.values)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _appendable(self, end: int, key_states: torch.Tensor) -> bool:
        """Are keys/values still the start of our buffers, with room up to ``end``?"""
        buffers = (self._key_buffer, self._value_buffer)
        if buffers[0] is None or end > buffers[0].shape[-2]:
            return False
        if buffers[0].shape[:2] != key_states.shape[:2] or buffers[0].shape[-1] != key_states.shape[-1]:
            return False
        return all(
            data is not None and data.data_ptr() == buffer.data_ptr() and data.stride() == buffer.stride()
            for data, buffer in zip((self.keys, self.values), buffers)
        )

    def _regrow(self, length: int, capacity: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        buffers = []
        for data, like in ((self.keys, key_states), (self.values, value_states)):
            batch, heads, _, dim = like.shape
            buffer = torch.empty(batch, heads, capacity, dim, dtype=like.dtype, device=like.device)
            if length:
                buffer[:, :, :length].copy_(data)
            clear_spare(buffer, length)
            buffers.append(buffer)
        self._key_buffer, self._value_buffer = buffers


def clear_spare(buffer: torch.Tensor, length: int) -> None:
    """Zero a KV buffer's slots from ``length`` on: a compiled step's attention reads spare slots
    (masked), and uninitialised memory there could hold NaN, which a zero weight does not cancel."""
    buffer[:, :, length:].zero_()


def new_cache(config) -> DynamicCache:
    """A DynamicCache whose full-attention layers append in place (sliding ones stay as they are)."""
    cache = DynamicCache(config=config)
    cache.layers = [AppendLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def make_room(cache: DynamicCache, tokens: int) -> None:
    """Let the next growth of each layer add ``tokens`` spare slots (what the turn may still append)."""
    for layer in cache.layers:
        if isinstance(layer, AppendLayer):
            layer.forget_plan()
            layer.room = max(0, tokens)


def reserve(cache: DynamicCache, feed: int, then: int, headroom: int) -> None:
    """Let each layer take a turn's ``feed`` tokens and the ``then`` it may decode after them,
    and end the turn with at least ``headroom`` spare slots: a layer whose spare slots fall short
    moves into a buffer with 2 x ``headroom`` spare behind the turn's tokens. It moves at the
    turn's first decode step when its spare slots hold the feed, else at once."""
    feed, then = max(0, feed), max(0, then)
    for layer in cache.layers:
        if isinstance(layer, AppendLayer):
            length, spare = layer.get_seq_length(), layer.spare()
            layer.reserved_end = length + feed + then
            layer.room = most_spare(headroom)
            early = _falls_short(spare, feed, then, headroom) and then and feed <= spare
            layer.grow_from = length + feed if early else None


def growth_tokens(cache: DynamicCache | None, feed: int, then: int, headroom: int) -> int:
    """The most token slots ``reserve(cache, feed, then, headroom)`` and the turn add to the cache."""
    spare = spare_tokens(cache)
    return feed + then + most_spare(headroom) - spare if _falls_short(spare, feed, then, headroom) else 0


def _falls_short(spare: int, feed: int, then: int, headroom: int) -> bool:
    """Would a layer with ``spare`` slots end a turn of ``feed`` + ``then`` tokens with fewer than ``headroom``?"""
    return spare < feed + then + max(0, headroom)


def most_spare(headroom: int) -> int:
    """Spare slots a move leaves behind a turn's tokens, and the most a session keeps between turns."""
    return 2 * max(0, headroom)


def spare_tokens(cache: DynamicCache | None) -> int:
    """Tokens every layer can still append in place (0 without a cache)."""
    layers = [layer for layer in cache.layers if isinstance(layer, AppendLayer)] if cache is not None else []
    return min((layer.spare() for layer in layers), default=0)


def trim(cache: DynamicCache, headroom: int) -> None:
    """At the end of a turn: each layer keeps at most 2 x ``headroom`` spare slots (``reserve``)."""
    for layer in cache.layers:
        if isinstance(layer, AppendLayer):
            layer.trim(most_spare(headroom))


def truncate(cache: DynamicCache, length: int) -> None:
    """Forget every token from ``length`` on (a turn undone); appending layers keep their buffers,
    so the next turn appends in place where the undone one began."""
    for layer in cache.layers:
        if layer.keys is not None and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]
        if isinstance(layer, AppendLayer):
            layer.forget_plan()


def cache_bytes(cache: DynamicCache | None) -> int:
    """Device bytes the cache holds, spare room included."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        if isinstance(layer, AppendLayer):
            total += layer.bytes_held()
            continue
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total
