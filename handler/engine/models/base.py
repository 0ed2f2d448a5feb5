"""What the engine needs to know about one model family: the ModelAdapter interface.

An adapter is made once per loaded model (model_loader.load_model) and answers:
- how to load the family's model class and processor (``load``);
- how to encode a turn's images into one feature tensor per image, the rows of each being the
  placeholder tokens that image takes in the prompt (``encode_images``);
- how many placeholder tokens each image expands to, before it is encoded (``image_tokens``): the
  prompt's length and the memory reservation are known before the vision tower runs. It comes
  from the real feature length (measured at load, or the processor's count for families whose
  images take a count that depends on their size), and generation.encode_images checks it
  against the rows each image's features really have.

The chat template's turn frame and end-of-turn tokens come from the template itself
(prompt.TurnFormatter), so an adapter needs to say nothing about them.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch


class ModelAdapter:
    """One family's loading, image encoding and image token counts."""

    model_type: ClassVar[str]  # config.json's model_type
    description: ClassVar[str]  # the checkpoints it serves, for messages and the README

    def __init__(self, model, processor, device: torch.device):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype: torch.dtype = next(model.parameters()).dtype

    @classmethod
    def load(cls, source: str, dtype) -> tuple[object, object]:
        """(model, processor) from a local directory or hub id, safetensors only; ``dtype`` is
        "auto" or a torch dtype."""
        raise NotImplementedError

    def encode_images(self, images: Sequence) -> list[torch.Tensor]:
        """Vision tower and projector over ``images``: one [tokens, H] tensor per image."""
        raise NotImplementedError

    def image_tokens(self, images: Sequence) -> list[int]:
        """The placeholder tokens each image expands to (its features' rows), before encoding."""
        raise NotImplementedError

    @property
    def fixed_image_tokens(self) -> int | None:
        """The count every image takes, for families where it does not depend on the image; None
        where it does (per-image figures then come from ``image_tokens``)."""
        return None
