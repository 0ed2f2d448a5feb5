"""Pick each row's next token on the device: greedy, temperature and top-p, one batch at a time.

No host sync inside: every row's choice is made with tensor ops of fixed shape, so the caller
copies the B picked ids to the host once per step (``tokens.tolist()``), and a compiled step can
include it. Rows carry their own settings as tensors: ``temperature`` [B] (below MIN_TEMPERATURE:
greedy) and ``top_p`` [B] (any value in (0, 1] keeps at least the most likely token).

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


@torch.inference_mode()
def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    suppressed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Each row's next token id [B] (int64, on the logits' device) from logits [B, V].

    ``temperature`` None means every row is greedy (the common case: no softmax or sort over the
    vocabulary at all). The ``suppressed`` id is never picked (the image placeholder: an answer
    must not add an image token with no features behind it); it is masked in place, so pass this
    step's own logits.
    """
    if suppressed is not None:
        logits[:, suppressed] = float("-inf")
    greedy = logits.argmax(dim=-1)  # [B]
    if temperature is None:
        return greedy
    scaled = logits.float() / temperature.clamp_min(MIN_TEMPERATURE).unsqueeze(-1)
    probs = torch.softmax(scaled, dim=-1)  # [B, V]
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    # The smallest prefix whose mass reaches top_p; the most likely token always stays.
    outside = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p.unsqueeze(-1)
    outside[:, 0] = False
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
    race = torch.empty_like(kept).exponential_(generator=generator)
    sampled = (kept / race).argmax(dim=-1)  # [B]
    return torch.where(temperature < MIN_TEMPERATURE, greedy, sampled)


@torch.inference_mode()
def pick(logits: torch.Tensor, params: list[SamplingParams], suppressed: int | None = None,
         generator: torch.Generator | None = None) -> list[int]:
    """The rows' next token ids on the host: one copy of B ids for the whole batch."""
    if all(p.greedy for p in params):
        return sample(logits, suppressed=suppressed).tolist()
    temperature, top_p = row_settings(params, logits.device)
    return sample(logits, temperature, top_p, suppressed, generator).tolist()
