"""Session routing bookkeeping: balance and expiry (the open response's header: test_wire.py)."""

from __future__ import annotations

import threading

import pytest

from llava_sessions.session_routes import SessionRoutes


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


def test_consecutive_picks_alternate_when_nothing_is_bound(clock):
    routes = SessionRoutes(3, clock=clock)
    assert [routes.pick_backend() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_pick_prefers_the_backend_with_fewest_sessions(clock):
    routes = SessionRoutes(3, clock=clock)
    routes.bind("a", 0, clock.now + 60)
    routes.bind("b", 0, clock.now + 60)
    routes.bind("c", 1, clock.now + 60)
    assert routes.pick_backend() == 2
    routes.bind("d", 2, clock.now + 60)
    # 1 and 2 tie with one session each: round-robin continues after the last pick (2).
    assert routes.pick_backend() == 1


def test_binding_what_was_picked_balances_the_backends(clock):
    routes = SessionRoutes(2, clock=clock)
    for index in range(10):
        routes.bind(f"s{index}", routes.pick_backend(), clock.now + 60)
    assert routes.counts() == [5, 5]


def test_lookup_bind_unbind(clock):
    routes = SessionRoutes(2, clock=clock)
    assert routes.lookup("sess-1") is None
    routes.bind("sess-1", 1, clock.now + 10)
    assert routes.lookup("sess-1") == 1
    assert len(routes) == 1 and routes.counts() == [0, 1]
    assert routes.unbind("sess-1") == 1
    assert routes.unbind("sess-1") is None
    assert routes.lookup("sess-1") is None
    assert len(routes) == 0 and routes.counts() == [0, 0]


def test_rebind_moves_the_session_and_its_expiry(clock):
    routes = SessionRoutes(2, clock=clock)
    routes.bind("s", 0, clock.now + 10)
    routes.bind("s", 1, clock.now + 100)
    assert routes.counts() == [0, 1]
    clock.now += 50  # past the first expiry, before the second
    assert routes.lookup("s") == 1
    assert routes.expire() == 0


def test_expired_sessions_are_forgotten_at_their_expiry(clock):
    routes = SessionRoutes(2, clock=clock)
    routes.bind("early", 0, clock.now + 10)
    routes.bind("late", 1, clock.now + 20)
    clock.now += 9.999
    assert routes.lookup("early") == 0
    clock.now += 0.001  # expired at expires_at, like the worker's session store
    assert routes.lookup("early") is None
    assert routes.counts() == [0, 1]
    clock.now += 10
    assert len(routes) == 0


def test_expire_counts_what_it_dropped(clock):
    routes = SessionRoutes(2, clock=clock)
    for index in range(4):
        routes.bind(f"s{index}", index % 2, clock.now + 10 + index)
    clock.now += 11.5  # past s0 (backend 0) and s1 (backend 1)
    assert routes.expire() == 2
    assert routes.expire() == 0
    assert routes.counts() == [1, 1]
    assert routes.unbind("s0") is None
    assert routes.unbind("s2") == 0


def test_expired_sessions_do_not_count_as_load(clock):
    routes = SessionRoutes(2, clock=clock)
    routes.bind("old", 0, clock.now + 1)
    routes.bind("new", 1, clock.now + 100)
    clock.now += 2
    assert routes.pick_backend() == 0


def test_bad_arguments_are_refused(clock):
    with pytest.raises(ValueError):
        SessionRoutes(0)
    routes = SessionRoutes(2, clock=clock)
    with pytest.raises(ValueError):
        routes.bind("s", 2, clock.now + 1)


def test_concurrent_binds_keep_counts_consistent(clock):
    routes = SessionRoutes(4, clock=clock)

    def worker(prefix: str) -> None:
        for index in range(500):
            session_id = f"{prefix}-{index}"
            routes.bind(session_id, routes.pick_backend(), clock.now + 60)
            if index % 2:
                routes.unbind(session_id)

    threads = [threading.Thread(target=worker, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sum(routes.counts()) == len(routes) == 4 * 250
    assert max(routes.counts()) - min(routes.counts()) <= 4


def test_closed_sessions_do_not_pile_up_until_their_expiry():
    routes = SessionRoutes(2, clock=lambda: 1000.0)
    for k in range(5000):
        routes.bind(f"s{k}", k % 2, expires_at=5000.0)
        routes.unbind(f"s{k}")
    routes.bind("alive", 1, expires_at=2000.0)
    assert len(routes._expiry_heap) <= 2 * len(routes) + 65
    assert routes.lookup("alive") == 1 and routes.counts() == [0, 1]
