"""Pick each row's next token on the device: repetition penalty, greedy, temperature, top-k and
top-p, one batch at a time.

No host sync inside: every row's choice is made with tensor ops of fixed shape, so the caller
copies the B picked ids to the host once per step (``tokens.tolist()``), and a compiled step can
include it. Rows carry their own settings as tensors: ``temperature`` [B] (below MIN_TEMPERATURE:
greedy), ``top_p`` [B] (any value in (0, 1] keeps at least the most likely token) and ``top_k``
[B] (0: off). A row with a repetition penalty brings its own bool mask [V] of the ids it applies
to (``seen_mask``, updated by the caller with each picked token); rows without one pay nothing.
The order is transformers' and TGI's: penalty, temperature, top-k, then top-p over what top-k kept.

Sampling uses the exponential race (a categorical draw is the argmax of p_i / E_i with E_i ~
Exp(1)), which needs no cumulative search and no host round trip.
"""

from __future__ import annotations

import torch

from llava_sessions.handler.engine.generation import MIN_TEMPERATURE, SamplingParams


def row_settings(params: list[SamplingParams], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(temperature [B], top_p [B]) as float32 tensors on ``device``."""
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    return temperature, top_p


def row_top_k(params: list[SamplingParams], device: torch.device) -> torch.Tensor | None:
    """top_k [B] (int64, 0: off) on ``device``; None when no row sets one (nothing to do)."""
    if not any(p.top_k for p in params):
        return None
    return torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device)


def seen_mask(ids: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """A row's repetition-penalty mask: bool [vocab], True at ``ids`` (one copy to the device).

    Made once per turn from its context; the caller marks each picked token (``mask[token] = True``:
    a device write, no sync)."""
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    if ids:
        mask[torch.tensor(ids, dtype=torch.int64, device=device)] = True
    return mask


def penalize(logits: torch.Tensor, penalties: list[float], seen: list[torch.Tensor | None]) -> torch.Tensor:
    """Logits [B, V] with each row's repetition penalty applied where its mask is set: as
    transformers' RepetitionPenaltyLogitsProcessor, logit / p where logit > 0, else logit * p.

    In float32, as transformers' generate scores are (a half-precision logit's float value is
    exact, so an unpenalised row's argmax is unchanged); in place when the logits are float32
    already. Rows whose mask is None are untouched.
    """
    logits = logits.float()
    rows = [row for row, mask in enumerate(seen) if mask is not None]
    if not rows:
        return logits
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    penalty = torch.tensor([penalties[row] for row in rows], dtype=torch.float32, device=logits.device)[:, None]
    chosen = logits.index_select(0, index)  # [k, V]
    penalized = torch.where(chosen > 0, chosen / penalty, chosen * penalty)
    mask = torch.stack([seen[row] for row in rows])  # [k, V]
    return logits.index_copy_(0, index, torch.where(mask, penalized, chosen))


@torch.inference_mode()
def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    suppressed: int | None = None,
    generator: torch.Generator | None = None,
    top_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each row's next token id [B] (int64, on the logits' device) from logits [B, V].

    ``temperature`` None means every row is greedy (the common case: no softmax or sort over the
    vocabulary at all). The ``suppressed`` id is never picked (the image placeholder: an answer
    must not add an image token with no features behind it); it is masked in place, so pass this
    step's own logits. ``top_k`` [B] (0: off) keeps each sampling row's k most likely tokens, ties
    with the k-th included, and top-p then takes its share of what they hold; top_k 1 is greedy.
    """
    if suppressed is not None:
        logits[:, suppressed] = float("-inf")
    greedy = logits.argmax(dim=-1)  # [B]
    if temperature is None:
        return greedy
    scaled = logits.float() / temperature.clamp_min(MIN_TEMPERATURE).unsqueeze(-1)
    probs = torch.softmax(scaled, dim=-1)  # [B, V]
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass = top_p.unsqueeze(-1)  # [B, 1]
    if top_k is not None:
        # Below the k-th most likely: out. top-p's share is of the mass top-k kept (transformers
        # renormalises between the two); rows without top_k keep today's arithmetic exactly.
        k = torch.where(top_k > 0, top_k, sorted_probs.shape[-1]).clamp_max(sorted_probs.shape[-1])
        kth = sorted_probs.gather(-1, (k - 1).unsqueeze(-1))  # [B, 1]
        sorted_probs = sorted_probs.masked_fill(sorted_probs < kth, 0.0)
        mass = torch.where(top_k.unsqueeze(-1) > 0, mass * sorted_probs.sum(-1, keepdim=True), mass)
    # The smallest prefix whose mass reaches top_p; the most likely token always stays.
    outside = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= mass
    outside[:, 0] = False
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
    race = torch.empty_like(kept).exponential_(generator=generator)
    sampled = (kept / race).argmax(dim=-1)  # [B]
    # top_k 1 is greedy exactly (argmax's first maximum where probabilities tie).
    picks_greedy = temperature < MIN_TEMPERATURE
    if top_k is not None:
        picks_greedy = picks_greedy | (top_k == 1)
    return torch.where(picks_greedy, greedy, sampled)


@torch.inference_mode()
def pick(logits: torch.Tensor, params: list[SamplingParams], suppressed: int | None = None,
         generator: torch.Generator | None = None,
         seen: list[torch.Tensor | None] | None = None) -> list[int]:
    """The rows' next token ids on the host: one copy of B ids for the whole batch.

    ``seen``: per row, its repetition-penalty mask (``seen_mask``), or None for a row whose
    penalty is off; leaving it out means no row has one. A penalty changes greedy picks too.
    """
    if seen is not None and any(mask is not None for mask in seen):
        logits = penalize(logits, [p.repetition_penalty for p in params], seen)
    if all(p.greedy for p in params):
        return sample(logits, suppressed=suppressed).tolist()
    temperature, top_p = row_settings(params, logits.device)
    top_k = row_top_k(params, logits.device)
    return sample(logits, temperature, top_p, suppressed, generator, top_k).tolist()
