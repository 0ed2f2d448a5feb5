"""Model families on a real TorchServe: the SigLIP LLaVA, LLaVA-NeXT and LLaVA-OneVision served end to end, and a
model type without an adapter refused when the worker starts (not on its first request)."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from llava_sessions.archive import build_archive
from llava_sessions.torchserve_process import TorchServeProcess
from tests.fakes import copy_with, png_b64
from tests.integration.test_serving import CLOSED, invoke, start_server, wait_for_log, worker_log

pytestmark = pytest.mark.integration

MAX_NEW = 6


# Wide and tall at open, a square one mid-conversation: SigLIP squashes each to 25 tokens;
# LLaVA-NeXT tiles each by its shape, so each takes its own count; OneVision leaves the two sent
# together untiled (25 + 1 each) and tiles the one sent alone.
FAMILIES = {"siglip": ("tiny_siglip_dir", "loaded_siglip", [[25, 25], [25]]),
            "next": ("tiny_next_dir", "loaded_next", [[44, 40], [88]]),
            "onevision": ("tiny_onevision_dir", "loaded_onevision", [[26, 26], [135]])}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_serves_a_conversation_as_the_engine_does(family, tmp_path, request):
    from llava_sessions.config import ServingConfig
    from llava_sessions.handler.engine.engine import SessionEngine
    from llava_sessions.handler.engine.generation import SamplingParams

    checkpoint_fixture, loaded_fixture, counts = FAMILIES[family]
    checkpoint, loaded = request.getfixturevalue(checkpoint_fixture), request.getfixturevalue(loaded_fixture)
    opened_with = [Image.new("RGB", (48, 30), (200, 40, 10)), Image.new("RGB", (20, 70), (10, 90, 220))]
    later = Image.new("RGB", (50, 50), (30, 160, 60))
    assert [loaded.image_tokens(opened_with), loaded.image_tokens([later])] == counts
    turns = [("What is in the pictures?", []), ("Which one is darker?", []), ("And this one?", [later])]
    server = start_server(checkpoint, tmp_path, workers=1, ttl=600)
    try:
        log_before = len(worker_log(server))
        response = invoke(server.url, {"requestType": "NEW_SESSION", "images": [png_b64(i) for i in opened_with]},
                          "NEW_SESSION")
        assert response.status_code == 200, response.text
        sid = response.json()["session_id"]
        served = []
        for prompt, images in turns:
            body = {"prompt": prompt, "max_new_tokens": MAX_NEW, "images": [png_b64(i) for i in images]}
            response = invoke(server.url, body, sid)
            assert response.status_code == 200, response.text
            served.append(response.json())
        response = invoke(server.url, {"requestType": "CLOSE"}, sid)
        assert response.status_code == 200 and response.headers[CLOSED] == sid
        assert wait_for_log(server, r"sessions: 0 open, 0 bytes held")
        assert "vision tower: encoded 2 image(s)" in worker_log(server)[log_before:]
    finally:
        server.stop()

    # The processor's own count for the first turn; later turns reuse the cache.
    processor = loaded.processor
    messages = [{"role": "user", "content": [{"type": "image"}] * 2 + [{"type": "text", "text": turns[0][0]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    # (the images nested as one prompt's, as apply_chat_template gives them)
    assert served[0]["usage"]["prompt_tokens"] == len(processor(images=[opened_with], text=prompt)["input_ids"][0])
    assert served[0]["usage"]["cached_tokens"] == 0
    assert 0 < served[1]["usage"]["cached_tokens"] < served[2]["usage"]["cached_tokens"]
    # An engine in this process, given the same conversation, answers exactly the same.
    engine = SessionEngine(loaded, ServingConfig())
    session = engine.open_session(opened_with)
    for (prompt, images), reply in zip(turns, served):
        result = engine.turn(session.session_id, prompt, SamplingParams(MAX_NEW), images=images)
        assert reply["generated_text"] == result.text
        assert reply["usage"]["prompt_tokens"] == result.prompt_tokens


def test_a_model_type_without_an_adapter_fails_the_worker_at_start(tiny_model_dir, tmp_path):
    checkpoint = copy_with(tiny_model_dir, tmp_path, "config.json", model_type="mllama")
    archive = build_archive(checkpoint, tmp_path / "store", max_sessions_per_worker=1, session_ttl_s=60)
    with TorchServeProcess(archive, tmp_path / "run") as ts:
        deadline = time.monotonic() + 120
        while "Supported model types" not in ts.log_tail(2000) and time.monotonic() < deadline:
            time.sleep(0.5)
        log = ts.log_tail(2000)
        assert "ConfigError" in log and "model_type 'mllama'" in log, log[-3000:]
        assert "Supported model types: 'llava' (" in log and "'llava_next' (LLaVA-NeXT" in log
        assert "'llava_onevision' (LLaVA-OneVision" in log
        workers = ts.describe(ts.model_names[0])["workers"]
        assert all(worker["status"] != "READY" for worker in workers)
