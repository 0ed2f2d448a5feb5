"""Conversations: what a turn keeps of its session's history and what it adds.

A turn continues its session, rewinds it (``rewind_to``) or brings the whole conversation
(``history``). ``plan_turn`` decides, without touching the session, which of the session's
tokens, features and messages the turn keeps and which ids it adds: a session whose messages
start the conversation keeps its own ids; a conversation that departs keeps the longest common
prefix with a fresh session's ids (images by digest). ``cut_kv`` and ``replace_history`` apply a
plan; ``SavedHistory`` (state.py) puts a cut history back when the turn fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from llava_sessions.errors import InvalidRequest, TooManyImages
from llava_sessions.handler.engine import kv_cache
from llava_sessions.handler.engine.api import ImageInput, TurnRequest, image_digest
from llava_sessions.handler.engine.kv_manager import HostKV
from llava_sessions.handler.engine.model_loader import LoadedModel
from llava_sessions.handler.engine.prompt import Conversation, TurnFormatter
from llava_sessions.handler.engine.state import SavedHistory, SessionState

# --- turn plans: what a turn keeps of its session's history and what it adds -------------


@dataclass
class ImageSlot:
    """One image a turn adds to its session, in order: a feature the session holds (same
    digest), or a decoded image to encode."""

    digest: str
    tokens: int  # its placeholder tokens (feature rows)
    held: int | None = None  # index of the session's feature to reuse, as its features were when planned
    image: object = None  # the decoded image to encode, when it holds none


@dataclass(frozen=True)
class History:
    """A session's history as a turn replaces it: the start of its ids and features it keeps, and
    the conversation before the new user message."""

    keep: int  # token ids kept (with their KV)
    keep_images: int  # features kept (the first ones)
    conversation: Conversation
    turn_ends: list[int]
    pending_images: int
    open_images: int


@dataclass(frozen=True)
class TurnPlan:
    """What a turn adds after the ids its session keeps, and how its history changes first."""

    turn_ids: list[int]  # messages the session lacks (a history's), then the new user message's
    images: list[ImageSlot]  # images the turn adds to the session, in order
    n_images: int  # images of the new user message, the open's unused ones included
    history: History | None = None  # None: the session's history stays as it is

    def keep(self, state: SessionState) -> int:
        """The session's token ids this turn keeps."""
        return self.history.keep if self.history is not None else len(state.token_ids)


def plan_turn(loaded: LoadedModel, formatter: TurnFormatter, max_images: int, state: SessionState,
              request: TurnRequest) -> TurnPlan:
    """Check a turn against its session and plan it (TurnRequest states the contract). Decodes
    only the images the session does not hold; changes nothing."""
    if request.history is not None and request.rewind_to is not None:
        raise InvalidRequest("send either 'history' or 'rewind_to', not both: a history already says what to keep")
    images = _Images(loaded, state)
    if request.history is not None:
        return _plan_history(images, formatter, max_images, state, request)
    if request.rewind_to is not None:
        return _plan_rewind(images, formatter, max_images, state, request)
    _check_image_count(len(state.features) + len(request.images), max_images)
    return _follow_up(images, formatter, state, request.prompt, request.images)


def _check_image_count(total: int, max_images: int) -> None:
    if total > max_images:
        raise TooManyImages(
            f"this turn would bring the session to {total} images; a session holds at most {max_images}"
        )


class _Images:
    """A turn's images as slots: one the session holds (by digest) is reused, never loaded again;
    any other is loaded (ImageInput.load) once and counted."""

    def __init__(self, loaded: LoadedModel, state: SessionState):
        self._loaded, self._features = loaded, state.features
        self._held: dict[str, int] = {}
        for index, digest in enumerate(state.image_digests):
            self._held.setdefault(digest, index)
        self._new: dict[str, ImageSlot] = {}
        self._digests: dict[int, str] = {}  # by id(): a PIL image is hashed once per turn

    def digest(self, image) -> str:
        if id(image) not in self._digests:
            self._digests[id(image)] = image_digest(image)
        return self._digests[id(image)]

    def slot(self, image) -> ImageSlot:
        digest = self.digest(image)
        if digest in self._held:
            index = self._held[digest]
            return ImageSlot(digest, len(self._features[index]), held=index)
        if digest not in self._new:
            decoded = image.load() if isinstance(image, ImageInput) else image
            self._new[digest] = ImageSlot(digest, self._loaded.image_tokens([decoded])[0], image=decoded)
        known = self._new[digest]
        return ImageSlot(digest, known.tokens, image=known.image)


def image_slots(loaded: LoadedModel, state: SessionState, images: Sequence) -> list[ImageSlot]:
    """``images`` (PIL images or ImageInput) as slots to add to ``state``: one it holds by digest is
    reused, any other loaded once."""
    resolver = _Images(loaded, state)
    return [resolver.slot(image) for image in images]


def _follow_up(images: _Images, formatter: TurnFormatter, state: SessionState, prompt: str,
               new_images: Sequence, history: History | None = None) -> TurnPlan:
    """The new user message after the history (``history``'s, or the session's as it is): the
    open's unused images (which come first in the first user message), then ``new_images``."""
    conversation = history.conversation if history is not None else state.conversation
    kept = history.keep_images if history is not None else len(state.features)
    pending = history.pending_images if history is not None else state.pending_images
    slots = [images.slot(image) for image in new_images]
    image_tokens = [len(f) for f in state.features[kept - pending : kept]] + [s.tokens for s in slots]
    turn_ids = formatter.user_turn_ids(conversation, prompt, image_tokens)
    return TurnPlan(turn_ids, slots, len(image_tokens), history)


def _plan_rewind(images: _Images, formatter: TurnFormatter, max_images: int, state: SessionState,
                 request: TurnRequest) -> TurnPlan:
    """Keep the session's first ``rewind_to`` turns (0: none, the open's images kept), then the turn."""
    turns, wanted = len(state.turn_ends), request.rewind_to
    if isinstance(wanted, bool) or not isinstance(wanted, int) or not 0 <= wanted <= turns:
        raise InvalidRequest(
            f"rewind_to is {wanted!r}, but this session has {turns} completed turn(s): send a number from 0 to {turns}"
        )
    if wanted:
        system = 1 if state.conversation.messages[0]["role"] == "system" else 0
        messages = state.conversation.messages[: system + 2 * wanted]
        keep_images = sum(len(digests) for _role, _text, digests in state.messages()[: len(messages)])
        keep, pending = state.turn_ends[wanted - 1], 0
    else:  # right after the open: its images, again waiting for the first user message
        messages, keep, keep_images, pending = [], 0, state.open_images, state.open_images
    _check_image_count(keep_images + len(request.images), max_images)
    history = History(keep, keep_images, Conversation(list(messages)), state.turn_ends[:wanted], pending,
                      state.open_images)
    return _follow_up(images, formatter, state, request.prompt, request.images, history)


def _plan_history(images: _Images, formatter: TurnFormatter, max_images: int, state: SessionState,
                  request: TurnRequest) -> TurnPlan:
    """Serve the conversation ``request.history`` + the new user message (TurnRequest's contract)."""
    messages = _checked_history(request.history, formatter)
    _check_image_count(sum(len(m_images) for _role, _text, m_images in messages) + len(request.images), max_images)
    wanted = [(role, text, tuple(images.digest(i) for i in m_images)) for role, text, m_images in messages]
    held = state.messages()
    if wanted[: len(held)] == held and _carries_pending(images, state, wanted[len(held):], request):
        if len(wanted) == len(held):  # the session's own conversation: a plain follow-up
            return _follow_up(images, formatter, state, request.prompt, request.images[state.pending_images :])
        return _extend(images, formatter, state, request, messages[len(held):])
    return _depart(images, formatter, state, request, messages)


def _carries_pending(images: _Images, state: SessionState, after: list[tuple[str, str, tuple[str, ...]]],
                     request: TurnRequest) -> bool:
    """Does the first user message after the session's messages carry the open's unused images first?"""
    pending = tuple(state.pending_digests())
    if not pending:
        return True
    first = next((digests for role, _text, digests in after if role == "user"), None)
    if first is None:
        first = tuple(images.digest(i) for i in request.images[: len(pending)])
    return first[: len(pending)] == pending


def _extend(images: _Images, formatter: TurnFormatter, state: SessionState, request: TurnRequest,
            extra: list[tuple[str, str, tuple]]) -> TurnPlan:
    """The session's messages start the history: its ids stay, the history's other messages and
    the new user message are added after them (the open's unused images first in the first user one)."""
    waiting = [len(f) for f in state.features[len(state.features) - state.pending_images :]]
    pending = state.pending_images  # until a message of the history takes them
    slots, items = [], []
    messages = extra + [("user", request.prompt, tuple(request.images))]
    for index, (role, text, message_images) in enumerate(messages):
        image_tokens = []
        if role == "user" and waiting:  # held in place: the first user message's first images
            image_tokens, message_images, waiting = waiting, message_images[len(waiting) :], []
            pending = pending if index == len(messages) - 1 else 0
        added = [images.slot(image) for image in message_images]
        slots.extend(added)
        items.append((role, text, image_tokens + [s.tokens for s in added]))
    conversation = Conversation(list(state.conversation.messages))
    ids, ends = formatter.extend(conversation, items[:-1])
    new_images = items[-1][2]
    ids.extend(formatter.user_turn_ids(conversation, request.prompt, new_images))
    base = len(state.token_ids)
    history = History(base, len(state.features), conversation, state.turn_ends + [base + end for end in ends],
                      pending, state.open_images)
    return TurnPlan(ids, slots, len(new_images), history)


def _depart(images: _Images, formatter: TurnFormatter, state: SessionState, request: TurnRequest,
            messages: list[tuple[str, str, tuple]]) -> TurnPlan:
    """The history departs from the session's: its fresh ids F, the session keeping the start of
    its own ids that F shares (whole images of the same digest only, at most len(F) - 1)."""
    slots, items, first_user = [], [], None
    for role, text, message_images in messages + [("user", request.prompt, tuple(request.images))]:
        added = [images.slot(image) for image in message_images]
        if role == "user" and first_user is None:
            first_user = added
        slots.extend(added)
        items.append((role, text, [s.tokens for s in added]))
    conversation = Conversation()
    fresh, ends = formatter.extend(conversation, items[:-1])
    new_images = items[-1][2]
    fresh.extend(formatter.user_turn_ids(conversation, request.prompt, new_images))
    keep, keep_images = _common_start(state, fresh, slots, formatter.image_token_id)
    # The open's images still where the open put them: first in the first user message.
    open_images = 0
    while (open_images < min(state.open_images, len(first_user))
           and first_user[open_images].digest == state.image_digests[open_images]):
        open_images += 1
    history = History(keep, keep_images, conversation, ends, 0, open_images)
    return TurnPlan(fresh[keep:], slots[keep_images:], len(new_images), history)


def _common_start(state: SessionState, fresh: list[int], slots: list[ImageSlot], image_id: int) -> tuple[int, int]:
    """(ids, images) of the session's history that ``fresh`` starts with: the longest common start,
    at most len(fresh) - 1 (a turn feeds at least one token), cut back to the start of the first
    image whose digest differs; images count whole."""
    ids = state.token_ids
    limit = min(len(ids), len(fresh) - 1)
    common, chunk = 0, 256
    while common + chunk <= limit and ids[common : common + chunk] == fresh[common : common + chunk]:
        common += chunk
    while common < limit and ids[common] == fresh[common]:
        common += 1
    kept, at = 0, 0
    for index in range(len(state.features) - state.pending_images):
        start = ids.index(image_id, at)
        if start >= common:
            break
        end = start + len(state.features[index])
        if end > common or index >= len(slots) or slots[index].digest != state.image_digests[index]:
            common = start
            break
        kept, at = index + 1, end
    return common, kept


def _checked_history(history: Sequence, formatter: TurnFormatter) -> list[tuple[str, str, tuple]]:
    """(role, text, images) of each message, refused unless the roles make a conversation the new
    user message can follow. An assistant message may be empty (a model can answer nothing)."""
    messages, previous = [], None
    for index, message in enumerate(history):
        role, text = getattr(message, "role", None), getattr(message, "text", None)
        images = tuple(getattr(message, "images", ()) or ())
        where = f"history[{index}]"
        if role not in ("system", "user", "assistant"):
            raise InvalidRequest(f"{where} has role {role!r}; a message's role is 'system', 'user' or 'assistant'")
        if not isinstance(text, str):
            raise InvalidRequest(f"{where} has no text; give each message its text ('' for none)")
        if role == "system":
            if index:
                raise InvalidRequest(f"{where} is a system message; only the first message may be one: "
                                     "move it first, or merge it into the first")
            if not formatter.takes_system:
                raise InvalidRequest("this model's chat template takes no system message; put its text at the "
                                     "start of the first user message instead")
        if images and role != "user":
            raise InvalidRequest(f"{where} is {_a(role)} message with images; only user messages carry images: "
                                 "put them in a user message")
        if role != "assistant" and not text and not images:
            raise InvalidRequest(f"{where} is an empty {role} message; give it text or images, or leave it out")
        expected = "assistant" if previous == "user" else "user"
        if role != "system" and role != expected:
            raise InvalidRequest(
                f"{where} is {_a(role)} message where {_a(expected)} message must come: after an optional system "
                "message, user and assistant messages alternate, starting with a user message; merge "
                "consecutive messages of one role into one"
            )
        messages.append((role, text, images))
        previous = role
    if previous == "user":
        raise InvalidRequest(
            "history ends with a user message, but this turn's prompt is the next user message: history "
            "ends with an assistant message; merge that message into the prompt"
        )
    return messages


def _a(role: str) -> str:
    return ("an " if role == "assistant" else "a ") + role


def cut_kv(state: SessionState, keep: int) -> None:
    """Drop the session's KV from token ``keep`` on, on the device or in host memory (a cache
    with layers that cannot be cut, sliding-window ones, is dropped whole: the prefill rebuilds it)."""
    host = state.host_kv
    if host is not None and host.tokens > keep:
        state.host_kv = HostKV([(k[:, :, :keep], v[:, :, :keep]) for k, v in host.layers]) if keep else None
    cache = state.cache
    if cache is not None and cache.get_seq_length() > keep:
        if keep and all(isinstance(layer, kv_cache.AppendLayer) for layer in cache.layers):
            kv_cache.truncate(cache, keep)
        else:
            state.cache = None


def replace_history(state: SessionState, history: History) -> SavedHistory:
    """Put ``history`` in place of the session's (its KV cut by ``cut_kv``); what it was, to restore."""
    saved = SavedHistory.of(state)
    state.token_ids = state.token_ids[: history.keep]
    state.features = state.features[: history.keep_images]
    state.image_digests = state.image_digests[: history.keep_images]
    state.conversation, state.turn_ends = history.conversation, list(history.turn_ends)
    state.pending_images, state.open_images = history.pending_images, history.open_images
    return saved
