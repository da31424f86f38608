"""The backbone interface: everything the engine needs to know about a model family, and nothing more.

The engine (``ivtlr.method.engine``) never names a model family; it asks a :class:`Backbone` for input-level embeddings,
image-token positions, position ids, the decoder call and the LM head.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from transformers import DynamicCache, PreTrainedModel


def unwrap_peft(model: nn.Module) -> PreTrainedModel:
    """Return the transformers model inside a PEFT wrapper (LoRA layers are injected in place, so calling the
    unwrapped model's sub-modules still runs the adapters)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@dataclass
class Embedded:
    """Input-level embeddings of a batch: token embeddings with the image rows already filled in."""

    embeds: torch.Tensor  # (B, S, D)
    image_mask: torch.Tensor  # (B, S) bool: True at image-token positions, in image-token order
    #: (B, S, *F) features the decoder adds to image-token rows inside its layers (Qwen3-VL's deepstack), zeros
    #: elsewhere; they travel with each row, inserted patch copies included. None for most families.
    row_features: torch.Tensor | None = None


@dataclass(frozen=True)
class RegionView:
    """A run of image tokens laid out row-major on a ``rows x cols`` grid that covers the whole picture."""

    first: int  # index, among the sample's image tokens, of the grid's top-left token
    rows: int
    cols: int


def box_token_mask(views: list[RegionView], box: tuple[float, float, float, float], n_tokens: int) -> torch.Tensor:
    """(n_tokens,) bool: the image tokens a box covers. ``box`` is (x0, y0, x1, y1) as fractions of the picture's
    width and height. In each view a token is in the box when its cell's centre is; a box smaller than every cell
    takes the cell under its own centre, so every box names at least one token per view."""
    x0, y0, x1, y1 = box
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"a region box must be (x0, y0, x1, y1) fractions with 0 <= x0 < x1 <= 1 and "
                         f"0 <= y0 < y1 <= 1, got {box}")
    mask = torch.zeros(n_tokens, dtype=torch.bool)
    for view in views:
        if view.first + view.rows * view.cols > n_tokens:
            raise ValueError(f"a {view.rows}x{view.cols} view from image token {view.first} does not fit the "
                             f"sample's {n_tokens} image tokens")
        centre_x = (torch.arange(view.cols) + 0.5) / view.cols
        centre_y = (torch.arange(view.rows) + 0.5) / view.rows
        inside = ((centre_y >= y0) & (centre_y <= y1))[:, None] & ((centre_x >= x0) & (centre_x <= x1))[None, :]
        if not bool(inside.any()):
            row = min(int((y0 + y1) / 2 * view.rows), view.rows - 1)
            col = min(int((x0 + x1) / 2 * view.cols), view.cols - 1)
            inside[row, col] = True
        mask[view.first: view.first + view.rows * view.cols] = inside.flatten()
    return mask


class Backbone(ABC):
    """Family-specific glue between the IVT-LR engine and a transformers VLM."""

    #: K used when the user does not choose one (the original's setting for the family).
    default_num_selected_patches: int = 32
    #: renames from the transformers 4.51 weight layout (the released checkpoints) to the current one.
    legacy_key_renames: tuple[tuple[str, str], ...] = ()
    #: whether :meth:`embed` returns ``row_features`` the decoder adds inside its layers: a patch row inserted from
    #: another image would then lack its own, so the probe's donor-image condition cannot run.
    has_row_features: bool = False

    def __init__(self, model: nn.Module):
        self.wrapped = model
        self.model = unwrap_peft(model)
        self.config = self.model.config

    # ---- ids -------------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        """Placeholder id whose positions carry image embeddings (the config's, in transformers' VLM layout)."""
        return int(self.config.image_token_id)

    @property
    def eos_token_id(self) -> int | None:
        for cfg in (getattr(self.model, "generation_config", None), self.text_config, self.config):
            eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
            if eos is not None:
                return eos[0] if isinstance(eos, (list, tuple)) else int(eos)
        return None

    @property
    def text_config(self):
        return self.config.get_text_config()

    # ---- modules ---------------------------------------------------------------------------------------
    # Defaults: the layout transformers 5 gives its VLMs (``model.language_model`` under ``model``, ``lm_head`` on top).
    def decoder(self) -> nn.Module:
        """The text decoder (embeddings in, final-norm hidden states out, key/value cache aware)."""
        return self.model.model.language_model

    def lm_head(self) -> nn.Module:
        """The output projection."""
        return self.model.lm_head

    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def attention_modules(self) -> list[nn.Module]:
        """The decoder's self-attention modules, whose attention rows rank image patches."""
        return [layer.self_attn for layer in self.decoder().layers]

    @property
    def attn_implementation(self) -> str:
        """The text decoder's attention implementation (a registered name, e.g. ``sdpa`` or ``ivtlr_rows_sdpa``)."""
        return self.decoder().config._attn_implementation or "eager"

    def set_text_attention(self, implementation: str) -> None:
        """Select ``implementation`` for the text decoder only (the vision tower keeps its own), through
        ``set_attn_implementation``."""
        config = self.model.config
        key = next((name for name in getattr(config, "sub_configs", {}) or {}
                    if getattr(config, name, None) is self.text_config), None)
        self.model.set_attn_implementation({key: implementation} if key else implementation)

    # ---- computation -----------------------------------------------------------------------------------
    @abstractmethod
    def embed(self, input_ids: torch.Tensor, vision: Mapping[str, torch.Tensor]) -> Embedded:
        """Input-level embeddings: vision features (or VQ-token embeddings) placed at the image tokens.

        ``vision`` holds the processor's outputs beside ids and mask (``pixel_values`` and whatever the family adds);
        only backbones read its keys."""

    @staticmethod
    def place_image_features(embeds: torch.Tensor, placeholders: torch.Tensor, features: torch.Tensor,
                             placeholder_name: str) -> torch.Tensor:
        """``embeds`` with ``features`` (N, D) written into the N ``placeholders`` rows, in row-major order.

        index_put places rows in the order masked_scatter does, but its backward is a gather: about 10x cheaper on
        CPU for these shapes than masked_scatter's (a masked_select over the broadcast mask)."""
        n_rows = int(placeholders.sum())
        if features.shape[0] != n_rows:
            raise ValueError(f"the images give {features.shape[0]} visual tokens but input_ids hold {n_rows} "
                             f"{placeholder_name} tokens: build inputs with the model's processor")
        return embeds.index_put((placeholders,), features.to(embeds.device, embeds.dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head()(hidden)

    def run_decoder(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                    cache: DynamicCache | None, output_attentions: bool = False,
                    row_features: torch.Tensor | None = None, visual: torch.Tensor | None = None):
        """One decoder call; ``position_ids`` is (R, B, L) as produced by :meth:`prompt_positions`;
        ``attention_mask`` (B, cached + L), or None when every key is real (the causal pattern alone).

        ``row_features`` (B, L, *F) and ``visual`` (B, L) are the per-row visual features of :class:`Embedded` and
        which rows are image tokens, for families whose decoder adds visual features inside its layers."""
        return self.decoder()(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=self.decoder_position_ids(position_ids),
            cache=cache,
            use_cache=cache is not None,
            output_attentions=output_attentions,
            return_dict=True,
            **self.decoder_visual_kwargs(row_features, visual),
        )

    def decoder_visual_kwargs(self, row_features: torch.Tensor | None, visual: torch.Tensor | None) -> dict:
        """Extra decoder arguments carrying per-row visual features; none for families without them."""
        if row_features is not None:
            raise NotImplementedError(f"{type(self).__name__} has no per-row visual features")
        return {}

    @property
    def position_rows(self) -> int:
        """Rows of the engine's position tensor (3 for M-RoPE models, 1 otherwise)."""
        return 1

    def decoder_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """Convert the engine's (R, B, L) positions into what the decoder expects."""
        return positions[0]

    def prompt_positions(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                         vision: Mapping[str, torch.Tensor], mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of right-padded prompts, (R, B, P), and each sample's next free position, (B,).

        ``original``: a plain 0..len-1 range, as the original trains and as the released checkpoints expect.
        """
        if mode != "original":
            raise ValueError(f"positions={mode!r} is not supported for {type(self).__name__}; use 'original'")
        positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions.unsqueeze(0).expand(self.position_rows, -1, -1), prompt_mask.long().sum(-1)

    def image_grid(self, vision: Mapping[str, torch.Tensor], sample: int) -> tuple[int, int]:
        """(rows, cols) of the image-token grid of one sample, for drawing selections."""
        raise NotImplementedError

    def region_views(self, vision: Mapping[str, torch.Tensor], sample: int) -> list[RegionView]:
        """The sample's image tokens as views of the whole picture, each a row-major grid of consecutive image
        tokens: where a box in the picture falls among them (:func:`box_token_mask`). Default: one view, the grid of
        :meth:`image_grid` (families whose processor shows the model the whole picture on one grid)."""
        rows, cols = self.image_grid(vision, sample)
        return [RegionView(first=0, rows=rows, cols=cols)]

    def processor_view(self, image_processor, image: Image.Image, vision: Mapping[str, torch.Tensor], sample: int
                       ) -> Image.Image:
        """The picture as the image processor shaped it, before normalisation, so that the token grid of
        :meth:`image_grid` falls on its pixels (what ``--explain`` draws on). Default: resized to the grid's
        patches."""
        raise NotImplementedError

    # ---- checkpoint conversion -------------------------------------------------------------------------
    def rename_legacy_key(self, key: str) -> str:
        for pattern, replacement in self.legacy_key_renames:
            new_key, n = re.subn(pattern, replacement, key)
            if n:
                return new_key
        return key
