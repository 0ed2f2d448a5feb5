"""The inference path as small named steps: encode images, prefill, decode one token, pick it.

Shapes: B = batch (1 per session here), T = new tokens, H = hidden size, V = vocab.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from llava_sessions.errors import InternalError, InvalidRequest
from llava_sessions.handler.engine import kv_cache
from llava_sessions.handler.engine.model_loader import LoadedModel


# Temperatures below this pick greedily: dividing logits by a smaller one overflows float32
# (1e-45 is 0 there) and sampling would fail; at this temperature sampling is greedy anyway.
MIN_TEMPERATURE = 1e-5


def cache_argument(module: torch.nn.Module, cache) -> dict:
    """The cache as the installed transformers wants it: ``cache=`` (5.25 on; ``past_key_values=``
    is deprecated there, for removal in 5.40) or ``past_key_values=`` (earlier 5.x)."""
    keyword = _CACHE_KEYWORD.get(type(module))
    if keyword is None:
        parameters = inspect.signature(module.forward).parameters
        keyword = _CACHE_KEYWORD[type(module)] = "cache" if "cache" in parameters else "past_key_values"
    return {keyword: cache}


_CACHE_KEYWORD: dict[type, str] = {}


# Stop strings a turn may ask for, and how long each may be: as OpenAI's API allows (4); the
# length bounds the text searched for them at each token (scheduler.py, StopStrings).
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 64


@dataclass(frozen=True)
class SamplingParams:
    """How a turn picks its tokens; the defaults are plain greedy decoding up to max_new_tokens.

    ``top_k`` (0: off) keeps the k most likely tokens (ties with the k-th kept) before top-p
    and temperature sampling; greedy ignores it, and 1 is greedy. ``repetition_penalty`` (1.0:
    off) is TGI's and transformers' (the CTRL paper's): for every token id in the turn's context
    (the session's history and this turn's prompt) or its answer so far, a logit > 0 is divided
    by it and any other multiplied by it, before greedy or sampling picks. ``stop``: strings
    that end the turn once the answer's text contains one (finish reason "stop"); the answer's
    text is cut before it, its tokens all kept (Scheduler._accept and _finish). A lone string
    counts as a tuple of one, a list as a tuple.

    The new fields are checked here, so an engine caller cannot pass values the engine cannot
    honour: InvalidRequest, whose message says which field and what it allows. The HTTP layer
    may check them first, with the same bounds; temperature and top_p are the HTTP layer's to check.
    """

    max_new_tokens: int
    temperature: float = 0.0  # below MIN_TEMPERATURE (0 included): greedy
    top_p: float = 1.0  # any value in (0, 1] keeps at least the most likely token
    top_k: int = 0  # 0: every token; k: the k most likely (ties with the k-th kept)
    repetition_penalty: float = 1.0  # 1.0: off; > 0
    stop: tuple[str, ...] = ()  # at most MAX_STOP_STRINGS, each 1 to MAX_STOP_LENGTH characters

    def __post_init__(self):
        if isinstance(self.stop, str):  # OpenAI accepts "stop": "\n" for ["\n"]
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))  # hashable, like the rest
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be a whole number >= 0 (0 keeps every token), got {self.top_k!r}")
        penalty = self.repetition_penalty
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 < penalty < math.inf:
            raise InvalidRequest(
                f"repetition_penalty must be a number greater than 0 (1.0 is no penalty), got {penalty!r}"
            )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop holds at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}; drop some")
        for text in self.stop:
            if not isinstance(text, str) or not 0 < len(text) <= MAX_STOP_LENGTH:
                raise InvalidRequest(
                    f"each stop string must be text of 1 to {MAX_STOP_LENGTH} characters, got {text!r:.80}"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def encode_images(loaded: LoadedModel, images: list) -> list[torch.Tensor]:
    """Vision tower + projector once per image (the family's adapter): one [tokens_i, H] tensor
    each, its rows the placeholders ``loaded.image_tokens`` promised the prompt for that image."""
    features = loaded.adapter.encode_images(images)
    promised = loaded.image_tokens(images)
    rows = [f.shape[0] for f in features]
    if rows != promised:
        raise InternalError(
            f"the images gave {rows} feature rows where the prompt expands them into {promised} "
            f"placeholders ({type(loaded.adapter).__name__})"
        )
    return features


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
        **cache_argument(loaded.model, cache),
        use_cache=True,
        mm_encoder_outputs=mm,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :]  # [1, V]


@torch.inference_mode()
def decode_one_token(loaded: LoadedModel, token: int, cache: DynamicCache) -> torch.Tensor:
    """Feed one token on top of one session's own ``cache``; return its next-token logits [1, V].

    A turn decodes this way only when the budget has no room for a decode arena (runner.py)."""
    input_ids = torch.tensor([[token]], device=loaded.device)  # [1, 1]
    return forward_rows(loaded, input_ids, cache, None, None)


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
        **cache_argument(loaded.model, cache),
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :]  # [B, V]


def step(loaded: LoadedModel, ids: torch.Tensor, positions: torch.Tensor, cache, last: torch.Tensor) -> torch.Tensor:
    """T tokens per row over fixed KV slots (runner.py): ids [B, T] at positions [B, T] -> the
    logits [B, V] of each row's token at index ``last`` [B]. Fixed shapes, no host sync: what a
    compiled step traces. A decode step feeds one token per row (T = 1, last = 0); a follow-up's
    prefill feeds its new tokens (B = 1), padded past ``last`` to a bucket when graphs need it."""
    slots = cache.layers[0].keys.shape[-2]
    cache.rows = torch.arange(ids.shape[0], device=ids.device)[:, None]  # [B, 1]
    cache.slots = positions
    # mask [B, 1, T, S]: each token sees its row's slots up to the one it writes
    mask = torch.arange(slots, device=ids.device)[None, None, None, :] <= positions[:, None, :, None]
    language_model = loaded.model.model.language_model
    hidden = language_model(
        inputs_embeds=language_model.embed_tokens(ids),
        attention_mask=mask,
        position_ids=positions,
        **cache_argument(language_model, cache),
        use_cache=True,
    ).last_hidden_state  # [B, T, H]
    chosen = hidden[torch.arange(ids.shape[0], device=ids.device), last]  # [B, H]
    return loaded.model.lm_head(chosen)  # [B, V]


cache_bytes = kv_cache.cache_bytes
