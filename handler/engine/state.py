"""A session's tensors and history (SessionState), and a turn's from its checks to its result
(RunningTurn): what the scheduler, the executor and the memory manager share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from llava_sessions.handler.engine import generation
from llava_sessions.handler.engine.api import TurnRequest
from llava_sessions.handler.engine.kv_manager import HostKV
from llava_sessions.handler.engine.prompt import Conversation
from llava_sessions.handler.engine.session_store import SessionRecord


@dataclass
class SessionState:
    """The tensors and history of one session."""

    features: list[torch.Tensor] = field(default_factory=list)  # each [tokens_per_image, H]
    pending_images: int = 0  # encoded, placeholders not yet in the history
    token_ids: list[int] = field(default_factory=list)
    conversation: Conversation = field(default_factory=Conversation)
    cache: DynamicCache | None = None  # KV of token_ids[:cache.get_seq_length()]; always on the device
    host_kv: HostKV | None = None  # or that KV in host memory until the next turn (kv_manager.py)
    features_on_host: bool = False  # cold: features in host memory until the next turn

    def feature_bytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features)

    def bytes_held(self) -> int:
        host_kv = self.host_kv.nbytes() if self.host_kv is not None else 0
        return self.feature_bytes() + generation.cache_bytes(self.cache) + host_kv


@dataclass
class RunningTurn:
    """One turn of a batch, from its checks and reservation to its result."""

    slot: int
    request: TurnRequest
    record: SessionRecord
    state: SessionState
    turn_ids: list[int]
    n_images: int
    context: int
    max_new: int
    features_before: int
    pending_before: int
    started: float
    headroom: int = 0  # spare KV slots reserved for after the turn (Scheduler.grant_headroom)
    cached: int = 0
    answer: list[int] = field(default_factory=list)
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    stopped_by: str | None = None  # "cancelled" or "deadline" when the turn stopped early
    outcome: object = None  # the TurnResult or the exception, once known


def cached_tokens(state: SessionState) -> int:
    """Tokens of the session's history its KV cache holds (0 without one)."""
    return state.cache.get_seq_length() if state.cache is not None else 0


def feed(running: RunningTurn) -> list[int]:
    """What a turn's prefill must run: the history its cache lacks, then the turn's own tokens."""
    return (running.state.token_ids + running.turn_ids)[cached_tokens(running.state):]


def is_out_of_memory(error: BaseException) -> bool:
    """An allocator failure: CUDA's OutOfMemoryError, MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
