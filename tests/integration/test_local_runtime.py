"""boto3 → the local sagemaker-runtime stand-in → two real instances (TorchServe + tiny model each).

One LocalRuntime for the whole module; the last test kills an instance.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError
from PIL import Image

from llava_sessions.archive import build_archive
from llava_sessions.deploy.local_runtime import LocalRuntime
from tests.fakes import png_b64

pytestmark = pytest.mark.integration

ENDPOINT = "llava-local"
NEW_SESSION_ID = re.compile(r"^([A-Za-z0-9-]+); Expires=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)$")
MAX_NEW = 8


@pytest.fixture(scope="module")
def runtime(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local-runtime")
    archive = build_archive(tiny_model_dir, tmp / "archive", max_sessions_per_worker=8, session_ttl_s=600)
    runtime = LocalRuntime(archive, tmp / "run", instances=2, port=0, endpoint_name=ENDPOINT)
    runtime.start(ready_timeout=300)
    yield runtime
    runtime.stop()


@pytest.fixture(scope="module")
def smr(runtime):
    return boto3.client(
        "sagemaker-runtime", endpoint_url=runtime.url, region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="x",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, read_timeout=120),
    )


def image(i: int) -> Image.Image:
    return Image.new("RGB", (48, 40), ((53 * i) % 256, (97 * i) % 256, (29 * i) % 256))


def invoke(smr, body: dict, session: str | None = None):
    kwargs = {"SessionId": session} if session else {}
    response = smr.invoke_endpoint(EndpointName=ENDPOINT, Body=json.dumps(body), ContentType="application/json",
                                   Accept="application/json", **kwargs)
    return response, json.loads(response["Body"].read())


def open_session(smr, img: Image.Image) -> str:
    response, body = invoke(smr, {"requestType": "NEW_SESSION", "images": [png_b64(img)]}, "NEW_SESSION")
    match = NEW_SESSION_ID.match(response["NewSessionId"])
    assert match, response["NewSessionId"]
    assert body == {"session_id": match.group(1), "expires_at": match.group(2)}
    return match.group(1)


def ask(smr, session: str, prompt: str) -> dict:
    response, body = invoke(smr, {"prompt": prompt, "max_new_tokens": MAX_NEW, "temperature": 0}, session)
    assert response["InvokedProductionVariant"] == "AllTraffic"
    assert "NewSessionId" not in response
    return body


def bound(runtime) -> dict[str, int]:
    return requests.get(f"{runtime.url}/local/sessions", timeout=10).json()["sessions"]


def test_sessions_stay_on_their_instances(smr, runtime):
    images = [image(1), image(1), image(2), image(3)]  # the first two are the same picture
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda img: open_session(smr, img), images))
    assert len(set(ids)) == 4
    placement = bound(runtime)
    assert set(placement) == set(ids)
    assert sorted(placement.values()) == [0, 0, 1, 1]  # least loaded: two each

    answers: dict[str, list[str]] = {sid: [] for sid in ids}
    for question in ("What is in the picture?", "What colour is it?"):
        for sid in ids:
            body = ask(smr, sid, question)
            answers[sid].append(body["generated_text"])
            if len(answers[sid]) > 1:  # the session's state is where the turn ran
                assert 0 < body["usage"]["cached_tokens"] < body["usage"]["prompt_tokens"]
        assert bound(runtime) == placement
    # Same picture, same questions, fresh sessions (wherever they landed): the same answers.
    assert answers[ids[0]] == answers[ids[1]]

    for sid in ids:
        response, _ = invoke(smr, {"requestType": "CLOSE"}, sid)
        assert response["ClosedSessionId"] == sid
    assert bound(runtime) == {}


def test_streamed_turn_through_botocore(smr, runtime):
    sid = open_session(smr, image(4))
    reference = ask(smr, sid, "Describe it.")  # one turn in one piece first
    response = smr.invoke_endpoint_with_response_stream(
        EndpointName=ENDPOINT, SessionId=sid, ContentType="application/json",
        Body=json.dumps({"prompt": "And again?", "max_new_tokens": MAX_NEW, "stream": True}),
    )
    assert response["ContentType"].startswith("text/event-stream")
    assert "NewSessionId" not in response
    parts = [event["PayloadPart"]["Bytes"] for event in response["Body"]]
    assert len(parts) > 1
    events = [json.loads(line[len("data:"):]) for line in b"".join(parts).decode().splitlines() if line]
    assert all("error" not in event for event in events)
    assert "".join(event["token"]["text"] for event in events) == events[-1]["generated_text"]
    assert events[-1]["usage"]["cached_tokens"] > 0  # it ran on the session's instance
    assert reference["generated_text"]
    # NEW_SESSION cannot be opened through the streaming API.
    with pytest.raises(ClientError) as caught:
        smr.invoke_endpoint_with_response_stream(EndpointName=ENDPOINT, SessionId="NEW_SESSION", Body=b"{}")
    assert caught.value.response["Error"]["Code"] == "ValidationError"
    invoke(smr, {"requestType": "CLOSE"}, sid)


def test_container_errors_are_model_errors(smr):
    with pytest.raises(ClientError) as caught:
        ask(smr, "sess-never-opened", "hi")
    error = caught.value.response
    assert error["Error"]["Code"] == "ModelError"
    assert error["OriginalStatusCode"] == 404
    assert json.loads(error["OriginalMessage"])["error"]["code"] == "SESSION_NOT_FOUND"


def test_killed_instance_loses_its_sessions_and_the_other_serves(smr, runtime):
    ids = [open_session(smr, image(5 + i)) for i in range(2)]
    placement = bound(runtime)
    assert sorted(placement[sid] for sid in ids) == [0, 1]
    victim = next(sid for sid in ids if placement[sid] == 1)
    survivor = next(sid for sid in ids if placement[sid] == 0)
    runtime.kill_instance(1)
    assert runtime.alive() == [True, False]
    with pytest.raises(ClientError) as caught:
        ask(smr, victim, "Still there?")
    assert caught.value.response["Error"]["Code"] == "ModelError"
    assert json.loads(caught.value.response["OriginalMessage"])["error"]["code"] == "SESSION_NOT_FOUND"
    assert ask(smr, survivor, "Still there?")["generated_text"] is not None
    reopened = open_session(smr, image(5))
    assert bound(runtime)[reopened] == 0


def test_the_snippet_local_prints_works_without_aws_credentials(runtime, monkeypatch, tmp_path):
    """What `llava-sessions local` prints, run as printed on a machine with no AWS set-up."""
    from llava_sessions.deploy.local_runtime import boto3_snippet

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = eval(boto3_snippet(runtime.url), {"boto3": boto3})  # noqa: S307 (our own printed line)
    response = client.invoke_endpoint(EndpointName=ENDPOINT, SessionId="NEW_SESSION", ContentType="application/json",
                                      Body=json.dumps({"requestType": "NEW_SESSION"}))
    session = response["NewSessionId"].split(";")[0]
    closed = client.invoke_endpoint(EndpointName=ENDPOINT, SessionId=session, ContentType="application/json",
                                    Body=json.dumps({"requestType": "CLOSE"}))
    assert closed["ClosedSessionId"] == session


def test_openai_and_tgi_bodies_through_boto3(smr, runtime):
    """The bodies LMI, TGI and vLLM endpoints take, sent with unmodified boto3: an OpenAI
    conversation opens a session (NewSessionId) and follows up whole; a TGI body streams in it
    with the seed articles' framing; without a SessionId each is a one-shot answer."""
    picture = "data:image/png;base64," + png_b64(image(6))
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture}},
                                          {"type": "text", "text": "What is in the picture?"}]}]
    body = {"model": "llava", "messages": first, "max_tokens": MAX_NEW, "temperature": 0}
    response, opened = invoke(smr, body, "NEW_SESSION")
    sid = NEW_SESSION_ID.match(response["NewSessionId"]).group(1)
    assert opened["object"] == "chat.completion" and bound(runtime)[sid] in (0, 1)
    answer = opened["choices"][0]["message"]["content"]

    whole = {**body, "messages": first + [{"role": "assistant", "content": answer},
                                          {"role": "user", "content": "What colour is it?"}]}
    _, follow_up = invoke(smr, whole, sid)
    assert follow_up["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

    tgi = {"inputs": "And its size?", "parameters": {"max_new_tokens": MAX_NEW, "details": True}}
    streamed = smr.invoke_endpoint_with_response_stream(
        EndpointName=ENDPOINT, SessionId=sid, ContentType="application/json", Body=json.dumps({**tgi, "stream": True}))
    parts = b"".join(event["PayloadPart"]["Bytes"] for event in streamed["Body"])
    events = [json.loads(line[len("data:"):]) for line in parts.decode().splitlines() if line]
    assert "".join(event["token"]["text"] for event in events) == events[-1]["generated_text"]
    assert events[-1]["usage"]["cached_tokens"] > follow_up["usage"]["prompt_tokens"] - 1

    before = bound(runtime)
    _, one_shot = invoke(smr, tgi)
    assert one_shot[0]["details"]["generated_tokens"] > 0 and bound(runtime) == before  # nothing kept
    _, one_shot = invoke(smr, body)
    assert one_shot["choices"][0]["message"]["content"] == answer  # the same question, fresh
    response, _ = invoke(smr, {"requestType": "CLOSE"}, sid)
    assert response["ClosedSessionId"] == sid
