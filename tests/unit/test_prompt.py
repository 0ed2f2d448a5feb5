"""Per-turn ids: a follow-up renders over a stand-in history only when that is exact."""

import contextlib

from llava_sessions.handler.engine.prompt import Conversation, TurnFormatter

# Numbers every message: a follow-up's text depends on the whole history's length.
COUNTING_TEMPLATE = (
    "{% for message in messages %}{{ loop.index }}. {{ message['role'] }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


# Writes the prompt trimmed: "USER: " + prompt + " ASSISTANT:" holds only for prompts without edge spaces.
TRIMMING_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] | trim }}"
    "{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
AWKWARD_PROMPTS = ["and then?", "  two leading spaces", "a trailing space ", "two\nlines", "{{ x }}", "日本語 ✓",
                   "spell </s> and <s> as text?"]


def _conversation(exchanges: int, first_images: int = 1) -> Conversation:
    conversation = Conversation()
    for k in range(exchanges):
        conversation.messages.append(conversation.user_message(f"question number {k}", first_images if k == 0 else 0))
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


@contextlib.contextmanager
def _formatter_with_template(loaded, template: str):
    """A formatter for the offline tokenizer with another chat template (restored after)."""
    saved = loaded.tokenizer.chat_template
    loaded.tokenizer.chat_template = template
    try:
        yield TurnFormatter(loaded.tokenizer, loaded.image_token_id, loaded.tokens_per_image)
    finally:
        loaded.tokenizer.chat_template = saved


def test_a_template_that_counts_messages_falls_back_to_full_renders(loaded_tiny):
    with _formatter_with_template(loaded_tiny, COUNTING_TEMPLATE) as formatter:
        assert not formatter.renders_locally
        conversation = _conversation(4)
        ids = formatter.user_turn_ids(conversation, "and then?", 0)
        assert ids == _full_render_ids(formatter, conversation, "and then?")
        assert loaded_tiny.tokenizer.decode(ids).startswith("9.")


def test_a_text_only_follow_up_is_the_templates_frame_around_the_prompt(loaded_tiny):
    formatter = TurnFormatter(loaded_tiny.tokenizer, loaded_tiny.image_token_id, loaded_tiny.tokens_per_image)
    assert formatter.follow_up_frame == ("USER: ", " ASSISTANT:")
    for first_images in (0, 1):
        for exchanges in (1, 4):
            conversation = _conversation(exchanges, first_images)
            for prompt in AWKWARD_PROMPTS:
                assert formatter.user_turn_ids(conversation, prompt, 0) == _full_render_ids(
                    formatter, conversation, prompt
                ), (first_images, exchanges, prompt)


def test_a_template_that_trims_the_prompt_renders_every_follow_up(loaded_tiny):
    with _formatter_with_template(loaded_tiny, TRIMMING_TEMPLATE) as formatter:
        assert formatter.renders_locally and formatter.follow_up_frame is None
        conversation = _conversation(3)
        for prompt in AWKWARD_PROMPTS:
            assert formatter.user_turn_ids(conversation, prompt, 0) == _full_render_ids(formatter, conversation, prompt)
        ids = formatter.user_turn_ids(conversation, "  padded  ", 0)
        assert loaded_tiny.tokenizer.decode(ids) == "USER: padded ASSISTANT:"


def test_follow_up_ids_ignore_padding_left_on_the_shared_tokenizer(loaded_tiny):
    formatter = TurnFormatter(loaded_tiny.tokenizer, loaded_tiny.image_token_id, loaded_tiny.tokens_per_image)
    conversation = _conversation(2)
    expected = formatter.user_turn_ids(conversation, "and then?", 0)
    backend = loaded_tiny.tokenizer.backend_tokenizer
    backend.enable_padding(length=64, pad_id=loaded_tiny.tokenizer.pad_token_id)
    try:
        assert formatter.user_turn_ids(conversation, "and then?", 0) == expected
    finally:
        backend.no_padding()


def test_a_follow_up_that_brings_an_image_is_rendered(loaded_tiny):
    formatter = TurnFormatter(loaded_tiny.tokenizer, loaded_tiny.image_token_id, loaded_tiny.tokens_per_image)
    conversation = _conversation(2)
    ids = formatter.user_turn_ids(conversation, "and this one?", 1)
    assert ids.count(loaded_tiny.image_token_id) == loaded_tiny.tokens_per_image
    rendered = formatter._turn_text(conversation.messages, conversation.user_message("and this one?", 1))
    assert formatter._expand_images(formatter.tokenizer(rendered, add_special_tokens=False)["input_ids"], 1) == ids
