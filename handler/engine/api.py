"""The engine's public data types: what a caller sends (TurnRequest, Message, ImageInput), gets
back (OpenedSession, TurnResult) and can observe (EngineCounters, EngineSnapshot, SessionView).
Torch-free."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

if TYPE_CHECKING:
    from llava_sessions.handler.engine.generation import SamplingParams

# (token id, whether it is the turn's last): called as each token is picked.
TokenCallback = Callable[[int, bool], None]
# Whether the turn's client has gone away: asked before the turn starts and after each token.
CancelCheck = Callable[[], bool]


@dataclass(frozen=True)
class ImageInput:
    """An image with the digest of its content: a session knows an image it already holds by its digest.

    Wherever an image is taken (``open_session``, ``TurnRequest.images``, ``Message.images``) a
    PIL image or an ImageInput will do; a PIL image's digest is ``pixel_digest(image)``. Digests
    are compared as strings, so send an image under the same digest each time.
    """

    digest: str
    load: Callable[[], Any]  # the decoded image (PIL); called only when the session does not hold it yet


@dataclass(frozen=True)
class Message:
    """One message of a conversation sent as ``TurnRequest.history``."""

    role: str  # "system" (first message only), "user" or "assistant"
    text: str
    images: Sequence = ()  # user messages only: ImageInput or PIL images, in order


def pixel_digest(image) -> str:
    """A PIL image's digest: sha256 over its mode, size and pixel bytes (and palette: a "P" image's
    pixels are indices into it), what two images that decode to the same pixels share."""
    digest = hashlib.sha256(f"{image.mode} {image.size[0]}x{image.size[1]}\n".encode())
    digest.update(image.tobytes())
    palette = image.getpalette() if image.mode in ("P", "PA") else None
    if palette:
        digest.update(bytes(palette))
    return "pixels-sha256:" + digest.hexdigest()


def image_digest(image) -> str:
    """An ImageInput's digest, or a PIL image's ``pixel_digest``."""
    return image.digest if isinstance(image, ImageInput) else pixel_digest(image)


@dataclass(frozen=True)
class OpenedSession:
    session_id: str
    expires_at: float  # epoch seconds


@dataclass(frozen=True)
class TurnRequest:
    """One turn for ``SessionEngine.turns``: a new user message (``prompt`` and ``images``) and
    its answer.

    ``on_token`` gets each token of this turn as it is picked. When ``cancelled()`` turns true the
    turn stops at its next token and its session is left as before it (TurnCancelled). Past
    ``deadline`` (a ``time.monotonic()`` value) the turn stops and answers what it has, with
    finish reason "deadline"; the session keeps exactly that answer.

    ``history`` (None: continue the session) is the whole conversation before the new user
    message: an optional system message first, then user and assistant messages alternating,
    ending with an assistant message (or empty). The answer is the one a fresh session holding
    exactly that conversation gives, where a fresh session's ids are built message by message as
    turns build them (TurnFormatter.extend: a user message's turn ids, an assistant message's
    template text; images expand by their token counts). What is reused:

    * The session's messages (role, text, image digests; an assistant message's text is the
      answer text its turn returned) are the start of ``history``: the session's ids are kept
      as they are (generated tokens included) and only the messages after them, and the new
      one, are added and prefilled. Images the session was opened with and no turn has used yet
      belong to the first user message: it must carry them first (by digest).
    * Otherwise (an earlier message edited, an answer regenerated) the conversation's fresh ids
      F are served: the session keeps the longest start of its ids that F shares, cut back to
      the start of the first image whose digest differs and to at most len(F) - 1 (the last
      token is always fed), with its KV; the rest is dropped and F after it prefilled.
      ``cached_tokens`` is that length where the KV was on the device.

    ``rewind_to`` (None: keep every turn) keeps only the session's first ``rewind_to`` completed
    turns and answers this one after them; 0 goes back to right after the open, the open's
    images kept (a system message that came with a history goes too). Not with ``history``.

    Images held at the same place, or anywhere in the session, by digest are never loaded or
    encoded again. A turn that fails or is cancelled leaves the session as it was before it,
    history cut by a rewind or a reconciliation included.

    ``on_done`` gets the turn's outcome (its TurnResult or exception) when the turn ends while
    other turns of the same ``turns`` call still run: its answer need not wait for theirs. A
    turn that ends with the call's last is not told (the call's return value has it), except
    one that joined the call (``Joiners``): it is always told.
    """

    session_id: str
    prompt: str
    params: SamplingParams
    images: Sequence = ()
    on_token: TokenCallback | None = None
    cancelled: CancelCheck | None = None
    deadline: float | None = None
    history: Sequence[Message] | None = None
    rewind_to: int | None = None
    on_done: Callable[[TurnResult | Exception], None] | None = None


class Joiners(Protocol):
    """Turns that ask to join a ``SessionEngine.turns`` call while its turns decode.

    ``arrivals`` is asked at the end of every decode step (keep it cheap when nothing came). A turn
    the call takes runs as if it had been in the call: its own checks and reservation, its prefill,
    then decoding with the others from the next step; its outcome always goes to its ``on_done``.
    One the call cannot take now (its session has a turn in the call, no memory room beside the
    running turns, the step's rows are full) goes back through ``declined``, its session untouched.
    """

    def arrivals(self) -> Sequence[TurnRequest]: ...

    def declined(self, request: TurnRequest) -> None: ...


@dataclass(frozen=True)
class TurnResult:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int  # the whole context this turn's answer was conditioned on
    cached_tokens: int  # of those, how many came from the session's KV cache
    completion_tokens: int
    finish_reason: str  # "stop" (eos or a stop string), "length" (max_new_tokens or the context) or "deadline"
    ttft_s: float  # from the turn's start (images, room, prefill) to its first token
    decode_s: float  # from the first token to the last
    stop_sequence: bool = False  # "stop" by one of the turn's stop strings, not eos (TGI tells them apart)

    @property
    def time_per_output_token_s(self) -> float | None:
        return self.decode_s / (self.completion_tokens - 1) if self.completion_tokens > 1 else None


@dataclass
class EngineCounters:
    """Exact counts, for tests and metrics."""

    vision_tower_runs: int = 0
    images_encoded: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    sessions_opened: int = 0
    sessions_closed: int = 0
    sessions_expired: int = 0
    # Memory budget: one per session and step taken, and requests refused for want of room.
    kv_offloaded: int = 0  # KV moved to host memory
    kv_restored: int = 0  # host KV copied back at its session's turn
    host_kv_recomputed: int = 0  # host KV not copied back at its turn (re-prefill estimated faster): prefilled
    host_kv_dropped: int = 0  # host KV dropped to make host room
    kv_dropped: int = 0  # KV dropped from the device
    features_offloaded: int = 0
    features_restored: int = 0
    sessions_evicted: int = 0
    memory_refusals: int = 0
    # Turns stopped because their client went away (undone), and turns cut by their deadline.
    turns_cancelled: int = 0
    turns_past_deadline: int = 0
    # Turns that waited for a later wave of their ``turns`` call (no room beside the earlier
    # ones), once per wave waited.
    turns_deferred: int = 0
    # Graphs of the compiled step: one per decode row bucket and one for follow-up prefills
    # (CUDA graphs: one per bucket of new tokens), and any recompile.
    step_compiles: int = 0
    # Follow-up prefills run by the compiled step in their session's spare KV slots.
    prefills_compiled: int = 0
    # On CUDA: compiled step graphs that run without CUDA graph capture (inductor skipped it).
    cuda_graph_skips: int = 0
    # Turns that joined a ``turns`` call while its turns decoded (Joiners), and those declined.
    turns_joined: int = 0
    joins_declined: int = 0


@dataclass(frozen=True)
class SessionView:
    """One session in an ``EngineSnapshot``; the bytes are measured on its tensors."""

    history_tokens: int  # token ids in its history (``SessionEngine.session_history``)
    kv_tokens: int  # of those, how many its KV cache holds (0 without one)
    kv_bytes: int  # its KV cache on the device, spare slots included (0 without one)
    host_kv_bytes: int  # its KV cache in host memory until its next turn (0 without one)
    feature_bytes: int  # its image features, on the device or on host
    features_on_host: bool  # cold: features in host memory until its next turn
    images: int  # images whose features it holds
    busy: bool  # a turn of it is running
    expires_at: float  # epoch seconds


@dataclass(frozen=True)
class EngineSnapshot:
    """What an engine holds at one moment, taken under its lock (``SessionEngine.snapshot``); for
    tests and metrics. Torch-free. It names sessions by their full ids: never log it.

    ``sessions`` (least recently used first) measure each session's tensors, while the tier
    bytes are the engine's accounting per session, which the memory budget decides on: the two
    agree whenever no operation is between its steps.
    """

    sessions: Mapping[str, SessionView]
    device_kv: int  # bytes by tier, as accounted (``bytes_by_tier``)
    device_features: int
    host_kv: int
    host_features: int
    reserved: int  # device bytes promised to the operation in progress
    batch_view_bytes: int  # KV held by the running decode arena (its rows' KV and spare slots)
    kept_arena_bytes: int  # the decode arena kept for the engine's life, set aside from the budget
    memory_budget: int  # device bytes the sessions may hold
    host_budget: int  # host bytes their host KV and cold features may hold
    counters: EngineCounters  # a copy

    @property
    def session_count(self) -> int:
        return len(self.sessions)

    @property
    def tiers(self) -> dict[str, int]:
        """As ``SessionEngine.bytes_by_tier``."""
        return {"device_kv": self.device_kv, "device_features": self.device_features,
                "host_kv": self.host_kv, "host_features": self.host_features}

    @property
    def device_bytes(self) -> int:
        """Accounted device bytes of the sessions (``device_kv + device_features``)."""
        return self.device_kv + self.device_features
