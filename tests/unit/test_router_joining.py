"""The affinity router's joiners: a follow-up for a busy worker joins the bundle it runs.

A fake worker takes joiners as the real handler does (router_hop.JoinListener on the router's
secret): after the running bundle's hold it answers its own members and the joiners it takes,
in that bundle's frames; a joiner whose prompt is "decline" is never answered there, as the
engine leaves one it cannot take, and the router must send it with the next bundle.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiohttp import web

from llava_sessions.handler import bundle, router_hop
from llava_sessions.wire import SESSION_HEADER
from tests.unit.test_affinity_router import WAIT_S, FakeTorchServe, _wait_for, invoke_alone, open_session

pytestmark = pytest.mark.timeout(30)

SECRET = router_hop.new_secret()


class JoiningWorker(FakeTorchServe):
    """One model whose bundles take joiners; a member with X-Test-Hold holds its bundle until released."""

    def __init__(self):
        super().__init__(1)
        self.listener: router_hop.JoinListener | None = None
        self.taken: list[dict[int, str]] = []  # per bundle: the joiners it answered, prompt by member index

    async def _start(self) -> None:
        await super()._start()
        self.listener = router_hop.JoinListener(SECRET, "llava-0")

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.listener.close()

    async def _bundle(self, request: web.Request, backend: int, members) -> web.StreamResponse:
        bundle_id = request.headers[router_hop.REQUEST_ID_HEADER]
        if any("X-Test-Hold" in headers for headers, _ in members):
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, WAIT_S)
        joiners = [j for j in self.listener.take(bundle_id) if json.loads(j.body).get("prompt") != "decline"]
        self.listener.end(bundle_id)
        self.bundles.append([json.loads(body) for _, body in members])
        self.taken.append({j.member: json.loads(j.body)["prompt"] for j in joiners})
        answers = [(m, *self._answer(backend, headers, body)) for m, (headers, body) in enumerate(members)]
        answers += [(j.member, *self._answer(backend, j.headers, j.body)) for j in joiners]
        reply = web.StreamResponse(headers={"Content-Type": bundle.CONTENT_TYPE})
        reply.enable_chunked_encoding()
        await reply.prepare(request)
        for member, status, headers, payload in answers:
            await reply.write(bundle.head_frame(member, status, headers, "application/json")
                              + bundle.frame(member, bundle.DATA, payload) + bundle.frame(member, bundle.END))
        await reply.write_eof()
        return reply


@pytest.fixture
def worker():
    with JoiningWorker() as server:
        yield server


@pytest.fixture
def router(worker):
    from llava_sessions.affinity_router import AffinityRouter

    with AffinityRouter(worker.urls, port=0, ping_url=worker.ping_url, secret=SECRET) as started:
        yield started


def test_follow_ups_for_a_busy_worker_join_its_running_bundle(router, worker):
    """The held follow-up went as a bundle of one; three follow-ups join it and are answered in
    its frames; the one the worker declines, and a second turn of the running session, go as
    the next bundle. Every client gets its own answer."""
    ids = [open_session(invoke_session(), router)[0] for _ in range(5)]
    worker.release.clear()
    with ThreadPoolExecutor(6) as pool:
        host = pool.submit(invoke_alone, router, {"prompt": "hold"}, ids[0], **{"X-Test-Hold": "1"})
        assert _wait_for(lambda: len(worker.seen) == 6)  # five opens, then the host's bundle of one
        first = worker.seen[-1]
        assert first.headers[bundle.BUNDLE_HEADER.lower()] == "1"
        bundle_id = first.headers[router_hop.REQUEST_ID_HEADER.lower()]
        joining = [pool.submit(invoke_alone, router, {"prompt": f"p{i}"}, ids[i]) for i in (1, 2, 3)]
        declined = pool.submit(invoke_alone, router, {"prompt": "decline"}, ids[4])
        assert _wait_for(lambda: worker.listener.waiting(bundle_id) == 4)
        again = pool.submit(invoke_alone, router, {"prompt": "again"}, ids[0])  # its session is running
        assert _wait_for(lambda: len(router._gates[0].waiting) == 1)
        worker.release.set()
        replies = [f.result(WAIT_S) for f in [host, *joining, declined, again]]
    for reply, sid in zip(replies, [ids[0], ids[1], ids[2], ids[3], ids[4], ids[0]]):
        assert reply.status_code == 200 and reply.json()["session_id"] == sid
        assert reply.json()["headers"][SESSION_HEADER] == sid
    # Members after the bundle's own, numbered as they reached the router (the clients race).
    [taken, none] = worker.taken
    assert sorted(taken.values()) == ["p1", "p2", "p3"] and set(taken) < {1, 2, 3, 4} and none == {}
    assert [[m["prompt"] for m in members] for members in worker.bundles] == [["hold"], ["decline", "again"]]
    assert len(worker.seen) == 7  # the joiners never went through TorchServe's queue
    assert router._gates[0].running is None and not router._gates[0].busy


def test_a_joiner_whose_bundle_ended_without_it_goes_with_the_next(router, worker):
    """A joiner sent while the bundle's answer was already on its way (the worker ended it): no
    frame of it came, so it goes as the next bundle."""
    ids = [open_session(invoke_session(), router)[0] for _ in range(2)]
    worker.release.clear()
    with ThreadPoolExecutor(2) as pool:
        host = pool.submit(invoke_alone, router, {"prompt": "hold"}, ids[0], **{"X-Test-Hold": "1"})
        assert _wait_for(lambda: len(worker.seen) == 3)
        bundle_id = worker.seen[-1].headers[router_hop.REQUEST_ID_HEADER.lower()]
        worker.listener.end(bundle_id)  # the worker is past its last step: joiners are dropped
        late = pool.submit(invoke_alone, router, {"prompt": "late"}, ids[1])
        assert _wait_for(lambda: len(router._gates[0].running.answers) == 2)
        time.sleep(0.05)
        worker.release.set()
        assert host.result(WAIT_S).status_code == 200
        reply = late.result(WAIT_S)
    assert reply.status_code == 200 and reply.json()["session_id"] == ids[1]
    assert worker.taken == [{}, {}] and [len(m) for m in worker.bundles] == [1, 1]


def invoke_session():
    import requests

    session = requests.Session()
    session.trust_env = False
    return session
