"""Per-turn ids: a follow-up renders over a stand-in history only when that is exact."""

from llava_sessions.handler.engine.prompt import Conversation, TurnFormatter

# Numbers every message: a follow-up's text depends on the whole history's length.
COUNTING_TEMPLATE = (
    "{% for message in messages %}{{ loop.index }}. {{ message['role'] }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def _conversation(exchanges: int) -> Conversation:
    conversation = Conversation()
    for k in range(exchanges):
        conversation.messages.append(conversation.user_message(f"question number {k}", 1 if k == 0 else 0))
        conversation.messages.append(Conversation.assistant_message(f"the answer is {k * 7}"))
    return conversation


def _full_render_ids(formatter: TurnFormatter, conversation: Conversation, text: str) -> list[int]:
    message = conversation.user_message(text, 0)
    before = formatter._render(conversation.messages, add_generation_prompt=False)
    after = formatter._render(conversation.messages + [message], add_generation_prompt=True)
    return formatter.tokenizer(after[len(before):], add_special_tokens=False)["input_ids"]


def test_the_checkpoints_template_renders_follow_ups_locally_and_exactly(loaded_tiny):
    formatter = TurnFormatter(loaded_tiny.tokenizer, loaded_tiny.image_token_id, loaded_tiny.tokens_per_image)
    assert formatter.renders_locally
    for exchanges in (1, 2, 5, 12):
        conversation = _conversation(exchanges)
        assert formatter.user_turn_ids(conversation, "and then?", 0) == _full_render_ids(
            formatter, conversation, "and then?"
        )


def test_a_template_that_counts_messages_falls_back_to_full_renders(loaded_tiny):
    tokenizer = loaded_tiny.tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = COUNTING_TEMPLATE
    try:
        formatter = TurnFormatter(tokenizer, loaded_tiny.image_token_id, loaded_tiny.tokens_per_image)
        assert not formatter.renders_locally
        conversation = _conversation(4)
        ids = formatter.user_turn_ids(conversation, "and then?", 0)
        assert ids == _full_render_ids(formatter, conversation, "and then?")
        assert tokenizer.decode(ids).startswith("9.")
    finally:
        tokenizer.chat_template = saved
