"""Pictures of which image patches each latent step selected.

IVT-LR copies, at every latent step, the K image tokens the model attends to most. The indices are in
image-token order (row-major over the token grid), so drawing them only needs the grid shape, which the
backbone gives (``IVTLR.image_grid``). Only PIL is used, so the picture can be made wherever the model runs.
"""

from __future__ import annotations

import colorsys
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageColor, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

# matplotlib's tab10 without its grey, so no step colour can be mistaken for (or occur in) a greyscale image.
STEP_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
)
MIN_CELL_PX = 24  # smallest on-screen cell when the scale is chosen automatically
OUTLINE_PX = 3  # width of one step's outline, drawn inside the cell
FONT_PX = 14
PAD_PX = 6
SWATCH_PX = 14
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)

Color = tuple[int, int, int]
Box = tuple[int, int, int, int]


def patch_grid_boxes(image_size: tuple[int, int], grid_hw: tuple[int, int]) -> list[Box]:
    """Pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of every token cell, row-major.

    ``image_size`` is PIL's ``(width, height)``; ``grid_hw`` is ``(rows, cols)``. Cells get
    ``size // count`` pixels and the last row/column absorbs the remainder, so the cells tile the image.
    """
    width, height = image_size
    rows, cols = grid_hw
    if rows < 1 or cols < 1:
        raise ValueError(f"grid_hw must be positive, got {grid_hw}")
    if width < cols or height < rows:
        raise ValueError(f"image of size {image_size} (w, h) is smaller than the token grid {grid_hw} (h, w)")
    cell_w, cell_h = width // cols, height // rows
    xs = [c * cell_w for c in range(cols)] + [width]
    ys = [r * cell_h for r in range(rows)] + [height]
    return [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(rows) for c in range(cols)]


def render_selection(
    image: Image.Image,
    grid_hw: tuple[int, int],
    selected: Sequence[Sequence[int]],
    *,
    scale: int | None = None,
    title: str | None = None,
    step_colors: Sequence[str | Color] | None = None,
    step_labels: Sequence[str] | None = None,
) -> Image.Image:
    """Draw the image with each step's selected cells outlined in that step's colour, plus a legend.

    The legend names each step "step 1", "step 2", ...; ``step_labels`` replaces those names (e.g. with what the
    written rationale read at that step).

    The image is enlarged by an integer ``scale`` (nearest neighbour, so pixels stay honest); by default
    the smallest scale that makes every cell at least ``MIN_CELL_PX`` pixels. A cell chosen by several
    steps gets nested outlines, earliest step outermost. Layout: optional title strip, the image at the
    left edge, then the legend strip.
    """
    rows, cols = grid_hw
    steps = [[int(index) for index in step] for step in selected]
    _check_indices(steps, rows * cols)
    colors = _resolve_colors(step_colors, len(steps))
    source_boxes = patch_grid_boxes(image.size, grid_hw)

    steps_per_cell: dict[int, list[int]] = {}
    for step, indices in enumerate(steps):
        for index in dict.fromkeys(indices):
            steps_per_cell.setdefault(index, []).append(step)
    depth = max((len(s) for s in steps_per_cell.values()), default=1)
    needed_px = max(MIN_CELL_PX, 2 * OUTLINE_PX * depth + 2)
    smallest_cell = min(min(x1 - x0, y1 - y0) for x0, y0, x1, y1 in source_boxes)
    if scale is None:
        scale = math.ceil(needed_px / smallest_cell)
    elif scale < 1 or smallest_cell * scale < 2 * OUTLINE_PX * depth:
        raise ValueError(f"scale={scale} leaves cells of {smallest_cell * scale}px, too small for {depth} outline(s)")

    picture = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(picture)
    for index, cell_steps in steps_per_cell.items():
        x0, y0, x1, y1 = (v * scale for v in source_boxes[index])
        for ring, step in enumerate(cell_steps):
            inset = ring * OUTLINE_PX
            ring_box = (x0 + inset, y0 + inset, x1 - 1 - inset, y1 - 1 - inset)
            draw.rectangle(ring_box, outline=colors[step], width=OUTLINE_PX)
    if step_labels is not None and len(step_labels) < len(steps):
        raise ValueError(f"{len(step_labels)} step_labels given for {len(steps)} steps")
    labels = ([f"step {s + 1}" for s in range(len(steps))] if step_labels is None
              else list(step_labels[: len(steps)]))
    return _compose(picture, colors, labels, title)


def save_selection_png(
    path: str | Path,
    image: Image.Image,
    grid_hw: tuple[int, int],
    selected: Sequence[Sequence[int]],
    **kw,
) -> Path:
    """Render with ``render_selection`` and write a PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_selection(image, grid_hw, selected, **kw).save(path, format="PNG")
    logger.info("wrote patch-selection picture for %d step(s) to %s", len(selected), path)
    return path


def _check_indices(steps: list[list[int]], n_cells: int) -> None:
    for step, indices in enumerate(steps):
        bad = [i for i in indices if not 0 <= i < n_cells]
        if bad:
            raise ValueError(f"step {step + 1} selects patch index(es) {bad} outside the grid of {n_cells} cells")


def _resolve_colors(step_colors: Sequence[str | Color] | None, n_steps: int) -> list[Color]:
    """Explicit colours (names or RGB), else the palette, extended with saturated hues past its end."""
    if step_colors is None:
        extra = n_steps - len(STEP_PALETTE)
        golden = 0.618033988749895
        hues = [(0.05 + i * golden) % 1.0 for i in range(max(extra, 0))]
        generated = [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.9, 0.85)) for h in hues]
        return (list(STEP_PALETTE) + generated)[:n_steps]
    if len(step_colors) < n_steps:
        raise ValueError(f"{len(step_colors)} step_colors given for {n_steps} steps")
    return [ImageColor.getrgb(c)[:3] if isinstance(c, str) else tuple(c)[:3] for c in step_colors[:n_steps]]


def _compose(picture: Image.Image, colors: list[Color], labels: list[str], title: str | None) -> Image.Image:
    """Stack the title strip, the picture and a legend (one label and swatch per step)."""
    font = ImageFont.load_default(size=FONT_PX)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_px = FONT_PX + 2 * PAD_PX

    entry_widths = [SWATCH_PX + PAD_PX + round(measure.textlength(label, font=font)) + 2 * PAD_PX for label in labels]
    title_width = round(measure.textlength(title, font=font)) + 2 * PAD_PX if title else 0
    width = max([picture.width, title_width, *(w + PAD_PX for w in entry_widths)])

    legend_origins: list[tuple[int, int]] = []
    x, y = PAD_PX, 0
    for entry_width in entry_widths:
        if x + entry_width > width and x > PAD_PX:
            x, y = PAD_PX, y + line_px
        legend_origins.append((x, y))
        x += entry_width
    legend_px = y + line_px if colors else 0
    title_px = line_px if title else 0

    canvas = Image.new("RGB", (width, title_px + picture.height + legend_px), BACKGROUND)
    canvas.paste(picture, (0, title_px))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD_PX, PAD_PX), title, fill=TEXT_COLOR, font=font)
    top = title_px + picture.height
    for (x, y), color, label in zip(legend_origins, colors, labels):
        swatch_y = top + y + (line_px - SWATCH_PX) // 2
        draw.rectangle((x, swatch_y, x + SWATCH_PX - 1, swatch_y + SWATCH_PX - 1), fill=color)
        draw.text((x + SWATCH_PX + PAD_PX, top + y + PAD_PX), label, fill=TEXT_COLOR, font=font)
    return canvas
