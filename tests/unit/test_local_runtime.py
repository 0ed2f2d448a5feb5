"""The sagemaker-runtime stand-in in front of fake containers, driven by real boto3.

Each fake container is a small aiohttp server speaking the container contract (GET /ping,
POST /invocations) with the session headers our handler uses, so routing, header mapping,
error mapping and event-stream framing are checked exactly as boto3 sees them, in seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import threading
import time

import boto3
import pytest
import requests
from aiohttp import web
from botocore.config import Config
from botocore.exceptions import ClientError, EventStreamError

from llava_sessions.deploy.local_runtime import ACCOUNT, SERVER, SageMakerRuntimeServer

SESSION = "X-Amzn-SageMaker-Session-Id"
CLOSED = "X-Amzn-SageMaker-Closed-Session-Id"
NEW_SESSION_ID = re.compile(r"^([A-Za-z0-9-]+); Expires=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
ENDPOINT = "my-endpoint"


class FakeContainer:
    """A container-contract server in its own thread; records what it received."""

    def __init__(self, name: str, ttl_s: float = 600):
        self.name, self.ttl_s = name, ttl_s
        self.sessions: set[str] = set()
        self.received: list[tuple[dict, dict]] = []  # (headers, body)
        self.in_flight = 0
        self.healthy = True
        self._opened = 0
        self._loop = None
        self._runner = None
        self._ready = threading.Event()
        self._stop = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _main(self):
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/ping", self._ping)
        app.router.add_post("/invocations", self._invocations)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        self._ready.set()
        await self._stop.wait()
        await self._runner.cleanup()

    def stop(self):
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)

    async def _ping(self, request):
        return web.json_response({"status": "Healthy"}, status=200 if self.healthy else 503)

    async def _invocations(self, request):
        body = json.loads(await request.read() or b"{}")
        headers = dict(request.headers)
        self.received.append((headers, body))
        self.in_flight += 1
        try:
            return await self._answer(request, headers.get(SESSION), body)
        finally:
            self.in_flight -= 1

    async def _answer(self, request, session, body):
        if "sleep" in body:
            await asyncio.sleep(body["sleep"])
        if "fail" in body:
            return web.json_response({"error": {"code": "BOOM", "message": "it failed"}}, status=body["fail"])
        if body.get("requestType") == "NEW_SESSION":
            self._opened += 1
            session_id = f"sess-{self.name}-{self._opened}"
            self.sessions.add(session_id)
            expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + self.ttl_s))
            return web.json_response({"session_id": session_id, "instance": self.name},
                                     headers={SESSION: f"{session_id}; Expires={expires}"})
        if session not in (None, "NEW_SESSION") and session not in self.sessions:
            return web.json_response({"error": {"code": "SESSION_NOT_FOUND", "message": "no such session"}},
                                     status=404)
        if body.get("requestType") == "CLOSE":
            self.sessions.discard(session)
            return web.json_response({"closed": session}, headers={CLOSED: session})
        if body.get("stream"):
            reply = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                "X-Amzn-SageMaker-Custom-Attributes": "streamed"})
            reply.enable_chunked_encoding()
            await reply.prepare(request)
            for i, word in enumerate(body["words"]):
                if i == body.get("break_after"):
                    request.transport.close()  # dies mid-stream: no terminating chunk
                    return reply
                await reply.write(f"data:{json.dumps({'token': word, 'instance': self.name})}\n\n".encode())
                await asyncio.sleep(0.01)
            await reply.write_eof()
            return reply
        echo = {"instance": self.name, "session": session, "body": body,
                "headers": {k: v for k, v in request.headers.items()}}
        return web.json_response(echo, headers={"X-Amzn-SageMaker-Custom-Attributes": "answered"})


@pytest.fixture
def containers():
    fakes = [FakeContainer("a"), FakeContainer("b")]
    yield fakes
    for fake in fakes:
        fake.stop()


def start_runtime(containers, **options) -> SageMakerRuntimeServer:
    options.setdefault("health_interval_s", 0)
    return SageMakerRuntimeServer([c.url for c in containers], port=0, **options).start()


@pytest.fixture
def runtime(containers):
    server = start_runtime(containers)
    yield server
    server.stop()


def client_for(url: str, region: str = "eu-west-1"):
    return boto3.client(
        "sagemaker-runtime", endpoint_url=url, region_name=region, aws_access_key_id="x",
        aws_secret_access_key="x", config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


@pytest.fixture
def smr(runtime):
    return client_for(runtime.url)


def invoke(smr, body, **kwargs):
    response = smr.invoke_endpoint(EndpointName=ENDPOINT, Body=json.dumps(body), ContentType="application/json",
                                   **kwargs)
    return response, json.loads(response["Body"].read())


def open_session(smr) -> tuple[str, str]:
    response, body = invoke(smr, {"requestType": "NEW_SESSION"}, SessionId="NEW_SESSION")
    match = NEW_SESSION_ID.match(response["NewSessionId"])
    assert match, response["NewSessionId"]
    assert match.group(1) == body["session_id"]
    return match.group(1), body["instance"]


def model_error(call) -> dict:
    with pytest.raises(ClientError) as caught:
        call()
    return caught.value.response


# --- InvokeEndpoint: sessions ------------------------------------------------------------


def test_new_session_binds_to_the_least_loaded_instance_and_stays(smr, runtime, containers):
    first, where_first = open_session(smr)
    second, where_second = open_session(smr)
    assert {where_first, where_second} == {"a", "b"}  # one each
    # The container saw NEW_SESSION literally, as SageMaker forwards it.
    assert [h[SESSION] for h, _ in containers[0].received + containers[1].received] == ["NEW_SESSION"] * 2
    # Close the first one: its instance is now the least loaded, so the next open goes there.
    response, _ = invoke(smr, {"requestType": "CLOSE"}, SessionId=first)
    assert response["ClosedSessionId"] == first
    assert "NewSessionId" not in response
    third, where_third = open_session(smr)
    assert where_third == where_first
    # Turns follow their sessions, many times over.
    for _ in range(3):
        for session_id, where in ((second, where_second), (third, where_third)):
            response, body = invoke(smr, {"prompt": "hi"}, SessionId=session_id)
            assert (body["instance"], body["session"]) == (where, session_id)
            assert response["InvokedProductionVariant"] == "AllTraffic"
            assert response["ContentType"].startswith("application/json")  # the container's, as sent
            assert "NewSessionId" not in response and "ClosedSessionId" not in response
    index = {"a": 0, "b": 1}
    assert runtime.bindings() == {second: index[where_second], third: index[where_third]}
    status = requests.get(f"{runtime.url}/local/sessions", timeout=5).json()
    assert status["sessions"] == runtime.bindings()
    assert [i["sessions"] for i in status["instances"]] == [
        sorted(s for s, i in runtime.bindings().items() if i == n) for n in (0, 1)
    ]


def test_close_unbinds(smr, runtime):
    session_id, _ = open_session(smr)
    assert session_id in runtime.bindings()
    response, _ = invoke(smr, {"requestType": "CLOSE"}, SessionId=session_id)
    assert response["ClosedSessionId"] == session_id
    assert runtime.bindings() == {}


def test_new_session_id_is_bound_until_its_expiry(containers):
    now = [time.time()]
    server = start_runtime(containers, clock=lambda: now[0])
    try:
        smr = client_for(server.url)
        session_id, _ = open_session(smr)
        assert list(server.bindings()) == [session_id]
        now[0] += 599  # the fake container's sessions live 600 s
        assert list(server.bindings()) == [session_id]
        now[0] += 2
        assert server.bindings() == {}
    finally:
        server.stop()


def test_unknown_session_reaches_a_container_and_comes_back_as_model_error(smr, containers):
    response = model_error(lambda: invoke(smr, {"prompt": "hi"}, SessionId="sess-never-opened"))
    assert response["Error"]["Code"] == "ModelError"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert response["OriginalStatusCode"] == 404
    assert json.loads(response["OriginalMessage"])["error"]["code"] == "SESSION_NOT_FOUND"
    assert response["LogStreamArn"] == f"arn:aws:logs:eu-west-1:{ACCOUNT}:log-group:/aws/sagemaker/Endpoints/{ENDPOINT}"
    message = response["Error"]["Message"]
    assert message.startswith('Received client error (404) from primary with message "{')
    assert f"in account {ACCOUNT} for more information." in message
    received = [h.get(SESSION) for c in containers for h, _ in c.received]
    assert received == ["sess-never-opened"]


def test_server_errors_are_model_errors_too(smr):
    response = model_error(lambda: invoke(smr, {"fail": 503}))
    assert response["Error"]["Code"] == "ModelError"
    assert response["OriginalStatusCode"] == 503
    assert response["Error"]["Message"].startswith("Received server error (503) from primary")
    assert json.loads(response["OriginalMessage"]) == {"error": {"code": "BOOM", "message": "it failed"}}


def test_a_session_on_a_dead_instance_goes_elsewhere_and_is_not_found(smr, runtime, containers):
    session_id, where = open_session(smr)
    index = {"a": 0, "b": 1}[where]
    containers[index].stop()  # the instance dies; the runtime does not know yet
    response = model_error(lambda: invoke(smr, {"prompt": "hi"}, SessionId=session_id))
    assert response["OriginalStatusCode"] == 404  # asked the other, live instance
    assert json.loads(response["OriginalMessage"])["error"]["code"] == "SESSION_NOT_FOUND"
    assert runtime.bindings() == {}
    assert [i["in_service"] for i in runtime.instance_status()] == [index != 0, index != 1]
    # Reopening works, on the live instance.
    _, again = open_session(smr)
    assert again != where


def test_retired_instance_gets_nothing(smr, runtime, containers):
    session_id, where = open_session(smr)
    index = {"a": 0, "b": 1}[where]
    runtime.retire(index)
    model_error(lambda: invoke(smr, {"prompt": "hi"}, SessionId=session_id))
    for _ in range(3):
        _, body = invoke(smr, {"prompt": "stateless"})
        assert body["instance"] != where
    assert len(containers[index].received) == 1  # only the open


def test_no_instance_in_service_is_service_unavailable(smr, runtime):
    runtime.retire(0)
    runtime.retire(1)
    response = model_error(lambda: invoke(smr, {"prompt": "hi"}))
    assert response["Error"]["Code"] == "ServiceUnavailable"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 503


def test_health_checks_take_an_instance_out_and_back(containers):
    server = start_runtime(containers, health_interval_s=0.05)
    try:
        containers[1].healthy = False
        deadline = time.monotonic() + 5
        while server.instance_status()[1]["in_service"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [i["in_service"] for i in server.instance_status()] == [True, False]
        smr = client_for(server.url)
        assert {invoke(smr, {"prompt": "x"})[1]["instance"] for _ in range(4)} == {"a"}
        containers[1].healthy = True
        deadline = time.monotonic() + 5
        while not server.instance_status()[1]["in_service"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [i["in_service"] for i in server.instance_status()] == [True, True]
    finally:
        server.stop()


def test_stateless_requests_go_to_the_least_busy_instance(smr, containers):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(invoke, smr, {"sleep": 1.0})
        deadline = time.monotonic() + 5
        while not any(c.in_flight for c in containers) and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = next(c.name for c in containers if c.in_flight)
        for _ in range(3):
            _, body = invoke(smr, {"prompt": "quick"})
            assert body["instance"] != busy
            assert body["session"] is None  # no session header at all
        assert slow.result()[1]["instance"] == busy


def test_headers_forwarded_as_sagemaker_does(smr):
    response, body = invoke(
        smr, {"prompt": "hi"}, Accept="application/json", CustomAttributes="trace=1",
        InferenceId="inference-7", TargetModel="ignored.tar.gz",
    )
    sent = {k.lower(): v for k, v in body["headers"].items()}
    assert sent["content-type"] == "application/json"
    assert sent["accept"] == "application/json"
    assert sent["x-amzn-sagemaker-custom-attributes"] == "trace=1"
    assert sent["x-amzn-sagemaker-inference-id"] == "inference-7"
    assert "authorization" not in sent and "x-amz-date" not in sent  # stripped, as SageMaker does
    assert response["CustomAttributes"] == "answered"
    headers = response["ResponseMetadata"]["HTTPHeaders"]
    assert headers["server"] == SERVER
    assert response["ResponseMetadata"]["RequestId"] == headers["x-amzn-requestid"]


# --- validation --------------------------------------------------------------------------


def test_endpoint_name_restriction(containers):
    server = start_runtime(containers, endpoint_name="only-this")
    try:
        smr = client_for(server.url)
        with pytest.raises(ClientError) as caught:
            smr.invoke_endpoint(EndpointName="other", Body=b"{}", ContentType="application/json")
        error = caught.value.response
        assert error["Error"] == {"Code": "ValidationError", "Message": f"Endpoint other of account {ACCOUNT} not found."}
        assert error["ResponseMetadata"]["HTTPStatusCode"] == 400
        response = smr.invoke_endpoint(EndpointName="only-this", Body=b"{}", ContentType="application/json")
        assert json.loads(response["Body"].read())["instance"] in ("a", "b")
        with pytest.raises(ClientError) as caught:
            smr.invoke_endpoint_with_response_stream(EndpointName="other", Body=b"{}")
        assert caught.value.response["Error"]["Code"] == "ValidationError"
    finally:
        server.stop()


def test_malformed_session_id_is_a_validation_error(smr, containers):
    error = model_error(lambda: invoke(smr, {"prompt": "hi"}, SessionId="bad_id"))
    assert error["Error"]["Code"] == "ValidationError"
    assert error["Error"]["Message"].startswith("1 validation error detected: Value 'bad_id' at 'sessionId'")
    assert not any(c.received for c in containers)


def test_body_over_the_limit_is_refused_before_any_instance(containers):
    server = start_runtime(containers, max_body_bytes=1000)
    try:
        smr = client_for(server.url)
        error = model_error(lambda: smr.invoke_endpoint(EndpointName=ENDPOINT, Body=b"x" * 1001))
        assert error["ResponseMetadata"]["HTTPStatusCode"] == 413
        assert error["Error"]["Code"] == "413"
        assert error["Error"]["Message"] == "HTTP content length exceeded 1000 bytes."
        smr.invoke_endpoint(EndpointName=ENDPOINT, Body=json.dumps({"pad": "x" * 900}))
        assert sum(len(c.received) for c in containers) == 1
    finally:
        server.stop()


def test_default_limit_is_six_mebibytes(runtime):
    big = b"x" * (6 * 1024 * 1024 + 1)
    reply = requests.post(f"{runtime.url}/endpoints/{ENDPOINT}/invocations", data=big, timeout=30)
    assert reply.status_code == 413


def test_unknown_paths(runtime):
    reply = requests.post(f"{runtime.url}/nope", data=b"{}", timeout=5)
    assert reply.status_code == 404
    assert reply.headers["x-amzn-ErrorType"] == "UnknownOperationException"
    assert "development stand-in" in requests.get(runtime.url, timeout=5).text


# --- InvokeEndpointWithResponseStream ------------------------------------------------------


def stream(smr, body, **kwargs):
    return smr.invoke_endpoint_with_response_stream(
        EndpointName=ENDPOINT, Body=json.dumps(body), ContentType="application/json", **kwargs
    )


def expected_bytes(words, instance):
    return b"".join(f"data:{json.dumps({'token': w, 'instance': instance})}\n\n".encode() for w in words)


def test_streaming_relays_each_chunk_as_a_payload_part(smr, containers):
    session_id, where = open_session(smr)
    words = ["The", " cat", " sat", " on", " the", " mat", " ✓"]
    response = stream(smr, {"prompt": "hi", "stream": True, "words": words}, SessionId=session_id,
                      Accept="text/event-stream")
    assert response["ContentType"] == "text/event-stream"
    assert response["InvokedProductionVariant"] == "AllTraffic"
    assert response["CustomAttributes"] == "streamed"
    assert "NewSessionId" not in response and "ClosedSessionId" not in response
    assert response["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/vnd.amazon.eventstream"
    events = list(response["Body"])
    assert all(set(e) == {"PayloadPart"} for e in events)
    parts = [e["PayloadPart"]["Bytes"] for e in events]
    assert len(parts) == len(words)  # one part per container chunk: relayed, not buffered
    assert b"".join(parts) == expected_bytes(words, where)
    container = containers[{"a": 0, "b": 1}[where]]
    headers, _ = container.received[-1]
    assert headers[SESSION] == session_id
    assert headers["Accept"] == "text/event-stream"  # X-Amzn-SageMaker-Accept becomes Accept


def test_streaming_refuses_new_session(smr, containers):
    error = model_error(lambda: stream(smr, {"prompt": "hi"}, SessionId="NEW_SESSION"))
    assert error["Error"]["Code"] == "ValidationError"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "Value 'NEW_SESSION' at 'sessionId' failed to satisfy constraint" in error["Error"]["Message"]
    assert not any(c.received for c in containers)


def test_streaming_without_session_is_stateless(smr):
    response = stream(smr, {"stream": True, "words": ["a", "b"]})
    data = b"".join(e["PayloadPart"]["Bytes"] for e in response["Body"])
    assert data.startswith(b"data:")


def test_streaming_error_before_the_first_chunk_is_a_model_error(smr):
    error = model_error(lambda: stream(smr, {"prompt": "hi"}, SessionId="sess-unknown"))
    assert error["Error"]["Code"] == "ModelError"
    assert error["OriginalStatusCode"] == 404


def test_stream_broken_off_midway_raises_model_stream_error(smr):
    session_id, where = open_session(smr)
    response = stream(smr, {"stream": True, "words": ["one", "two", "three", "four"], "break_after": 2},
                      SessionId=session_id)
    events = iter(response["Body"])
    got = b""
    with pytest.raises(EventStreamError) as caught:
        for event in events:
            got += event["PayloadPart"]["Bytes"]
    assert got == expected_bytes(["one", "two"], where)
    assert caught.value.response["Error"]["Code"] == "ModelStreamError"
    assert "closed before its response was complete" in caught.value.response["Error"]["Message"]


# --- the command ---------------------------------------------------------------------------


def test_local_command_is_registered_and_checks_its_arguments(capsys):
    from llava_sessions.cli import _parser, main

    args = _parser().parse_args(["local", "--instances", "3", "--port", "9000", "--endpoint-name", "e-1"])
    assert (args.instances, args.port, args.endpoint_name, args.host) == (3, 9000, "e-1", "127.0.0.1")
    assert main(["local", "--instances", "0"]) == 2
    assert main(["local", "--endpoint-name", "not_valid"]) == 2
    assert "not a valid SageMaker endpoint name" in capsys.readouterr().err
