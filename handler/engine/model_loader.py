"""Load a LLaVA-family checkpoint and its processor onto one device: the one entry for the
TorchServe handler, the bench and the tests.

The checkpoint's ``config.model_type`` picks its family's adapter (handler/engine/models/);
a type without one is refused with ConfigError. The same code path serves the offline tiny
models, any local checkpoint and a hub id: ``from_pretrained`` with safetensors only (never
pickle).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from llava_sessions.errors import ConfigError
from llava_sessions.handler.engine import models
from llava_sessions.handler.engine.models import ModelAdapter

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module  # a LlavaForConditionalGeneration (or another family's class)
    processor: object  # a LlavaProcessor (tokenizer + image processor)
    device: torch.device
    dtype: torch.dtype
    image_token_id: int
    eos_token_ids: frozenset[int]
    max_context: int  # the language model's position limit
    adapter: ModelAdapter  # the family's loading, image encoding and tokens per image

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor

    def image_tokens(self, images: Sequence) -> list[int]:
        """The placeholder tokens each image expands to (its feature rows), known before encoding."""
        return self.adapter.image_tokens(images)

    @property
    def fixed_image_tokens(self) -> int | None:
        """The count every image takes in a fixed-size family (LLaVA-1.5: 576); None where it
        depends on the image."""
        return self.adapter.fixed_image_tokens


def resolve_device(requested: str, gpu_id: int | None) -> torch.device:
    """"auto" means the GPU TorchServe assigned to this worker, else the CPU."""
    if requested == "auto":
        if gpu_id is not None and torch.cuda.is_available():
            return torch.device(f"cuda:{gpu_id}")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} asked for but no CUDA device is visible; use device=auto or cpu")
    return device


def load_model(source: str, device: torch.device, dtype: str = "auto") -> LoadedModel:
    """Load model and processor from a local directory or hub id onto ``device``, through the
    adapter of the checkpoint's model type (ConfigError for a type this server does not serve)."""
    torch_dtype = "auto" if dtype == "auto" else _DTYPES[dtype]
    adapter = models.load(source, device, torch_dtype)
    model, processor = adapter.model, adapter.processor
    config = model.config
    loaded = LoadedModel(
        model=model,
        processor=processor,
        device=device,
        dtype=adapter.dtype,
        image_token_id=int(config.image_token_id),
        eos_token_ids=_eos_token_ids(model, processor.tokenizer),
        max_context=int(config.get_text_config().max_position_embeddings),
        adapter=adapter,
    )
    log.info(
        "loaded %s (%s) on %s (%s): %s tokens per image, context %d",
        source, config.model_type, device, loaded.dtype,
        loaded.fixed_image_tokens or "image-dependent", loaded.max_context,
    )
    return loaded


def _eos_token_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    generation_eos = getattr(model.generation_config, "eos_token_id", None)
    for value in (generation_eos, tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    if not ids:
        raise ConfigError("the checkpoint defines no eos token; set eos_token_id in generation_config.json")
    return frozenset(int(i) for i in ids)
