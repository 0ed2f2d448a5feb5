"""End to end: SessionClient (boto3) → local SageMaker runtime → two TorchServe instances.

Several sessions spread over both instances take plain and streamed turns; then one instance is
killed mid-conversation and every session goes on: those it held are reopened on the survivor and
their conversation replayed (greedy, so the replayed answers equal the answers given before the
kill). The ``chat`` command runs as a subprocess with its stdin piped. A session driven by OpenAI
``messages`` resends its whole conversation each turn (a regenerated answer included) and is
reopened with it in one request when lost; each answer equals a one-shot answer of its conversation.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import pytest
from llava_sessions.deploy.client import SessionClient
from llava_sessions.deploy.local_runtime import LocalRuntime

from llava_sessions.archive import build_archive
from llava_sessions.commands.chat import printable
from tests.conftest import noise_image
from tests.fakes import isolate_from_aws

pytestmark = pytest.mark.integration

ENDPOINT = "llava-e2e"
MAX_NEW = 8
PROMPTS = ["What is in the picture?", "What colours does it have?", "Describe it again, briefly."]


@pytest.fixture(scope="module")
def runtime(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client-e2e")
    archive = build_archive(tiny_model_dir, tmp / "archive", max_sessions_per_worker=8, session_ttl_s=600)
    runtime = LocalRuntime(archive, tmp / "run", instances=2, port=0).start(ready_timeout=300)
    yield runtime
    runtime.stop()


@pytest.fixture(autouse=True)
def local_aws_env(monkeypatch):
    """No real AWS anywhere: fake keys, a region, no instance-metadata lookups."""
    isolate_from_aws(monkeypatch)


def make_client(runtime, **options) -> SessionClient:
    return SessionClient(ENDPOINT, endpoint_url=runtime.url, region="us-east-1", max_new_tokens=MAX_NEW,
                         temperature=0, **options)


def test_chat_command_streams_a_conversation(runtime, tmp_path):
    image = tmp_path / "noise.png"
    noise_image(7, 48).save(image)
    with make_client(runtime).open(images=[image]) as twin:
        # As the terminal shows them: chat drops control characters (random weights do produce some).
        expected = [printable(twin.ask(prompt)) for prompt in PROMPTS[:2]]

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    done = subprocess.run(
        [sys.executable, "-m", "llava_sessions.cli", "chat", "--endpoint", ENDPOINT, "--endpoint-url", runtime.url,
         "--image", str(image), "--max-new-tokens", str(MAX_NEW)],
        input=f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n/quit\nnever sent\n", capture_output=True, text=True, timeout=120,
        env=env, check=False,
    )
    assert done.returncode == 0, done.stderr
    # No credentials and no region in that environment: a local runtime needs neither.
    assert done.stdout == f"> {expected[0]}\n> > {expected[1]}\n> ", done.stdout
    assert "open until" in done.stderr and "closed" in done.stderr, done.stderr
    assert runtime.sessions() == {}


def one_shot(client: SessionClient, messages: list[dict]) -> str:
    """The answer a fresh session gives the conversation: an OpenAI body with no SessionId."""
    body = {"messages": messages, "max_tokens": MAX_NEW, "temperature": 0}
    response = client.runtime.invoke_endpoint(EndpointName=ENDPOINT, Body=json.dumps(body),
                                              ContentType="application/json")
    assert "NewSessionId" not in response
    return json.loads(response["Body"].read())["choices"][0]["message"]["content"]


def test_a_session_driven_by_whole_conversations(runtime):
    client = make_client(runtime)
    png = io.BytesIO()
    noise_image(3, 40).save(png, format="PNG")
    look = {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}},
        {"type": "text", "text": PROMPTS[0]}]}
    with client.open() as chat:
        a0 = chat.ask(messages=[look])
        conversation = [look, {"role": "assistant", "content": a0}, {"role": "user", "content": PROMPTS[1]}]
        chat.ask(messages=conversation)
        assert chat.last_usage["cached_tokens"] > 0  # the session's messages were kept, not prefilled again
        # Regenerate: the same conversation without the answer just given. The server answers it as
        # a fresh session with that conversation would (greedy): as a one-shot of it does.
        again = chat.ask(messages=conversation)
        assert again == one_shot(client, conversation)
        assert chat.last_usage["cached_tokens"] > 0  # the common prefix was reused
        assert [turn.answer for turn in chat.history] == [a0, again]

        # Streamed, a regenerate again: the same answer as the one-shot's.
        streamed = chat.stream(messages=conversation)
        pieces = list(streamed)
        assert pieces and "".join(pieces) == streamed.text == again
        assert streamed.details["finish_reason"] in ("stop", "length") and chat.last_usage["cached_tokens"] > 0
        # Streamed, the whole conversation and one more question: the session's tokens are kept.
        conversation += [{"role": "assistant", "content": streamed.text}, {"role": "user", "content": PROMPTS[2]}]
        extended = chat.stream(messages=conversation)
        assert "".join(extended) == extended.text and chat.last_usage["cached_tokens"] > 0
        assert [turn.answer for turn in chat.history] == [a0, again, extended.text]

        # Lost (closed behind the client's back): the next question reopens it with the whole
        # conversation in one request, and is answered as that conversation's one-shot is.
        lost = chat.id
        client._invoke({"requestType": "CLOSE"}, lost)
        conversation += [{"role": "assistant", "content": extended.text}, {"role": "user", "content": "And now?"}]
        answer = chat.ask(messages=[conversation[-1]])
        assert chat.reopened == 1 and chat.id != lost and chat.divergences == []
        assert answer == one_shot(client, conversation)
        assert [turn.answer for turn in chat.history] == [a0, again, extended.text, answer]
    assert runtime.sessions() == {}


def test_sessions_survive_an_instance_killed_mid_conversation(runtime):
    client = make_client(runtime)
    chats = [client.open(images=[noise_image(seed, 40)]) for seed in range(4)]
    try:
        before: dict[int, list[str]] = {}
        for index, chat in enumerate(chats):
            streamed = chat.stream(PROMPTS[0])
            pieces = list(streamed)
            assert len(pieces) >= 1 and "".join(pieces) == streamed.text
            before[index] = [streamed.text, chat.ask(PROMPTS[1])]
            assert chat.last_usage["cached_tokens"] > 0  # the second turn reused the session's KV cache

        bound = runtime.sessions()
        placement = [bound[chat.id] for chat in chats]
        assert sorted(placement) == [0, 0, 1, 1], placement  # the sessions are spread over both instances
        killed = placement[0]
        runtime.kill_instance(killed)

        seen = {True: 0, False: 0}
        for index, chat in enumerate(chats):
            lost = placement[index] == killed
            seen[lost] += 1
            if seen[lost] == 1:  # one lost and one kept session streams, the others ask
                answer = "".join(chat.stream(PROMPTS[2]))
            else:
                answer = chat.ask(PROMPTS[2])
            assert answer
            assert chat.reopened == (1 if lost else 0), (index, chat.last_reopen_reason)
            # Greedy decoding: the replayed turns came out as they had before the kill.
            assert chat.divergences == []
            assert [turn.answer for turn in chat.history[:2]] == before[index]
            assert len(chat.history) == 3 and all(turn.complete for turn in chat.history)
            assert runtime.sessions()[chat.id] != killed

        # The continued conversation equals a fresh one on the surviving instance.
        with client.open(images=[noise_image(0, 40)]) as twin:
            assert [twin.ask(prompt) for prompt in PROMPTS] == [turn.answer for turn in chats[0].history]
    finally:
        for chat in chats:
            chat.close()
    assert runtime.sessions() == {}
