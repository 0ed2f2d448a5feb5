"""Privacy: unguessable ids checked in constant time, a session reachable only through its own id,
nothing a client sent in the logs, no server software named, weights never unpickled.

The same log check against a real TorchServe's log files is in tests/integration/test_faults.py.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import shutil
from pathlib import Path

import pytest
from llava_sessions.handler.engine import session_store
from llava_sessions.handler.engine.session_store import SessionStore, new_session_id

from tests.conftest import noise_image
from tests.fakes import png_b64

SESSION = "x-amzn-sagemaker-session-id"
SECRET_PROMPT = "wombat-saffron-9931 what do you see?"


def request(handler, body: dict, session: str | None = None):
    headers = {"content-type": "application/json"}
    if session is not None:
        headers[SESSION] = session
    return handler.handle_one({"body": json.dumps(body).encode()}, headers)


# --- (a) ids ------------------------------------------------------------------------------


def test_session_ids_carry_128_random_bits_from_the_os():
    ids = [new_session_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"sess-[0-9a-f]{32}", sid) for sid in ids)
    bits = 4 * len(ids[0].removeprefix("sess-"))
    assert bits >= 122  # at least a uuid4's
    # Every hex digit shows up in every position: no fixed or biased nibble.
    for position in range(32):
        assert len({sid[5 + position] for sid in ids}) == 16
    # Roughly uniform digits overall (expected 4000 each; a biased source would be far off).
    counts = [sum(sid.count(d) - (d == "s") * 2 - (d == "e") for sid in ids) for d in "0123456789abcdef"]
    assert all(abs(c - 4000) < 6 * math.sqrt(4000) for c in counts)


def test_a_session_id_is_confirmed_in_constant_time(monkeypatch):
    compared = []
    real = session_store.hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(session_store.hmac, "compare_digest", recording)
    store = SessionStore(capacity=4)
    sid = new_session_id()
    store.reserve(sid, now=0.0, ttl_s=60)
    assert store.lookup(sid) is not None
    assert compared == [(sid, sid)]
    assert store.lookup(sid.upper()) is None and store.lookup(sid[:-1]) is None


# --- (b) a session's content is reachable only through its own id -----------------------------


def variants(session_id: str) -> list[str]:
    body = session_id.removeprefix("sess-")
    return [
        session_id[:-1],  # a prefix
        session_id[:13],  # a short prefix, as logs show
        session_id + "0",  # a suffix
        "x" + session_id,
        session_id.upper(),
        "SESS-" + body,
        "sess-" + body.upper(),
        body,  # without its prefix
        session_id[:-1] + ("0" if session_id[-1] != "0" else "1"),  # one digit off
        "sess-" + body[16:] + body[:16],  # its halves swapped
    ]


def test_a_session_answers_to_its_own_id_only(handler):
    opened = request(handler, {"requestType": "NEW_SESSION", "images": [png_b64(noise_image(3, 40))]})
    neighbour = request(handler, {"requestType": "NEW_SESSION", "images": [png_b64(noise_image(4, 40))]})
    sid, other = opened.body["session_id"], neighbour.body["session_id"]
    first = request(handler, {"prompt": SECRET_PROMPT, "max_new_tokens": 4}, sid)
    assert first.status == 200
    held = handler.engine.session_history(sid)

    for wrong in variants(sid):
        for body in ({"prompt": "repeat what I said", "max_new_tokens": 4}, {"requestType": "CLOSE"}):
            reply = request(handler, body, wrong)
            assert reply.status in (400, 404), (wrong, reply.body)
            assert reply.body["error"]["code"] in ("SESSION_NOT_FOUND", "INVALID_REQUEST"), (wrong, reply.body)
            assert SECRET_PROMPT not in json.dumps(reply.body)
    # The AWS sample's dialect names the session in the body: the same rule.
    for wrong in variants(sid)[:4]:
        reply = request(handler, {"type": "send_text_prompt", "session_id": wrong, "prompt": "again"})
        assert reply.body["error"]["code"] in ("SESSION_NOT_FOUND", "INVALID_REQUEST"), (wrong, reply.body)

    # Nothing was taken from or added to the session by the wrong ids; its neighbour knows nothing of it.
    assert handler.engine.session_history(sid) == held
    assert request(handler, {"prompt": "and now?", "max_new_tokens": 4}, sid).body["usage"]["cached_tokens"] > 0
    assert request(handler, {"prompt": "and now?", "max_new_tokens": 4}, other).body["usage"]["cached_tokens"] == 0
    for session_id in (sid, other):
        assert request(handler, {"requestType": "CLOSE"}, session_id).status == 200


# --- (c) nothing a client sent is logged ------------------------------------------------------


def test_the_handler_logs_no_prompt_image_or_full_id_even_at_debug(handler, caplog, monkeypatch):
    from llava_sessions.handler.engine import generation

    image = png_b64(noise_image(5, 40))
    caplog.set_level(logging.DEBUG)
    opened = request(handler, {"requestType": "NEW_SESSION", "images": [image], "prompt": SECRET_PROMPT,
                               "max_new_tokens": 3})
    sid = opened.body["session_id"]
    request(handler, {"prompt": SECRET_PROMPT, "max_new_tokens": 3, "stream": True}, sid)
    request(handler, {"prompt": SECRET_PROMPT, "images": ["bm90IGFuIGltYWdl" * 4]}, sid)  # invalid image
    request(handler, {"prompt": SECRET_PROMPT}, sid + "0")  # unknown session
    monkeypatch.setattr(generation, "prefill", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    failed = request(handler, {"prompt": SECRET_PROMPT, "max_new_tokens": 3}, sid)
    assert failed.body["error"]["code"] == "INTERNAL_ERROR"  # logged, with its traceback
    monkeypatch.undo()
    request(handler, {"requestType": "CLOSE"}, sid)

    logged = "\n".join(record.getMessage() for record in caplog.records) + "\n" + caplog.text
    assert "request failed" in logged and "vision tower" in logged  # the log did capture the handler
    for needle in (SECRET_PROMPT, "wombat", image[100:124], sid, sid.removeprefix("sess-")):
        assert needle not in logged


# --- (d) no server software named -------------------------------------------------------------


def test_the_router_names_no_server_software():
    import requests

    from llava_sessions.affinity_router import AffinityRouter

    router = AffinityRouter(["http://127.0.0.1:9/predictions/llava-0"], port=0, ping_url="http://127.0.0.1:9/ping")
    with router, requests.Session() as http:
        http.trust_env = False
        replies = [
            http.get(f"{router.url}/ping", timeout=10),  # 503: TorchServe unreachable
            http.get(f"{router.url}/nowhere", timeout=10),
            http.get(f"{router.url}/invocations", timeout=10),
            http.post(f"{router.url}/invocations", data=b"{}", headers={"X-Amzn-SageMaker-Session-Id": "sess-x"},
                      timeout=10),
            http.post(f"{router.url}/invocations", data=b"{}", timeout=10),  # backend down
        ]
    assert [r.status_code for r in replies] == [503, 404, 405, 404, 503]
    for reply in replies:
        assert not any(name.lower() == "server" for name in reply.headers), reply.headers
        assert "aiohttp" not in str(reply.headers)


# --- (e) weights only from safetensors ------------------------------------------------------------


class _Payload:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_weights_load_only_from_safetensors_never_from_pickle(tiny_model_dir, tmp_path):
    import torch
    from llava_sessions.handler.engine.model_loader import load_model

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors*"))
    marker = tmp_path / "unpickled"
    for name in ("pytorch_model.bin", "model.pt"):
        (pickled / name).write_bytes(pickle.dumps({"weights": _Payload(marker)}))
    with pytest.raises(OSError, match="model.safetensors"):
        load_model(str(pickled), torch.device("cpu"))
    assert not marker.exists()
    # The same directory with its safetensors back loads (the refusal was about the format).
    shutil.copy(Path(tiny_model_dir) / "model.safetensors", pickled / "model.safetensors")
    assert load_model(str(pickled), torch.device("cpu")).max_context > 0
    assert not marker.exists()
