"""An offline visual reasoning dataset made of real handwritten digit scans, built for interleaved latent reasoning.

`ivtlr demo` needs a task that a tiny VLM trained from scratch on a CPU learns in minutes, that cannot be answered in
one glance, and where *where to look next depends on what was just seen* -- the situation IVT-LR's interleaved
latent vision is made for. Each image is a grid of coloured cells, each holding one real scan from the UCI
handwritten digits that ship with scikit-learn (1797 8x8 grey scans, ink 0..16).

The reasoning kind, ``FOLLOW_POINTERS``: every digit points to a colour (digit ``d`` to the ``d mod n``-th colour of
the grid's palette, e.g. on a 2x2 grid 0, 4, 8 -> red, 1, 5, 9 -> green, 2, 6 -> blue, 3, 7 -> yellow). A question
names a start cell by its colour; the answer is the digit reached after following two pointers. The rationale reads
one cell per step, each step's cell chosen by the digit the step before read (7 points to yellow, 2 to blue)::

    7 in the red cell. 2 in the yellow cell. 5 in the blue cell ends the path.

Design choices:

- Each step *opens with the digit it reads* and names no next colour. IVT-LR picks a latent step's patches from the
  attention row of the position just before the latent slot; in stage 0 that position predicts the first token of
  the step the slot replaces, so a step that opens with its cell's digit asks that position for the cell's content,
  and with the next colour unwritten the model has to turn the digit it just read into where to look next, which
  is what a latent step must do once the step's text is gone.
- The three cells of a path are distinct (IVT-LR never inserts a patch twice, so a path revisiting a cell would
  have no patch left to insert): the start cell's digit never points back to it, the second cell's digit points to
  a third cell; the third cell's digit (the answer) and the fourth cell's are free, so the answer is as uniform as
  the scan labels.
- Neither the text nor one cell gives the answer: the start cell's digit only says where to look next, and the
  answer sits in one of the other cells, which one depending on the second read.
- One cell is exactly one Qwen2-VL merged token (patch 14, spatial merge 2: 28x28 px) at ``cell_px=28``, or 2x2
  merged tokens at 56, so a token never mixes two cells. Colours are shuffled over the cells for every image, so
  "the red cell" is a search over the image, not a fixed position.
- The scan is upsampled by an integer factor (3 per 28 px of cell) with nearest neighbour, so every drawn pixel is a
  real scan pixel; the ink is drawn black over the cell colour.
- Options are the ten digits in order, so the letter follows from the digit reached (a tiny model given four drawn
  digits settles for guessing among them, a local optimum it takes longer than the demo's budget to leave).
- Train / validation / test draw their scans from disjoint parts of the 1797 scans (a seeded permutation), so
  evaluation measures reading unseen handwriting.
- A one-step kind, ``READ_CELL`` ("Which digit is in the red cell?"), is not a reasoning question: it is the demo's
  visual pre-training, so that every method compared starts from a model that can find and read a cell, as a
  pretrained VLM can. Its rationale is the colour, then the digit ("red 7"): the digit is predicted at the colour
  word itself, so one attention hop (colour word -> cell of that colour) reads it. Measured on validation after
  three epochs: 85 % read; with "The red cell shows 7" 36 % (the colour two tokens back: two hops to learn at once),
  with "7 in the red cell" 10 % (the colour back in the question). Half of its training questions show one scan in
  every cell (``warmup_share``), so that recognising digits does not wait for finding the cell.

Rows follow the M3CoT schema (docs/design.md); ``topic`` names the question kind, ``domain`` its family.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from datasets import Sequence as SequenceFeature
from PIL import Image

from ivtlr.data.example import option_letter

logger = logging.getLogger(__name__)

MERGED_PATCH_PX = 28  # Qwen2-VL: patch 14 x spatial merge 2
SCAN_PX = 8
MAX_INK = 16.0
SPLITS = ("train", "validation", "test")
DIGIT_CHOICES = tuple(str(d) for d in range(10))

# Named cell colours, bright enough for black ink to stand out; a grid uses the first grid*grid of them, and a
# digit points to the (digit mod grid*grid)-th of those.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (235, 70, 70),
    "green": (80, 190, 90),
    "blue": (90, 140, 245),
    "yellow": (245, 220, 60),
    "orange": (250, 150, 50),
    "purple": (175, 110, 225),
    "cyan": (80, 215, 225),
    "pink": (250, 160, 205),
    "grey": (175, 175, 175),
}

#: Follow two pointers from a named cell; three cells read, the answer is the last digit read.
FOLLOW_POINTERS = "follow_pointers"
#: One step, not a reasoning question: read the digit of one named cell (the demo's visual pre-training).
READ_CELL = "read_cell"
KINDS = (FOLLOW_POINTERS, READ_CELL)
CELLS_READ = {FOLLOW_POINTERS: 3, READ_CELL: 1}
DOMAIN_OF_KIND = {FOLLOW_POINTERS: "pointers", READ_CELL: "reading"}
# Terse on purpose: a tiny model trained from scratch finds the named cell far sooner when the prompt is short (its
# image tokens then hold a larger share of every attention row).
QUESTION_OF_KIND = {
    FOLLOW_POINTERS: "Start at the {start} cell and follow two pointers. Which digit do you reach?",
    READ_CELL: "Which digit is in the {start} cell?",
}


@dataclass(frozen=True)
class DigitScans:
    """The UCI handwritten digit scans: ``images`` (N, 8, 8) ink 0..16 and their ``labels`` (N,)."""

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class DigitPuzzle:
    """Everything that defines one question, before drawing: kept so the data can be checked against its source."""

    split: str
    index: int
    kind: str
    grid: int
    scan_indices: tuple[int, ...]  # one scan per cell, row-major
    digits: tuple[int, ...]  # the scans' labels, row-major
    colours: tuple[str, ...]  # each cell's colour name, row-major
    path: tuple[int, ...]  # the cells the rationale reads, in order (row-major indices); the first is named

    @property
    def uid(self) -> str:
        return f"digits-{self.split}-{self.index:05d}"

    @property
    def answer_digit(self) -> int:
        return self.digits[self.path[-1]]

    @property
    def step_cells(self) -> tuple[int | None, ...]:
        """The cell each rationale step reads, in order (None for a step that reads no cell)."""
        return self.path


@functools.lru_cache(maxsize=1)
def load_digit_scans() -> DigitScans:
    """Load scikit-learn's bundled digits once (it takes a second or two)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return DigitScans(images=bunch.images.astype(np.uint8), labels=bunch.target.astype(np.int64))


def partition_scans(n_scans: int, seed: int, fractions: Sequence[float]) -> dict[str, np.ndarray]:
    """Split scan indices into disjoint train/validation/test pools by a seeded permutation."""
    if len(fractions) != len(SPLITS) or min(fractions) <= 0:
        raise ValueError(f"need one positive fraction per split {SPLITS}, got {fractions}")
    order = np.random.default_rng(seed).permutation(n_scans)
    bounds = np.cumsum(np.asarray(fractions, dtype=float) / sum(fractions))[:-1] * n_scans
    pools = np.split(order, bounds.round().astype(int))
    return {split: np.sort(pool) for split, pool in zip(SPLITS, pools)}


def grid_colours(grid: int) -> tuple[str, ...]:
    """The palette of a grid, in pointer order: digit d points to ``grid_colours(grid)[d % (grid * grid)]``."""
    return tuple(PALETTE)[: grid * grid]


def pointed_colour(digit: int, grid: int) -> str:
    """The colour a digit points to on a grid of this size."""
    colours = grid_colours(grid)
    return colours[digit % len(colours)]


def rationale_steps(puzzle: DigitPuzzle) -> list[str]:
    """One sentence per cell read, opening with the digit it reads (see the module docstring)."""
    if puzzle.kind == READ_CELL:
        (cell,) = puzzle.path
        return [f"{puzzle.colours[cell]} {puzzle.digits[cell]}"]
    steps = [f"{puzzle.digits[cell]} in the {puzzle.colours[cell]} cell" for cell in puzzle.path]
    steps[-1] += " ends the path"
    return steps


def _draw_scan(rng: np.random.Generator, pool: np.ndarray, labels: np.ndarray, allowed: set[int]) -> int:
    """A scan of the pool whose label is in ``allowed``, uniformly among those scans."""
    candidates = pool[np.isin(labels[pool], sorted(allowed))]
    return int(rng.choice(candidates))


def _compose_puzzle(rng: np.random.Generator, split: str, index: int, pool: np.ndarray, labels: np.ndarray,
                    grid: int, kind: str, same_scan: bool = False) -> DigitPuzzle:
    """Draw one question: scans from this split's pool, shuffled colours, a start cell and a path of distinct cells.
    ``same_scan`` puts one scan in every cell (a warm-up reading question: any cell gives the answer)."""
    n_cells = grid * grid
    palette = grid_colours(grid)
    scans = np.full(n_cells, rng.choice(pool)) if same_scan else rng.choice(pool, size=n_cells)
    colours = tuple(rng.permutation(palette).tolist())
    cell_of_colour = {colour: cell for cell, colour in enumerate(colours)}
    path = [int(rng.integers(n_cells))]
    for _ in range(CELLS_READ[kind] - 1):
        # The digit of the last cell read must point to a cell not read yet.
        allowed = {d for d in range(10) if cell_of_colour[pointed_colour(d, grid)] not in path}
        scans[path[-1]] = _draw_scan(rng, pool, labels, allowed)
        path.append(cell_of_colour[pointed_colour(int(labels[scans[path[-1]]]), grid)])
    return DigitPuzzle(split=split, index=index, kind=kind, grid=grid, scan_indices=tuple(int(s) for s in scans),
                       digits=tuple(int(labels[s]) for s in scans), colours=colours, path=tuple(path))


def compose_digit_puzzles(
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 1000,
    grid: int = 2,
    kind: str = FOLLOW_POINTERS,
    scan_fractions: Sequence[float] = (0.7, 0.1, 0.2),
    warmup_share: float = 0.0,
) -> dict[str, list[DigitPuzzle]]:
    """Choose scans, colours and paths for every split, without drawing anything.

    Each split has its own random stream, so changing ``n_train`` leaves validation and test unchanged.
    ``warmup_share`` of the training ``READ_CELL`` questions show one scan in every cell: a model trained from scratch
    then learns to recognise digits before it can find the named cell, instead of having to learn both at once
    (each is useless without the other, a long plateau). Validation and test never have them.
    """
    if not 0.0 <= warmup_share <= 1.0 or (warmup_share and kind != READ_CELL):
        raise ValueError(f"warmup_share must be in [0, 1] and only for {READ_CELL}, got {warmup_share} for {kind}")
    if not 2 <= grid * grid <= len(PALETTE):
        raise ValueError(f"grid must give between 2 and {len(PALETTE)} cells, got {grid}x{grid}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if CELLS_READ[kind] > grid * grid:
        raise ValueError(f"a {kind} path reads {CELLS_READ[kind]} distinct cells: a {grid}x{grid} grid is too small")
    scans = load_digit_scans()
    pools = partition_scans(len(scans.labels), seed, scan_fractions)
    sizes = dict(zip(SPLITS, (n_train, n_val, n_test)))
    puzzles = {}
    for split_number, split in enumerate(SPLITS):
        rng = np.random.default_rng((seed, split_number))
        warmup = np.random.default_rng((seed, split_number, 1)).random(sizes[split]) < warmup_share
        puzzles[split] = [_compose_puzzle(rng, split, i, pools[split], scans.labels, grid, kind,
                                          same_scan=bool(warmup[i]) and split == "train")
                          for i in range(sizes[split])]
        logger.info("digit puzzles (%s) %s: %d questions from %d scans", kind, split, sizes[split], len(pools[split]))
    return puzzles


def render_puzzle(puzzle: DigitPuzzle, scans: DigitScans, cell_px: int = MERGED_PATCH_PX) -> Image.Image:
    """Draw the grid: each cell filled with its colour, the scan in black ink with a thin margin."""
    if cell_px <= 0 or cell_px % MERGED_PATCH_PX:
        raise ValueError(f"cell_px must be a multiple of {MERGED_PATCH_PX} (one merged image token of the demo's "
                         f"model), got {cell_px}")
    scale = 3 * cell_px // MERGED_PATCH_PX
    margin = (cell_px - scale * SCAN_PX) // 2
    side = puzzle.grid * cell_px
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    for cell, (scan_index, colour) in enumerate(zip(puzzle.scan_indices, puzzle.colours)):
        background = np.asarray(PALETTE[colour], dtype=float)
        ink = np.kron(scans.images[scan_index] / MAX_INK, np.ones((scale, scale)))
        tile = np.broadcast_to(background, (cell_px, cell_px, 3)).copy()
        inner = slice(margin, margin + scale * SCAN_PX)
        tile[inner, inner] = background * (1.0 - ink[..., None])
        row, col = divmod(cell, puzzle.grid)
        canvas[row * cell_px : (row + 1) * cell_px, col * cell_px : (col + 1) * cell_px] = np.rint(tile)
    return Image.fromarray(canvas)


def cell_box(cell: int, grid: int, cell_px: int) -> list[float]:
    """A cell's box in the picture's pixels, [x0, y0, x1, y1] (the ``step_boxes`` format)."""
    row, col = divmod(cell, grid)
    return [float(col * cell_px), float(row * cell_px), float((col + 1) * cell_px), float((row + 1) * cell_px)]


def puzzle_to_row(puzzle: DigitPuzzle, image: Image.Image, cell_px: int = MERGED_PATCH_PX) -> dict:
    """One M3CoT-schema row (docs/design.md); the options are the ten digits in order. ``step_boxes`` (the schema's
    optional region column) holds the box of the cell each rationale step reads."""
    return {
        "id": puzzle.uid,
        "category": f"digit-grid-{puzzle.grid}x{puzzle.grid}",
        "image_id": puzzle.uid,
        "question": QUESTION_OF_KIND[puzzle.kind].format(start=puzzle.colours[puzzle.path[0]]),
        "choices": list(DIGIT_CHOICES),
        "context": "",
        "answer": option_letter(puzzle.answer_digit),
        "rationale": ". ".join(rationale_steps(puzzle)) + ".",
        "split": puzzle.split,
        "image": image,
        "domain": DOMAIN_OF_KIND[puzzle.kind],
        "topic": puzzle.kind,
        "step_boxes": [cell_box(cell, puzzle.grid, cell_px) for cell in puzzle.step_cells],
    }


def build_digit_reasoning(
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 1000,
    grid: int = 2,
    cell_px: int = MERGED_PATCH_PX,
    kind: str = FOLLOW_POINTERS,
    scan_fractions: Sequence[float] = (0.7, 0.1, 0.2),
    warmup_share: float = 0.0,
) -> dict[str, list[dict]]:
    """The dataset as M3CoT-schema rows per split, images as PIL; row i is puzzle i of `compose_digit_puzzles`."""
    return puzzle_rows(compose_digit_puzzles(seed, n_train, n_val, n_test, grid, kind, scan_fractions, warmup_share),
                       cell_px)


def puzzle_rows(puzzles: dict[str, list[DigitPuzzle]], cell_px: int = MERGED_PATCH_PX) -> dict[str, list[dict]]:
    """Composed puzzles drawn and turned into M3CoT-schema rows, per split."""
    scans = load_digit_scans()
    return {split: [puzzle_to_row(p, render_puzzle(p, scans, cell_px), cell_px) for p in split_puzzles]
            for split, split_puzzles in puzzles.items()}


def m3cot_features() -> Features:
    """The M3CoT columns as `datasets` features, so parquet files carry a decodable Image column."""
    text = Value("string")
    return Features(
        {
            "id": text,
            "category": text,
            "image_id": text,
            "question": text,
            "choices": SequenceFeature(text),
            "context": text,
            "answer": text,
            "rationale": text,
            "split": text,
            "image": ImageFeature(),
            "domain": text,
            "topic": text,
            "step_boxes": SequenceFeature(SequenceFeature(Value("float32"))),
        }
    )


def write_digit_reasoning(out_dir: str | Path, **kwargs) -> dict[str, Path]:
    """Write ``<split>.parquet`` per split (keyword arguments as for `build_digit_reasoning`)."""
    cell_px = kwargs.pop("cell_px", MERGED_PATCH_PX)
    return write_puzzles(out_dir, compose_digit_puzzles(**kwargs), cell_px)


def write_puzzles(out_dir: str | Path, puzzles: dict[str, list[DigitPuzzle]], cell_px: int = MERGED_PATCH_PX
                  ) -> dict[str, Path]:
    """Draw already composed puzzles and write ``<split>.parquet`` per split, so a caller that keeps the puzzles
    (what each step reads) has exactly what the files hold."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    features = m3cot_features()
    paths = {}
    for split, rows in puzzle_rows(puzzles, cell_px).items():
        paths[split] = out_dir / f"{split}.parquet"
        Dataset.from_list(rows, features=features).to_parquet(str(paths[split]))
        logger.info("wrote %d rows to %s", len(rows), paths[split])
    return paths
