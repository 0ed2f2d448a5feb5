"""Token-exact conversation history: each turn's new token ids, never a re-tokenised history.

A turn's text is the difference between the chat template rendered over the
conversation with and without the new user message, so any checkpoint's own
template is honoured. Only that difference is tokenised; the ids of earlier
turns (and of generated answers) are kept exactly as they were, which keeps
the session's KV cache valid.

Rendering the whole history every turn would make a follow-up cost grow with
the conversation, so a follow-up renders over a stand-in history instead: the
first user message and the last assistant message (which keeps role
alternation and first-turn specials). That is exact for templates that render
each message on its own, which the formatter checks once at start against a
full render; a template that fails the check gets full renders.

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
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
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


class TurnFormatter:
    def __init__(self, tokenizer, image_token_id: int):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_token = tokenizer.decode([image_token_id])
        self.template = getattr(tokenizer, "chat_template", None) or LLAVA_15_TEMPLATE
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
        text (special_text.py).
        """
        n_images = len(image_tokens)
        spelled = self.special_text.spelled(text)
        if self.follow_up_frame is not None and conversation.messages and n_images == 0:
            before, after = self.follow_up_frame
            if spelled is None:
                return self._expand_images(self._encode_follow_up(before + text + after), ())
            return self._literal_ids(before + text + after, len(before), text, spelled, False, ())
        history = self._stand_in(conversation.messages) if self.renders_locally else conversation.messages
        first_turn = not conversation.messages
        turn_text = self._turn_text(history, conversation.user_message(text, n_images))
        if spelled is None:
            return self._expand_images(self.tokenizer(turn_text, add_special_tokens=first_turn)["input_ids"],
                                       image_tokens)
        start = self._prompt_start(history, text, n_images, turn_text)
        return self._literal_ids(turn_text, start, text, spelled, first_turn, image_tokens)

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

    def _prompt_start(self, history: list[dict], text: str, n_images: int, turn_text: str) -> int | None:
        """Where the prompt sits in its turn's text, when the template writes it as it is."""
        frame = self._frame(history, n_images)
        if frame is None:
            return None
        before, after = frame
        return len(before) if before + text + after == turn_text else None

    def _frame(self, history: list[dict], n_images: int) -> tuple[str, str] | None:
        """The turn text around a prompt over ``history`` (rendered with a mark for the prompt)."""
        marked = self._turn_text(history, Conversation().user_message(_PROMPT_MARK, n_images))
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

    def _turn_text(self, history: list[dict], message: dict) -> str:
        before = self._render(history, add_generation_prompt=False)
        after = self._render(history + [message], add_generation_prompt=True)
        if not after.startswith(before):
            raise InternalError("the checkpoint's chat template is not prefix-stable; incremental turns need one that is")
        return after[len(before):]

    @staticmethod
    def _stand_in(messages: list[dict]) -> list[dict]:
        # [first user message, last assistant message]: O(1) to render, alternation kept.
        return messages if len(messages) <= 2 else [messages[0], messages[-1]]

    def _check_local_rendering(self) -> bool:
        """Does a follow-up render the same over the stand-in history as over the whole one?"""
        sample = _sample_conversation(first_images=1)
        message = sample.user_message("one more question", 0)
        try:
            return self._turn_text(self._stand_in(sample.messages), message) == self._turn_text(
                sample.messages, message
            )
        except Exception:  # a template that rejects the sample: keep the always-correct full render
            return False

    def _find_follow_up_frame(self) -> tuple[str, str] | None:
        """The text around a text-only follow-up's prompt, if every probe renders as that frame."""
        histories = [_sample_conversation(first_images) for first_images in (1, 0)]
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


def _sample_conversation(first_images: int) -> Conversation:
    """Three exchanges, the first with ``first_images`` images: what the start-up checks render."""
    sample = Conversation()
    for k in range(3):
        sample.messages.append(sample.user_message(f"question {k}", first_images if k == 0 else 0))
        sample.messages.append(Conversation.assistant_message(f"answer {k}"))
    return sample
