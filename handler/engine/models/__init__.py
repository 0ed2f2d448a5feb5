"""The model families the engine serves: one adapter per config.json ``model_type``.

``load`` reads the checkpoint's ``model_type``, picks its adapter from ADAPTERS and loads the
model and processor through it; a type without an adapter is refused there (ConfigError),
before any weights load, so a TorchServe worker fails at start rather than on its first
request. Adding a family is one module here (base.ModelAdapter: loading, image encoding,
tokens per image), its entry in ADAPTERS, and its tiny preset (llava_sessions/tiny_model.py).
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from llava_sessions.errors import ConfigError
from llava_sessions.handler.engine.models.base import ModelAdapter
from llava_sessions.handler.engine.models.llava import LlavaAdapter
from llava_sessions.handler.engine.models.llava_next import LlavaNextAdapter
from llava_sessions.handler.engine.models.llava_onevision import LlavaOnevisionAdapter

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for", "load", "supported"]

ADAPTERS: dict[str, type[ModelAdapter]] = {
    adapter.model_type: adapter for adapter in (LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter)
}


def supported() -> str:
    """The supported model types and what each serves, for messages."""
    return "; ".join(f"{model_type!r} ({adapter.description})" for model_type, adapter in ADAPTERS.items())


def adapter_for(model_type: str | None, source: str = "the checkpoint") -> type[ModelAdapter]:
    """The adapter of ``model_type``; ConfigError naming the supported types when there is none."""
    adapter = ADAPTERS.get(model_type or "")
    if adapter is None:
        raise ConfigError(
            f"{source} has model_type {model_type!r} in its config.json, which this server does not serve. "
            f"Supported model types: {supported()}. Serve a checkpoint of one of these types, or add an "
            f"adapter for {model_type!r} under handler/engine/models/"
        )
    return adapter


def load(source: str, device: torch.device, dtype="auto") -> ModelAdapter:
    """The adapter of ``source``'s model type, its model (on ``device``, eval mode) and processor
    loaded; ``dtype`` is "auto" or a torch dtype."""
    config, _ = PretrainedConfig.get_config_dict(source)
    adapter = adapter_for(config.get("model_type"), source)
    model, processor = adapter.load(source, dtype)
    model.to(device).eval()
    return adapter(model, processor, device)
