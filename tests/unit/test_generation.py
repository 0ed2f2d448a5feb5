"""Picking the next token: greedy never returns the suppressed id and keeps argmax's first maximum."""

import torch

from llava_sessions.handler.engine import sampling
from llava_sessions.handler.engine.generation import SamplingParams


def select_next_token(logits, params, generator, suppressed):
    """One row through the engine's on-device picker (it masks in place: pass a copy)."""
    return sampling.pick(logits.clone(), [params], suppressed, generator)[0]

GREEDY = SamplingParams(max_new_tokens=1)


def test_greedy_is_the_argmax_unless_that_is_suppressed():
    logits = torch.tensor([[0.1, 3.0, 2.5, -1.0]])
    assert select_next_token(logits, GREEDY, None, suppressed=3) == 1
    assert select_next_token(logits, GREEDY, None, suppressed=1) == 2
    assert select_next_token(logits, GREEDY, None, suppressed=None) == 1


def test_greedy_ties_go_to_the_first_maximum_not_masked():
    logits = torch.tensor([[1.0, 5.0, 5.0, 5.0]])
    assert select_next_token(logits, GREEDY, None, suppressed=3) == 1
    assert select_next_token(logits, GREEDY, None, suppressed=1) == 2


def test_greedy_on_half_precision_logits_picks_as_in_float():
    logits = torch.randn(1, 32000, generator=torch.Generator().manual_seed(0)).half()
    best = int(torch.argmax(logits[0].float()))
    assert select_next_token(logits, GREEDY, None, suppressed=None) == best
    second = int(torch.argmax(logits[0].float().index_fill(0, torch.tensor([best]), float("-inf"))))
    assert select_next_token(logits, GREEDY, None, suppressed=best) == second


def test_sampling_never_returns_the_suppressed_id():
    logits = torch.tensor([[0.0, 0.0, 8.0]])  # the suppressed id holds almost all the mass
    generator = torch.Generator().manual_seed(1)
    params = SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.9)
    picks = {select_next_token(logits, params, generator, suppressed=2) for _ in range(50)}
    assert picks <= {0, 1} and picks
