"""Load a LLaVA checkpoint and its processor onto one device.

The same code path serves the offline tiny model, any local checkpoint and a
hub id: ``from_pretrained`` with safetensors only (never pickle).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava_sessions.errors import ConfigError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    model: LlavaForConditionalGeneration
    processor: object  # a LlavaProcessor (tokenizer + image processor)
    device: torch.device
    dtype: torch.dtype
    image_token_id: int
    tokens_per_image: int
    eos_token_ids: frozenset[int]
    max_context: int  # the language model's position limit

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor


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
    """Load model and processor from a local directory or hub id onto ``device``."""
    torch_dtype = "auto" if dtype == "auto" else _DTYPES[dtype]
    model = LlavaForConditionalGeneration.from_pretrained(
        source, dtype=torch_dtype, use_safetensors=True
    )
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(source)
    config = model.config
    tokenizer = processor.tokenizer
    tokens_per_image = _tokens_per_image(config)
    processor_count = getattr(processor, "num_image_tokens", None)
    if processor_count is not None and processor_count != tokens_per_image:
        raise ConfigError(
            f"processor expands an image into {processor_count} tokens but the model expects "
            f"{tokens_per_image}; the checkpoint's processor and model configs disagree"
        )
    eos = _eos_token_ids(model, tokenizer)
    loaded = LoadedModel(
        model=model,
        processor=processor,
        device=device,
        dtype=next(model.parameters()).dtype,
        image_token_id=int(config.image_token_id),
        tokens_per_image=tokens_per_image,
        eos_token_ids=eos,
        max_context=int(config.text_config.max_position_embeddings),
    )
    log.info(
        "loaded %s on %s (%s): %d tokens per image, context %d",
        source, device, loaded.dtype, tokens_per_image, loaded.max_context,
    )
    return loaded


def _tokens_per_image(config) -> int:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    # The "default" strategy drops the CLS token; "full" keeps it.
    return patches if config.vision_feature_select_strategy == "default" else patches + 1


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
