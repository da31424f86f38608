"""InternVL: an InternViT vision tower and a pixel-shuffle projector whose outputs fill the ``<IMG_CONTEXT>`` rows;
a Qwen2/Qwen3/LLaMA-like text decoder with 1-D rotary positions.

Selectable patches are all image-context rows. With :class:`~.processor.ImageOnlyInternVLProcessor` an image is one
tile, so a sample's rows are one square grid of ``(tile / patch * downsample_ratio)`` tokens per side, row-major
(the projector's pixel shuffle keeps row-major order).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from PIL import Image

from ivtlr.backbones.base import Backbone, Embedded


class InternVLBackbone(Backbone):
    default_num_selected_patches = 32  # as for Qwen2-VL: the InternVL3.5 448-px tile has 256 image tokens

    def embed(self, input_ids, vision) -> Embedded:
        embeds = self.input_embeddings()(input_ids)
        image_mask = input_ids == self.image_token_id
        n_tokens = int(image_mask.sum())
        if n_tokens:
            pixel_values = vision.get("pixel_values")
            if pixel_values is None:
                raise ValueError("input_ids contain <IMG_CONTEXT> tokens but pixel_values is missing")
            # (tiles, tokens per tile, D): every tile's tokens in tile order, as the placeholders are laid out.
            features = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
            embeds = self.place_image_features(embeds, image_mask, features.reshape(-1, features.shape[-1]),
                                               "<IMG_CONTEXT>")
        return Embedded(embeds=embeds, image_mask=image_mask)

    def tile_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of one tile's image tokens: patches per side, shrunk by the projector's pixel shuffle."""
        patch_h, patch_w = self.config.vision_config.patch_size
        ratio = self.config.downsample_ratio
        height, width = pixel_values.shape[-2:]
        return int(height // patch_h * ratio), int(width // patch_w * ratio)

    def image_grid(self, vision: Mapping[str, torch.Tensor], sample: int) -> tuple[int, int]:
        """The tile's token grid. A sample whose image was tiled (several grids plus a thumbnail) cannot be drawn on
        one grid: where the batch's ``input_ids`` are at hand, that is checked and refused."""
        rows, cols = self.tile_grid(vision["pixel_values"])
        input_ids = vision.get("input_ids")
        if input_ids is not None:
            n_tokens = int((input_ids[sample] == self.image_token_id).sum())
            if n_tokens != rows * cols:
                raise NotImplementedError(
                    f"sample {sample} has {n_tokens} image tokens, not one {rows}x{cols} tile: drawing tiled images "
                    "(crop_to_patches=True) is not supported; ImageOnlyInternVLProcessor makes one tile per image")
        return rows, cols

    def processor_view(self, image_processor, image: Image.Image, vision, sample: int) -> Image.Image:
        """One tile: the picture resized to the image processor's tile size (no crop)."""
        size = image_processor.size
        resample = getattr(image_processor, "resample", None) or Image.Resampling.BICUBIC
        return image.convert("RGB").resize((size["width"], size["height"]), resample)
