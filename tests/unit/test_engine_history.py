"""Turns that carry the whole conversation (``history``) or rewind the session (``rewind_to``):
every answer is the one a fresh session with that conversation gives, token for token (greedy),
and the session keeps as much of its ids and KV as the conversation shares with it."""

from __future__ import annotations

import pytest

from llava_sessions.config import ServingConfig
from llava_sessions.errors import InvalidRequest, TooManyImages, TurnCancelled
from llava_sessions.handler.engine import generation
from llava_sessions.handler.engine.api import ImageInput, Message, TurnRequest, pixel_digest
from llava_sessions.handler.engine.engine import SessionEngine
from llava_sessions.handler.engine.generation import SamplingParams
from tests.conftest import noise_image
from tests.unit.test_engine import FakeClock, stateless_answer
from tests.fakes import GoneAfter

GREEDY = SamplingParams(max_new_tokens=6)
LONG = SamplingParams(max_new_tokens=16)
QUESTIONS = ["What is in the image?", "And what colour is it?", "Why?", "Tell me more please"]
# LLaVA-1.5's template, ChatML, Mistral's (tiled images) and OneVision's ChatML (an answer's
# text there has a "\n" more than the generation prompt asked for).
FAMILIES = ["loaded_tiny", "loaded_siglip", "loaded_next", "loaded_onevision"]


def make_engine(loaded, **config) -> SessionEngine:
    return SessionEngine(loaded, ServingConfig(max_sessions_per_worker=32, **config), clock=FakeClock())


def run(engine, session_id, prompt, images=(), params=GREEDY, **fields):
    """One turn; its exception raised."""
    [result] = engine.turns([TurnRequest(session_id, prompt, params, tuple(images), **fields)])
    if isinstance(result, BaseException):
        raise result
    return result


def held(image) -> ImageInput:
    """The image as a client sends one the session holds: loading it fails the test."""
    def load():
        raise AssertionError("an image the session holds was loaded again")

    return ImageInput(pixel_digest(image), load)


class Chat:
    """A session and the conversation its client keeps (what it resends as ``history``)."""

    def __init__(self, engine: SessionEngine, images=()):
        self.engine = engine
        self.sid = engine.open_session(list(images)).session_id
        self.messages: list[Message] = []
        self._unused = list(images)  # the open's images: the first user message's first ones

    def ask(self, prompt, images=(), **fields):
        """A plain follow-up (or a rewind), the conversation kept as the client sees it."""
        result = run(self.engine, self.sid, prompt, images, **fields)
        if fields.get("rewind_to") is not None:
            self.messages = self.messages[: 2 * fields["rewind_to"]]
        self.messages += [Message("user", prompt, tuple(self._unused) + tuple(images)), Message("assistant", result.text)]
        self._unused = []
        return result

    def ids(self) -> list[int]:
        return list(self.engine.session_history(self.sid))


def fresh(engine, history, prompt, images=()):
    """A brand-new session, opened empty, sent this turn with this history: (result, its Chat)."""
    chat = Chat(engine)
    return run(engine, chat.sid, prompt, images, history=history), chat


def common_start(session_ids: list[int], fresh_ids: list[int]) -> int:
    """The longest common start of two id lists, at most len(fresh_ids) - 1 (a turn feeds a token)."""
    n = 0
    while n < min(len(session_ids), len(fresh_ids) - 1) and session_ids[n] == fresh_ids[n]:
        n += 1
    return n


def prompt_of(chat: Chat, result) -> list[int]:
    """The ids the turn's answer was conditioned on."""
    return chat.ids()[: result.prompt_tokens]


# --- the session's own conversation ---------------------------------------------------------


def test_a_follow_up_that_resends_the_whole_conversation_is_a_plain_follow_up(loaded_tiny):
    image = noise_image(1)
    engine = make_engine(loaded_tiny)
    plain, resent = Chat(engine, [image]), Chat(engine, [image])
    # The open's image belongs to the first user message: a client that resends sends it there.
    first = run(engine, resent.sid, QUESTIONS[0], [held(image)], history=[])
    assert first.token_ids == plain.ask(QUESTIONS[0]).token_ids
    history = [Message("user", QUESTIONS[0], [held(image)]), Message("assistant", first.text)]
    for question in QUESTIONS[1:3]:
        expected = plain.ask(question)
        got = run(engine, resent.sid, question, history=history)
        assert got.token_ids == expected.token_ids
        assert got.cached_tokens == expected.cached_tokens > 0
        assert got.prompt_tokens == expected.prompt_tokens
        history += [Message("user", question), Message("assistant", got.text)]
    assert resent.ids() == plain.ids()
    assert engine.counters.images_encoded == 2  # once per session


def test_an_exchange_the_session_never_saw_is_served_like_a_fresh_session(loaded_siglip):
    image = noise_image(1)
    engine = make_engine(loaded_siglip)
    chat = Chat(engine, [image])
    chat.ask(QUESTIONS[0])
    before = chat.ids()
    history = chat.messages + [Message("user", "An invented question?"), Message("assistant", "An invented answer.")]
    got = run(engine, chat.sid, QUESTIONS[1], history=history)
    want, twin = fresh(engine, history, QUESTIONS[1])
    # Here the first answer's text tokenises back into its ids, so the fresh session holds the
    # session's own ids: were it not so, the session would keep its ids and answer after them.
    assert twin.ids()[: len(before)] == before, "the tiny model's first answer no longer round-trips"
    assert got.token_ids == want.token_ids and chat.ids() == twin.ids()
    assert got.cached_tokens > 0 and want.cached_tokens == 0
    # Only the messages the session lacked were prefilled after its own ids.
    assert got.prompt_tokens == want.prompt_tokens and chat.ids()[: len(before)] == before


def test_an_exchange_the_session_never_saw_follows_its_own_ids(loaded_tiny):
    """LLaVA-1.5's template writes " " before an answer that decodes with a space of its own:
    no answer tokenises back, so the session keeps the ids it generated, as the contract says."""
    image = noise_image(1)
    engine = make_engine(loaded_tiny)
    chat, twin = Chat(engine, [image]), Chat(engine, [image])
    chat.ask(QUESTIONS[0])
    twin.ask(QUESTIONS[0])
    before = chat.ids()
    history = chat.messages + [Message("user", "An invented question?"), Message("assistant", "An invented answer.")]
    got = run(engine, chat.sid, QUESTIONS[1], history=history)
    assert got.cached_tokens == twin.ask(QUESTIONS[1]).cached_tokens > 0
    prompt = prompt_of(chat, got)
    assert prompt[: len(before)] == before
    added = loaded_tiny.tokenizer.decode(prompt[len(before):])
    assert added == "USER: An invented question? ASSISTANT: An invented answer.</s>USER: And what colour is it? ASSISTANT:"
    assert list(got.token_ids) == stateless_answer(loaded_tiny, prompt, [image], GREEDY.max_new_tokens)


# --- a history that departs from the session's --------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_regenerated_answer_equals_a_fresh_sessions_and_reuses_the_common_start(family, request):
    loaded = request.getfixturevalue(family)
    image = noise_image(1)
    engine = make_engine(loaded)
    chat = Chat(engine, [image])
    for question in QUESTIONS[:3]:
        chat.ask(question)
    before = chat.ids()
    history = chat.messages[:-2]  # the last answer goes; its question comes again
    got = run(engine, chat.sid, QUESTIONS[2], history=history)
    want, twin = fresh(engine, history, QUESTIONS[2])
    assert got.token_ids == want.token_ids and got.prompt_tokens == want.prompt_tokens
    assert got.cached_tokens == common_start(before, prompt_of(twin, want)) > 0
    assert chat.ids() == twin.ids()
    assert engine.counters.images_encoded == 2  # the session's image was never encoded again


@pytest.mark.parametrize("family", FAMILIES)
def test_an_edited_earlier_question_equals_a_fresh_session(family, request):
    loaded = request.getfixturevalue(family)
    image = noise_image(1)
    engine = make_engine(loaded)
    chat = Chat(engine, [image])
    first = chat.ask(QUESTIONS[0])
    for question in QUESTIONS[1:3]:
        chat.ask(question)
    before = chat.ids()
    history = list(chat.messages)
    history[2] = Message("user", "And what shape is it?")
    got = run(engine, chat.sid, QUESTIONS[3], history=history)
    want, twin = fresh(engine, history, QUESTIONS[3])
    assert got.token_ids == want.token_ids
    # At least the first question is shared; its answer too where its text tokenises back.
    expected = common_start(before, prompt_of(twin, want))
    assert got.cached_tokens == expected >= first.prompt_tokens
    assert chat.ids() == twin.ids()
    # The session goes on from the edited conversation.
    assert chat.ask(QUESTIONS[0]).token_ids == run(engine, twin.sid, QUESTIONS[0]).token_ids


def test_an_edited_first_image_keeps_only_what_comes_before_it(loaded_tiny):
    first, other = noise_image(1), noise_image(2)
    engine = make_engine(loaded_tiny)
    chat = Chat(engine, [first])
    chat.ask(QUESTIONS[0])
    chat.ask(QUESTIONS[1])
    before = chat.ids()
    history = [Message("user", QUESTIONS[0], [other])] + chat.messages[1:]
    encoded = engine.counters.images_encoded
    got = run(engine, chat.sid, QUESTIONS[2], history=history)
    want, twin = fresh(engine, history, QUESTIONS[2])
    assert got.token_ids == want.token_ids and chat.ids() == twin.ids()
    # Every id before the image is shared; an image token matches only the same image's.
    start = before.index(loaded_tiny.image_token_id)
    assert got.cached_tokens == start == min(common_start(before, prompt_of(twin, want)), start)
    assert engine.counters.images_encoded == encoded + 2  # the new image, once per session
    view = engine.snapshot().sessions[chat.sid]
    assert view.images == 1 and view.feature_bytes == engine.snapshot().sessions[twin.sid].feature_bytes


# --- system messages -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES[:2])
def test_a_system_message_first_is_served_like_a_fresh_session(family, request):
    loaded = request.getfixturevalue(family)
    image = noise_image(1)
    engine = make_engine(loaded)
    chat = Chat(engine, [image])
    chat.ask(QUESTIONS[0])
    history = [Message("system", "Answer in one short sentence.")] + chat.messages
    got = run(engine, chat.sid, QUESTIONS[1], history=history)
    want, twin = fresh(engine, history, QUESTIONS[1])
    assert got.token_ids == want.token_ids and chat.ids() == twin.ids()
    assert "Answer in one short sentence." in loaded.tokenizer.decode(chat.ids())
    assert list(got.token_ids) == stateless_answer(loaded, prompt_of(chat, got), [image], GREEDY.max_new_tokens)
    # It stays first: the client resends it with the conversation, a plain follow-up.
    history += [Message("user", QUESTIONS[1]), Message("assistant", got.text)]
    follow_up = run(engine, chat.sid, QUESTIONS[2], history=history)
    assert follow_up.token_ids == run(engine, twin.sid, QUESTIONS[2]).token_ids
    assert follow_up.cached_tokens > got.prompt_tokens


def test_a_system_message_opens_a_session_from_nothing(loaded_tiny):
    image = noise_image(1)
    engine = make_engine(loaded_tiny)
    chat = Chat(engine)
    got = run(engine, chat.sid, QUESTIONS[0], [image], history=[Message("system", "Be brief.")])
    text = loaded_tiny.tokenizer.decode(prompt_of(chat, got))
    assert text.startswith("<s>Be brief. USER: <image>") and text.endswith("\nWhat is in the image? ASSISTANT:")
    assert list(got.token_ids) == stateless_answer(loaded_tiny, prompt_of(chat, got), [image], GREEDY.max_new_tokens)


def test_system_messages_are_refused_where_the_template_or_the_order_does_not_take_them(loaded_tiny, monkeypatch):
    engine = make_engine(loaded_tiny)
    chat = Chat(engine, [noise_image(1)])
    chat.ask(QUESTIONS[0])
    before = chat.ids()
    late = chat.messages + [Message("system", "Be brief.")]
    with pytest.raises(InvalidRequest, match="only the first message may be one"):
        run(engine, chat.sid, QUESTIONS[1], history=late)
    monkeypatch.setattr(engine.formatter, "takes_system", False)
    with pytest.raises(InvalidRequest, match="chat template takes no system message"):
        run(engine, chat.sid, QUESTIONS[1], history=[Message("system", "Be brief.")] + chat.messages)
    assert chat.ids() == before


# --- rewind_to ------------------------------------------------------------------------------


def test_rewind_keeps_the_first_turns_and_answers_as_a_session_that_only_had_them(loaded_tiny):
    image = noise_image(1)
    engine = make_engine(loaded_tiny)
    chat = Chat(engine, [image])
    ends = []
    for question in QUESTIONS[:3]:
        chat.ask(question)
        ends.append(len(chat.ids()))
    twin = Chat(engine, [image])
    twin.ask(QUESTIONS[0])
    got = chat.ask(QUESTIONS[3], rewind_to=1)
    assert got.token_ids == twin.ask(QUESTIONS[3]).token_ids
    assert got.cached_tokens == ends[0] and chat.ids() == twin.ids()
    # 0: right after the open, its image kept (never encoded again).
    encoded = engine.counters.images_encoded
    again = Chat(engine, [image])
    got = chat.ask(QUESTIONS[1], rewind_to=0)
    assert got.token_ids == again.ask(QUESTIONS[1]).token_ids and got.cached_tokens == 0
    assert chat.ids() == again.ids() and engine.counters.images_encoded == encoded + 1  # the new twin's
    # Out of range, or with a history: refused, and nothing changes.
    before = chat.ids()
    for wanted in (2, -1):
        with pytest.raises(InvalidRequest, match="this session has 1 completed turn"):
            run(engine, chat.sid, QUESTIONS[2], rewind_to=wanted)
    with pytest.raises(InvalidRequest, match="not both"):
        run(engine, chat.sid, QUESTIONS[2], rewind_to=0, history=[])
    assert chat.ids() == before


# --- images ---------------------------------------------------------------------------------


def test_an_image_input_the_session_holds_is_never_loaded_or_encoded_again(loaded_tiny):
    first, second = noise_image(1), noise_image(2)
    loads = []

    def sent(image) -> ImageInput:
        return ImageInput(pixel_digest(image), lambda: loads.append(image) or image)

    engine = make_engine(loaded_tiny)
    chat = Chat(engine, [sent(first)])
    assert len(loads) == 1
    a0 = run(engine, chat.sid, QUESTIONS[0], [held(first)], history=[])
    a1 = run(engine, chat.sid, QUESTIONS[1], [sent(second)],
             history=[Message("user", QUESTIONS[0], [held(first)]), Message("assistant", a0.text)])
    assert len(loads) == 2 and engine.counters.images_encoded == 2
    history = [Message("user", QUESTIONS[0], [held(first)]), Message("assistant", a0.text),
               Message("user", QUESTIONS[1], [held(second)]), Message("assistant", a1.text)]
    run(engine, chat.sid, QUESTIONS[2], history=history)
    # Edited: the second image now comes first. Held elsewhere in the session, it is reused too.
    edited = [Message("user", QUESTIONS[0], [held(second), held(first)]), Message("assistant", a0.text)]
    got = run(engine, chat.sid, QUESTIONS[2], history=edited)
    assert len(loads) == 2 and engine.counters.images_encoded == 2
    want, _ = fresh(engine, [Message("user", QUESTIONS[0], [second, first]), edited[1]], QUESTIONS[2])
    assert got.token_ids == want.token_ids


def test_the_image_limit_counts_the_whole_conversation(loaded_tiny):
    engine = make_engine(loaded_tiny, max_images_per_session=2)
    chat = Chat(engine)
    history = [Message("user", "two", [noise_image(1), noise_image(2)]), Message("assistant", "ok")]
    with pytest.raises(TooManyImages, match="at most 2"):
        run(engine, chat.sid, "and one more", [noise_image(3)], history=history)
    assert engine.counters.images_encoded == 0
    run(engine, chat.sid, "and none", history=history)


@pytest.mark.parametrize("history, match", [
    ([Message("assistant", "hi")], "a user message must come"),
    ([Message("user", "a"), Message("user", "b")], "an assistant message must come"),
    ([Message("user", "a"), Message("assistant", "b", [noise_image(1)])], "only user messages carry images"),
    ([Message("user", ""), Message("assistant", "b")], "empty user message"),
    ([Message("user", "a")], "ends with a user message"),
    ([Message("user", "a"), Message("assistant", "b"), Message("system", "c")], "only the first message"),
    ([Message("tool", "a")], "role 'tool'"),
], ids=["assistant-first", "two-users", "assistant-images", "empty", "ends-with-user", "late-system", "role"])
def test_histories_that_are_no_conversation_are_refused(loaded_tiny, history, match):
    engine = make_engine(loaded_tiny)
    chat = Chat(engine, [noise_image(1)])
    chat.ask(QUESTIONS[0])
    before = chat.ids()
    with pytest.raises(InvalidRequest, match=match):
        run(engine, chat.sid, QUESTIONS[1], history=history)
    assert chat.ids() == before and engine.counters.images_encoded == 1


# --- failures, cancellations and memory -----------------------------------------------------


def test_a_cancelled_or_failed_turn_leaves_a_cut_history_as_it_was(loaded_tiny, monkeypatch):
    first, other = noise_image(1), noise_image(2)
    engine = make_engine(loaded_tiny)
    chat, twin = Chat(engine, [first]), Chat(engine, [first])
    for question in QUESTIONS[:2]:
        chat.ask(question)
        twin.ask(question)
    before, view = chat.ids(), engine.snapshot().sessions[chat.sid]
    edited = [Message("user", "Something else entirely", [other]), Message("assistant", "No.")]
    client = GoneAfter(2)
    [outcome] = engine.turns([TurnRequest(chat.sid, QUESTIONS[2], LONG, history=edited,
                                          on_token=client.on_token, cancelled=client)])
    assert isinstance(outcome, TurnCancelled) and client.received == 2
    after = engine.snapshot().sessions[chat.sid]
    assert chat.ids() == before and (after.images, after.feature_bytes) == (view.images, view.feature_bytes)

    def explode(_token, _last):
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        run(engine, chat.sid, QUESTIONS[2], on_token=explode, history=chat.messages[:-2])
    with pytest.raises(RuntimeError):
        run(engine, chat.sid, QUESTIONS[2], on_token=explode, rewind_to=0)
    with monkeypatch.context() as patch:  # the new image fails after the history was cut
        patch.setattr(generation, "encode_images", lambda loaded, images: explode(None, None))
        with pytest.raises(RuntimeError):
            run(engine, chat.sid, QUESTIONS[2], history=edited)
    after = engine.snapshot().sessions[chat.sid]
    assert chat.ids() == before and (after.images, after.feature_bytes) == (view.images, view.feature_bytes)
    got = chat.ask(QUESTIONS[2])
    expected = twin.ask(QUESTIONS[2])
    assert got.token_ids == expected.token_ids and got.prompt_tokens == expected.prompt_tokens
    assert chat.ids() == twin.ids()


def test_a_cut_history_holds_what_a_fresh_session_with_the_kept_conversation_holds(loaded_tiny):
    first, second = noise_image(1), noise_image(2)
    engine = make_engine(loaded_tiny, kv_headroom_tokens=0)
    chat = Chat(engine, [first])
    chat.ask(QUESTIONS[0])
    chat.ask(QUESTIONS[1], [second])
    chat.ask(QUESTIONS[2])
    twin = Chat(engine, [first])
    twin.ask(QUESTIONS[0])
    # Rewound to the first turn: the second image and the later KV are gone.
    chat.ask(QUESTIONS[3], rewind_to=1)
    twin.ask(QUESTIONS[3])
    snapshot = engine.snapshot()
    assert snapshot.sessions[chat.sid] == snapshot.sessions[twin.sid]
    # Edited back to a conversation a fresh session holds: the same bytes again.
    history = twin.messages[:2]
    got = run(engine, chat.sid, QUESTIONS[1], history=history)
    run(engine, twin.sid, QUESTIONS[1], history=history)
    snapshot = engine.snapshot()
    assert snapshot.sessions[chat.sid] == snapshot.sessions[twin.sid] and got.cached_tokens > 0
    measured = [(v.kv_bytes, v.feature_bytes) for v in snapshot.sessions.values()]
    assert snapshot.device_kv == sum(kv for kv, _ in measured)
    assert snapshot.device_features == sum(f for _, f in measured)


def test_a_kv_in_host_memory_comes_back_only_as_far_as_the_history_is_kept(loaded_tiny, monkeypatch):
    from llava_sessions.handler.engine.memory_budget import Step, StepKind

    image = noise_image(1)
    engine = SessionEngine(loaded_tiny, ServingConfig(), FakeClock(), host_budget_bytes=1 << 24)
    chat = Chat(engine, [image])
    for question in QUESTIONS[:3]:
        chat.ask(question)
    before = chat.ids()
    engine.kv_manager.apply([Step(StepKind.OFFLOAD_KV, chat.sid, 0)])
    assert engine.snapshot().sessions[chat.sid].host_kv_bytes > 0
    monkeypatch.setattr(engine.kv_manager.costs, "copy_faster", lambda nbytes, tokens: True)
    history = chat.messages[:-2]
    got = run(engine, chat.sid, QUESTIONS[2], history=history)
    want, twin = fresh(engine, history, QUESTIONS[2])
    assert got.token_ids == want.token_ids and chat.ids() == twin.ids()
    assert engine.counters.kv_restored == 1
    assert got.cached_tokens == common_start(before, prompt_of(twin, want)) > 0
    snapshot = engine.snapshot()
    assert snapshot.sessions[chat.sid].host_kv_bytes == 0 and snapshot.host_kv == 0


def test_turns_with_histories_run_together_as_they_run_alone(loaded_tiny):
    engine = make_engine(loaded_tiny)
    chats = [Chat(engine, [noise_image(seed)]) for seed in (1, 2, 2)]
    for chat in chats:
        chat.ask(QUESTIONS[0])
        chat.ask(QUESTIONS[1])
    regenerated, resent, twin = chats
    together = engine.turns([TurnRequest(regenerated.sid, QUESTIONS[1], GREEDY, history=regenerated.messages[:2]),
                             TurnRequest(resent.sid, QUESTIONS[2], GREEDY, history=resent.messages)])
    assert together[0].token_ids == fresh(engine, regenerated.messages[:2], QUESTIONS[1])[0].token_ids
    assert together[1].token_ids == twin.ask(QUESTIONS[2]).token_ids
    assert all(r.cached_tokens > 0 for r in together)


def test_a_pil_images_digest_is_its_pixels():
    from PIL import Image

    image = noise_image(1)
    assert pixel_digest(image) == pixel_digest(image.copy()) != pixel_digest(noise_image(2))
    assert pixel_digest(image) != pixel_digest(image.convert("RGBA"))
    indexed = Image.new("P", (4, 4))
    recoloured = indexed.copy()
    recoloured.putpalette([255, 0, 0] * 256)
    assert pixel_digest(indexed) != pixel_digest(recoloured)  # same indices, other colours
