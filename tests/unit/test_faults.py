"""A real allocator failure inside a turn: never a wedged worker, never a changed answer.

The memory budget decides before a turn runs, but it is an estimate: the allocator may still
fail (fragmentation, another process on the GPU). Simulated here by making
``generation.prefill`` / ``generation.step`` raise the errors torch raises: on a
prefill, other sessions give memory back in the budget's order and the prefill runs once more;
when that cannot help, the turn is refused with INSUFFICIENT_MEMORY and its session is left as
before the turn. Every other session's answers stay exactly those of an engine that never failed.

The router, when the worker behind a request fails (a stand-in backend failing as TorchServe does):
a token stream broken off between events ends with TGI's error event; TorchServe's own error bodies
become WORKER_UNAVAILABLE. The same faults against a real TorchServe: tests/integration/test_faults.py.
"""

from __future__ import annotations

import time

import pytest
import torch
from llava_sessions.handler.engine import generation
from llava_sessions.handler.engine.engine import is_out_of_memory
from llava_sessions.handler.replies import error_reply

from llava_sessions.errors import OutOfMemoryBudget
from tests.conftest import noise_image
from tests.unit.test_engine import GREEDY, QUESTIONS, make_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CUDA_OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
CPU_OOM = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes.")


def failing(monkeypatch, name: str, error: Exception, calls: set[int]) -> list[int]:
    """Make ``generation.<name>`` raise ``error`` on the given (1-based) calls; returns the call log."""
    real = getattr(generation, name)
    log: list[int] = []

    def wrapper(*args, **kwargs):
        log.append(len(log) + 1)
        if len(log) in calls:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, name, wrapper)
    return log


def three_sessions(loaded):
    """An engine and a twin that never fails, each with sessions a, b, c; a and b took a turn (hot KV).

    No spare KV slots (kv_headroom_tokens=0): the sizes below are exactly the sessions' tokens."""
    engines = []
    for _ in range(2):
        engine = make_engine(loaded, kv_headroom_tokens=0)
        ids = [engine.open_session([noise_image(seed, 40)]).session_id for seed in range(3)]
        answers = [engine.turn(sid, QUESTIONS[0], GREEDY).token_ids for sid in ids[:2]]
        engines.append((engine, ids, answers))
    (engine, ids, answers), (twin, twin_ids, twin_answers) = engines
    assert answers == twin_answers
    return engine, ids, twin, twin_ids


def answers_of(engine, ids, question):
    return [engine.turn(sid, question, GREEDY).token_ids for sid in ids]


@pytest.mark.parametrize("error", [CUDA_OOM, CPU_OOM], ids=["cuda", "cpu"])
def test_an_oom_in_a_prefill_frees_lru_memory_and_retries_once(loaded_tiny, monkeypatch, error):
    engine, (a, b, c), twin, (ta, tb, tc) = three_sessions(loaded_tiny)
    calls = failing(monkeypatch, "prefill", error, {1})

    result = engine.turn(c, QUESTIONS[0], GREEDY)

    assert len(calls) == 2  # failed, then retried once
    assert result.token_ids == twin.turn(tc, QUESTIONS[0], GREEDY).token_ids
    # The budget's order: KV caches go before anything else (the turn's worst case is 40 tokens
    # of KV, a and b hold 39 each), so both dropped theirs and every session is still there.
    assert engine.counters.kv_dropped == 2 and engine.counters.sessions_evicted == 0
    assert all(engine.has_session(s) for s in (a, b, c))
    snapshot = engine.snapshot()
    assert [(snapshot.sessions[s].kv_tokens, snapshot.sessions[s].kv_bytes) for s in (a, b)] == [(0, 0), (0, 0)]
    assert engine.counters.memory_refusals == 0 and snapshot.reserved == 0
    # Nobody's answers changed: a rebuilds its KV from its features and token ids.
    assert answers_of(engine, [a, b, c], QUESTIONS[1]) == answers_of(twin, [ta, tb, tc], QUESTIONS[1])


def test_an_oom_that_persists_refuses_the_turn_and_leaves_the_session_as_before(loaded_tiny, monkeypatch):
    engine, (a, b, c), twin, (ta, tb, tc) = three_sessions(loaded_tiny)
    history = engine.session_history(c)
    calls = failing(monkeypatch, "prefill", CUDA_OOM, {1, 2})

    with pytest.raises(OutOfMemoryBudget) as refused:
        engine.turn(c, QUESTIONS[0], GREEDY)

    assert len(calls) == 2  # the retry failed too
    reply = error_reply(refused.value)
    assert (reply.status, reply.body["error"]["code"]) == (503, "INSUFFICIENT_MEMORY")
    snapshot = engine.snapshot()
    assert engine.counters.memory_refusals == 1 and snapshot.reserved == 0
    assert engine.session_history(c) == history and not snapshot.sessions[c].busy
    # The worker keeps serving; c's turn asked again and everyone else's equal the twin's.
    assert answers_of(engine, [c, a, b], QUESTIONS[0]) == answers_of(twin, [tc, ta, tb], QUESTIONS[0])


def test_an_oom_is_refused_without_touching_anyone_when_the_others_hold_too_little(loaded_tiny, monkeypatch):
    """b's turn may need 65 tokens of KV; a and c hold less than that between them: as with the
    budget, a refusal that nothing could prevent takes nothing from the others."""
    engine, (a, b, c), twin, (ta, tb, tc) = three_sessions(loaded_tiny)
    calls = failing(monkeypatch, "prefill", CUDA_OOM, {1})
    with pytest.raises(OutOfMemoryBudget):
        engine.turn(b, QUESTIONS[1], GREEDY)
    assert len(calls) == 1 and engine.counters.kv_dropped == 0 and engine.snapshot().sessions[a].kv_tokens > 0
    assert answers_of(engine, [b, a, c], QUESTIONS[1]) == answers_of(twin, [tb, ta, tc], QUESTIONS[1])


def test_with_nothing_to_give_back_an_oom_is_refused_without_a_retry(loaded_tiny, monkeypatch):
    engine, twin = make_engine(loaded_tiny), make_engine(loaded_tiny)
    sid, tid = engine.open_session([noise_image(1, 40)]).session_id, twin.open_session([noise_image(1, 40)]).session_id
    calls = failing(monkeypatch, "prefill", CUDA_OOM, {1})

    with pytest.raises(OutOfMemoryBudget):
        engine.turn(sid, QUESTIONS[0], GREEDY)

    assert len(calls) == 1
    assert engine.turn(sid, QUESTIONS[0], GREEDY).token_ids == twin.turn(tid, QUESTIONS[0], GREEDY).token_ids


def test_an_oom_while_decoding_refuses_every_turn_of_the_batch_cleanly(loaded_tiny, monkeypatch):
    from llava_sessions.handler.engine.engine import TurnRequest

    engine, (a, b, c), twin, (ta, tb, tc) = three_sessions(loaded_tiny)
    failing(monkeypatch, "step", CPU_OOM, {2})
    streamed = []
    outcomes = engine.turns([
        TurnRequest(a, QUESTIONS[1], GREEDY, on_token=lambda token, _last: streamed.append(token)),
        TurnRequest(c, QUESTIONS[1], GREEDY),
    ])
    assert [type(o) for o in outcomes] == [OutOfMemoryBudget, OutOfMemoryBudget]
    assert streamed  # tokens had gone out: a stream ends with an INSUFFICIENT_MEMORY event
    assert engine.counters.memory_refusals == 2 and engine.snapshot().reserved == 0
    monkeypatch.undo()
    assert answers_of(engine, [a, b, c], QUESTIONS[1]) == answers_of(twin, [ta, tb, tc], QUESTIONS[1])


def test_other_errors_are_not_taken_for_oom(loaded_tiny, monkeypatch):
    assert is_out_of_memory(CUDA_OOM) and is_out_of_memory(CPU_OOM) and is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("out of memory"))
    engine = make_engine(loaded_tiny)
    sid = engine.open_session([noise_image(2, 40)]).session_id
    engine.open_session([noise_image(3, 40)])
    calls = failing(monkeypatch, "prefill", RuntimeError("shape mismatch"), {1})
    with pytest.raises(RuntimeError, match="shape mismatch"):
        engine.turn(sid, QUESTIONS[0], GREEDY)
    assert len(calls) == 1 and engine.counters.kv_dropped == 0 and engine.counters.memory_refusals == 0


def test_through_the_handler_an_oom_is_a_503_and_the_worker_keeps_serving(handler, monkeypatch):
    import json

    from tests.fakes import png_b64

    def request(body: dict, session: str | None = None):
        headers = {"content-type": "application/json"}
        if session:
            headers["x-amzn-sagemaker-session-id"] = session
        return handler.handle_one({"body": json.dumps(body).encode()}, headers)

    opened = request({"requestType": "NEW_SESSION", "images": [png_b64(noise_image(4, 40))]})
    sid = opened.body["session_id"]
    failing(monkeypatch, "prefill", CUDA_OOM, {1, 2})
    refused = request({"prompt": QUESTIONS[0], "max_new_tokens": 4}, sid)
    assert refused.status == 503 and refused.body["error"]["code"] == "INSUFFICIENT_MEMORY"
    monkeypatch.undo()
    answered = request({"prompt": QUESTIONS[0], "max_new_tokens": 4}, sid)
    assert answered.status == 200 and answered.body["usage"]["cached_tokens"] == 0
    assert request({"requestType": "CLOSE"}, sid).status == 200


# --- the router when the worker fails -------------------------------------------------------


class FailingBackend:
    """A stand-in for TorchServe's inference API that fails as TorchServe does; ``X-Fault`` picks how."""

    def __init__(self):
        import asyncio
        import threading

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/predictions/llava-0"

    def __enter__(self):
        import asyncio

        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc):
        import asyncio

        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self):
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/predictions/llava-0", self._predict)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def _predict(self, request):
        import asyncio

        from aiohttp import web

        await request.read()
        fault = request.headers.get("X-Fault")
        if fault == "worker-died":
            body = {"code": 500, "type": "InternalServerException", "message": "Worker died."}
            return web.json_response(body, status=500)
        if fault == "no-worker":
            body = {"code": 503, "type": "ServiceUnavailableException",
                    "message": "Model \"llava-0\" has no worker to serve inference request. Please use scale workers API to add workers."}
            return web.json_response(body, status=503)
        if fault == "our-503":
            body = {"error": {"code": "INSUFFICIENT_MEMORY", "message": "no room"}}
            return web.json_response(body, status=503)
        reply = web.StreamResponse(headers={"Content-Type": "text/event-stream", "ts_stream_next": "true"})
        reply.enable_chunked_encoding()
        await reply.prepare(request)
        await reply.write(b'data:{"token": {"id": 7, "text": " cat", "special": false}, "generated_text": null}\n\n')
        if fault == "die-mid-event":
            await reply.write(b'data:{"token": {"id"')
        await asyncio.sleep(0.05)
        request.transport.close()  # the worker process died
        return reply


@pytest.fixture
def failing_router():
    from llava_sessions.affinity_router import AffinityRouter

    with FailingBackend() as backend:
        # A plain backend: it answers requests as they come, and takes no joiners (no bundles of one).
        router = AffinityRouter([backend.url], port=0, ping_url=backend.url, joining=False).start()
        router.routes.bind("sess-abc", 0, time.time() + 600)
        yield router
        router.stop()


def post(router, fault: str, session: str | None = "sess-abc", **kwargs):
    import requests

    headers = {"Content-Type": "application/json", "X-Fault": fault}
    if session:
        headers["X-Amzn-SageMaker-Session-Id"] = session
    with requests.Session() as http:
        http.trust_env = False
        return http.post(f"{router.url}/invocations", data=b'{"prompt": "hi"}', headers=headers, timeout=10, **kwargs)


def test_a_token_stream_broken_off_between_events_ends_with_an_error_event(failing_router):
    from llava_sessions.deploy.client import iter_events

    with post(failing_router, "die-between-events", stream=True) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        assert "ts_stream_next" not in response.headers and "Server" not in response.headers
        raw = b"".join(response.iter_content(None))  # a clean end: no ChunkedEncodingError
    events = list(iter_events([raw]))
    assert events[0]["token"]["text"] == " cat"
    assert events[1]["error_type"] == "WORKER_UNAVAILABLE" and len(events) == 2


def test_a_stream_broken_off_inside_an_event_stays_broken_off(failing_router):
    import requests

    with post(failing_router, "die-mid-event", stream=True) as response:
        received = bytearray()
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for chunk in response.iter_content(None):
                received += chunk
    assert received.endswith(b'data:{"token": {"id"')  # nothing appended to a half event


def test_a_worker_that_died_is_a_503_worker_unavailable_and_its_session_is_forgotten(failing_router):
    response = post(failing_router, "worker-died")
    assert response.status_code == 503 and "Server" not in response.headers
    error = response.json()["error"]
    assert error["code"] == "WORKER_UNAVAILABLE" and "sessions it held are gone" in error["message"]
    assert failing_router.routes.lookup("sess-abc") is None
    again = post(failing_router, "worker-died")  # answered by the router itself
    assert again.status_code == 404 and again.json()["error"]["code"] == "SESSION_NOT_FOUND"


def test_torchserve_refusals_become_worker_unavailable_and_our_own_5xx_pass_unchanged(failing_router):
    refused = post(failing_router, "no-worker")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "WORKER_UNAVAILABLE"
    assert "no worker to serve" in refused.json()["error"]["message"]
    assert failing_router.routes.lookup("sess-abc") == 0  # a refusal loses no session
    ours = post(failing_router, "our-503")
    assert ours.status_code == 503 and ours.json() == {"error": {"code": "INSUFFICIENT_MEMORY", "message": "no room"}}
