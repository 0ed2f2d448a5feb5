"""The inference path as small named steps: encode images, prefill, decode one token, pick it.

Shapes: B = batch (1 per session here), T = new tokens, H = hidden size, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from llava_sessions.handler.engine import kv_cache
from llava_sessions.handler.engine.model_loader import LoadedModel


# Temperatures below this pick greedily: dividing logits by a smaller one overflows float32
# (1e-45 is 0 there) and sampling would fail; at this temperature sampling is greedy anyway.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # below MIN_TEMPERATURE (0 included): greedy
    top_p: float = 1.0  # any value in (0, 1] keeps at least the most likely token

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


@torch.inference_mode()
def encode_images(loaded: LoadedModel, images: list) -> list[torch.Tensor]:
    """Vision tower + projector once per image; returns one [tokens_per_image, H] tensor each."""
    pixels = loaded.image_processor(images=images, return_tensors="pt")["pixel_values"]
    # pixels: [n_images, 3, image_size, image_size]
    pixels = pixels.to(loaded.device, loaded.dtype)
    out = loaded.model.get_image_features(pixel_values=pixels, return_dict=True)
    return [features.contiguous() for features in out.pooler_output]


def new_cache(loaded: LoadedModel) -> DynamicCache:
    """An empty per-session KV cache that appends in place (kv_cache.py)."""
    return kv_cache.new_cache(loaded.model.config.get_text_config())


@torch.inference_mode()
def prefill(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    image_rows: torch.Tensor | None,
    cache: DynamicCache,
) -> torch.Tensor:
    """Run the new tokens on top of ``cache`` (updated in place); return last-position logits.

    input_ids: [1, T]; image_rows: [n_image_tokens_in_chunk, H] in placeholder order.
    """
    mm = None
    if image_rows is not None and image_rows.shape[0] > 0:
        mm = {"image": BaseModelOutputWithPooling(pooler_output=[image_rows])}
    out = loaded.model(
        input_ids=input_ids,
        past_key_values=cache,
        use_cache=True,
        mm_encoder_outputs=mm,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :]  # [1, V]


@torch.inference_mode()
def decode_one_token(
    loaded: LoadedModel,
    token: int | list[int],
    cache: DynamicCache,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed one token per row on top of ``cache``; return next-token logits [B, V].

    One session: ``token`` an int, B = 1. Several (batch_decode.py): a list of B tokens, with
    the batched cache's attention_mask [B, past + 1] and each row's position_ids [B, 1].
    """
    tokens = [token] if isinstance(token, int) else list(token)
    input_ids = torch.tensor([[t] for t in tokens], device=loaded.device)  # [B, 1]
    return forward_rows(loaded, input_ids, cache, attention_mask, position_ids)


@torch.inference_mode()
def forward_rows(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    cache: DynamicCache,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Feed input_ids [B, T] on top of a (batched) cache; return the last position's logits [B, V].

    attention_mask: [B, past + T], 0 where a row has padding; position_ids: [B, T], each row's own.
    """
    out = loaded.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :]  # [B, V]


def select_next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    suppressed: int | None = None,
) -> int:
    """Greedy at temperature 0, else nucleus sampling; never the ``suppressed`` id.

    The image placeholder is suppressed: an answer must not add an image token that
    has no features behind it (the next prefill could not fill it).
    """
    logits = logits[0]  # [V]
    if params.greedy:
        token = int(torch.argmax(logits))
        # argmax keeps the first maximum: masking another id cannot change it. Skipping the
        # mask saves two small ops per token, most of this function's time on a CPU.
        if token != suppressed:
            return token
    logits = logits.float()
    if suppressed is not None:
        logits = logits.index_fill(0, torch.tensor([suppressed], device=logits.device), float("-inf"))
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p. The most likely token always stays:
        # a top_p that rounds to 0 in float32 (1e-300) would otherwise leave nothing to sample.
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        outside[0] = False
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


cache_bytes = kv_cache.cache_bytes
