"""The memory-budget planner with plain numbers: which sessions give memory back, in what order."""

from __future__ import annotations

import pytest

from llava_sessions.handler.engine.memory_budget import (
    Holding,
    NoRoom,
    Step,
    StepKind,
    auto_budget,
    kv_bytes_per_token,
    plan_room,
    prefill_activation_bytes,
    read_mem_available,
)

DROP, OFFLOAD, EVICT = StepKind.DROP_KV, StepKind.OFFLOAD_FEATURES, StepKind.EVICT


def kinds(plan):
    return [(step.kind, step.session_id) for step in plan]


def used(lru):
    return sum(h.device for h in lru)


def test_nothing_to_do_when_it_fits():
    lru = [Holding("a", device_kv=30, device_features=10)]
    assert plan_room(lru, 60, budget=100, device_used=40) == []
    assert plan_room(lru, 0, budget=40, device_used=40) == []


def test_drops_the_least_recently_used_kv_first_and_only_as_many_as_needed():
    lru = [Holding("a", 30, 10), Holding("b", 30, 10), Holding("c", 30, 10)]
    plan = plan_room(lru, 40, budget=130, device_used=used(lru))  # free 10: one KV is enough
    assert plan == [Step(DROP, "a", 30)]
    plan = plan_room(lru, 65, budget=130, device_used=used(lru))
    assert kinds(plan) == [(DROP, "a"), (DROP, "b")]


def test_every_kv_goes_before_any_features_move():
    # a's features would suffice alone, but dropping b's and c's KV is cheaper.
    lru = [Holding("a", 0, 50), Holding("b", 20, 10), Holding("c", 20, 10)]
    plan = plan_room(lru, 40, budget=120, device_used=used(lru), host_budget=1000)
    assert kinds(plan) == [(DROP, "b"), (DROP, "c")]
    plan = plan_room(lru, 60, budget=120, device_used=used(lru), host_budget=1000)
    assert kinds(plan) == [(DROP, "b"), (DROP, "c"), (OFFLOAD, "a")]
    assert plan[-1] == Step(OFFLOAD, "a", 50, host_bytes_change=50)


def test_features_move_to_host_in_lru_order_while_the_host_has_room():
    lru = [Holding("a", 0, 10), Holding("b", 0, 10), Holding("c", 0, 10)]
    plan = plan_room(lru, 20, budget=30, device_used=30, host_budget=25, host_used=0)
    assert kinds(plan) == [(OFFLOAD, "a"), (OFFLOAD, "b")]
    # Room on host for one: the least recently used session is evicted (no copy is made
    # of it), the next one goes to host.
    plan = plan_room(lru, 20, budget=30, device_used=30, host_budget=15, host_used=0)
    assert plan == [Step(EVICT, "a", 10, 0), Step(OFFLOAD, "b", 10, 10)]
    # No room on host at all: evictions in LRU order.
    plan = plan_room(lru, 20, budget=30, device_used=30, host_budget=5, host_used=0)
    assert kinds(plan) == [(EVICT, "a"), (EVICT, "b")]


def test_no_host_tier_goes_straight_from_dropping_kv_to_eviction():
    lru = [Holding("a", 5, 10), Holding("b", 5, 10), Holding("c", 5, 10)]
    plan = plan_room(lru, 28, budget=45, device_used=45, host_budget=0)
    assert kinds(plan) == [(DROP, "a"), (DROP, "b"), (DROP, "c"), (EVICT, "a"), (EVICT, "b")]
    assert sum(step.device_bytes_freed for step in plan) == 35


def test_an_older_cold_session_is_evicted_to_let_a_warm_one_go_to_host():
    lru = [Holding("cold", host_features=10), Holding("warm", device_features=10)]
    plan = plan_room(lru, 10, budget=10, device_used=10, host_budget=10, host_used=10)
    assert plan == [Step(EVICT, "cold", 0, host_bytes_change=-10), Step(OFFLOAD, "warm", 10, 10)]


def test_a_cold_session_too_small_to_help_is_kept_and_the_warm_one_evicted():
    lru = [Holding("cold", host_features=5), Holding("warm", device_features=10)]
    plan = plan_room(lru, 10, budget=10, device_used=10, host_budget=5, host_used=5)
    assert plan == [Step(EVICT, "warm", 10, host_bytes_change=0)]


def test_a_more_recent_cold_session_is_never_evicted_before_an_older_warm_one():
    lru = [Holding("warm", device_features=10), Holding("cold", host_features=10)]
    plan = plan_room(lru, 10, budget=10, device_used=10, host_budget=10, host_used=10)
    assert kinds(plan) == [(EVICT, "warm")]


def test_no_room_is_a_value_decided_before_any_step():
    lru = [Holding("a", 30, 10), Holding("b", 0, 0, 50)]
    result = plan_room(lru, 61, budget=100, device_used=80, host_budget=1000, host_used=50)
    assert result == NoRoom(needed=61, free=20, reclaimable=40, budget=100)
    # Exactly enough when everything else goes.
    assert kinds(plan_room(lru, 60, budget=100, device_used=80, host_budget=50, host_used=50)) == [
        (DROP, "a"),
        (EVICT, "a"),
    ]
    assert isinstance(plan_room([], 1, budget=100, device_used=100), NoRoom)


def test_plans_never_leave_the_device_over_budget_nor_the_host_over_its_allowance():
    import random

    rng = random.Random(7)
    for _ in range(2000):
        lru = [
            Holding(str(i), rng.choice([0, rng.randint(1, 50)]), rng.randint(0, 20), rng.choice([0, 0, 20]))
            for i in range(rng.randint(0, 6))
        ]
        device_used = used(lru)
        host_used = sum(h.host_features for h in lru)
        budget = device_used + rng.randint(0, 30)
        host_budget = host_used + rng.choice([0, 10, 40])
        needed = rng.randint(0, 120)
        plan = plan_room(lru, needed, budget=budget, device_used=device_used, host_budget=host_budget, host_used=host_used)
        if isinstance(plan, NoRoom):
            assert needed > budget  # all the device bytes are the others': evicting all would not do
            continue
        device, host = device_used, host_used
        seen_kind = 0
        order = [DROP, OFFLOAD, EVICT]
        for step in plan:
            device -= step.device_bytes_freed
            host += step.host_bytes_change
            assert host <= host_budget
            # Kinds come in order, except offloads right after an eviction made host room.
            if step.kind is not OFFLOAD or seen_kind < 2:
                assert order.index(step.kind) >= seen_kind
                seen_kind = order.index(step.kind)
        assert device + needed <= budget


def test_sizes_and_auto_budget_rules():
    # llava-1.5-7b in float16: 32 layers, 32 KV heads of 128 -> 512 KiB per token.
    assert kv_bytes_per_token(32, 32, 128, 2) == 524_288
    assert prefill_activation_bytes(4096, 4096, 11008, 2) == 4096 * (4 * 4096 + 2 * 11008) * 2
    assert auto_budget(80 * 2**30, 0.9, 2**30) == int(80 * 2**30 * 0.9) - 2**30
    assert auto_budget(100, 0.5, 60) == -10


def test_mem_available_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n")
    assert read_mem_available(str(meminfo)) == 8_000_000 * 1024
    assert read_mem_available(str(tmp_path / "missing")) > 0


def test_negative_need_is_a_bug():
    with pytest.raises(ValueError):
        plan_room([], -1, budget=10, device_used=0)
