"""The engine under a memory budget: LRU sessions give memory back in steps, answers stay exact.

Tiny model, float32: one token of KV is 1024 bytes (2 x 2 layers x 4 heads x 16 x 4 bytes),
one image's features 4096 bytes (16 tokens x 64 x 4 bytes). A first turn with one image and
QUESTIONS[0] has a 30-token context, so it reserves (30 + 10) tokens of KV.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from llava_sessions.config import ServingConfig
from llava_sessions.errors import ConfigError, OutOfMemoryBudget, SessionNotFound
from llava_sessions.handler.engine import generation, kv_manager, memory_budget
from llava_sessions.handler.engine.kv_cache import AppendLayer, spare_tokens
from llava_sessions.handler.engine.engine import EngineSnapshot, SessionEngine, TurnRequest
from llava_sessions.handler.engine.generation import SamplingParams, cache_bytes
from llava_sessions.handler.replies import error_reply
from tests.unit.test_engine import (
    GREEDY,
    QUESTIONS,
    FakeClock,
    make_engine,
    prompt_ids_of_last_turn,
    stateless_answer,
)

# A 64-wide model gains nothing from threads, and loses a lot on a busy machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

KV_TOKEN = 1024
FEATURES = 4096


def budgeted(loaded, budget, host_budget):
    return SessionEngine(loaded, ServingConfig(memory_budget_bytes=budget), FakeClock(), host_budget_bytes=host_budget)


def measured(engine_or_snapshot) -> dict[str, int]:
    """Bytes by tier, measured on the tensors themselves (the snapshot's sessions, not its accounting)."""
    snapshot = as_snapshot(engine_or_snapshot)
    tiers = {"device_kv": 0, "device_features": 0, "host_kv": 0, "host_features": 0}
    for view in snapshot.sessions.values():
        tiers["device_kv"] += view.kv_bytes
        tiers["host_kv"] += view.host_kv_bytes
        tier = "host_features" if view.features_on_host else "device_features"
        tiers[tier] += view.feature_bytes
    return tiers


def as_snapshot(engine_or_snapshot):
    if isinstance(engine_or_snapshot, EngineSnapshot):
        return engine_or_snapshot
    return engine_or_snapshot.snapshot()


def tier_of(engine_or_snapshot, session_id) -> str:
    view = as_snapshot(engine_or_snapshot).sessions.get(session_id)
    if view is None:
        return "gone"
    if view.features_on_host:
        return "cold"
    if view.kv_bytes:
        return "hot"
    if view.host_kv_bytes:
        return "host"  # KV in host memory, features on the device
    return "warm" if view.feature_bytes else "empty"  # empty: no images, no KV


def check_accounting(engine) -> dict[str, int]:
    snapshot = engine.snapshot()
    tiers = measured(snapshot)
    assert engine.bytes_by_tier() == tiers and snapshot.tiers == tiers
    assert tiers["device_kv"] + tiers["device_features"] <= engine.memory_budget_bytes
    assert tiers["host_kv"] + tiers["host_features"] <= engine.host_budget_bytes
    assert snapshot.reserved == 0 and snapshot.batch_view_bytes == 0
    assert not any(view.busy for view in snapshot.sessions.values())
    return tiers


def counts(engine):
    c = engine.counters
    return (c.kv_dropped, c.features_offloaded, c.features_restored, c.sessions_evicted)


@pytest.mark.parametrize("headroom", [0, 64])
def test_sizes_come_from_the_model_config_and_match_the_tensors(loaded_tiny, images, headroom):
    engine = make_engine(loaded_tiny, kv_headroom_tokens=headroom)
    assert (engine.kv_bytes_per_token, engine.feature_bytes_per_image) == (KV_TOKEN, FEATURES)
    session = engine.open_session(images)
    result = engine.turn(session.session_id, QUESTIONS[0], GREEDY)
    view = engine.snapshot().sessions[session.session_id]
    assert view.feature_bytes == 2 * FEATURES
    kv_tokens = result.prompt_tokens + result.completion_tokens - 1
    assert view.kv_tokens == kv_tokens
    # A lone turn with the budget free moved into a buffer with 2 x headroom spare slots.
    assert view.kv_bytes == (kv_tokens + 2 * headroom) * KV_TOKEN
    assert engine.bytes_by_tier() == {
        "device_kv": (kv_tokens + 2 * headroom) * KV_TOKEN,
        "device_features": 2 * FEATURES,
        "host_kv": 0,
        "host_features": 0,
    }


def caches_of(monkeypatch, loaded) -> list:
    """The KV caches made for sessions of engines on ``loaded`` (generation.new_cache), oldest first.

    Tests whose twin engine must not count give the twin a copy of the LoadedModel."""
    made = []
    new_cache = generation.new_cache

    def tracked(model):
        cache = new_cache(model)
        if model is loaded:
            made.append(cache)
        return cache

    monkeypatch.setattr(generation, "new_cache", tracked)
    return made


def test_a_follow_up_that_fits_the_spare_slots_copies_no_history(loaded_tiny, images, monkeypatch):
    engine = make_engine(loaded_tiny)
    exact = make_engine(dataclasses.replace(loaded_tiny), kv_headroom_tokens=0)  # its caches are not engine's
    caches = caches_of(monkeypatch, loaded_tiny)
    sid, exact_sid = engine.open_session(images).session_id, exact.open_session(images).session_id
    for question in QUESTIONS[:2]:
        assert engine.turn(sid, question, GREEDY).token_ids == exact.turn(exact_sid, question, GREEDY).token_ids
    [cache] = caches  # the session's one cache, kept from turn to turn
    # keys is a view of the start of the layer's buffer: its address is the buffer's.
    buffer, spare = cache.layers[0].keys.data_ptr(), cache.layers[0].spare()
    result = engine.turn(sid, "Why?", SamplingParams(1))
    assert result.token_ids == exact.turn(exact_sid, "Why?", SamplingParams(1)).token_ids
    new_tokens = result.prompt_tokens - result.cached_tokens
    assert new_tokens <= spare  # it fit: written in place, the buffer did not move
    assert cache.layers[0].keys.data_ptr() == buffer and cache.layers[0].spare() == spare - new_tokens
    assert caches == [cache] and engine.snapshot().sessions[sid].kv_bytes == cache_bytes(cache)
    check_accounting(engine)


def test_follow_ups_prefill_in_place_turn_after_turn(loaded_tiny, images, monkeypatch):
    """No follow-up's prefill copies the history: a turn that would leave fewer than the headroom's
    spare slots moves at its first decode step, after its first token, not at the next prefill;
    and it moves into twice the headroom, so the turn after it fits in place."""
    engine = make_engine(loaded_tiny)
    exact = make_engine(dataclasses.replace(loaded_tiny), kv_headroom_tokens=0)  # its caches are not engine's
    headroom = engine.config.kv_headroom_tokens
    caches = caches_of(monkeypatch, loaded_tiny)  # engine's session's cache(s), newest last
    moved = []
    prefill = generation.prefill

    def watched(loaded, input_ids, image_rows, cache):
        before = cache.layers[0].keys  # a view of the start of the layer's buffer (None: new cache)
        logits = prefill(loaded, input_ids, image_rows, cache)
        if before is not None and caches and cache is caches[-1]:  # not the twin's
            moved.append(cache.layers[0].keys.data_ptr() != before.data_ptr())
        return logits

    monkeypatch.setattr(generation, "prefill", watched)
    regrow, regrown = AppendLayer._regrow, []

    def counted(layer, *args):
        cache = caches[-1] if caches and engine.has_session(sid) else None
        if cache is not None and layer is cache.layers[0]:
            regrown.append(args[1])
        regrow(layer, *args)

    monkeypatch.setattr(AppendLayer, "_regrow", counted)
    spares = []
    sid, exact_sid = engine.open_session(images).session_id, exact.open_session(images).session_id
    for question in QUESTIONS * 2:
        result = engine.turn(sid, question, GREEDY)
        assert result.token_ids == exact.turn(exact_sid, question, GREEDY).token_ids
        # Between turns: from one to two headrooms spare, whether the turn fit in place or moved.
        spares.append(spare_tokens(caches[-1]))
        assert engine.snapshot().sessions[sid].kv_bytes == cache_bytes(caches[-1])  # it is the session's
    assert len(caches) == 1  # one cache, kept from turn to turn
    assert moved == [False] * (2 * len(QUESTIONS) - 1)
    assert all(headroom <= spare <= 2 * headroom for spare in spares)
    assert 0 < len(regrown) <= len(spares) // 2 + 1  # at most every other turn moved
    check_accounting(engine)


def test_spare_slots_come_only_from_plainly_free_budget(loaded_tiny, images):
    """With less than a quarter of the budget free after the turn, no spare slots: exactly its tokens."""
    r = (30 + 10) * KV_TOKEN  # a first turn's reservation
    engine = budgeted(loaded_tiny, budget=2 * FEATURES + r + 16 * KV_TOKEN, host_budget=0)
    sid = engine.open_session(images[:1]).session_id
    result = engine.turn(sid, QUESTIONS[0], GREEDY)
    kv_tokens = result.prompt_tokens + result.completion_tokens - 1
    view = engine.snapshot().sessions[sid]
    assert view.kv_bytes == kv_tokens * KV_TOKEN and view.kv_tokens == kv_tokens
    check_accounting(engine)


def test_lru_sessions_give_back_kv_then_features_then_themselves(loaded_tiny, images):
    r = (30 + 10) * KV_TOKEN  # a first turn's reservation
    engine = budgeted(loaded_tiny, budget=2 * FEATURES + r, host_budget=FEATURES)
    twin = make_engine(loaded_tiny)
    s0, s1 = engine.open_session([images[0]]).session_id, engine.open_session([images[1]]).session_id
    t0, t1 = twin.open_session([images[0]]).session_id, twin.open_session([images[1]]).session_id
    assert counts(engine) == (0, 0, 0, 0)

    # Fits exactly: nothing moves.
    first = engine.turn(s0, QUESTIONS[0], GREEDY)
    assert first.token_ids == twin.turn(t0, QUESTIONS[0], GREEDY).token_ids
    assert first.completion_tokens == 10  # so s0 keeps 39 tokens of KV
    assert counts(engine) == (0, 0, 0, 0)
    check_accounting(engine)

    # A third session's features: the only KV (s0's) is dropped, though s1 is older.
    s2 = engine.open_session([images[0]]).session_id
    t2 = twin.open_session([images[0]]).session_id
    assert counts(engine) == (1, 0, 0, 0)
    assert [tier_of(engine, s) for s in (s0, s1, s2)] == ["warm", "warm", "warm"]
    check_accounting(engine)

    # s2's turn: no KV left to drop, so the least recently used features (s1's) go to host.
    assert engine.turn(s2, QUESTIONS[0], GREEDY).token_ids == twin.turn(t2, QUESTIONS[0], GREEDY).token_ids
    assert counts(engine) == (1, 1, 0, 0)
    assert [tier_of(engine, s) for s in (s0, s1, s2)] == ["warm", "cold", "hot"]
    check_accounting(engine)

    # s1 comes back: its features return to the device. Room: s2's KV is dropped first (the
    # cheapest step anywhere in the LRU order), then s0, the least recently used, is evicted
    # (the host is full with s1's own features, so s0 cannot go cold).
    result = engine.turn(s1, QUESTIONS[0], GREEDY)
    assert result.token_ids == twin.turn(t1, QUESTIONS[0], GREEDY).token_ids
    history = prompt_ids_of_last_turn(engine, s1, result)
    assert list(result.token_ids) == stateless_answer(loaded_tiny, history, [images[1]], 10)
    assert counts(engine) == (2, 1, 1, 1)
    assert [tier_of(engine, s) for s in (s0, s1, s2)] == ["gone", "hot", "warm"]
    check_accounting(engine)

    with pytest.raises(SessionNotFound):
        engine.turn(s0, QUESTIONS[1], GREEDY)
    assert counts(engine) == (2, 1, 1, 1)

    # s2's second turn rebuilds 54 tokens of KV + 10: more than the budget could ever give it.
    # Refused, and nothing else is touched.
    before = (engine.bytes_by_tier(), [tier_of(engine, s) for s in (s1, s2)], engine.counters.prefill_tokens)
    with pytest.raises(OutOfMemoryBudget) as refused:
        engine.turn(s2, QUESTIONS[1], GREEDY)
    assert error_reply(refused.value).status == 503
    assert refused.value.to_dict()["error"]["code"] == "INSUFFICIENT_MEMORY"
    assert (engine.bytes_by_tier(), [tier_of(engine, s) for s in (s1, s2)], engine.counters.prefill_tokens) == before
    assert counts(engine) == (2, 1, 1, 1) and engine.counters.memory_refusals == 1
    check_accounting(engine)

    # The vision tower never ran again for anyone; closing gives everything back.
    assert engine.counters.images_encoded == 3
    engine.close_session(s1)
    engine.close_session(s2)
    assert check_accounting(engine) == {"device_kv": 0, "device_features": 0, "host_kv": 0, "host_features": 0}


def test_requests_that_cannot_fit_even_alone_are_refused_and_touch_nothing(loaded_tiny, images):
    engine = budgeted(loaded_tiny, budget=3 * FEATURES, host_budget=FEATURES)
    s = engine.open_session(images).session_id  # 2 images: 8 KiB of 12
    before = (engine.bytes_by_tier(), engine.session_count(), engine.counters.images_encoded)
    with pytest.raises(OutOfMemoryBudget):
        engine.open_session(images + images)  # 16 KiB of features: more than the whole budget
    with pytest.raises(OutOfMemoryBudget):
        engine.turn(s, QUESTIONS[0], GREEDY)  # 56 tokens of KV
    assert (engine.bytes_by_tier(), engine.session_count(), engine.counters.images_encoded) == before
    assert tier_of(engine, s) == "warm" and counts(engine) == (0, 0, 0, 0)
    assert engine.counters.memory_refusals == 2
    check_accounting(engine)


@pytest.mark.parametrize("seed", [1234, 4])
def test_many_sessions_churning_under_a_tight_budget_answer_like_an_unconstrained_twin(loaded_tiny, images, seed):
    rng = random.Random(seed)
    budget = 100 * KV_TOKEN  # 2.5 first turns' KV; sessions take two turns, then close
    engine = budgeted(loaded_tiny, budget=budget, host_budget=FEATURES)
    twin = make_engine(loaded_tiny)
    twin_of: dict[str, str] = {}
    turns_of: dict[str, int] = {}
    images_of: dict[str, list] = {}
    gone: set[str] = set()
    seen_not_found = 0
    stateless_checks = 0

    def on_token(_token, _last):
        tiers = measured(engine)
        assert tiers["device_kv"] + tiers["device_features"] <= budget

    for _ in range(80):
        live = [s for s in twin_of if s not in gone]
        if len(live) < 10 and (len(live) < 6 or rng.random() < 0.4):
            pics = [images[rng.randrange(2)]] if rng.random() < 0.85 else []
            before = _tiers_before(engine)
            sid = engine.open_session(pics).session_id
            _check_step(engine, before, asking=sid, was_cold=False)
            twin_of[sid] = twin.open_session(pics).session_id
            turns_of[sid], images_of[sid] = 0, list(pics)
        else:
            sid = rng.choice(list(twin_of))
            if sid in gone:
                with pytest.raises(SessionNotFound):
                    engine.turn(sid, QUESTIONS[0], GREEDY)
                seen_not_found += 1
                twin.close_session(twin_of.pop(sid))
                continue
            question = QUESTIONS[turns_of[sid]]
            extra = [images[1]] if turns_of[sid] == 1 and rng.random() < 0.2 else []
            before = _tiers_before(engine)
            was_cold = tier_of(engine, sid) == "cold"
            result = engine.turn(sid, question, GREEDY, images=extra, on_token=on_token)
            _check_step(engine, before, asking=sid, was_cold=was_cold)
            expected = twin.turn(twin_of[sid], question, GREEDY, images=extra)
            assert result.token_ids == expected.token_ids
            images_of[sid] += extra
            turns_of[sid] += 1
            if result.cached_tokens == 0 and turns_of[sid] > 1 and stateless_checks < 4:
                history = prompt_ids_of_last_turn(engine, sid, result)
                assert list(result.token_ids) == stateless_answer(loaded_tiny, history, images_of[sid], 10)
                stateless_checks += 1
            if turns_of[sid] == 2:
                engine.close_session(sid)
                twin.close_session(twin_of.pop(sid))
        gone |= {s for s in twin_of if not engine.has_session(s)}
        check_accounting(engine)

    c = engine.counters
    # Every kind of step happened, features were never re-encoded, nothing was refused.
    assert min(c.kv_dropped, c.features_offloaded, c.features_restored, c.sessions_evicted) > 0, counts(engine)
    assert seen_not_found > 0 and stateless_checks > 0
    assert c.memory_refusals == 0
    assert c.images_encoded == twin.counters.images_encoded


def _tiers_before(engine):
    """LRU order (oldest first) with each session's tier, and the counters, before an operation."""
    snapshot = engine.snapshot()
    return [(sid, tier_of(snapshot, sid)) for sid in snapshot.sessions], counts(engine)


def _check_step(engine, before, asking, was_cold):
    """The operation's demotions follow the plan's rules, and the counters count exactly them."""
    tiers_before, counts_before = before
    others = [(sid, tier) for sid, tier in tiers_before if sid != asking]
    snapshot = engine.snapshot()
    after = {sid: tier_of(snapshot, sid) for sid, _ in others}
    dropped = [sid for sid, tier in others if tier == "hot" and after[sid] != "hot"]
    offloaded = [sid for sid, tier in others if tier in ("hot", "warm") and after[sid] == "cold"]
    evicted = [sid for sid, _ in others if after[sid] == "gone"]
    # KVs go least recently used first: those dropped are the oldest hot ones.
    hot = [sid for sid, tier in others if tier == "hot"]
    assert dropped == hot[: len(dropped)]
    if offloaded or evicted:
        assert not any(tier == "hot" for tier in after.values())  # every KV went first
    # No warm session older than an evicted one survives.
    order = [sid for sid, _ in others]
    for victim in evicted:
        older = order[: order.index(victim)]
        assert not any(after[sid] == "warm" for sid in older)
    delta = tuple(now - then for now, then in zip(counts(engine), counts_before))
    assert delta == (len(dropped), len(offloaded), int(was_cold), len(evicted))


def test_budget_config(monkeypatch, loaded_tiny):
    assert ServingConfig().memory_budget_bytes == 0
    config = ServingConfig.from_sources({}, environ={"LLAVA_SESSIONS_MEMORY_BUDGET_BYTES": "123456"})
    assert config.memory_budget_bytes == 123456
    with pytest.raises(ConfigError, match="memory_budget_bytes"):
        ServingConfig(memory_budget_bytes=-1)
    assert ServingConfig.from_sources({"kv_headroom_tokens": 16}).kv_headroom_tokens == 16
    with pytest.raises(ConfigError, match="LLAVA_SESSIONS_KV_HEADROOM_TOKENS"):
        ServingConfig(kv_headroom_tokens=-1)
    assert SessionEngine(loaded_tiny, config).memory_budget_bytes == 123456

    # Auto on CPU: half of MemAvailable, less one full-context prefill's activations.
    reserve = 512 * (4 * 64 + 2 * 128) * 4
    monkeypatch.setattr(memory_budget, "read_mem_available", lambda: 10 * 2**20)
    engine = make_engine(loaded_tiny)
    assert engine.memory_budget_bytes == 5 * 2**20 - reserve
    assert engine.host_budget_bytes == 0  # on CPU the device is the host: no cold tier
    monkeypatch.setattr(memory_budget, "read_mem_available", lambda: reserve)
    with pytest.raises(ConfigError, match="no memory left for sessions"):
        make_engine(loaded_tiny)


# --- the host KV tier ------------------------------------------------------------------


def host_counts(engine):
    c = engine.counters
    return (c.kv_offloaded, c.kv_restored, c.host_kv_recomputed, c.host_kv_dropped, c.kv_dropped)


def test_kv_goes_to_host_before_it_is_dropped_and_comes_back_by_copy(loaded_tiny, images):
    # Room for one first turn's KV beside another's (39 + 40 > 70 tokens), or for one second turn.
    engine = budgeted(loaded_tiny, budget=2 * FEATURES + 70 * KV_TOKEN, host_budget=200 * KV_TOKEN)
    twin = make_engine(loaded_tiny)
    s0, s1 = engine.open_session([images[0]]).session_id, engine.open_session([images[1]]).session_id
    t0, t1 = twin.open_session([images[0]]).session_id, twin.open_session([images[1]]).session_id
    assert engine.turn(s0, QUESTIONS[0], GREEDY).token_ids == twin.turn(t0, QUESTIONS[0], GREEDY).token_ids
    assert engine.turn(s1, QUESTIONS[0], GREEDY).token_ids == twin.turn(t1, QUESTIONS[0], GREEDY).token_ids

    # s0's KV went to host, exactly its 39 tokens; nothing was dropped.
    assert host_counts(engine) == (1, 0, 0, 0, 0)
    assert [tier_of(engine, s) for s in (s0, s1)] == ["host", "hot"]
    view = engine.snapshot().sessions[s0]
    assert (view.kv_bytes, view.host_kv_bytes, view.kv_tokens) == (0, 39 * KV_TOKEN, 0)
    assert check_accounting(engine)["host_kv"] == 39 * KV_TOKEN

    # s0 comes back: its KV is copied back (s1's goes to host for the room), and the turn
    # prefills only its own tokens, as on the unconstrained twin.
    prefilled = engine.counters.prefill_tokens
    result = engine.turn(s0, QUESTIONS[1], GREEDY)
    expected = twin.turn(t0, QUESTIONS[1], GREEDY)
    assert result.token_ids == expected.token_ids
    assert result.cached_tokens == expected.cached_tokens == 39
    assert engine.counters.prefill_tokens - prefilled == result.prompt_tokens - result.cached_tokens
    history = prompt_ids_of_last_turn(engine, s0, result)
    assert list(result.token_ids) == stateless_answer(loaded_tiny, history, [images[0]], 10)
    assert host_counts(engine) == (2, 1, 0, 0, 0)
    assert [tier_of(engine, s) for s in (s0, s1)] == ["hot", "host"]
    check_accounting(engine)

    # Closing a session gives its host KV back.
    engine.close_session(s1)
    assert check_accounting(engine)["host_kv"] == 0
    engine.close_session(s0)
    assert check_accounting(engine) == {"device_kv": 0, "device_features": 0, "host_kv": 0, "host_features": 0}


@pytest.mark.parametrize("copy_faster", [True, False])
def test_a_host_kv_comes_back_the_way_the_cost_model_estimates_faster(loaded_tiny, images, copy_faster):
    engine = budgeted(loaded_tiny, budget=2 * FEATURES + 70 * KV_TOKEN, host_budget=200 * KV_TOKEN)
    twin = make_engine(loaded_tiny)
    # Rates forced (smoothing 0: measurements do not move them): a copy far slower than a
    # prefill, or far faster.
    slow, fast = 1.0, 1e-12
    engine.kv_manager.costs = memory_budget.RestoreCosts(
        copy_s_per_byte=fast if copy_faster else slow, prefill_s_per_token=slow if copy_faster else fast, smoothing=0
    )
    s0, s1 = engine.open_session([images[0]]).session_id, engine.open_session([images[1]]).session_id
    t0, t1 = twin.open_session([images[0]]).session_id, twin.open_session([images[1]]).session_id
    for sid, tid in ((s0, t0), (s1, t1)):
        assert engine.turn(sid, QUESTIONS[0], GREEDY).token_ids == twin.turn(tid, QUESTIONS[0], GREEDY).token_ids
    assert tier_of(engine, s0) == "host"

    result = engine.turn(s0, QUESTIONS[1], GREEDY)
    expected = twin.turn(t0, QUESTIONS[1], GREEDY)
    assert result.token_ids == expected.token_ids  # either way, the same answer
    if copy_faster:
        assert result.cached_tokens == expected.cached_tokens > 0
        assert host_counts(engine)[1:3] == (1, 0)
    else:  # dropped and rebuilt by the turn's prefill, from the kept features and ids
        assert result.cached_tokens == 0
        assert host_counts(engine)[1:3] == (0, 1)
        assert engine.counters.images_encoded == 2  # the features were kept, not re-encoded
    assert tier_of(engine, s0) == "hot"
    check_accounting(engine)


def test_a_copy_back_that_fails_leaves_the_kv_to_the_prefill(loaded_tiny, images, monkeypatch):
    engine = budgeted(loaded_tiny, budget=2 * FEATURES + 70 * KV_TOKEN, host_budget=200 * KV_TOKEN)
    twin = make_engine(loaded_tiny)
    s0, s1 = engine.open_session([images[0]]).session_id, engine.open_session([images[1]]).session_id
    t0, t1 = twin.open_session([images[0]]).session_id, twin.open_session([images[1]]).session_id
    for sid, tid in ((s0, t0), (s1, t1)):
        engine.turn(sid, QUESTIONS[0], GREEDY)
        twin.turn(tid, QUESTIONS[0], GREEDY)
    assert tier_of(engine, s0) == "host"

    def out_of_memory(*_args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes.")

    monkeypatch.setattr(kv_manager.KVManager, "_restore_kv", out_of_memory)
    result = engine.turn(s0, QUESTIONS[1], GREEDY)
    assert result.token_ids == twin.turn(t0, QUESTIONS[1], GREEDY).token_ids and result.cached_tokens == 0
    assert host_counts(engine)[1:3] == (0, 1) and engine.counters.memory_refusals == 0
    check_accounting(engine)


def test_the_cost_model_learns_from_real_copies_and_prefills(loaded_tiny, images):
    engine = budgeted(loaded_tiny, budget=2 * FEATURES + 70 * KV_TOKEN, host_budget=200 * KV_TOKEN)
    costs = engine.kv_manager.costs
    assert costs.copy_faster(39 * KV_TOKEN, 39)  # the prior prefers the copy
    s0, s1 = engine.open_session([images[0]]).session_id, engine.open_session([images[1]]).session_id
    for sid in (s0, s1, s0):
        engine.turn(sid, QUESTIONS[0], GREEDY)
    costs = engine.kv_manager.costs
    assert costs.prefills_measured == 3 and costs.copies_measured == 1 and engine.counters.kv_restored == 1
    assert costs.prefill_s_per_token > 0 and costs.copy_s_per_byte > 0


def test_older_host_kv_makes_room_on_host_for_a_more_recent_one(loaded_tiny, images):
    # The host holds one KV: the more recently used session's goes there, the older one's is dropped.
    engine = budgeted(loaded_tiny, budget=3 * FEATURES + 70 * KV_TOKEN, host_budget=50 * KV_TOKEN)
    twin = make_engine(loaded_tiny)
    sids = [engine.open_session([images[i % 2]]).session_id for i in range(3)]
    tids = [twin.open_session([images[i % 2]]).session_id for i in range(3)]
    for sid, tid in zip(sids, tids):
        assert engine.turn(sid, QUESTIONS[0], GREEDY).token_ids == twin.turn(tid, QUESTIONS[0], GREEDY).token_ids
        check_accounting(engine)
    assert [tier_of(engine, s) for s in sids] == ["warm", "host", "hot"]
    assert host_counts(engine) == (2, 0, 0, 1, 0)

    # s0's KV is gone: its turn rebuilds it from the kept features and ids, answers unchanged;
    # s2's KV takes s1's place on host.
    result = engine.turn(sids[0], QUESTIONS[1], GREEDY)
    assert result.token_ids == twin.turn(tids[0], QUESTIONS[1], GREEDY).token_ids
    assert result.cached_tokens == 0
    assert [tier_of(engine, s) for s in sids] == ["hot", "warm", "host"]
    assert host_counts(engine) == (3, 0, 0, 2, 0)
    check_accounting(engine)


def test_restored_sessions_come_back_together_in_one_call(loaded_tiny, images):
    """Two sessions whose KV is on host come back by copy in one ``turns`` call; each prefills only
    its own new tokens, and the answers are the twin's."""
    engine = budgeted(loaded_tiny, budget=4 * FEATURES + 200 * KV_TOKEN, host_budget=400 * KV_TOKEN)
    twin = make_engine(loaded_tiny)
    sids = [engine.open_session([images[i % 2]]).session_id for i in range(4)]
    tids = [twin.open_session([images[i % 2]]).session_id for i in range(4)]
    for sid, tid in zip(sids, tids):
        assert engine.turn(sid, QUESTIONS[0], GREEDY).token_ids == twin.turn(tid, QUESTIONS[0], GREEDY).token_ids
    # Make room for a long answer so that the two oldest sessions go to host.
    while tier_of(engine, sids[0]) != "host" or tier_of(engine, sids[1]) != "host":
        assert engine.turn(sids[3], QUESTIONS[1], GREEDY).token_ids == twin.turn(tids[3], QUESTIONS[1], GREEDY).token_ids
    requests = [TurnRequest(sid, QUESTIONS[1], GREEDY) for sid in sids[:2]]
    results = engine.turns(requests)
    for result, tid in zip(results, tids[:2]):
        expected = twin.turn(tid, QUESTIONS[1], GREEDY)
        assert result.token_ids == expected.token_ids and result.cached_tokens == expected.cached_tokens > 0
    assert engine.counters.kv_restored == 2
    check_accounting(engine)


@pytest.mark.parametrize("seed", [1234, 4])
def test_churn_with_a_host_tier_answers_like_an_unconstrained_twin(loaded_tiny, images, seed):
    rng = random.Random(seed)
    budget = 100 * KV_TOKEN
    engine = budgeted(loaded_tiny, budget=budget, host_budget=120 * KV_TOKEN)
    twin = make_engine(loaded_tiny)
    twin_of: dict[str, str] = {}
    turns_of: dict[str, int] = {}
    restored_hits = 0

    def on_token(_token, _last):
        tiers = measured(engine)
        assert tiers["device_kv"] + tiers["device_features"] <= budget
        assert tiers["host_kv"] + tiers["host_features"] <= engine.host_budget_bytes

    for _ in range(60):
        live = [s for s in twin_of if engine.has_session(s)]
        for gone in [s for s in twin_of if not engine.has_session(s)]:
            twin.close_session(twin_of.pop(gone))
        if len(live) < 8 and (len(live) < 5 or rng.random() < 0.4):
            pics = [images[rng.randrange(2)]] if rng.random() < 0.85 else []
            sid = engine.open_session(pics).session_id
            twin_of[sid], turns_of[sid] = twin.open_session(pics).session_id, 0
        else:
            sid = rng.choice(live)
            question = QUESTIONS[turns_of[sid]]
            was_on_host = tier_of(engine, sid) == "host"
            restored = engine.counters.kv_restored
            result = engine.turn(sid, question, GREEDY, on_token=on_token)
            expected = twin.turn(twin_of[sid], question, GREEDY)
            assert result.token_ids == expected.token_ids
            if was_on_host and engine.counters.kv_restored > restored:
                # Copied back: only the turn's own tokens were prefilled, as on the twin.
                assert result.cached_tokens == expected.cached_tokens > 0
                restored_hits += 1
            turns_of[sid] += 1
            if turns_of[sid] == 3:
                engine.close_session(sid)
                twin.close_session(twin_of.pop(sid))
        check_accounting(engine)

    c = engine.counters
    assert min(c.kv_offloaded, c.host_kv_dropped, c.features_offloaded, restored_hits) > 0, host_counts(engine)
    assert c.memory_refusals == 0
    assert c.images_encoded == twin.counters.images_encoded
