"""OpenAI and TGI clients, unmodified, against a real TorchServe behind `serve`'s router.

The real ``openai`` client talks to ``/v1/chat/completions`` one-shot, opens a session through
the session header, follows up with the whole conversation or only the new message, streams,
and regenerates; the seed articles' TGI payload and ``TokenIterator`` run one-shot and in a
session. Each answer is compared with the engine in this process given the same conversation.
"""

from __future__ import annotations

import json

import pytest
import requests
from PIL import Image

from tests.fakes import png_b64
from tests.integration.test_serving import SESSION, invoke, start_server
from tests.integration.test_streaming import TokenIterator

pytestmark = pytest.mark.integration

openai = pytest.importorskip("openai")

MAX_NEW = 6
IMAGE = Image.new("RGB", (40, 30), (200, 40, 10))
DATA_URL = "data:image/png;base64," + png_b64(IMAGE)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("chat"), workers=1, ttl=600)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(loaded_tiny):
    """The engine in this process: ``reference(history, prompt, images)`` answers as a fresh
    session given that conversation."""
    from llava_sessions.config import ServingConfig
    from llava_sessions.handler.engine.api import Message
    from llava_sessions.handler.engine.engine import SessionEngine, TurnRequest
    from llava_sessions.handler.engine.generation import SamplingParams

    engine = SessionEngine(loaded_tiny, ServingConfig())

    def answer(history, prompt, images=(), follow_ups=(), **params):
        """The answer to ``prompt``, then (returned instead) to each of ``follow_ups`` in turn."""
        session = engine.open_session()
        messages = tuple(Message(role, text, tuple(imgs)) for role, text, imgs in history)
        for n, (text, turn_images) in enumerate([(prompt, images), *[(f, ()) for f in follow_ups]]):
            [result] = engine.turns([TurnRequest(session.session_id, text, SamplingParams(MAX_NEW, **params),
                                                 tuple(turn_images), history=messages if n == 0 else None)])
            if isinstance(result, Exception):
                raise result
        engine.close_session(session.session_id)
        return result

    return answer


def question(text, image=False):
    parts = [{"type": "image_url", "image_url": {"url": DATA_URL}}] if image else []
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def ask(client, messages, session=None, **extra):
    headers = {} if session is None else {SESSION: session}
    extra.setdefault("max_tokens", MAX_NEW)
    return client.chat.completions.create(model="llava", messages=messages, temperature=0, extra_headers=headers,
                                          **extra)


def test_models_lists_the_served_model(client):
    [model] = client.models.list().data
    assert model.id == "llava" and model.object == "model"


def test_one_shot_with_an_image_keeps_nothing(client, server, reference):
    completion = ask(client, [question("What is in the image?", image=True)])
    expected = reference([], "What is in the image?", [IMAGE])
    assert completion.choices[0].message.content == expected.text
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens == expected.prompt_tokens
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    health = requests.get(f"{server.url}/ping", timeout=10)
    assert health.status_code == 200


def test_a_session_through_the_header_with_whole_or_new_only_follow_ups(client, reference):
    first = [question("What is in the image?", image=True)]
    raw = client.chat.completions.with_raw_response.create(
        model="llava", messages=first, max_tokens=MAX_NEW, temperature=0, extra_headers={SESSION: "NEW_SESSION"})
    opened_header = raw.headers[SESSION]
    session_id = opened_header.split(";")[0]
    answer1 = raw.parse().choices[0].message.content
    assert answer1 == reference([], "What is in the image?", [IMAGE]).text

    # The whole conversation again, as OpenAI clients send it; the pasted header value works as the id.
    second = first + [{"role": "assistant", "content": answer1}, question("What colour is it?")]
    reply2 = ask(client, second, session=opened_header)
    assert reply2.usage.prompt_tokens_details.cached_tokens > 0

    # Only the new message: the session continues from what it holds.
    reply3 = ask(client, [question("Is it big?")], session=session_id)
    assert reply3.usage.prompt_tokens_details.cached_tokens > reply2.usage.prompt_tokens_details.cached_tokens

    # Regenerate the second answer: the conversation as it stood then, answered as a fresh
    # session given it would answer (a one-shot is exactly that), with its common prefix reused.
    regenerated = ask(client, second, session=session_id)
    fresh = ask(client, second)
    assert regenerated.choices[0].message.content == fresh.choices[0].message.content
    assert 0 < regenerated.usage.prompt_tokens_details.cached_tokens < fresh.usage.prompt_tokens
    assert regenerated.usage.prompt_tokens == fresh.usage.prompt_tokens

    # An edited first question (a body with earlier messages is the whole conversation): only
    # what precedes the edit is kept.
    edited = [question("What is shown here?", image=True)] + second[1:]
    reply_edited = ask(client, edited, session=session_id)
    fresh_edited = ask(client, edited)
    assert reply_edited.choices[0].message.content == fresh_edited.choices[0].message.content
    assert 0 < reply_edited.usage.prompt_tokens_details.cached_tokens < regenerated.usage.prompt_tokens_details.cached_tokens


def test_streaming_equals_the_whole_answer(client):
    messages = [question("Describe the image.", image=True)]
    whole = ask(client, messages)
    chunks = list(ask(client, messages, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_errors_keep_our_codes(client):
    with pytest.raises(openai.NotFoundError) as info:
        ask(client, [question("hi")], session="no-such-session")
    assert info.value.body["code"] == "SESSION_NOT_FOUND"
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, [{"role": "tool", "content": "x"}, question("hi")])
    assert info.value.body["code"] == "INVALID_REQUEST"
    oversized = "data:image/png;base64," + "A" * (9 * 1024 * 1024)  # over the router's 8 MiB body limit
    with pytest.raises(openai.APIStatusError) as info:
        ask(client, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": oversized}}]}])
    assert info.value.status_code == 413 and info.value.body["code"] == "REQUEST_TOO_LARGE"
    with pytest.raises(openai.PermissionDeniedError):  # an image host that is not allow-listed
        client.chat.completions.create(model="llava", max_tokens=MAX_NEW, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            {"type": "text", "text": "hi"}]}])


def test_the_seed_tgi_client_one_shot_and_in_a_session(server, reference):
    """The TGI payload and TokenIterator of the seed articles (parameters as they send them)."""
    parameters = {"do_sample": False, "top_p": 0.6, "temperature": 0.9, "top_k": 50, "max_new_tokens": MAX_NEW,
                  "repetition_penalty": 1.03, "stop": ["</s>"], "return_full_text": False}
    prompt = "How do I build a website?"
    payload = {"inputs": prompt, "parameters": parameters, "stream": True}
    expected = reference([], prompt, repetition_penalty=1.03).text

    def streamed(session=None):
        headers = {"Content-Type": "application/json", **({SESSION: session} if session else {})}
        with requests.post(f"{server.url}/invocations", data=json.dumps(payload), headers=headers, stream=True,
                           timeout=120) as response:
            assert response.status_code == 200
            chunks = ({"PayloadPart": {"Bytes": chunk}} for chunk in response.iter_content(chunk_size=None))
            return "".join(TokenIterator(chunks))

    assert streamed() == expected  # one-shot
    opened = invoke(server.url, {"inputs": prompt, "parameters": parameters}, "NEW_SESSION")  # not streamed: an open
    assert opened.status_code == 200 and opened.json() == [{"generated_text": expected}]
    session_id = opened.headers[SESSION].split(";")[0]
    follow_up = streamed(session_id)
    assert follow_up == reference([], prompt, follow_ups=[prompt], repetition_penalty=1.03).text


def test_a_stop_string_ends_streamed_and_whole_answers_alike(client):
    """A stop string taken from the middle of an answer: both answers end before it, the stream
    sending none of it (held back until it is known not to be the stop string's start)."""
    messages = [question("Describe the image in detail.", image=True)]
    full = ask(client, messages, max_tokens=12).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assume = stop.strip() and full.find(stop) == len(full) // 2  # its first occurrence is where it was taken
    if not assume:
        pytest.skip("the answer repeats the chosen piece earlier; nothing to test with it")
    whole = ask(client, messages, max_tokens=12, stop=[stop])
    assert whole.choices[0].message.content == full[: len(full) // 2]
    assert whole.choices[0].finish_reason == "stop"
    chunks = list(ask(client, messages, max_tokens=12, stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
