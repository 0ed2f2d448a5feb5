"""``model_type == "llava"``: LlavaForConditionalGeneration, one fixed-size feature tensor per image.

Serves LLaVA-1.5 (a CLIP tower whose CLS token the "default" strategy drops: 576 tokens at
336 px) and the SigLIP LLaVAs such as llava-interleave-qwen (no CLS token, strategy "full":
729 tokens at 384 px). Every image is resized to the tower's input size, so every image takes
the same count, measured once at load by encoding a blank image and checked against what the
checkpoint's processor writes for it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from llava_sessions.errors import ConfigError
from llava_sessions.handler.engine.models.base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    model_type = "llava"
    description = (
        "LLaVA-1.5 with a CLIP vision tower (llava-hf/llava-1.5-7b-hf) and SigLIP LLaVAs "
        "(llava-hf/llava-interleave-qwen-0.5b-hf)"
    )
    model_class = LlavaForConditionalGeneration  # pixel_values: [n_images, 3, image_size, image_size]

    def __init__(self, model, processor, device: torch.device):
        super().__init__(model, processor, device)
        self._tokens = self._measure()

    def image_tokens(self, images: Sequence) -> list[int]:
        return [self._tokens] * len(images)

    @property
    def fixed_image_tokens(self) -> int:
        return self._tokens

    def _measure(self) -> int:
        """The feature rows of one image (a blank one at the tower's input size), checked against
        the placeholders the checkpoint's processor writes for it."""
        config = self.model.config
        side = config.vision_config.image_size
        blank = Image.new("RGB", (side, side))
        rows = self.encode_images([blank])[0].shape[0]
        placeholders = self.processor_placeholders(blank)
        if placeholders != rows:
            raise ConfigError(
                f"the checkpoint's processor expands an image into {placeholders} tokens but its vision tower "
                f"gives {rows} feature rows (vision_feature_select_strategy "
                f"{config.vision_feature_select_strategy!r}, vision_feature_layer {config.vision_feature_layer}); "
                "set processor_config.json to match config.json: num_additional_image_tokens 1 for a CLIP "
                "tower (its CLS token), 0 for SigLIP, and the same vision_feature_select_strategy"
            )
        return rows
