"""The sampling controls TGI and OpenAI clients send: top_k, repetition_penalty and stop strings.

Each is checked on crafted logits against its definition (transformers' logits processors
where it has one) and through the engine against a stateless reference or a twin session
that never asked for it; the defaults change nothing (the engine's other tests, unchanged).
"""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from llava_sessions.errors import InvalidRequest
from llava_sessions.handler.engine import sampling, scheduler
from llava_sessions.handler.engine.engine import TurnRequest
from llava_sessions.handler.engine.generation import SamplingParams
from tests.unit.test_engine_stops import make_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ASK = "Describe it at length please"
GREEDY = SamplingParams(max_new_tokens=24)


def pick_rows(logits, params, seen=None, generator=None, suppressed=None):
    return sampling.pick(logits.clone(), params, suppressed, generator, seen=seen)


def stateless_penalised(loaded, history_ids, images, max_new_tokens, penalty):
    """transformers' generate over the whole history, with its repetition penalty; cut at eos."""
    ids = torch.tensor([history_ids])
    pixels = loaded.image_processor(images=images, return_tensors="pt")["pixel_values"]
    out = loaded.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, do_sample=False,
        max_new_tokens=max_new_tokens, repetition_penalty=penalty,
        suppress_tokens=[loaded.image_token_id],  # as the engine does
    )
    answer = out[0, len(history_ids):].tolist()
    for i, token in enumerate(answer):
        if token in loaded.eos_token_ids:
            return answer[: i + 1]
    return answer


# --- SamplingParams ------------------------------------------------------------------------


def test_defaults_are_off_and_bad_values_say_how_to_fix_them():
    params = SamplingParams(8)
    assert (params.top_k, params.repetition_penalty, params.stop) == (0, 1.0, ())
    assert SamplingParams(8, stop="\n").stop == ("\n",)  # OpenAI's lone string
    assert SamplingParams(8, stop=["a", "b"]).stop == ("a", "b")
    hash(SamplingParams(8, stop=["a"]))  # still hashable
    bad = [
        ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"top_k": True}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"stop": ("a", "b", "c", "d", "e")}, "at most 4"), ({"stop": ("",)}, "1 to 64"),
        ({"stop": ("x" * 65,)}, "1 to 64"), ({"stop": (3,)}, "1 to 64"),
    ]
    for fields, says in bad:
        with pytest.raises(InvalidRequest, match=says):
            SamplingParams(8, **fields)
    assert SamplingParams(8, stop=("x" * 64,) * 4).stop  # the bounds themselves are fine


# --- top_k ---------------------------------------------------------------------------------


def test_top_k_samples_only_from_the_k_most_likely_and_one_is_greedy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=generator) * 2
    top3 = logits.topk(3).indices
    hot = [SamplingParams(1, temperature=1.5, top_k=3)] * 4
    picks = torch.tensor([pick_rows(logits, hot, generator=generator) for _ in range(300)])  # [300, 4]
    for row in range(4):
        assert set(picks[:, row].tolist()) == set(top3[row].tolist())  # all of them, and only them
    one = [SamplingParams(1, temperature=3.0, top_k=1)] * 4
    assert all(pick_rows(logits, one, generator=generator) == logits.argmax(-1).tolist() for _ in range(50))
    # Each row its own: a row without top_k in the same batch goes beyond the others' k.
    mixed = [SamplingParams(1, temperature=5.0, top_k=2), SamplingParams(1, temperature=5.0)] * 2
    picks = torch.tensor([pick_rows(logits, mixed, generator=generator) for _ in range(300)])
    assert set(picks[:, 0].tolist()) <= set(logits[0].topk(2).indices.tolist())
    assert len(set(picks[:, 1].tolist())) > 2


def test_top_p_takes_its_share_of_what_top_k_kept():
    # p = [0.5, 0.3, 0.2]: top_k 2 keeps [0.625, 0.375] of its own mass, of which top_p 0.6
    # needs the first only (transformers renormalises between the two warpers).
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    generator = torch.Generator().manual_seed(0)
    both = [SamplingParams(1, temperature=1.0, top_p=0.6, top_k=2)]
    assert {pick_rows(logits, both, generator=generator)[0] for _ in range(200)} == {0}
    alone = [SamplingParams(1, temperature=1.0, top_p=0.6)]
    assert {pick_rows(logits, alone, generator=generator)[0] for _ in range(200)} == {0, 1}


def test_top_k_with_temperature_answers_as_greedy_when_k_is_one(loaded_tiny, images):
    engine = make_engine(loaded_tiny)
    sessions = [engine.open_session(images[:1]).session_id for _ in range(2)]
    one = engine.turn(sessions[0], ASK, SamplingParams(16, temperature=1.0, top_k=1))
    assert one.token_ids == engine.turn(sessions[1], ASK, SamplingParams(16)).token_ids


# --- repetition_penalty --------------------------------------------------------------------


def test_the_penalty_matches_transformers_processor():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 40, generator=generator) * 3
    ids = torch.randint(0, 40, (3, 12), generator=generator)
    penalties = [1.3, 0.7, 1.0]
    seen = [sampling.seen_mask(ids[row].tolist(), 40, scores.device) for row in range(3)]
    got = sampling.penalize(scores.clone(), penalties, seen)
    for row, penalty in enumerate(penalties):
        want = RepetitionPenaltyLogitsProcessor(penalty)(ids[row : row + 1], scores[row : row + 1].clone())
        assert torch.equal(got[row], want[0]), row
    # A row without a mask is untouched, and greedy picks the penalised argmax.
    assert torch.equal(sampling.penalize(scores.clone(), penalties, [seen[0], None, None])[1:], scores[1:])
    top = scores[:1].clone()
    top[0, ids[0, 0]] = top.max() + 1  # the argmax is a seen token: the penalty moves it
    want = RepetitionPenaltyLogitsProcessor(3.0)(ids[:1], top.clone()).argmax(-1).item()
    assert want != ids[0, 0].item()
    assert pick_rows(top, [SamplingParams(1, repetition_penalty=3.0)], seen=seen[:1]) == [want]


def test_a_half_precision_row_is_penalised_in_float32():
    scores = torch.randn(2, 30, generator=torch.Generator().manual_seed(2)).half()
    ids = torch.tensor([[1, 5, 7, 7, 20]])
    seen = [sampling.seen_mask(ids[0].tolist(), 30, scores.device), None]
    got = sampling.penalize(scores.clone(), [1.2, 1.0], seen)
    assert got.dtype == torch.float32
    assert torch.equal(got[0], RepetitionPenaltyLogitsProcessor(1.2)(ids, scores[:1].float())[0])
    assert torch.equal(got[1], scores[1].float())


def test_a_penalised_turn_answers_as_transformers_generate(loaded_tiny, images):
    engine = make_engine(loaded_tiny)
    sid = engine.open_session(images[:1]).session_id
    penalised = SamplingParams(24, repetition_penalty=1.3)
    plain = engine.turn(engine.open_session(images[:1]).session_id, ASK, GREEDY)
    for question in (ASK, "Why?"):  # the second on a cached history, through the decode arena
        result = engine.turn(sid, question, penalised)
        history = list(engine.session_history(sid))[: result.prompt_tokens]
        assert list(result.token_ids) == stateless_penalised(loaded_tiny, history, images[:1], 24, 1.3)
    first = engine.turns([TurnRequest(engine.open_session(images[:1]).session_id, ASK, penalised)])[0]
    assert first.token_ids != plain.token_ids  # the penalty changed this greedy answer


def test_rows_of_a_batch_each_get_their_own_penalty(loaded_tiny, images):
    engine, alone = make_engine(loaded_tiny), make_engine(loaded_tiny)
    settings = [SamplingParams(16, repetition_penalty=1.3), GREEDY, SamplingParams(16, repetition_penalty=2.0),
                SamplingParams(16, repetition_penalty=1.3, temperature=1.0, top_k=1)]
    sessions = [engine.open_session(images[:1]).session_id for _ in settings]
    outcomes = engine.turns([TurnRequest(sid, ASK, params) for sid, params in zip(sessions, settings)])
    for outcome, params in zip(outcomes, settings):
        assert outcome.token_ids == alone.turn(alone.open_session(images[:1]).session_id, ASK, params).token_ids
    assert len({outcome.token_ids for outcome in outcomes[:3]}) == 3
    assert outcomes[3].token_ids == outcomes[0].token_ids  # top_k 1 is greedy, penalty included


def test_turns_without_the_controls_pay_nothing_for_them(loaded_tiny, images, monkeypatch):
    made = []
    monkeypatch.setattr(sampling, "seen_mask", lambda *args: made.append(args))
    monkeypatch.setattr(scheduler, "StopStrings", lambda *args: made.append(args))
    engine = make_engine(loaded_tiny)
    sessions = [engine.open_session(images[:1]).session_id for _ in range(2)]
    engine.turns([TurnRequest(sid, ASK, SamplingParams(8, temperature=1.0, top_k=5)) for sid in sessions])
    assert made == []


# --- stop strings --------------------------------------------------------------------------


def completing_token(tokenizer, ids, stop):
    """How many tokens the answer has once its decoded text first holds ``stop``."""
    return next(n for n in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:n], skip_special_tokens=True))


def a_stop_string_from(tokenizer, ids):
    """A piece of the answer's text from its middle that spans two tokens (no U+FFFD in it)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for n in range(len(ids) // 3, len(ids) - 1):
        before = tokenizer.decode(ids[:n], skip_special_tokens=True)
        if not text.startswith(before) or "\ufffd" in text[len(before) - 3 : len(before) + 3]:
            continue
        stop = text[len(before) - 3 : len(before) + 3]
        if len(before) >= 3 and stop.strip() == stop and text.find(stop) == len(before) - 3:
            return stop
    raise AssertionError(f"no stop string to take from {text!r}")


def test_the_detector_finds_a_stop_string_across_tokens_and_broken_characters(loaded_tiny):
    tokenizer = loaded_tiny.tokenizer
    ids = tokenizer("héllo wörld, a STOP sign and mörë", add_special_tokens=False)["input_ids"]
    for stop in ("ö", "wörld,", "STOP", "d, a S", "ë"):
        detector = scheduler.StopStrings(tokenizer, (stop, "never there"))
        n = next(i + 1 for i, token in enumerate(ids) if detector.push(token))
        assert n == completing_token(tokenizer, ids, stop), stop
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        assert detector.found == text.find(stop)
        assert scheduler.text_before_stop(text, detector) == text[: text.find(stop)]


def test_a_stop_string_ends_the_turn_and_the_session_keeps_every_token(loaded_tiny, images):
    engine = make_engine(loaded_tiny)
    tokenizer = loaded_tiny.tokenizer
    plain, stopped, twin = (engine.open_session(images[:1]).session_id for _ in range(3))
    full = engine.turn(plain, ASK, GREEDY)
    assert full.finish_reason == "length"
    stop = a_stop_string_from(tokenizer, list(full.token_ids))
    n = completing_token(tokenizer, list(full.token_ids), stop)
    assert 1 < n < len(full.token_ids)
    streamed = []
    result = engine.turn(stopped, ASK, SamplingParams(24, stop=("never there", stop)),
                         on_token=lambda token, last: streamed.append((token, last)))
    assert result.finish_reason == "stop" and result.stop_sequence and not full.stop_sequence
    assert result.text == full.text[: full.text.find(stop)]
    assert result.token_ids == full.token_ids[:n] and result.completion_tokens == n
    assert streamed == [(token, i == n - 1) for i, token in enumerate(result.token_ids)]
    # The conversation holds the text the client got; the history every token, closed with eos.
    assert engine._states[stopped].conversation.messages[-1]["content"][0]["text"] == result.text
    cut = engine.turn(twin, ASK, SamplingParams(n))  # the same tokens, cut by max_new_tokens
    assert (cut.token_ids, cut.finish_reason) == (result.token_ids, "length")
    assert engine.session_history(stopped) == engine.session_history(twin)
    assert engine.session_history(stopped)[-1] in loaded_tiny.eos_token_ids
    after = engine.turn(stopped, "Why?", GREEDY)
    expected = engine.turn(twin, "Why?", GREEDY)
    assert (after.token_ids, after.prompt_tokens) == (expected.token_ids, expected.prompt_tokens)
    assert after.cached_tokens > 0


def test_a_stop_string_in_a_batch_stops_only_its_row(loaded_tiny, images):
    engine, alone = make_engine(loaded_tiny), make_engine(loaded_tiny)
    full = alone.turn(alone.open_session(images[:1]).session_id, ASK, GREEDY)
    stop = a_stop_string_from(loaded_tiny.tokenizer, list(full.token_ids))
    sessions = [engine.open_session(images[:1]).session_id for _ in range(3)]
    outcomes = engine.turns([
        TurnRequest(sessions[0], ASK, GREEDY),
        TurnRequest(sessions[1], ASK, SamplingParams(24, stop=(stop,))),
        TurnRequest(sessions[2], ASK, SamplingParams(24, stop=("never there",))),
    ])
    assert outcomes[0].token_ids == outcomes[2].token_ids == full.token_ids
    assert (outcomes[2].text, outcomes[2].finish_reason) == (full.text, "length")
    assert outcomes[1].finish_reason == "stop" and outcomes[1].text == full.text[: full.text.find(stop)]
    assert full.token_ids[: len(outcomes[1].token_ids)] == outcomes[1].token_ids
