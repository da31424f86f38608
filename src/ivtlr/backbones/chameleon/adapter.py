"""Chameleon: images become VQ codes, embedded by the text embedding table; image-code logits are disabled."""
from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from ivtlr.backbones.base import Backbone, Embedded


class ChameleonBackbone(Backbone):
    default_num_selected_patches = 64

    @property
    def image_token_id(self) -> int:
        return int(self.model.model.vocabulary_mapping.image_token_id)

    def decoder(self) -> nn.Module:
        return self.model.model

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head()(hidden)
        # As the transformers model does: image-code tokens can never be predicted as text.
        logits[..., self.model.model.vocabulary_mapping.image_tokens] = torch.finfo(logits.dtype).min
        return logits

    def embed(self, input_ids, vision) -> Embedded:
        image_mask = input_ids == self.image_token_id
        n_tokens = int(image_mask.sum())
        ids = input_ids
        pixel_values = vision.get("pixel_values")
        if n_tokens:
            if pixel_values is None:
                raise ValueError("input_ids contain <image> tokens but pixel_values is missing")
            codes = self.model.model.get_image_tokens(pixel_values.to(self.model.dtype)).reshape(-1)
            if codes.numel() != n_tokens:
                raise ValueError(f"the images give {codes.numel()} VQ tokens but input_ids hold {n_tokens} <image> "
                                 "tokens: build inputs with the model's processor")
            ids = input_ids.masked_scatter(image_mask, codes.to(input_ids.dtype))
        return Embedded(embeds=self.input_embeddings()(ids), image_mask=image_mask)

    def image_grid(self, vision, sample):
        vq = self.config.vq_config
        side = vq.resolution // 2 ** (len(vq.channel_multiplier) - 1)
        return side, side

    def processor_view(self, image_processor, image, vision, sample):
        """Chameleon's processor resizes the shortest edge and crops the centre."""
        shortest, crop = image_processor.size["shortest_edge"], image_processor.crop_size
        resample = getattr(image_processor, "resample", None) or Image.Resampling.BICUBIC
        scale = shortest / min(image.size)
        size = (max(shortest, int(image.width * scale)), max(shortest, int(image.height * scale)))
        resized = image.resize(size, resample)
        left, top = (resized.width - crop["width"]) // 2, (resized.height - crop["height"]) // 2
        return resized.crop((left, top, left + crop["width"], top + crop["height"]))
