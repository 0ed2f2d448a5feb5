"""A session's tensors and history (SessionState), a turn's from its checks to its result
(RunningTurn), and what a turn does to its session's history before its answer (TurnPlan,
``plan_turn``): what the scheduler, the executor and the memory manager share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    image_digests: list[str] = field(default_factory=list)  # parallel to features (api.image_digest)
    pending_images: int = 0  # encoded, placeholders not yet in the history
    open_images: int = 0  # the first features came with the open (rewind_to=0 keeps them)
    token_ids: list[int] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)  # where each completed turn ends in token_ids
    conversation: Conversation = field(default_factory=Conversation)
    cache: DynamicCache | None = None  # KV of token_ids[:cache.get_seq_length()]; always on the device
    host_kv: HostKV | None = None  # or that KV in host memory until the next turn (kv_manager.py)
    features_on_host: bool = False  # cold: features in host memory until the next turn

    def feature_bytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features)

    def bytes_held(self) -> int:
        host_kv = self.host_kv.nbytes() if self.host_kv is not None else 0
        return self.feature_bytes() + generation.cache_bytes(self.cache) + host_kv

    def messages(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """Its history's messages as (role, text, image digests); an answer's text is the one its
        turn returned. The open's images not yet used are not in it (``pending_images``)."""
        out, cursor = [], 0
        for message in self.conversation.messages:
            parts = message["content"]
            n_images = sum(1 for part in parts if part["type"] == "image")
            text = "".join(part["text"] for part in parts if part["type"] == "text")
            out.append((message["role"], text, tuple(self.image_digests[cursor : cursor + n_images])))
            cursor += n_images
        return out

    def pending_digests(self) -> list[str]:
        return self.image_digests[len(self.image_digests) - self.pending_images :]


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
    saved: SavedHistory | None = None  # the session's history before this turn replaced it (TurnPlan.history)
    headroom: int = 0  # spare KV slots reserved for after the turn (Scheduler.grant_headroom)
    cached: int = 0
    answer: list[int] = field(default_factory=list)
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    stopped_by: str | None = None  # "cancelled", "deadline" or "stop" (a stop string) when it stopped early
    controls: Any = None  # scheduler.TurnControls of a turn with a repetition penalty or stop strings
    outcome: object = None  # the TurnResult or the exception, once known
    told: bool = False  # whether its request's on_done has had the outcome (Scheduler.tell)
    joined: bool = False  # it joined its call while the call's turns decoded (api.Joiners): always told


@dataclass(frozen=True)
class SavedHistory:
    """A session's history as it was before a turn replaced it (a rewind, a history reconciled):
    ``restore`` puts it back when the turn fails or is cancelled. Holding the lists (never
    changed in place: a replacement makes new ones) is enough."""

    token_ids: list[int]
    turn_ends: list[int]
    conversation: Conversation
    features: list[torch.Tensor]
    image_digests: list[str]
    pending_images: int
    open_images: int

    @classmethod
    def of(cls, state: SessionState) -> SavedHistory:
        return cls(state.token_ids, state.turn_ends, state.conversation, state.features, state.image_digests,
                   state.pending_images, state.open_images)

    def restore(self, state: SessionState) -> None:
        state.token_ids, state.turn_ends, state.conversation = self.token_ids, self.turn_ends, self.conversation
        state.features, state.image_digests = self.features, self.image_digests
        state.pending_images, state.open_images = self.pending_images, self.open_images


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
