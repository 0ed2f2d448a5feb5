"""``model_type == "llava_next"``: LlavaNextForConditionalGeneration, one feature tensor per image
of that image's own length.

Serves LLaVA-NeXT (llava-hf/llava-v1.6-mistral-7b-hf). The processor resizes and pads each image
to its best ``image_grid_pinpoints`` resolution, cuts that into tower-sized tiles and adds the
whole image as a base tile; the model keeps the base tile's rows, then the tiles' rows with the
padding cut away again ("unpadding") and one ``image_newline`` row closing each row of patches.
So an image's token count depends on its size and shape: in the 7B geometry (336 px tiles,
patch 14) a 672x672 image is 2,928 tokens, a 336x336 one 1,176.

The count of an image comes from the processor before it is encoded (``image_tokens``: its
``_get_number_of_features`` for the image's height and width, as its own prompt expansion does),
and generation.encode_images checks it against the rows the model really gives. At load one
awkwardly shaped image is expanded by the processor, counted here and encoded, and a checkpoint
whose three disagree is refused.

The engine prefills with the precomputed features (``mm_encoder_outputs``, the tower skipped)
and decodes through ``model.model.language_model`` and ``model.lm_head``: LlavaNext's forward
takes the same keywords as Llava's and has the same modules, so only loading and encoding differ.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration

from llava_sessions.errors import ConfigError
from llava_sessions.handler.engine.models.base import ModelAdapter, height_width


class LlavaNextAdapter(ModelAdapter):
    model_type = "llava_next"
    description = (
        "LLaVA-NeXT (llava-hf/llava-v1.6-mistral-7b-hf): anyres tiles, an image's token count depends "
        "on its size"
    )
    model_class = LlavaNextForConditionalGeneration

    def __init__(self, model, processor, device: torch.device):
        super().__init__(model, processor, device)
        if not hasattr(processor, "_get_number_of_features"):
            raise ConfigError(
                f"the checkpoint's processor is a {type(processor).__name__}, not a LlavaNextProcessor; its "
                "processor_config.json must name LlavaNextProcessor"
            )
        # (height, width) of each tile the tower sees: the processor's crop (or resize) size
        self._tile = self.tile_size()
        self._check()

    def pixel_inputs(self, images: Sequence) -> dict[str, torch.Tensor]:
        """The processor's ``pixel_values`` [n_images, max_tiles, 3, h, w] (padded with empty tiles)
        and ``image_sizes`` [n_images, 2] (height, width) on the device: what the model's forward
        and generate take; encode_images gives one [tokens_i, H] tensor per image from them."""
        out = self.processor.image_processor(images=list(images), return_tensors="pt")
        return {
            "pixel_values": out["pixel_values"].to(self.device, self.dtype),
            "image_sizes": out["image_sizes"].to(self.device),
        }

    def image_tokens(self, images: Sequence) -> list[int]:
        return [self._tokens_of(*height_width(image)) for image in images]

    def _tokens_of(self, height: int, width: int) -> int:
        """The processor's count for one image (LlavaNextProcessor.replace_image_token's)."""
        count = self.processor._get_number_of_features(height, width, *self._tile)
        if self.processor.vision_feature_select_strategy == "default":
            count -= 1
        return count

    def _check(self) -> None:
        """One image of an awkward shape (tiled, then unpadded): the processor's expansion, the
        count here and the model's feature rows must agree."""
        height, width = self._tile
        probe = Image.new("RGB", (2 * width - width // 3, height - height // 4))  # wide, not a pinpoint's shape
        config = self.model.config
        placeholders = self.processor_placeholders(probe)
        counted = self._tokens_of(probe.height, probe.width)
        rows = self.encode_images([probe])[0].shape[0]
        if not placeholders == counted == rows:
            raise ConfigError(
                f"the checkpoint's processor expands a {probe.width}x{probe.height} image into {placeholders} "
                f"tokens (counted {counted}) but the model gives {rows} feature rows "
                f"(vision_feature_select_strategy {config.vision_feature_select_strategy!r}, "
                f"image_grid_pinpoints {config.image_grid_pinpoints}); set processor_config.json to match "
                "config.json: num_additional_image_tokens 1 for a CLIP tower, the same "
                "vision_feature_select_strategy and image_grid_pinpoints"
            )
