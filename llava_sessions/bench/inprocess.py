"""Everything measured inside this process: the reference conversation and strategies (b)-(d).

(b) stateless: every turn decodes and preprocesses the image again and runs ``model.generate``
    with pixel_values over the full token history (what a stateless endpoint does).
(c) pixel cache (the AWS sample's strategy): the preprocessed pixel_values are kept, but the
    vision tower and the prefill of the full history run again every turn.
(d) floor: only the new tokens go through the model on a KV cache that already holds the
    history (``generation.prefill`` + ``sampling.pick``), no server, no bookkeeping.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from llava_sessions.config import ServingConfig
from llava_sessions.handler.engine import generation, sampling
from llava_sessions.handler.engine.engine import SessionEngine
from llava_sessions.handler.engine.generation import SamplingParams
from llava_sessions.handler.engine.model_loader import LoadedModel
from llava_sessions.handler.engine.prompt import Conversation


@dataclass
class ReferenceTurn:
    prompt: str
    context_ids: list[int]  # the full history this turn's answer is conditioned on
    cached_tokens: int  # how much of it the engine had in its KV cache
    answer_ids: list[int]
    text: str
    bytes_held_after: int  # engine accounting (features + KV) after the turn


@dataclass
class Reference:
    turns: list[ReferenceTurn]
    bytes_after_open: int
    question_tokens: list[int] = field(default_factory=list)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_image(image_b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB")


def reference_run(loaded: LoadedModel, image_b64: str, prompts: list[str], max_new_tokens: int | Sequence[int],
                  turn_images: Sequence[Sequence[str]] | None = None) -> Reference:
    """The conversation once through the session engine, greedily; its histories are the ground truth.

    The session opens with ``image_b64``; turn k also sends ``turn_images[k]`` (base64, none by
    default) and answers ``max_new_tokens`` tokens (one number for every turn, or one per turn).
    """
    per_turn = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    sent = [list(images) for images in turn_images] if turn_images is not None else [[] for _ in prompts]
    # No spare KV slots: the bytes measured per session are its tokens', as when sessions fill the
    # budget (spare slots are only kept while a quarter of it is free).
    engine = SessionEngine(loaded, ServingConfig(max_sessions_per_worker=2, kv_headroom_tokens=0))
    formatter = engine.formatter
    opened_with = [decode_image(image_b64)]
    opened = engine.open_session(opened_with)
    bytes_after_open = engine.bytes_held()
    conversation, history, turns, question_tokens = Conversation(), [], [], []
    for k, prompt in enumerate(prompts):
        sent_now = [decode_image(image) for image in sent[k]]
        placed = (opened_with if k == 0 else []) + sent_now  # the images this turn's placeholders stand for
        n_images = len(placed)
        turn_ids = formatter.user_turn_ids(conversation, prompt, loaded.image_tokens(placed))
        result = engine.turn(opened.session_id, prompt, SamplingParams(per_turn[k]), images=sent_now)
        context = history + turn_ids
        if len(context) != result.prompt_tokens:
            raise AssertionError(
                f"turn {k + 1}: rebuilt history has {len(context)} tokens, the engine says {result.prompt_tokens}"
            )
        answer = list(result.token_ids)
        turns.append(ReferenceTurn(prompt, context, result.cached_tokens, answer, result.text, engine.bytes_held()))
        question_tokens.append(len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]))
        history = context + answer + formatter.closing_ids(answer, loaded.eos_token_ids)
        conversation.messages.append(conversation.user_message(prompt, n_images))
        conversation.messages.append(Conversation.assistant_message(result.text))
    engine.close_session(opened.session_id)
    engine.stop()
    return Reference(turns, bytes_after_open, question_tokens)


class InProcess:
    """Strategies (b), (c), (d) and bare-generate decode on the reference histories."""

    def __init__(self, loaded: LoadedModel, image_b64: str | Sequence[str], reference: Reference):
        """``image_b64``: the conversation's image, or its images in the order they came."""
        self.loaded = loaded
        self.images_b64 = [image_b64] if isinstance(image_b64, str) else list(image_b64)
        self.reference = reference
        self.device = loaded.device
        images = [decode_image(image) for image in self.images_b64]
        self.pixels = self._preprocess(images)  # kept by (c)
        encoded = generation.encode_images(loaded, images)
        self.image_rows = [features.shape[0] for features in encoded]  # each image's placeholders
        self.features = torch.cat(encoded, dim=0)  # kept by (d)

    # --- (b) and (c) -----------------------------------------------------------

    def _preprocess(self, images: list) -> dict[str, torch.Tensor]:
        """The model's image inputs (pixel_values; image_sizes too where the family tiles)."""
        return self.loaded.adapter.pixel_inputs(images)

    def _kept_pixels(self, n_images: int) -> dict[str, torch.Tensor]:
        """The kept image inputs of the conversation's first ``n_images`` images."""
        return {name: value[:n_images] for name, value in self.pixels.items()}

    def _images_in(self, context_ids: list[int]) -> int:
        """How many of the conversation's images a history holds (the first ones: they come in order)."""
        placeholders = sum(1 for t in context_ids if t == self.loaded.image_token_id)
        images = 0
        while placeholders > 0 and images < len(self.image_rows):
            placeholders -= self.image_rows[images]
            images += 1
        return images

    @torch.inference_mode()
    def _generate(self, context_ids: list[int], pixels: dict[str, torch.Tensor], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([context_ids], device=self.device)
        out = self.loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **pixels,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.loaded.tokenizer.pad_token_id,
        )
        return out[0, ids.shape[1] :].tolist()

    def stateless_ttft(self, k: int) -> tuple[float, int]:
        """(b): decode + preprocess the history's images, generate 1 token over the full history."""
        turn = self.reference.turns[k]
        sent = self.images_b64[: self._images_in(turn.context_ids)]
        sync(self.device)
        start = time.perf_counter()
        pixels = self._preprocess([decode_image(image) for image in sent])
        tokens = self._generate(turn.context_ids, pixels, 1)
        sync(self.device)
        return time.perf_counter() - start, tokens[0]

    def pixel_cache_ttft(self, k: int) -> tuple[float, int]:
        """(c): kept pixel_values; vision tower and full prefill again; 1 token."""
        turn = self.reference.turns[k]
        pixels = self._kept_pixels(self._images_in(turn.context_ids))
        sync(self.device)
        start = time.perf_counter()
        tokens = self._generate(turn.context_ids, pixels, 1)
        sync(self.device)
        return time.perf_counter() - start, tokens[0]

    def bare_generate_total(self, k: int, new_tokens: int) -> tuple[float, list[int]]:
        """model.generate of ``new_tokens`` tokens (kept pixels) on turn k's history: total seconds."""
        turn = self.reference.turns[k]
        pixels = self._kept_pixels(self._images_in(turn.context_ids))
        sync(self.device)
        start = time.perf_counter()
        tokens = self._generate(turn.context_ids, pixels, new_tokens)
        sync(self.device)
        return time.perf_counter() - start, tokens

    # --- (d) ---------------------------------------------------------------------

    def floor_cache(self, k: int):
        """A KV cache holding exactly what the engine had cached before turn k."""
        turn = self.reference.turns[k]
        cache = generation.new_cache(self.loaded)
        if turn.cached_tokens:
            prefix = turn.context_ids[: turn.cached_tokens]
            self._prefill(prefix, 0, cache)
        return cache

    def floor_ttft(self, k: int, cache) -> tuple[float, int]:
        """(d): prefill only the new tokens on ``cache`` and pick the first token; cache restored after."""
        turn = self.reference.turns[k]
        sync(self.device)
        start = time.perf_counter()
        logits = self._prefill(turn.context_ids[turn.cached_tokens :], turn.cached_tokens, cache)
        token = sampling.pick(logits, [SamplingParams(1)])[0]
        sync(self.device)
        elapsed = time.perf_counter() - start
        _restore(cache, turn.cached_tokens)
        return elapsed, token

    def floor_decode_step(self, k: int, cache, token: int) -> float:
        """One bare decode step on top of turn k's context (informational); cache restored after."""
        turn = self.reference.turns[k]
        self._prefill(turn.context_ids[turn.cached_tokens :], turn.cached_tokens, cache)
        sync(self.device)
        start = time.perf_counter()
        logits = generation.decode_one_token(self.loaded, token, cache)
        sampling.pick(logits, [SamplingParams(1)])[0]
        sync(self.device)
        elapsed = time.perf_counter() - start
        _restore(cache, turn.cached_tokens)
        return elapsed

    @torch.inference_mode()
    def logit_gap(self, ids: list[int], token: int) -> tuple[float, float]:
        """(logit of ``token`` minus the best other logit, the best logit) after ``ids``, in float32.

        A small gap means another run whose kernels round differently may pick another token.
        """
        logits = self._prefill(ids, 0, generation.new_cache(self.loaded)).float().reshape(-1)
        chosen = float(logits[token])
        logits[token] = float("-inf")
        best_other = float(logits.max())
        return chosen - best_other, max(chosen, best_other)

    def _prefill(self, ids: list[int], start: int, cache) -> torch.Tensor:
        image_id = self.loaded.image_token_id
        context = self.reference.turns[-1].context_ids  # every history is a prefix of the last one
        first = sum(1 for t in context[:start] if t == image_id)
        needed = sum(1 for t in ids if t == image_id)
        rows = self.features[first : first + needed] if needed else None
        return generation.prefill(self.loaded, torch.tensor([ids], device=self.device), rows, cache)


def _restore(cache, length: int) -> None:
    """Drop what was added past ``length`` tokens (crop takes a negative count in transformers 5)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
    if cache.get_seq_length() != length:
        raise AssertionError(f"cache holds {cache.get_seq_length()} tokens after restoring to {length}")
