"""The memory-budget planner with plain numbers: which sessions give memory back, in what order."""

from __future__ import annotations

import pytest

from llava_sessions.handler.engine.memory_budget import (
    Holding,
    NoRoom,
    RestoreCosts,
    Step,
    StepKind,
    auto_budget,
    kv_bytes_per_token,
    plan_room,
    prefill_activation_bytes,
    read_mem_available,
)

DROP, OFFLOAD, EVICT = StepKind.DROP_KV, StepKind.OFFLOAD_FEATURES, StepKind.EVICT
TO_HOST, DROP_HOST = StepKind.OFFLOAD_KV, StepKind.DROP_HOST_KV


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


@pytest.mark.parametrize("host_budget, kv_step", [(1000, TO_HOST), (0, DROP)])
def test_every_kv_goes_before_any_features_move(host_budget, kv_step):
    # a's features would suffice alone, but moving b's and c's KV off the device is cheaper:
    # to host where the host has room, else dropped.
    lru = [Holding("a", 0, 50), Holding("b", 20, 10), Holding("c", 20, 10)]
    plan = plan_room(lru, 40, budget=120, device_used=used(lru), host_budget=host_budget)
    assert kinds(plan) == [(kv_step, "b"), (kv_step, "c")]
    assert plan[0] == Step(kv_step, "b", 20, host_bytes_change=20 if kv_step is TO_HOST else 0)
    if host_budget:
        plan = plan_room(lru, 60, budget=120, device_used=used(lru), host_budget=host_budget)
        assert kinds(plan) == [(TO_HOST, "b"), (TO_HOST, "c"), (OFFLOAD, "a")]
        assert plan[-1] == Step(OFFLOAD, "a", 50, host_bytes_change=50)


def test_the_tiers_in_order_kv_to_host_then_kv_dropped_then_features_to_host_then_eviction():
    lru = [Holding("a", 20, 10), Holding("b", 20, 10), Holding("c", 20, 10)]
    budget = used(lru)
    # Host room for one KV: the least recently used goes there...
    assert kinds(plan_room(lru, 20, budget=budget, device_used=budget, host_budget=25)) == [(TO_HOST, "a")]
    # ...and gives its place to a more recent one's, so the most recent KV ends on host. A move
    # planned and undone in the same plan is no copy: it is a drop.
    assert kinds(plan_room(lru, 60, budget=budget, device_used=budget, host_budget=25)) == [
        (DROP, "a"), (DROP, "b"), (TO_HOST, "c"),
    ]
    # Features need host room: the host KV is dropped for them, before anyone is evicted.
    assert kinds(plan_room(lru, 70, budget=budget, device_used=budget, host_budget=25)) == [
        (DROP, "a"), (DROP, "b"), (DROP, "c"), (OFFLOAD, "a"),
    ]
    # No host room left for c's features: the older cold session (a) is evicted for it.
    assert kinds(plan_room(lru, 90, budget=budget, device_used=budget, host_budget=25)) == [
        (DROP, "a"), (DROP, "b"), (DROP, "c"), (OFFLOAD, "b"), (EVICT, "a"), (OFFLOAD, "c"),
    ]


def test_older_host_kv_is_dropped_to_make_host_room_for_a_more_recent_one_lru_first():
    lru = [Holding("older", host_kv=10), Holding("old", host_kv=10), Holding("hot", device_kv=15)]
    plan = plan_room(lru, 15, budget=15, device_used=15, host_budget=25, host_used=20)
    assert plan == [Step(DROP_HOST, "older", 0, -10), Step(TO_HOST, "hot", 15, 15)]
    # Not enough host KV older than it to make room: the KV is dropped, the host left alone.
    lru = [Holding("older", host_kv=5), Holding("old", host_kv=5), Holding("hot", device_kv=15)]
    plan = plan_room(lru, 15, budget=15, device_used=15, host_budget=12, host_used=10)
    assert plan == [Step(DROP, "hot", 15)]


def test_a_more_recent_host_kv_is_never_dropped_for_an_older_kv():
    lru = [Holding("hot", device_kv=15), Holding("recent", host_kv=10)]
    plan = plan_room(lru, 15, budget=15, device_used=15, host_budget=15, host_used=10)
    assert plan == [Step(DROP, "hot", 15)]


def test_host_kv_goes_before_any_session_is_evicted_for_host_room():
    # b's features need host room: any host KV (even a more recent session's) is dropped first.
    lru = [Holding("b", device_features=10), Holding("c", host_kv=10)]
    plan = plan_room(lru, 10, budget=10, device_used=10, host_budget=10, host_used=10)
    assert plan == [Step(DROP_HOST, "c", 0, -10), Step(OFFLOAD, "b", 10, 10)]


def test_eviction_frees_the_sessions_host_kv_too():
    lru = [Holding("a", device_features=10, host_kv=7), Holding("b", device_features=10)]
    plan = plan_room(lru, 10, budget=20, device_used=20, host_budget=7, host_used=7)
    # The host has no room for features even without a's host KV (7 < 10): a is evicted, with it
    # its host KV.
    assert plan == [Step(EVICT, "a", 10, host_bytes_change=-7)]


def test_a_kv_moved_to_host_in_the_plan_and_then_evicted_is_never_copied():
    lru = [Holding("a", device_kv=10, device_features=30), Holding("b", device_features=30)]
    # a's KV fits the host, but nobody's features ever do: both sessions go, and a's KV is not
    # copied to host on the way (its eviction frees those device bytes instead).
    plan = plan_room(lru, 70, budget=70, device_used=70, host_budget=20)
    assert plan == [Step(EVICT, "a", 40, host_bytes_change=0), Step(EVICT, "b", 30, host_bytes_change=0)]
    # Only what is needed: a's KV to host would have done for 10 bytes.
    assert plan_room(lru, 10, budget=70, device_used=70, host_budget=20) == [Step(TO_HOST, "a", 10, 10)]


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
    for _ in range(3000):
        lru = [
            Holding(str(i), rng.choice([0, rng.randint(1, 50)]), rng.randint(0, 20), rng.choice([0, 0, 20]),
                    rng.choice([0, 0, rng.randint(1, 30)]))
            for i in range(rng.randint(0, 6))
        ]
        device_used = used(lru)
        host_used = sum(h.host for h in lru)
        budget = device_used + rng.randint(0, 30)
        host_budget = host_used + rng.choice([0, 10, 40, 100])
        needed = rng.randint(0, 120)
        plan = plan_room(lru, needed, budget=budget, device_used=device_used, host_budget=host_budget, host_used=host_used)
        if isinstance(plan, NoRoom):
            assert needed > budget  # all the device bytes are the others': evicting all would not do
            continue
        device, host = device_used, host_used
        host_kv = {h.session_id: h.host_kv for h in lru}
        seen_kind = 0
        rank = {TO_HOST: 0, DROP: 0, OFFLOAD: 1, EVICT: 2}  # host KV drops go wherever host room is needed
        for step in plan:
            device -= step.device_bytes_freed
            host += step.host_bytes_change
            assert 0 <= host <= host_budget
            if step.kind is TO_HOST:
                host_kv[step.session_id] += step.host_bytes_change
            if step.kind is DROP_HOST:
                assert step.device_bytes_freed == 0 and step.host_bytes_change == -host_kv[step.session_id] < 0
                host_kv[step.session_id] = 0
                continue
            # Kinds come in order, except offloads right after an eviction made host room.
            if step.kind is not OFFLOAD or seen_kind < 2:
                assert rank[step.kind] >= seen_kind
                seen_kind = rank[step.kind]
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


def test_restore_costs_choose_the_faster_way_back_and_learn_from_measurements():
    # Priors: on CUDA copying is estimated far faster than re-prefilling; on a CPU still faster.
    for device in ("cuda", "cpu"):
        costs = RestoreCosts.prior(kv_bytes_per_token=1000, device_type=device)
        assert costs.copy_faster(nbytes=100 * 1000, tokens=100)
    costs = RestoreCosts(copy_s_per_byte=1e-9, prefill_s_per_token=1e-3)
    assert costs.copy_faster(1000 * 512, 1000)  # 0.5 ms of copy against 1 s of prefill
    # The first measurement replaces the prior, later ones are averaged in.
    costs.observe_copy(1000, 1.0)
    assert costs.copy_s_per_byte == pytest.approx(1e-3) and not costs.copy_faster(1000 * 512, 1000)
    costs.observe_copy(1000, 0.0)
    assert costs.copy_s_per_byte == pytest.approx(0.8e-3)
    costs.observe_prefill(100, 10.0)
    assert costs.prefill_s_per_token == pytest.approx(0.1) and costs.copy_faster(1000 * 100, 1000)
    costs.observe_prefill(0, 1.0)  # nothing prefilled: nothing learnt
    assert costs.prefills_measured == 1
    # Smoothing 0 keeps the rates as set.
    frozen = RestoreCosts(copy_s_per_byte=1.0, prefill_s_per_token=0.0, smoothing=0.0)
    frozen.observe_copy(10, 0.0)
    frozen.observe_prefill(10, 1.0)
    assert (frozen.copy_s_per_byte, frozen.prefill_s_per_token) == (1.0, 0.0)
