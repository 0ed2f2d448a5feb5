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
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava_sessions.errors import ConfigError
from llava_sessions.handler.engine.models.base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    model_type = "llava"
    description = (
        "LLaVA-1.5 with a CLIP vision tower (llava-hf/llava-1.5-7b-hf) and SigLIP LLaVAs "
        "(llava-hf/llava-interleave-qwen-0.5b-hf)"
    )

    def __init__(self, model, processor, device: torch.device):
        super().__init__(model, processor, device)
        self._tokens = self._measure()

    @classmethod
    def load(cls, source: str, dtype) -> tuple[LlavaForConditionalGeneration, object]:
        model = LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype, use_safetensors=True)
        return model, AutoProcessor.from_pretrained(source)

    @torch.inference_mode()
    def encode_images(self, images: Sequence) -> list[torch.Tensor]:
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        # pixels: [n_images, 3, image_size, image_size]
        pixels = pixels.to(self.device, self.dtype)
        out = self.model.get_image_features(pixel_values=pixels, return_dict=True)
        return [features.contiguous() for features in out.pooler_output]  # each [tokens, H]

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
        try:
            ids = self.processor(images=[blank], text=self.processor.image_token, return_tensors="pt")["input_ids"]
        except Exception as error:
            raise ConfigError(
                f"the checkpoint's processor cannot expand an image ({type(error).__name__}: {error}); its "
                "processor_config.json needs patch_size, vision_feature_select_strategy and "
                "num_additional_image_tokens as transformers 5's LlavaProcessor reads them"
            ) from None
        placeholders = int((ids == config.image_token_id).sum())
        if placeholders != rows:
            raise ConfigError(
                f"the checkpoint's processor expands an image into {placeholders} tokens but its vision tower "
                f"gives {rows} feature rows (vision_feature_select_strategy "
                f"{config.vision_feature_select_strategy!r}, vision_feature_layer {config.vision_feature_layer}); "
                "set processor_config.json to match config.json: num_additional_image_tokens 1 for a CLIP "
                "tower (its CLS token), 0 for SigLIP, and the same vision_feature_select_strategy"
            )
        return rows
