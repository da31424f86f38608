"""LLaVA-OneVision: SigLIP views packed by anyres fill the ``<image>`` rows; 1-D positions only.

Selectable rows (``Embedded.image_mask``): every ``<image>`` row except the ``image_newline`` separators that end each
row of the tile grid. Those stay in the prompt (the model reads them) but are never ranked, selected or inserted.
The selectable rows, in order, are the base view's ``side x side`` tokens and then the unpadded tile grid's
``rows x side`` tokens, so :meth:`image_grid` is ``(side + rows, side)``: the base view above the tile grid, as
:meth:`processor_view` draws them (see :mod:`.geometry`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from PIL import Image
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from ivtlr.backbones.base import Backbone, Embedded, RegionView
from ivtlr.backbones.llava_onevision.geometry import AnyresLayout, anyres_layout, stacked_views


class LlavaOnevisionBackbone(Backbone):
    default_num_selected_patches = 32
    # transformers 4.51 layout -> 5.x layout (tower, projector and newline under ``model``; decoder unwrapped).
    legacy_key_renames = (
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^language_model\.model\.", "model.language_model."),
        (r"^(vision_tower|multi_modal_projector|image_newline)", r"model.\1"),
    )

    def embed(self, input_ids, vision) -> Embedded:
        embeds = self.input_embeddings()(input_ids)
        placeholders = input_ids == self.image_token_id
        n_tokens = int(placeholders.sum())
        if not n_tokens:
            return Embedded(embeds=embeds, image_mask=placeholders)
        pixel_values, image_sizes = vision.get("pixel_values"), vision.get("image_sizes")
        if pixel_values is None or image_sizes is None:
            raise ValueError("input_ids contain <image> tokens but pixel_values / image_sizes are missing")
        batch_num_images = vision.get("batch_num_images")
        features = self.model.model.get_image_features(pixel_values, image_sizes, batch_num_images=batch_num_images,
                                                       return_dict=True).pooler_output
        embeds = self.place_image_features(embeds, placeholders, torch.cat(list(features), dim=0), "<image>")
        patches = torch.cat(self._patch_rows(image_sizes, batch_num_images, [len(f) for f in features]))
        image_mask = placeholders.clone()
        image_mask[placeholders] = patches.to(input_ids.device)
        return Embedded(embeds=embeds, image_mask=image_mask)

    def _patch_rows(self, image_sizes: torch.Tensor, batch_num_images, lengths: list[int]) -> list[torch.Tensor]:
        """Per image, which packed rows are patches (False at the newline rows), from the model's own packing of
        all-ones features with a zero newline, so every packing rule (unpadding, ``anyres_max`` resampling,
        multi-image) is followed as the model follows it."""
        config = self.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        single = [True] * len(image_sizes) if batch_num_images is None else \
            [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        views = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                 if patch else 1 for size, patch in zip(image_sizes, single)]
        ones = [torch.ones(n, side * side, 1) for n in views]
        marked, _ = self.model.model.pack_image_features(ones, image_sizes.cpu(), image_newline=torch.zeros(1),
                                                         vision_aspect_ratio=config.vision_aspect_ratio)
        rows = [m[:, 0] != 0 for m in marked]
        if [len(r) for r in rows] != lengths:
            raise RuntimeError(f"packing gave {[len(r) for r in rows]} rows per image, the features {lengths}")
        return rows

    def layout(self, vision: Mapping[str, torch.Tensor], sample: int) -> AnyresLayout:
        """The token geometry of ``sample``'s image (one image per sample, as the data pipeline builds them)."""
        config, tower = self.config, self.config.vision_config
        return anyres_layout(vision["image_sizes"][sample].tolist(), config.image_grid_pinpoints, tower.image_size,
                             tower.patch_size, config.vision_aspect_ratio)

    def image_grid(self, vision, sample):
        layout = self.layout(vision, sample)
        if not layout.single_grid:
            height, width = vision["image_sizes"][sample].tolist()
            raise ValueError(
                f"a {width}x{height} image gives a {layout.side}x{layout.side} base view and a "
                f"{layout.rows}x{layout.cols} tile grid{' (resampled)' if layout.shrunk else ''}, which do not stack "
                "into one patch grid: resize images to a square no larger than the vision tower's image_size "
                f"({self.config.vision_config.image_size}), e.g. with image_size in the config")
        return layout.side + layout.rows, layout.side

    def region_views(self, vision, sample):
        """The base view (the whole picture on ``side x side`` tokens), then the unpadded tile grid (the whole picture
        again, ``rows x side``): a box covers tokens in both."""
        self.image_grid(vision, sample)  # the same clear error where the views do not stack
        layout = self.layout(vision, sample)
        return [RegionView(first=0, rows=layout.side, cols=layout.side),
                RegionView(first=layout.base_tokens, rows=layout.rows, cols=layout.cols)]

    def processor_view(self, image_processor, image, vision, sample):
        """The base view above the unpadded tile canvas: the grid of :meth:`image_grid` in patch-sized cells."""
        height, width = vision["image_sizes"][sample].tolist()
        if (image.height, image.width) != (height, width):
            raise ValueError(f"the image is {image.width}x{image.height} but the processor saw {width}x{height}")
        self.image_grid(vision, sample)  # the same clear error where the views do not stack
        resample = getattr(image_processor, "resample", None) or Image.Resampling.BICUBIC
        return stacked_views(image, self.layout(vision, sample), Image.Resampling(int(resample)))
