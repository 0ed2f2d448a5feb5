"""The OpenAI and TGI dialects: what their bodies become, and the shapes of their answers,
stream events and errors (the native and AWS-sample dialects: test_protocol.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from llava_sessions import wire
from llava_sessions.config import ServingConfig
from llava_sessions.errors import InvalidRequest, PromptTooLong, SessionNotFound, SessionsError, TooManyImages
from llava_sessions.handler.dialects import NATIVE, OPENAI, TGI, recognise
from llava_sessions.handler.protocol import NEW_SESSION, SESSION_HEADER, parse_request
from llava_sessions.handler.requests import Message, OneShot, OpenSession, Turn

CONFIG = ServingConfig()
SID = "sess-0123456789abcdef"
IMAGE = "data:image/png;base64,aGk="
RESULT = SimpleNamespace(text="A cat.", prompt_tokens=40, cached_tokens=30, completion_tokens=3, finish_reason="stop")


def parse(body: dict, header: str | None = None, hint: str | None = None, config=CONFIG):
    headers = {} if header is None else {SESSION_HEADER: header}
    return parse_request(json.dumps(body).encode(), headers, config, hint)


def chat(*messages, **fields) -> dict:
    return {"model": "llava", "messages": list(messages), **fields}


def user(*parts):
    return {"role": "user", "content": parts[0] if len(parts) == 1 and isinstance(parts[0], str) else list(parts)}


def image_part(url=IMAGE):
    return {"type": "image_url", "image_url": {"url": url}}


# --- recognising a body ----------------------------------------------------------------


@pytest.mark.parametrize("body, dialect", [
    ({"messages": []}, OPENAI), ({"inputs": "hi"}, TGI), ({"prompt": "hi"}, NATIVE),
    ({"requestType": "CLOSE"}, NATIVE), ({}, NATIVE),
])
def test_each_dialect_is_recognised_by_its_marker(body, dialect):
    assert recognise(body) is dialect


def test_the_route_decides_over_the_body():
    with pytest.raises(InvalidRequest, match="messages"):
        parse({"prompt": "hi"}, hint="openai")


# --- OpenAI ---------------------------------------------------------------------------------


def test_openai_without_a_session_is_a_one_shot_with_the_conversation():
    body = chat(
        {"role": "system", "content": "Be brief."},
        user(image_part(), {"type": "text", "text": "What is it?"}),
        {"role": "assistant", "content": "A cat."},
        user("And its colour?"),
        max_tokens=9, temperature=0, top_p=0.5, stop="\n",
    )
    request = parse(body)
    assert isinstance(request, OneShot)
    turn = request.turn
    assert (turn.prompt, turn.images, turn.max_new_tokens, turn.temperature, turn.top_p, turn.stop) == (
        "And its colour?", (), 9, 0.0, 0.5, ("\n",))
    assert turn.history == (
        Message("system", "Be brief."), Message("user", "What is it?", (IMAGE,)), Message("assistant", "A cat."))
    assert turn.model == "llava" and turn.dialect is OPENAI


def test_openai_new_session_opens_with_the_conversation_as_first_turn():
    request = parse(chat(user(image_part(), {"type": "text", "text": "What is it?"})), NEW_SESSION)
    assert isinstance(request, OpenSession) and request.images == ()
    assert request.first_turn.images == (IMAGE,) and request.first_turn.history == ()
    with pytest.raises(InvalidRequest, match="cannot stream an open"):
        parse(chat(user("hi"), stream=True), NEW_SESSION)


def test_openai_with_a_session_continues_or_reconciles():
    only_new = parse(chat(user("next?")), SID)
    assert isinstance(only_new, Turn) and only_new.session_id == SID and only_new.history is None
    whole = parse(chat(user("first"), {"role": "assistant", "content": "answer"}, user("next?")), SID)
    assert whole.history == (Message("user", "first"), Message("assistant", "answer"))


def test_openai_defaults_are_openais():
    turn = parse(chat(user("hi"))).turn
    assert (turn.temperature, turn.top_p, turn.max_new_tokens, turn.stream) == (1.0, 1.0, CONFIG.default_max_new_tokens, False)
    assert parse(chat(user("hi"), max_completion_tokens=7, temperature=None)).turn.max_new_tokens == 7


def test_openai_joins_neighbours_of_one_role_and_puts_images_first():
    turn = parse(chat(user("a"), user({"type": "text", "text": "b"}, image_part()))).turn
    assert (turn.prompt, turn.images) == ("a\n\nb", (IMAGE,))


def test_openai_developer_is_system():
    turn = parse(chat({"role": "developer", "content": "Be brief."}, user("hi"))).turn
    assert turn.history == (Message("system", "Be brief."),)


@pytest.mark.parametrize("body, message", [
    (chat(user("hi"), {"role": "assistant", "content": "yo"}), "last message must be the user's"),
    (chat(user("hi"), {"role": "system", "content": "late"}, user("again")), "system .* must come first"),
    (chat({"role": "tool", "content": "x"}, user("hi")), "role must be"),
    (chat({"role": "user"}), "content must be a string or a list"),
    (chat(user({"type": "audio", "audio": {}})), "type must be 'text' or 'image_url'"),
    (chat(user({"type": "image_url", "image_url": {"url": ""}})), "non-empty string"),
    (chat({"role": "assistant", "content": [image_part()]}, user("hi")), "only user messages may carry images"),
    (chat(user("hi"), n=2), "n must be 1"),
    (chat(user("hi"), frequency_penalty=0.5), "frequency_penalty is not supported"),
    (chat(user("hi"), logprobs=True), "logprobs"),
    (chat(user("hi"), tools=[]), "unknown field"),
    (chat(user("hi"), max_tokens=0), "max_tokens must be an integer"),
    (chat(user("hi"), max_tokens=5, max_completion_tokens=6), "differ"),
    (chat(user("hi"), temperature=3), "temperature"),
    (chat(user("hi"), stop=["a", "b", "c", "d", "e"]), "at most 4"),
    (chat(user("hi"), stream_options={"include_usage": True}), "needs \"stream\": true"),
    (chat(user(" ")), "content.* is empty"),
    (chat(user({"type": "text", "text": " "})), "user message is empty"),
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "unknown field"),
])
def test_openai_mistakes_say_how_to_fix_them(body, message):
    with pytest.raises(InvalidRequest, match=message):
        parse(body)


def test_openai_limits_apply_to_the_whole_conversation():
    config = CONFIG.replace(max_images_per_session=1, max_prompt_chars=10)
    with pytest.raises(TooManyImages):
        parse(chat(user(image_part(), image_part())), config=config)
    with pytest.raises(PromptTooLong):
        parse(chat(user("x" * 11)), config=config)


def test_openai_answer_is_a_chat_completion():
    turn = parse(chat(user("hi"))).turn
    body = OPENAI.turn_body(RESULT, turn)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "llava"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "A cat."},
                                "finish_reason": "stop", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43,
                             "prompt_tokens_details": {"cached_tokens": 30}}
    length = OPENAI.turn_body(SimpleNamespace(**{**vars(RESULT), "finish_reason": "length"}), turn)
    assert length["choices"][0]["finish_reason"] == "length"


def test_openai_stream_events_end_with_usage_and_done():
    turn = parse(chat(user("hi"), stream=True, stream_options={"include_usage": True})).turn
    events = OPENAI.stream_events(turn)
    text = events.first() + events.token(5, "A", False) + events.final(6, " cat.", False, RESULT)
    assert text.endswith("data: [DONE]\n\n")
    parsed = list(wire.iter_events([text.encode()]))
    assert [e["object"] for e in parsed] == ["chat.completion.chunk"] * 5
    assert len({e["id"] for e in parsed}) == 1
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in parsed[:-1]) == "A cat."
    assert parsed[3]["choices"][0]["finish_reason"] == "stop"
    assert parsed[4]["choices"] == [] and parsed[4]["usage"]["prompt_tokens_details"]["cached_tokens"] == 30
    assert all(e["usage"] is None for e in parsed[:4])


def test_openai_errors_keep_our_code_in_openais_shape():
    body = OPENAI.error_body(SessionNotFound("open a new session"), 404)
    assert body == {"error": {"message": "open a new session", "type": "not_found_error", "param": None,
                              "code": "SESSION_NOT_FOUND"}}


# --- TGI ------------------------------------------------------------------------------------


def test_tgi_body_of_the_seed_articles():
    body = {"inputs": "How do I build a website?",
            "parameters": {"do_sample": True, "top_p": 0.6, "temperature": 0.9, "top_k": 50, "max_new_tokens": 512,
                           "repetition_penalty": 1.03, "stop": ["</s>"], "return_full_text": False},
            "stream": True}
    request = parse(body, SID)
    assert isinstance(request, Turn) and request.dialect is TGI
    assert (request.prompt, request.temperature, request.top_p, request.top_k, request.repetition_penalty,
            request.stop, request.stream, request.max_new_tokens) == (
        "How do I build a website?", 0.9, 0.6, 50, 1.03, ("</s>",), True, 512)


def test_tgi_markdown_images_come_out_of_the_text():
    request = parse({"inputs": f"![]({IMAGE})What is this?\n\n![a](https://h/x.png) and this?"})
    assert isinstance(request, OneShot)
    assert request.turn.images == (IMAGE, "https://h/x.png") and request.turn.prompt == "What is this?\n\n and this?"


@pytest.mark.parametrize("parameters, temperature", [
    ({}, 0.0), ({"do_sample": False, "temperature": 0.8}, 0.0), ({"do_sample": True}, 1.0),
    ({"temperature": 0.5}, 0.5),
])
def test_tgi_do_sample_decides_greedy(parameters, temperature):
    assert parse({"inputs": "hi", "parameters": parameters}, SID).temperature == temperature


def test_tgi_answer_is_a_list_with_details_when_asked():
    turn = parse({"inputs": "hi", "parameters": {"details": True, "return_full_text": True}}, SID)
    assert TGI.turn_body(RESULT, turn) == [{"generated_text": "hiA cat.", "details": {
        "finish_reason": "eos_token", "generated_tokens": 3, "seed": None}}]
    assert TGI.turn_body(RESULT, parse({"inputs": "hi"}, SID)) == [{"generated_text": "A cat."}]
    by_string = SimpleNamespace(**{**vars(RESULT), "stop_sequence": True})
    assert TGI.turn_body(by_string, turn)[0]["details"]["finish_reason"] == "stop_sequence"


@pytest.mark.parametrize("body, message", [
    ({"inputs": "hi", "parameters": {"seed": 3}}, "unknown field.*seed"),
    ({"inputs": "hi", "parameters": []}, "must be an object"),
    ({"inputs": 3}, "must be a string"),
    ({"inputs": f"![]({IMAGE})"}, "no question"),
    ({"inputs": "hi", "parameters": {"top_k": -1}}, "top_k"),
    ({"inputs": "hi", "parameters": {"repetition_penalty": 0}}, "repetition_penalty"),
])
def test_tgi_mistakes_say_how_to_fix_them(body, message):
    with pytest.raises(InvalidRequest, match=message):
        parse(body, SID)


def test_tgi_errors_are_tgis():
    error = SessionNotFound("open a new session")
    assert TGI.error_body(error, 404) == {"error": "open a new session", "error_type": "SESSION_NOT_FOUND"}


def test_every_dialect_answers_errors_as_json():
    for dialect in (NATIVE, OPENAI, TGI):
        json.dumps(dialect.error_body(SessionsError("boom"), 500), allow_nan=False)


@pytest.mark.parametrize("body, header, hint", [
    ({"prompt": "hi", "max_tokens": 5}, SID, "'max_tokens' -> 'max_new_tokens'"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 5}, None, "'max_new_tokens' -> 'max_tokens'"),
    ({"inputs": "hi", "parameters": {}, "max_new_tokens": 5}, None, "allowed: inputs, parameters, stream"),
])
def test_an_unknown_field_names_the_field_to_use_and_the_dialects(body, header, hint):
    with pytest.raises(InvalidRequest) as info:
        parse(body, header)
    assert hint in info.value.message
    assert all(marker in info.value.message for marker in ('"messages"', '"inputs"', '"prompt"', '"type"'))
