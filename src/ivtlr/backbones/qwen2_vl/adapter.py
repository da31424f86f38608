"""Qwen2-VL and Qwen2.5-VL: a vision tower plus merger whose outputs fill the ``<|image_pad|>`` rows; M-RoPE."""
from __future__ import annotations

import torch
from PIL import Image

from ivtlr.backbones.base import Backbone, Embedded


class QwenVLBackbone(Backbone):
    default_num_selected_patches = 32
    # transformers 4.51 layout -> 5.x layout (vision tower and decoder moved under ``model``).
    legacy_key_renames = (
        (r"^visual\.", "model.visual."),
        (r"^model\.(?!visual\.|language_model\.)", "model.language_model."),
    )

    def embed(self, input_ids, vision) -> Embedded:
        embeds = self.input_embeddings()(input_ids)
        image_mask = input_ids == self.image_token_id
        n_tokens = int(image_mask.sum())
        if n_tokens:
            pixel_values, image_grid_thw = vision.get("pixel_values"), vision.get("image_grid_thw")
            if pixel_values is None or image_grid_thw is None:
                raise ValueError("input_ids contain image tokens but pixel_values / image_grid_thw are missing")
            features = self.model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
            features = torch.cat(list(features.pooler_output), dim=0)
            embeds = self.place_image_features(embeds, image_mask, features, "<|image_pad|>")
        return Embedded(embeds=embeds, image_mask=image_mask)

    @property
    def position_rows(self) -> int:
        return 3

    def decoder_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return positions

    def prompt_positions(self, prompt_ids, prompt_mask, vision, mode):
        if mode == "original":
            return super().prompt_positions(prompt_ids, prompt_mask, vision, "original")
        if mode != "mrope":
            raise ValueError(f"positions must be 'original' or 'mrope', got {mode!r}")
        mm_token_type_ids = (prompt_ids == self.image_token_id).int()
        positions, _ = self.model.model.get_rope_index(
            input_ids=prompt_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=vision.get("image_grid_thw"),
            attention_mask=prompt_mask,
        )
        positions = positions.masked_fill(~prompt_mask.bool().unsqueeze(0), 0)
        next_start = positions.amax(dim=(0, 2)) + 1
        return positions, next_start

    def image_grid(self, vision, sample):
        merge = self.model.model.visual.spatial_merge_size
        _, h, w = (int(x) for x in vision["image_grid_thw"][sample])
        return h // merge, w // merge

    def processor_view(self, image_processor, image, vision, sample):
        """Qwen's processor resizes to whole patches: the picture at the grid's patch resolution."""
        _, rows, cols = (int(x) for x in vision["image_grid_thw"][sample])
        patch = image_processor.patch_size
        resample = getattr(image_processor, "resample", None) or Image.Resampling.BICUBIC
        return image.resize((cols * patch, rows * patch), resample)
