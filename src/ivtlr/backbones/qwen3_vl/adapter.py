"""Qwen3-VL: Qwen2-VL's layout (merged visual tokens fill the ``<|image_pad|>`` rows, M-RoPE, now interleaved)
plus deepstack.

Deepstack: besides the merged visual tokens, Qwen3-VL's vision tower returns one more merged feature per chosen
vision block (``deepstack_visual_indexes``, e.g. blocks 8, 16, 24); the text decoder ADDS feature ``i`` to the hidden
states of the visual rows right after its decoder layer ``i`` (``Qwen3VLTextModel._deepstack_process``, fed with
``visual_pos_masks`` (B, L) and ``deepstack_visual_embeds``, a list over those layers of (n_visual_rows, D) in mask
order).

In ivtlr an inserted patch copy is a visual token: it carries its own deepstack features into those layers, exactly
as its source token did. :meth:`Qwen3VLBackbone.embed` therefore returns ``row_features`` (B, S, n_deepstack, D):
each image token's deepstack features, zeros at every other row. The engine carries them with every row, copies
included (``ivtlr.method.layout``), packs them per pass with a ``visual`` mask of image rows (``ivtlr.method.chain``),
and :meth:`Qwen3VLBackbone.decoder_visual_kwargs` turns the packed rows back into the decoder's two arguments. The
cached chain and the recompute reference add the same vectors to the same rows, so they stay equal with deepstack on.

Positions: (3, B, L) rows (time, height, width), what ``Qwen3VLModel`` itself hands its text model; the optional
fourth (text) row it also accepts only shapes the causal mask when no attention mask is given, and the engine always
gives one. ``mrope``: ``get_rope_index`` for the prompt (the image's rows share positions), sequential after it.
"""
from __future__ import annotations

import torch

from ivtlr.backbones.base import Embedded
from ivtlr.backbones.qwen2_vl.adapter import QwenVLBackbone


class Qwen3VLBackbone(QwenVLBackbone):
    default_num_selected_patches = 32
    # No IVT-LR release predates Qwen3-VL: its checkpoints only exist in the current weight layout.
    legacy_key_renames = ()
    has_row_features = True  # deepstack

    def embed(self, input_ids, vision) -> Embedded:
        """Merged visual tokens placed at the image tokens; their deepstack features as ``row_features``
        (None when the batch holds no image token: no row then gets anything added)."""
        embeds = self.input_embeddings()(input_ids)
        image_mask = input_ids == self.image_token_id
        n_tokens = int(image_mask.sum())
        if not n_tokens:
            return Embedded(embeds=embeds, image_mask=image_mask)
        pixel_values, image_grid_thw = vision.get("pixel_values"), vision.get("image_grid_thw")
        if pixel_values is None or image_grid_thw is None:
            raise ValueError("input_ids contain image tokens but pixel_values / image_grid_thw are missing")
        out = self.model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        features = torch.cat(list(out.pooler_output), dim=0)
        embeds = self.place_image_features(embeds, image_mask, features, "<|image_pad|>")
        # (N, n_deepstack, D): per image token, one feature per deepstack layer, in image-token order.
        deepstack = torch.stack([torch.cat(list(layer), dim=0) for layer in out.deepstack_features], dim=1)
        row_features = embeds.new_zeros(*input_ids.shape, *deepstack.shape[1:])
        row_features = row_features.index_put((image_mask,), deepstack.to(embeds.dtype))
        return Embedded(embeds=embeds, image_mask=image_mask, row_features=row_features)

    def decoder_visual_kwargs(self, row_features: torch.Tensor | None, visual: torch.Tensor | None) -> dict:
        """``visual_pos_masks`` and ``deepstack_visual_embeds`` of one decoder call from its packed rows; nothing
        when the chunk has no visual row (text passes, decoding steps, latent steps with K = 0)."""
        if row_features is None or visual is None or not bool(visual.any()):
            return {}
        rows = row_features[visual]  # (n_visual_rows, n_deepstack, D), in mask (row-major) order
        return {"visual_pos_masks": visual, "deepstack_visual_embeds": list(rows.unbind(dim=1))}
