"""Token-exact conversation history: each turn's new token ids, never a re-tokenised history.

A turn's text is the difference between the chat template rendered over the
conversation with and without the new user message, so any checkpoint's own
template is honoured. Only that difference is tokenised; the ids of earlier
turns (and of generated answers) are kept exactly as they were, which keeps
the session's KV cache valid.

Rendering the whole history every turn would make a follow-up cost grow with
the conversation, so a follow-up renders over a stand-in history instead: the
system message if there is one, the first user message and the last assistant
message (which keeps role alternation and first-turn specials); an assistant
message (one a client sends back in a history) renders over the same and the
user message it answers. That is exact for templates that render each message
on its own, which the formatter checks once at start against full renders; a
template that fails the check gets full renders.

An assistant message's ids are the template's own text for it: the conversation rendered
with it, minus the conversation rendered with the generation prompt, tokenised without
added specials (the template's eos text becomes the eos id). For an answer the model ended
with eos, that is its ids and ``closing_ids`` whenever the tokenizer gives the answer's text
back as those ids. A system message comes first or not at all, and renders with the first
user message: that turn is the two rendered together, tokenised with the tokenizer's specials.

Most follow-ups go further: a text-only follow-up's text is a fixed frame around
the prompt ("USER: " + prompt + " ASSISTANT:" for LLaVA-1.5), found once at
start and checked there against renders of awkward prompts (edge whitespace,
newlines, braces, non-ASCII). Its ids then come from the tokenizer backend
directly. Rendering twice and the tokenizer's wrapper cost about 1 ms of a
follow-up on 2 CPU cores right after a forward; the frame and the backend about
a tenth of that. A template that fails the check renders every turn.

A prompt is text: where it spells a special token ("</s>"), that stays text
(special_text.py); only the image token is refused, with a pointer to 'images'.

Each image's placeholder becomes as many image tokens as that image has feature rows (the
caller gives the counts: LLaVA-1.5 576 each, SigLIP LLaVAs 729, a size-dependent count in
families that tile). An answer's turn ends as the template ends it: eos (written when the
answer was cut short), then whatever the template writes after it ("\n" for ChatML).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

from llava_sessions.errors import InternalError, InvalidRequest
from llava_sessions.handler.engine.special_text import SpecialText, private_backend

log = logging.getLogger(__name__)

# LLaVA-1.5's conversation format, for checkpoints that ship no chat template.
# A system message is its text and a space before the first "USER: ", as llava-1.5-hf's own template writes it.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% else %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Stands for the prompt when finding the follow-up frame: private use, in no template.
_PROMPT_MARK = "\ue000"
# Prompts the frame must reproduce exactly: a template that trims, escapes or inspects the
# text fails on one of these and renders every turn instead.
_FRAME_PROBES = (
    "What is in the image?",
    "  two leading spaces",
    "a trailing space ",
    "line one\nline two\n",
    "{{ braces }} {% and a tag %}",
    "ünïcödé, 日本語 ✓",
    "tab\tand  double  space",
    "a </s> b <s>",
)


@dataclass
class Conversation:
    """What was said, as text (for rendering the template) — ids live with the session."""

    messages: list[dict] = field(default_factory=list)

    def user_message(self, text: str, n_images: int) -> dict:
        parts = [{"type": "image"} for _ in range(n_images)]
        parts.append({"type": "text", "text": text})
        return {"role": "user", "content": parts}

    @staticmethod
    def assistant_message(text: str) -> dict:
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    @staticmethod
    def system_message(text: str) -> dict:
        return {"role": "system", "content": [{"type": "text", "text": text}]}

    def first_turn(self) -> bool:
        """No user message yet (nothing, or only a system message): the next one opens the conversation."""
        return not self.messages or (len(self.messages) == 1 and self.messages[0]["role"] == "system")


class TurnFormatter:
    def __init__(self, tokenizer, image_token_id: int):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_token = tokenizer.decode([image_token_id])
        self.template = getattr(tokenizer, "chat_template", None) or LLAVA_15_TEMPLATE
        # Whether the template writes a system message (it may raise on one, or drop it).
        self.takes_system = self._check_system()
        self.renders_locally = self._check_local_rendering()
        # What the template writes after an answer's eos ("\n" after ChatML's <|im_end|>), as ids.
        self._after_eos = self._find_after_eos()
        # (before, after): a text-only follow-up's turn text is before + prompt + after.
        self.follow_up_frame = self._find_follow_up_frame() if self.renders_locally else None
        # One private copy of the tokenizer's backend serves the follow-up fast path and SpecialText.
        backend = private_backend(tokenizer, specials_as_text=False)
        self._encode_follow_up = self._follow_up_encoder(backend)
        self.special_text = SpecialText(tokenizer, parsed=backend)
        if not self.special_text.verify(self._special_text_samples()) and self.special_text.has_specials:
            log.warning("this tokenizer's special tokens cannot be kept as text in a prompt (special_text.py): "
                        "prompts that spell one are refused with INVALID_REQUEST")

    def user_turn_ids(self, conversation: Conversation, text: str, image_tokens: Sequence[int]) -> list[int]:
        """Ids of one user turn plus the assistant prompt, image placeholders expanded.

        ``image_tokens``: the turn's images in order, each as the count of tokens its
        placeholder expands to (its feature rows). Special-token spellings in the prompt are
        text (special_text.py). When ``conversation`` is only a system message, the turn is
        that message and this one rendered together (InvalidRequest where the template takes
        no system message, or the system message spells a special token).
        """
        n_images = len(image_tokens)
        spelled = self.special_text.spelled(text)
        first_turn = conversation.first_turn()
        if self.follow_up_frame is not None and not first_turn and n_images == 0:
            before, after = self.follow_up_frame
            if spelled is None:
                return self._expand_images(self._encode_follow_up(before + text + after), ())
            return self._literal_ids(before + text + after, len(before), text, spelled, False, ())
        if first_turn:
            # A system message is rendered with the first user turn: the two are one stretch of ids.
            history, lead = [], self._checked_system(conversation.messages)
        else:
            history = self._stand_in(conversation.messages) if self.renders_locally else conversation.messages
            lead = []
        turn_text = self._turn_text(history, conversation.user_message(text, n_images), lead)
        if spelled is None:
            return self._expand_images(self.tokenizer(turn_text, add_special_tokens=first_turn)["input_ids"],
                                       image_tokens)
        start = self._prompt_start(history, text, n_images, turn_text, lead)
        return self._literal_ids(turn_text, start, text, spelled, first_turn, image_tokens)

    def assistant_turn_ids(self, conversation: Conversation, text: str) -> list[int]:
        """Ids of an assistant message with ``text`` after ``conversation`` (which ends with the
        user message it answers): the template's own text for it, i.e. the conversation rendered
        with it minus the conversation rendered with the generation prompt, tokenised without
        added specials (the template's eos text becomes the eos id). For an answer the model
        ended with eos this is ``answer_ids + closing_ids(...)`` whenever the tokenizer gives
        its decoded text back as those ids. Special-token spellings in the text stay text.
        """
        messages = conversation.messages
        if not messages or messages[-1]["role"] != "user":
            raise InternalError("an assistant message follows the user message it answers")
        history = self._stand_in(messages) if self.renders_locally else messages
        turn_text = self._answer_text(history, text)
        spelled = self.special_text.spelled(text)
        if spelled is None:
            return self._expand_images(self.tokenizer(turn_text, add_special_tokens=False)["input_ids"], ())
        start = None
        marked = self._answer_text(history, _PROMPT_MARK)
        if marked.count(_PROMPT_MARK) == 1:
            before, after = marked.split(_PROMPT_MARK)
            start = len(before) if before + text + after == turn_text else None
        if start is None or not self.special_text.usable:
            raise InvalidRequest(
                f"an assistant message spells the special token {spelled!r}, which this model's tokenizer cannot "
                "keep as text; write it another way (with a space inside, say)"
            )
        # Even the image token stays text here: an answer is never an image.
        return self.special_text.encode(turn_text, start, start + len(text), False)

    def extend(self, conversation: Conversation, messages: Sequence[tuple[str, str, Sequence[int]]]
               ) -> tuple[list[int], list[int]]:
        """Add ``messages`` (role, text, image token counts) to ``conversation`` one by one, as a
        session builds its history: (their ids, where each assistant message ends in them).

        A user message is ``user_turn_ids`` (generation prompt included), an assistant message
        ``assistant_turn_ids``, a system message (only first) nothing of its own: it renders with
        the first user turn. The caller checks roles and order.
        """
        ids: list[int] = []
        ends: list[int] = []
        for role, text, image_tokens in messages:
            if role == "system":
                conversation.messages.append(Conversation.system_message(text))
            elif role == "user":
                ids.extend(self.user_turn_ids(conversation, text, image_tokens))
                conversation.messages.append(conversation.user_message(text, len(image_tokens)))
            else:
                ids.extend(self.assistant_turn_ids(conversation, text))
                conversation.messages.append(Conversation.assistant_message(text))
                ends.append(len(ids))
        return ids, ends

    def _checked_system(self, messages: list[dict]) -> list[dict]:
        """The system message a first turn renders with (none or one), refused where this template
        takes none or its text spells a special token (there is no telling it from the template's)."""
        if not messages:
            return []
        if not self.takes_system:
            raise InvalidRequest(
                "this model's chat template takes no system message; put its text at the start of the "
                "first user message instead"
            )
        text = "".join(part.get("text", "") for part in messages[0]["content"])
        spelled = self.special_text.spelled(text)
        if spelled is not None:
            raise InvalidRequest(
                f"the system message spells the special token {spelled!r}; write it another way "
                "(with a space inside, say)"
            )
        return list(messages)

    def _literal_ids(
        self, turn_text: str, start: int | None, text: str, spelled: str, first_turn: bool,
        image_tokens: Sequence[int],
    ) -> list[int]:
        """A turn whose prompt (``text`` at ``start``) spells special tokens, encoded with them as text."""
        if self.image_token in text:
            raise self._image_token_in_prompt()
        if start is None or not self.special_text.usable:
            raise InvalidRequest(
                f"the prompt spells the special token {spelled!r}, which this model's tokenizer cannot keep "
                "as text; write it another way (with a space inside, say)"
            )
        ids = self.special_text.encode(turn_text, start, start + len(text), first_turn)
        return self._expand_images(ids, image_tokens)

    def _prompt_start(self, history: list[dict], text: str, n_images: int, turn_text: str,
                      lead: Sequence[dict] = ()) -> int | None:
        """Where the prompt sits in its turn's text, when the template writes it as it is."""
        frame = self._frame(history, n_images, lead)
        if frame is None:
            return None
        before, after = frame
        return len(before) if before + text + after == turn_text else None

    def _frame(self, history: list[dict], n_images: int, lead: Sequence[dict] = ()) -> tuple[str, str] | None:
        """The turn text around a prompt over ``history`` (rendered with a mark for the prompt)."""
        marked = self._turn_text(history, Conversation().user_message(_PROMPT_MARK, n_images), lead)
        if marked.count(_PROMPT_MARK) != 1:
            return None
        before, after = marked.split(_PROMPT_MARK)
        return before, after

    def _special_text_samples(self) -> list[tuple[str, int, int, bool]]:
        """Turns (text, prompt start, prompt end, first turn) that SpecialText must encode as the tokenizer does."""
        samples = []
        prompt = "What is in the image?"
        for history, n_images in (([], 1), (_sample_conversation(first_images=1).messages, 0)):
            try:
                history = self._stand_in(history) if self.renders_locally else history
                turn_text = self._turn_text(history, Conversation().user_message(prompt, n_images))
                start = self._prompt_start(history, prompt, n_images, turn_text)
            except Exception:  # a template that rejects the sample: nothing to check with
                return []
            if start is not None:
                samples.append((turn_text, start, start + len(prompt), not history))
        if self.follow_up_frame is not None:
            before, after = self.follow_up_frame
            samples.append((before + prompt + after, len(before), len(before) + len(prompt), False))
        return samples

    def _turn_text(self, history: list[dict], message: dict, lead: Sequence[dict] = ()) -> str:
        """The text ``message`` (after ``lead``: a first turn's system message) adds to ``history``,
        with the generation prompt."""
        before = self._render(history, add_generation_prompt=False)
        after = self._render(history + list(lead) + [message], add_generation_prompt=True)
        if not after.startswith(before):
            raise InternalError("the checkpoint's chat template is not prefix-stable; incremental turns need one that is")
        return after[len(before):]

    def _answer_text(self, history: list[dict], text: str) -> str:
        """The text an assistant message adds to ``history`` (which ends with a user message)
        after its generation prompt."""
        before = self._render(history, add_generation_prompt=True)
        after = self._render(history + [Conversation.assistant_message(text)], add_generation_prompt=False)
        if not after.startswith(before):
            raise InvalidRequest(
                "this model's chat template does not write an assistant message after its own generation "
                "prompt, so a history with assistant messages the session lacks cannot be served; send plain "
                "turns to the session instead"
            )
        return after[len(before):]

    @staticmethod
    def _stand_in(messages: list[dict]) -> list[dict]:
        # [system message if any, first user message, last assistant message], and for an
        # assistant message the user message it answers: O(1) to render, alternation kept.
        head = 2 if messages and messages[0]["role"] == "system" else 1
        tail = 2 if messages and messages[-1]["role"] == "user" else 1
        return messages if len(messages) <= head + tail else messages[:head] + messages[-tail:]

    def _check_system(self) -> bool:
        """Does the template write a system message (once) before the first user turn?"""
        messages = [Conversation.system_message(_PROMPT_MARK), Conversation().user_message("question", 0)]
        try:
            return self._render(messages, add_generation_prompt=True).count(_PROMPT_MARK) == 1
        except Exception:  # a template that raises on a system message takes none
            return False

    def _check_local_rendering(self) -> bool:
        """Do follow-ups and assistant messages render the same over the stand-in history as over
        the whole one (with a system message too, where the template takes one)?"""
        samples = [_sample_conversation(first_images=1)]
        if self.takes_system:
            samples.append(_sample_conversation(first_images=1, system=True))
        try:
            for sample in samples:
                message = sample.user_message("one more question", 0)
                if self._turn_text(self._stand_in(sample.messages), message) != self._turn_text(sample.messages, message):
                    return False
                asked = sample.messages + [message]
                try:
                    answered = self._answer_text(asked, "an answer")
                except InvalidRequest:  # no assistant message can be served here: nothing to compare
                    continue
                if self._answer_text(self._stand_in(asked), "an answer") != answered:
                    return False
        except Exception:  # a template that rejects the sample: keep the always-correct full render
            return False
        return True

    def _find_follow_up_frame(self) -> tuple[str, str] | None:
        """The text around a text-only follow-up's prompt, if every probe renders as that frame
        (after a system message too, where the template takes one)."""
        histories = [_sample_conversation(first_images) for first_images in (1, 0)]
        if self.takes_system:
            histories.append(_sample_conversation(first_images=1, system=True))
        try:
            frame = self._frame(self._stand_in(histories[0].messages), 0)
            if frame is None:
                return None
            before, after = frame
            for history in histories:
                for probe in _FRAME_PROBES:
                    rendered = self._turn_text(self._stand_in(history.messages), history.user_message(probe, 0))
                    if rendered != before + probe + after:
                        return None
        except Exception:  # a template that rejects a probe: render every turn
            return None
        return before, after

    def _follow_up_encoder(self, private) -> Callable[[str], list[int]]:
        """Follow-up text -> ids: ``private`` (a copy of the tokenizer's backend) where it gives the
        wrapper's ids (checked on the probes' turn texts), else the wrapper."""
        def wrapper(text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        if private is None or self.follow_up_frame is None:
            return wrapper

        def direct(text: str) -> list[int]:
            return private.encode(text, add_special_tokens=False).ids

        before, after = self.follow_up_frame
        texts = [before + probe + after for probe in (*_FRAME_PROBES, "<image> and </s>")]
        return direct if all(direct(text) == wrapper(text) for text in texts) else wrapper

    def closing_ids(self, answer_ids: list[int], eos_token_ids: frozenset[int]) -> list[int]:
        """What follows an answer in the history: eos when max_new_tokens cut the answer short,
        then what the template writes after eos ("\n" after ChatML's <|im_end|>, nothing after
        Vicuna's </s>)."""
        ended = bool(answer_ids) and answer_ids[-1] in eos_token_ids
        return ([] if ended else [self.tokenizer.eos_token_id]) + self._after_eos

    def _find_after_eos(self) -> list[int]:
        """The ids of what the template writes after an answer's eos, found once by rendering an
        answer; none where the template writes no eos after an answer or rejects the sample."""
        eos = self.tokenizer.eos_token
        sample = Conversation()
        asked = [sample.user_message("question", 0)]
        try:
            prompt = self._render(asked, add_generation_prompt=True)
            answered = self._render(asked + [Conversation.assistant_message(_PROMPT_MARK)], add_generation_prompt=False)
        except Exception:  # a template that rejects the sample: eos alone closes an answer
            return []
        if not eos or not answered.startswith(prompt) or answered.count(_PROMPT_MARK) != 1:
            return []
        closing = answered.split(_PROMPT_MARK)[1]
        if not closing.startswith(eos) or len(closing) == len(eos):
            return []
        return self.tokenizer(closing[len(eos):], add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages and not add_generation_prompt:
            return ""
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    def _expand_images(self, ids: list[int], image_tokens: Sequence[int]) -> list[int]:
        """Image i's placeholder (in order) becomes ``image_tokens[i]`` image tokens."""
        placeholders = sum(1 for i in ids if i == self.image_token_id)
        if placeholders != len(image_tokens):
            # Only a prompt that spells the image token itself gets here.
            raise self._image_token_in_prompt()
        counts = iter(image_tokens)
        expanded: list[int] = []
        for token in ids:
            if token == self.image_token_id:
                expanded.extend([self.image_token_id] * next(counts))
            else:
                expanded.append(token)
        return expanded

    def _image_token_in_prompt(self) -> InvalidRequest:
        return InvalidRequest(
            f"the prompt must not contain the image token {self.image_token!r}; "
            "send images in the 'images' field"
        )


def _sample_conversation(first_images: int, system: bool = False) -> Conversation:
    """Three exchanges, the first with ``first_images`` images (after a system message if asked):
    what the start-up checks render."""
    sample = Conversation([Conversation.system_message("You are a careful assistant.")] if system else [])
    for k in range(3):
        sample.messages.append(sample.user_message(f"question {k}", first_images if k == 0 else 0))
        sample.messages.append(Conversation.assistant_message(f"answer {k}"))
    return sample
