"""The TorchServe adapter driven through TorchServe's own Context, without a server."""

from __future__ import annotations

import json
import re

import pytest
from ts.context import Context, RequestProcessor

from tests.fakes import copy_with, png_b64

SESSION = "X-Amzn-SageMaker-Session-Id"


def call(handler, body, headers=None):
    """One request through handle(); returns (status, json body, response headers)."""
    context = Context("llava", "/nonexistent", {}, 1, None, "0.12.0")
    context.request_processor = [RequestProcessor(dict(headers or {}))]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    [out] = handler.handle([{"body": raw}], context)
    processor = context.request_processor[0]
    return processor.get_response_status_code(), json.loads(out), processor.get_response_headers()


def test_open_turn_close_round_trip(handler, images):
    status, body, headers = call(handler, {"requestType": "NEW_SESSION", "images": [png_b64(images[0])]},
                                 {SESSION: "NEW_SESSION"})
    assert status == 200
    value = headers[SESSION]
    match = re.fullmatch(r"(sess-[0-9a-f]{32}); Expires=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)", value)
    assert match and body["session_id"] == match.group(1) and body["expires_at"] == match.group(2)
    sid = body["session_id"]
    assert call(handler, {"requestType": "NEW_SESSION"})[0] == 200  # no header opens too

    first = call(handler, {"prompt": "What is this?", "max_new_tokens": 5}, {"x-amzn-sagemaker-session-id": sid})
    second = call(handler, {"prompt": "And then?", "max_new_tokens": 5}, {SESSION: sid})
    assert first[0] == second[0] == 200
    assert first[1]["usage"]["cached_tokens"] == 0 and first[1]["usage"]["completion_tokens"] == 5
    assert second[1]["usage"]["cached_tokens"] > 0

    status, body, headers = call(handler, {"requestType": "CLOSE"}, {SESSION: sid})
    assert status == 200 and headers["X-Amzn-SageMaker-Closed-Session-Id"] == sid
    status, body, _ = call(handler, {"prompt": "still there?"}, {SESSION: sid})
    assert status == 404 and body["error"]["code"] == "SESSION_NOT_FOUND"


def test_an_open_can_bring_the_first_question_and_answer_it_in_the_same_reply(handler, images):
    image = png_b64(images[0])
    question = {"prompt": "What is this?", "max_new_tokens": 6}
    status, together, headers = call(handler, {"requestType": "NEW_SESSION", "images": [image], **question},
                                     {SESSION: "NEW_SESSION"})
    assert status == 200 and headers[SESSION].startswith(together["session_id"] + "; Expires=")
    _, opened, _ = call(handler, {"requestType": "NEW_SESSION", "images": [image]})
    _, separate, _ = call(handler, question, {SESSION: opened["session_id"]})
    assert together["generated_text"] == separate["generated_text"]
    assert together["usage"] == separate["usage"]
    # the session goes on from there exactly like the two-request one
    follow_up = {"prompt": "And then?", "max_new_tokens": 6}
    assert (call(handler, follow_up, {SESSION: together["session_id"]})[1]
            == call(handler, follow_up, {SESSION: opened["session_id"]})[1])
    for body in (together, opened):
        call(handler, {"requestType": "CLOSE"}, {SESSION: body["session_id"]})


def test_an_open_whose_question_fails_leaves_no_session_behind(handler, images):
    before = handler.engine.session_count()
    status, body, headers = call(handler, {"requestType": "NEW_SESSION", "images": [png_b64(images[0])],
                                           "prompt": "x" * 100, "max_new_tokens": 100000})
    assert status == 400 and body["error"]["code"] == "INVALID_REQUEST" and SESSION not in headers
    status, body, headers = call(handler, {"requestType": "NEW_SESSION", "prompt": "word " * 3000})
    assert status == 400 and body["error"]["code"] == "PROMPT_TOO_LONG" and SESSION not in headers
    assert handler.engine.session_count() == before


@pytest.mark.parametrize(
    "body, headers, status, code",
    [
        (b"{not json", {}, 400, "INVALID_JSON"),
        ({"requestType": "NEW_SESSION", "images": ["bm90IGFuIGltYWdl"]}, {}, 400, "INVALID_IMAGE"),
        ({"prompt": "hi"}, {SESSION: "sess-unknown"}, 404, "SESSION_NOT_FOUND"),
        ({"prompt": "hi", "max_new_tokens": 0}, {SESSION: "sess-x"}, 400, "INVALID_REQUEST"),
        ({"requestType": "NEW_SESSION", "images": ["s3://not-allowed/key.png"]}, {}, 403, "IMAGE_SOURCE_NOT_ALLOWED"),
    ],
)
def test_client_mistakes_get_4xx_json_and_the_worker_keeps_serving(handler, body, headers, status, code):
    got_status, got_body, _ = call(handler, body, headers)
    assert (got_status, got_body["error"]["code"]) == (status, code)
    assert got_body["error"]["message"]
    assert call(handler, {"requestType": "NEW_SESSION"}, {})[0] == 200


def test_aws_sample_dialect(handler, images, tiny_model_dir, tmp_path):
    image = tmp_path / "pic.png"
    images[1].save(image)
    data_url = "data:image/png;base64," + png_b64(images[1])
    status, body, headers = call(handler, {"type": "start_session", "path": data_url}, {SESSION: "NEW_SESSION"})
    assert status == 200 and set(body) == {"session_id"}
    sid = body["session_id"]
    assert headers[SESSION].startswith(sid + "; Expires=")
    status, body, _ = call(handler, {"type": "send_text_prompt", "session_id": sid, "prompt_text": "Describe"},
                           {SESSION: sid})
    assert status == 200 and isinstance(body["response_text"], str)
    status, body, headers = call(handler, {"type": "close_session", "session_id": sid}, {SESSION: sid})
    assert status == 200 and body == {"success": True}


def test_the_worker_keeps_the_host_memory_it_frees(tiny_model_dir, monkeypatch):
    """initialize sets the worker's malloc policy (tests/unit/test_host_allocator.py: what it does)."""
    from llava_sessions.handler.engine import host_allocator
    from llava_sessions.handler.torchserve_handler import LlavaSessionHandler

    calls = []
    monkeypatch.setattr(host_allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    context = Context("llava", "/nonexistent", {}, 1, None, "0.12.0",
                      model_yaml_config={"handler": {"model": str(tiny_model_dir), "session_ttl_s": 60}})
    worker = LlavaSessionHandler()
    worker.initialize(context)
    try:
        assert calls == [1]
    finally:
        worker.engine.stop()


def test_a_cpu_worker_takes_its_share_of_the_cores(tiny_model_dir, monkeypatch):
    """`serve` sets LLAVA_SESSIONS_CPU_THREADS to the cores divided by the workers (ServingStack)."""
    import torch

    from llava_sessions.handler.torchserve_handler import LlavaSessionHandler

    threads = torch.get_num_threads()
    monkeypatch.setenv("LLAVA_SESSIONS_CPU_THREADS", "1")
    context = Context("llava", "/nonexistent", {}, 1, None, "0.12.0",
                      model_yaml_config={"handler": {"model": str(tiny_model_dir), "session_ttl_s": 60}})
    worker = LlavaSessionHandler()
    try:
        torch.set_num_threads(2)
        worker.initialize(context)
        assert torch.get_num_threads() == 1
    finally:
        worker.engine.stop()
        torch.set_num_threads(threads)


def test_a_model_type_without_an_adapter_is_refused_when_the_worker_starts(tiny_model_dir, tmp_path):
    """A checkpoint of a family without an adapter (here Llama 3.2 Vision's) would load into the
    wrong class with only a warning: the worker refuses it at start, saying what is supported,
    instead of failing every request."""
    from llava_sessions.errors import ConfigError
    from llava_sessions.handler.torchserve_handler import LlavaSessionHandler

    checkpoint = copy_with(tiny_model_dir, tmp_path, "config.json", model_type="mllama")
    context = Context("llava", "/nonexistent", {}, 1, None, "0.12.0",
                      model_yaml_config={"handler": {"model": str(checkpoint), "session_ttl_s": 60}})
    worker = LlavaSessionHandler()
    with pytest.raises(ConfigError, match=r"model_type 'mllama'.*Supported model types: 'llava' \("):
        worker.initialize(context)
    assert not worker.initialized and worker.engine is None


def test_a_worker_full_of_sessions_still_answers_one_shots(tiny_model_dir):
    """max_sessions_per_worker bounds the sessions a worker keeps; a one-shot keeps none."""
    from llava_sessions.handler import router_hop
    from llava_sessions.handler.torchserve_handler import LlavaSessionHandler

    context = Context("llava", "/nonexistent", {}, 1, None, "0.12.0", model_yaml_config={
        "handler": {"model": str(tiny_model_dir), "session_ttl_s": 60, "max_sessions_per_worker": 1}})
    full = LlavaSessionHandler()
    with pytest.MonkeyPatch.context() as env:
        env.setenv(router_hop.SECRET_ENV, router_hop.new_secret())
        full.initialize(context)
    try:
        status, _, headers = call(full, {"requestType": "NEW_SESSION"}, {SESSION: "NEW_SESSION"})
        assert status == 200
        kept = headers[SESSION].split(";")[0]
        status, body, _ = call(full, {"requestType": "NEW_SESSION"}, {SESSION: "NEW_SESSION"})
        assert status == 429 and body["error"]["code"] == "TOO_MANY_SESSIONS"
        status, body, headers = call(full, {"inputs": "Describe a sunset.", "parameters": {"max_new_tokens": 3}})
        assert status == 200 and body[0]["generated_text"] and SESSION not in headers  # TGI answers a list
        assert full.engine.session_count() == 1 and full.engine.has_session(kept)
        assert call(full, {"prompt": "And then?", "max_new_tokens": 2}, {SESSION: kept})[0] == 200
    finally:
        full.engine.stop()
        full.cancellations.close()
