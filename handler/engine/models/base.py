"""What the engine needs to know about one model family: the ModelAdapter interface.

An adapter is made once per loaded model (model_loader.load_model) and answers:
- how to load the family's model class and processor (``load``: ``model_class`` and the
  checkpoint's own processor);
- the image processor's tensors as the model takes them (``pixel_inputs``: ``pixel_values``, and
  ``image_sizes`` for LLaVA-NeXT), which tests and the bench also give ``generate``;
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
from PIL import Image
from transformers import AutoProcessor

from llava_sessions.errors import ConfigError


class ModelAdapter:
    """One family's loading, image encoding and image token counts."""

    model_type: ClassVar[str]  # config.json's model_type
    model_class: ClassVar[type]  # the transformers class its checkpoints load into
    description: ClassVar[str]  # the checkpoints it serves, for messages and the README

    def __init__(self, model, processor, device: torch.device):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype: torch.dtype = next(model.parameters()).dtype

    @classmethod
    def load(cls, source: str, dtype) -> tuple[object, object]:
        """(model, processor) from a local directory or hub id, safetensors only; ``dtype`` is
        "auto" or a torch dtype: the family's ``model_class`` and the checkpoint's own processor."""
        model = cls.model_class.from_pretrained(source, dtype=dtype, use_safetensors=True)
        return model, AutoProcessor.from_pretrained(source)

    def pixel_inputs(self, images: Sequence) -> dict[str, torch.Tensor]:
        """The image processor's tensors for ``images``, on the device, as the model's forward and
        ``generate`` take them (``pixel_values``; families that tile add ``image_sizes``)."""
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels.to(self.device, self.dtype)}

    @torch.inference_mode()
    def encode_images(self, images: Sequence) -> list[torch.Tensor]:
        """Vision tower and projector over ``images``: one [tokens, H] tensor per image (the
        model's ``get_image_features`` on ``pixel_inputs``)."""
        out = self.model.get_image_features(**self.pixel_inputs(images), return_dict=True)
        return [features.contiguous() for features in out.pooler_output]

    def image_tokens(self, images: Sequence) -> list[int]:
        """The placeholder tokens each image expands to (its features' rows), before encoding."""
        raise NotImplementedError

    def processor_placeholders(self, image) -> int:
        """The placeholders the checkpoint's processor writes for ``image`` (the expansion of a
        prompt holding only the image token); ConfigError when it cannot expand one."""
        try:
            ids = self.processor(images=[image], text=self.processor.image_token, return_tensors="pt")["input_ids"]
        except Exception as error:
            raise ConfigError(
                f"the checkpoint's processor cannot expand an image ({type(error).__name__}: {error}); its "
                "processor_config.json needs patch_size, vision_feature_select_strategy and "
                f"num_additional_image_tokens as transformers 5's {type(self.processor).__name__} reads them"
            ) from None
        return int((ids == self.model.config.image_token_id).sum())

    @property
    def fixed_image_tokens(self) -> int | None:
        """The count every image takes, for families where it does not depend on the image; None
        where it does (per-image figures then come from ``image_tokens``)."""
        return None

    def tile_size(self) -> tuple[int, int]:
        """(height, width) of a tile the vision tower sees: what the processor makes of an image of
        the tower's own size."""
        side = self.model.config.vision_config.image_size
        pixels = self.pixel_inputs([Image.new("RGB", (side, side))])["pixel_values"]
        return int(pixels.shape[-2]), int(pixels.shape[-1])



def height_width(image) -> tuple[int, int]:
    """(height, width) of a PIL image or an [H, W, C] / [C, H, W] array, as the processor reads it."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    from transformers.image_utils import get_image_size, infer_channel_dimension_format, to_numpy_array

    array = to_numpy_array(image)
    return get_image_size(array, infer_channel_dimension_format(array))
