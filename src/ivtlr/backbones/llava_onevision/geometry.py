"""Where LLaVA-OneVision's image tokens come from, computed as the model packs them.

One image becomes a base view (the picture resized to the vision tower's square, ``side x side`` patch tokens) and
high-resolution tiles of the best ``image_grid_pinpoints`` resolution (the picture resized keeping its aspect ratio,
padded to that resolution, cut into views). ``pack_image_features`` lays out the base view's tokens row-major, then
the tiles' tokens as one grid with the padding removed (``unpad_image``), each of its rows followed by the learned
``image_newline`` row. The newline rows are separators, not patches: only the other rows are selectable.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image
from transformers.image_processing_utils import select_best_resolution


@dataclass(frozen=True)
class AnyresLayout:
    """The token geometry of one image (sizes in patches unless named ``*_px``)."""

    side: int  # patches per side of one view
    patch_px: int
    tiles: tuple[int, int]  # (rows, cols) of tile views at the best resolution
    top: int  # first row / column of the tile grid that survives unpadding
    left: int
    rows: int  # the unpadded tile grid, each row followed by a newline token
    cols: int
    shrunk: bool  # ``anyres_max_N`` resampled the tile grid to fewer cells

    @property
    def base_tokens(self) -> int:
        return self.side * self.side

    @property
    def single_grid(self) -> bool:
        """Whether base view and tile grid stack into one grid (same width, cells one patch each)."""
        return self.cols == self.side and not self.shrunk


def anyres_layout(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], view_px: int, patch_px: int,
                  aspect_ratio: str) -> AnyresLayout:
    """As ``get_anyres_image_grid_shape`` + ``unpad_image`` + the ``anyres_max_N`` check of the model."""
    height, width = (int(v) for v in image_hw)
    best_h, best_w = select_best_resolution((height, width), [list(p) for p in pinpoints])
    side = view_px // patch_px
    tiles = (best_h // view_px, best_w // view_px)
    grid_h, grid_w = tiles[0] * side, tiles[1] * side
    top = left = 0
    rows, cols = grid_h, grid_w
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        top = (grid_h - new_h) // 2
        rows = grid_h - 2 * top
    else:
        new_w = int(round(width * (grid_h / height), 7))
        left = (grid_w - new_w) // 2
        cols = grid_w - 2 * left
    max_views = int(aspect_ratio.strip("anyres_max_"))
    shrunk = math.sqrt(rows * cols / (max_views * side**2)) > 1.1
    return AnyresLayout(side=side, patch_px=patch_px, tiles=tiles, top=top, left=left, rows=rows, cols=cols,
                        shrunk=shrunk)


def fit_and_pad(image: Image.Image, resolution: tuple[int, int], resample) -> Image.Image:
    """The processor's tile canvas: resized to fit ``resolution`` (h, w) keeping the aspect ratio, centred on black
    (``_resize_for_patching`` + ``_pad_for_patching``)."""
    target_h, target_w = resolution
    scale_w, scale_h = target_w / image.width, target_h / image.height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(image.height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(image.width * scale_h), target_w), target_h
    canvas = Image.new("RGB", (target_w, target_h))
    canvas.paste(image.convert("RGB").resize((new_w, new_h), resample), ((target_w - new_w) // 2,
                                                                           (target_h - new_h) // 2))
    return canvas


def stacked_views(image: Image.Image, layout: AnyresLayout, resample) -> Image.Image:
    """The base view above the unpadded part of the tile canvas: the picture whose ``patch_px`` cells are the
    selectable tokens in order (needs :attr:`AnyresLayout.single_grid`)."""
    view_px = layout.side * layout.patch_px
    base = image.convert("RGB").resize((view_px, view_px), resample)
    canvas = fit_and_pad(image, (layout.tiles[0] * view_px, layout.tiles[1] * view_px), resample)
    p = layout.patch_px
    tile = canvas.crop((layout.left * p, layout.top * p, (layout.left + layout.cols) * p,
                        (layout.top + layout.rows) * p))
    picture = Image.new("RGB", (view_px, view_px + tile.height))
    picture.paste(base, (0, 0))
    picture.paste(tile, (0, view_px))
    return picture
