"""Where a served answer parts from the bench's reference, looked at on the tiny model (CPU)."""

from __future__ import annotations

import pytest
import torch

from llava_sessions.bench.inprocess import InProcess, reference_run
from llava_sessions.bench.runner import _Divergence, bench_image_b64


@pytest.fixture(scope="module")
def reference_and_divergence(loaded_tiny):
    image = bench_image_b64()
    reference = reference_run(loaded_tiny, image, ["What is in the picture?", "And the colours?"], 8)
    inproc = InProcess(loaded_tiny, image, reference)
    return reference, _Divergence(inproc, loaded_tiny.tokenizer, torch.finfo(loaded_tiny.dtype).eps)


def test_an_answer_that_parts_midway_is_examined_at_the_first_token_it_does_not_share(
    loaded_tiny, reference_and_divergence
):
    reference, divergence = reference_and_divergence
    turn = reference.turns[1]
    decode = lambda ids: loaded_tiny.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    # The first token from the third on that adds text: the other answer agrees up to it.
    j = next(j for j in range(2, len(turn.answer_ids)) if decode(turn.answer_ids[: j + 1]) != decode(turn.answer_ids[:j]))
    other = decode(turn.answer_ids[:j]) + "\x00 and then something else"
    found = divergence.at(turn, other)
    assert found["token_index"] == j and found["reference_token"] == turn.answer_ids[j]
    # In float32 a fresh prefill of the same history prefers the reference's token by far more
    # than rounding: such a parting would be a fault, not a near tie.
    assert found["logit_gap"] > found["tolerance"] > 0 and found["near_tie"] is False


def test_a_different_first_token_is_examined_at_the_first_position(reference_and_divergence):
    reference, divergence = reference_and_divergence
    turn = reference.turns[0]
    found = divergence.at(turn, "\x00", 0)
    assert found["token_index"] == 0 and found["reference_token"] == turn.answer_ids[0]
    assert found["near_tie"] is False
