"""Token-exact conversation history: each turn's new token ids, never a re-tokenised history.

A turn's text is the difference between the chat template rendered over the
conversation with and without the new user message, so any checkpoint's own
template is honoured. Only that difference is tokenised; the ids of earlier
turns (and of generated answers) are kept exactly as they were, which keeps
the session's KV cache valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llava_sessions.errors import InternalError, InvalidRequest

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
    def __init__(self, tokenizer, image_token_id: int, tokens_per_image: int):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.template = getattr(tokenizer, "chat_template", None) or LLAVA_15_TEMPLATE

    def user_turn_ids(self, conversation: Conversation, text: str, n_images: int) -> list[int]:
        """Ids of one user turn plus the assistant prompt, image placeholders expanded."""
        message = conversation.user_message(text, n_images)
        before = self._render(conversation.messages, add_generation_prompt=False)
        after = self._render(conversation.messages + [message], add_generation_prompt=True)
        if not after.startswith(before):
            raise InternalError("the checkpoint's chat template is not prefix-stable; incremental turns need one that is")
        first_turn = not conversation.messages
        ids = self.tokenizer(
            after[len(before):], add_special_tokens=first_turn
        )["input_ids"]
        return self._expand_images(ids, n_images)

    def closing_ids(self, answer_ids: list[int], eos_token_ids: frozenset[int]) -> list[int]:
        """An answer cut short by max_new_tokens still ends its turn with eos, as the template does."""
        if answer_ids and answer_ids[-1] in eos_token_ids:
            return []
        return [self.tokenizer.eos_token_id]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages and not add_generation_prompt:
            return ""
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    def _expand_images(self, ids: list[int], n_images: int) -> list[int]:
        placeholders = sum(1 for i in ids if i == self.image_token_id)
        if placeholders != n_images:
            # Only a prompt that spells the image token itself gets here.
            raise InvalidRequest(
                f"the prompt must not contain the image token {self.tokenizer.decode([self.image_token_id])!r}; "
                "send images in the 'images' field"
            )
        expanded: list[int] = []
        for token in ids:
            if token == self.image_token_id:
                expanded.extend([self.image_token_id] * self.tokens_per_image)
            else:
                expanded.append(token)
        return expanded
