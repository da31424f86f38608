"""Patch-selection pictures, checked by reading the rendered pixels back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from ivtlr.evaluation.explain import OUTLINE_PX, patch_grid_boxes, render_selection, save_selection_png

# matplotlib's tab10 minus its grey, written out independently of the module.
TAB10_NO_GREY = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207),
]
WIDTH, HEIGHT = 70, 42  # not divisible by the grid's rows: the last row is taller
GRID_HW = (4, 5)
X_EDGES = [0, 14, 28, 42, 56, 70]
Y_EDGES = [0, 10, 20, 30, 42]
AUTO_SCALE = 3  # smallest cell is 10 px high; 3 * 10 >= 24


@pytest.fixture(scope="module")
def digit_image() -> Image.Image:
    """A real handwritten-digit scan, smoothly upsampled: every pixel is grey (R == G == B)."""
    scan = load_digits().images[5]
    grey = Image.fromarray((scan * 255 / 16).astype(np.uint8), mode="L")
    return grey.resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR).convert("RGB")


def cell_box(index: int, scale: int) -> tuple[int, int, int, int]:
    row, col = divmod(index, GRID_HW[1])
    return X_EDGES[col] * scale, Y_EDGES[row] * scale, X_EDGES[col + 1] * scale, Y_EDGES[row + 1] * scale


def ring_mask(shape: tuple[int, int], box: tuple[int, int, int, int], inset: int, width: int) -> np.ndarray:
    """Pixels of ``box`` at distance [inset, inset + width) from its edge."""
    x0, y0, x1, y1 = box
    outer = np.zeros(shape, bool)
    outer[y0 + inset:y1 - inset, x0 + inset:x1 - inset] = True
    inner = np.zeros(shape, bool)
    inner[y0 + inset + width:y1 - inset - width, x0 + inset + width:x1 - inset - width] = True
    return outer & ~inner


def has_palette_color(pixels: np.ndarray, palette: list[tuple[int, int, int]]) -> bool:
    return any(np.all(pixels == color, axis=-1).any() for color in palette)


def test_patch_grid_boxes_tile_a_non_divisible_image_row_major():
    boxes = patch_grid_boxes((10, 7), (2, 3))
    assert boxes == [
        (0, 0, 3, 3), (3, 0, 6, 3), (6, 0, 10, 3),
        (0, 3, 3, 7), (3, 3, 6, 7), (6, 3, 10, 7),
    ]
    coverage = np.zeros((7, 10), int)
    for x0, y0, x1, y1 in boxes:
        coverage[y0:y1, x0:x1] += 1
    assert (coverage == 1).all()
    assert patch_grid_boxes((WIDTH, HEIGHT), GRID_HW) == [cell_box(i, 1) for i in range(20)]


def test_patch_grid_boxes_reject_a_grid_finer_than_the_image():
    with pytest.raises(ValueError, match="smaller than the token grid"):
        patch_grid_boxes((4, 40), (2, 5))


def test_every_cell_carries_exactly_its_steps_outline(digit_image):
    selected = [[0, 7, 19], [3, 12], [9, 16]]
    canvas = np.asarray(render_selection(digit_image, GRID_HW, selected))
    picture = canvas[: HEIGHT * AUTO_SCALE, : WIDTH * AUTO_SCALE]
    source = np.repeat(np.repeat(np.asarray(digit_image), AUTO_SCALE, 0), AUTO_SCALE, 1)
    shape = picture.shape[:2]

    drawn = np.zeros(shape, bool)
    step_of = {index: step for step, indices in enumerate(selected) for index in indices}
    for index in range(GRID_HW[0] * GRID_HW[1]):
        box = cell_box(index, AUTO_SCALE)
        assert min(box[2] - box[0], box[3] - box[1]) >= 24
        ring = ring_mask(shape, box, 0, OUTLINE_PX)
        if index in step_of:
            assert (picture[ring] == TAB10_NO_GREY[step_of[index]]).all(), f"cell {index}"
            drawn |= ring
        else:
            assert not has_palette_color(picture[ring], TAB10_NO_GREY), f"cell {index}"
    # Outlines stay inside their cells: everything else is the nearest-upscaled scan, untouched.
    assert (picture[~drawn] == source[~drawn]).all()


def test_cell_chosen_by_several_steps_gets_nested_outlines(digit_image):
    scale = 4
    canvas = np.asarray(render_selection(digit_image, GRID_HW, [[6], [1], [6, 2]], scale=scale))
    picture = canvas[: HEIGHT * scale, : WIDTH * scale]
    source = np.repeat(np.repeat(np.asarray(digit_image), scale, 0), scale, 1)
    shape = picture.shape[:2]
    box = cell_box(6, scale)
    outer = ring_mask(shape, box, 0, OUTLINE_PX)
    inner = ring_mask(shape, box, OUTLINE_PX, OUTLINE_PX)
    assert (picture[outer] == TAB10_NO_GREY[0]).all()
    assert (picture[inner] == TAB10_NO_GREY[2]).all()
    x0, y0, x1, y1 = box
    interior = (slice(y0 + 2 * OUTLINE_PX, y1 - 2 * OUTLINE_PX), slice(x0 + 2 * OUTLINE_PX, x1 - 2 * OUTLINE_PX))
    assert (picture[interior] == source[interior]).all()


def swatches(legend: np.ndarray, colors: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Bounding box (y0, x0, y1, x1) of each colour's pixels, asserting each is a filled square."""
    boxes = []
    for color in colors:
        ys, xs = np.nonzero(np.all(legend == color, axis=-1))
        assert ys.size, f"no swatch of colour {color}"
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        assert ys.size == (y1 - y0) * (x1 - x0), f"swatch {color} is not a filled rectangle"
        assert y1 - y0 == x1 - x0 >= 10
        boxes.append((y0, x0, y1, x1))
    return boxes


def test_legend_has_one_labelled_swatch_per_step_in_order(digit_image):
    canvas = np.asarray(render_selection(digit_image, GRID_HW, [[0], [1], [2]]))
    legend = canvas[HEIGHT * AUTO_SCALE:]
    boxes = swatches(legend, TAB10_NO_GREY[:3])
    assert boxes == sorted(boxes), "swatches are not laid out in step order"
    assert not has_palette_color(legend, TAB10_NO_GREY[3:])
    for y0, _, y1, x1 in boxes:  # a dark label right after each swatch
        label_band = legend[y0:y1, x1:x1 + 30]
        assert (label_band.max(axis=-1) < 100).any()


def test_step_labels_replace_the_default_names(digit_image):
    """The legend prints the given labels: their ink is what differs from the default legend, and a longer label
    takes more width after its swatch."""
    default = np.asarray(render_selection(digit_image, GRID_HW, [[0], [1]], scale=AUTO_SCALE))
    labelled = np.asarray(render_selection(digit_image, GRID_HW, [[0], [1]], scale=AUTO_SCALE,
                                           step_labels=["step 1: reads red (7)", "step 2: reads the blue cell (3)"]))
    picture_rows = HEIGHT * AUTO_SCALE
    assert (labelled[:picture_rows, :WIDTH * AUTO_SCALE] == default[:picture_rows, :WIDTH * AUTO_SCALE]).all()

    def first_label_width(canvas: np.ndarray) -> int:
        legend = canvas[picture_rows:]
        (y0, _, y1, x1), (second_y0, x0_second, _, _) = swatches(legend, TAB10_NO_GREY[:2])
        end = x0_second if second_y0 == y0 else legend.shape[1]  # the second entry may wrap to the next line
        dark = np.flatnonzero((legend[y0:y1, x1:end].max(axis=-1) < 100).any(axis=0))
        return int(dark.max() - dark.min())

    assert first_label_width(labelled) > first_label_width(default) + 60  # "step 1: reads red (7)" vs "step 1"
    with pytest.raises(ValueError, match="step_labels"):
        render_selection(digit_image, GRID_HW, [[0], [1]], step_labels=["only one"])


def test_many_steps_get_distinct_non_grey_colours(digit_image):
    steps = [[i] for i in range(12)]
    canvas = np.asarray(render_selection(digit_image, GRID_HW, steps, scale=AUTO_SCALE))
    colors = [tuple(int(v) for v in canvas[cell_box(i, AUTO_SCALE)[1], cell_box(i, AUTO_SCALE)[0]]) for i in range(12)]
    assert colors[:9] == TAB10_NO_GREY
    assert len(set(colors)) == 12
    assert all(len(set(c)) > 1 for c in colors)
    swatches(canvas[HEIGHT * AUTO_SCALE:], colors)


def test_explicit_step_colors_accept_names_and_rgb(digit_image):
    canvas = np.asarray(render_selection(digit_image, GRID_HW, [[4], [15]], scale=2, step_colors=["red", (0, 0, 255)]))
    for index, color in [(4, (255, 0, 0)), (15, (0, 0, 255))]:
        ring = ring_mask((HEIGHT * 2, WIDTH * 2), cell_box(index, 2), 0, OUTLINE_PX)
        assert (canvas[: HEIGHT * 2, : WIDTH * 2][ring] == color).all()
    with pytest.raises(ValueError, match="step_colors"):
        render_selection(digit_image, GRID_HW, [[4], [15]], step_colors=["red"])


def test_title_strip_sits_above_an_unchanged_picture(digit_image):
    plain = np.asarray(render_selection(digit_image, GRID_HW, [[1, 2]]))
    titled = np.asarray(render_selection(digit_image, GRID_HW, [[1, 2]], title="Q1"))
    extra = titled.shape[0] - plain.shape[0]
    assert extra > 0 and titled.shape[1] == plain.shape[1]
    assert (titled[extra:] == plain).all()
    assert (titled[:extra].max(axis=-1) < 100).any()


@pytest.mark.parametrize("bad_index", [20, -1])
def test_index_outside_the_grid_is_rejected(digit_image, bad_index):
    with pytest.raises(ValueError, match=rf"step 2 .*\[{bad_index}\].*20 cells"):
        render_selection(digit_image, GRID_HW, [[0], [5, bad_index]])


def test_save_selection_png_writes_the_rendered_picture(digit_image, tmp_path):
    path = save_selection_png(tmp_path / "nested" / "sel.png", digit_image, GRID_HW, [[3]], title="t")
    assert path.is_file()
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        expected = render_selection(digit_image, GRID_HW, [[3]], title="t")
        assert (np.asarray(saved.convert("RGB")) == np.asarray(expected)).all()
