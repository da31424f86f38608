"""An offline multi-step visual reasoning dataset made of real handwritten digit scans.

`ivtlr demo` needs a task that a tiny VLM trained from scratch on a CPU can learn in minutes, yet that cannot
be answered in one glance: only then does reasoning over the image (IVT-LR) have something to beat direct
answering (No-CoT) at. Each image is a grid of coloured cells, each holding one real scan from the UCI
handwritten digits that ship with scikit-learn (1797 8x8 grey scans, ink 0..16). A question names two cells
by colour; answering takes three steps, which the rationale spells out one sentence each: find and read the
first cell, find and read the second, combine the two digits.

Design choices:

- One cell is exactly one Qwen2-VL merged token (patch 14, spatial merge 2: 28x28 px) at the default
  ``cell_px=28``, or 2x2 merged tokens at 56, so a token never mixes two cells. The default 2x2 grid gives a
  56x56 image (4 image tokens); ``grid=3`` gives 84x84 (9 tokens, 7 distractor cells). Neither needs
  resizing by Qwen2-VL's processor (both are multiples of 28 and at least its 56x56 minimum).
- Colours are shuffled over the cells for every image, so "the red cell" is a search over the image, not a
  fixed position.
- The scan is upsampled by an integer factor (3 per 28 px of cell) with nearest neighbour, so every drawn
  pixel is a real scan pixel; the ink is drawn black over the cell colour.
- Every answer is uniform over its choice pool when the digits are (the scan labels are near-uniform), and
  the three distractors are drawn uniformly from the rest of the pool. So neither the option text nor one
  cell's digit tells the answer: reading both named cells is required.
- Train / validation / test draw their scans from disjoint parts of the 1797 scans (a seeded permutation),
  so evaluation measures reading unseen handwriting.
- A one-step kind, ``READ_CELL`` ("Which digit is in the red cell?", all ten digits as options), is not a
  reasoning question: it is the demo's visual pre-training, so that every method compared starts from a model
  that can find and read a cell, as a pretrained VLM can.
- Options: four by default (the answer and three distractors, shuffled). A model trained from scratch must then
  also learn to look its result up among the options, and with digits as options it first settles for guessing
  among the offered ones, a local optimum it takes longer than the demo's budget to leave. ``all_digit_options``
  (always on for ``READ_CELL``) offers the ten digits in order instead, so the letter follows from the result.

Rows follow the M3CoT schema (DESIGN.md §1.5); ``topic`` names the question kind, ``domain`` its family.
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

from .data.example import option_letter

logger = logging.getLogger(__name__)

MERGED_PATCH_PX = 28  # Qwen2-VL: patch 14 x spatial merge 2
SCAN_PX = 8
MAX_INK = 16.0
N_OPTIONS = 4  # options of a reasoning question
SPLITS = ("train", "validation", "test")

# Named cell colours, bright enough for black ink to stand out; a grid uses the first grid*grid of them.
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

SUM_LAST_DIGIT = "sum_last_digit"
DIFFERENCE_MOD_10 = "difference_mod_10"
PARITY_AND_ORDER = "parity_and_order"
#: One step, not a reasoning question: read the digit of one named cell. It is the demo's visual pre-training task
#: (a tiny model trained from scratch must first learn to find and read a cell, as a real VLM already can).
READ_CELL = "read_cell"
KINDS = (SUM_LAST_DIGIT, DIFFERENCE_MOD_10, PARITY_AND_ORDER)  # the reasoning kinds
NUMERIC_KINDS = (SUM_LAST_DIGIT, DIFFERENCE_MOD_10, READ_CELL)  # answers are digits
DOMAIN_OF_KIND = {SUM_LAST_DIGIT: "arithmetic", DIFFERENCE_MOD_10: "arithmetic", PARITY_AND_ORDER: "logic",
                  READ_CELL: "reading"}

# Each question names the cells in the order the rationale reads them, a colour standing for its cell's digit.
# The wording is terse on purpose: a tiny model trained from scratch learns to look up the named cell far sooner when
# the prompt is short (its image tokens then hold a larger share of every attention row).
QUESTION_OF_KIND = {
    SUM_LAST_DIGIT: "What is the last digit of {first} + {second}?",
    DIFFERENCE_MOD_10: "What is {first} - {second}, modulo 10?",
    PARITY_AND_ORDER: "Is {first} + {second} odd or even, and which is larger?",
    READ_CELL: "Which digit is in the {first} cell?",
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
    asked_cells: tuple[int, int]  # the cells the question names, in the order it names them
    choices: tuple[str, ...]
    answer_index: int

    @property
    def uid(self) -> str:
        return f"digits-{self.split}-{self.index:05d}"


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


def _parity_and_order_option(parity: str, larger_colour: str) -> str:
    return f"{parity} sum; the {larger_colour} digit is larger"


def _answer_pool(kind: str, first: str, second: str) -> list[str]:
    """Every answer a question of this kind can have: options are drawn from here."""
    if kind == PARITY_AND_ORDER:
        return [_parity_and_order_option(p, c) for p in ("odd", "even") for c in (first, second)]
    return [str(d) for d in range(10)]


def _correct_answer(kind: str, a: int, b: int, first: str, second: str) -> str:
    if kind == READ_CELL:
        return str(a)
    if kind == SUM_LAST_DIGIT:
        return str((a + b) % 10)
    if kind == DIFFERENCE_MOD_10:
        return str((a - b) % 10)
    parity = "odd" if (a + b) % 2 else "even"
    return _parity_and_order_option(parity, first if a > b else second)


def _rationale(kind: str, a: int, b: int, first: str, second: str) -> str:
    """Three sentences joined by ". " so DESIGN §1.2's splitter yields three steps: read, read, combine."""
    if kind == READ_CELL:
        return f"The {first} cell shows {a}."
    reads = f"The {first} cell shows {a}. The {second} cell shows {b}. "
    if kind == SUM_LAST_DIGIT:
        return reads + f"{a} plus {b} equals {a + b}, so the last digit of the sum of the two digits is {(a + b) % 10}."
    if kind == DIFFERENCE_MOD_10:
        return reads + f"{a} minus {b} equals {a - b}, so the difference of the two digits modulo 10 is {(a - b) % 10}."
    parity = "odd" if (a + b) % 2 else "even"
    larger, colour = (a, first) if a > b else (b, second)
    return reads + f"{a} plus {b} is {a + b}, which is {parity}, and {larger} in the {colour} cell is larger."


def _compose_puzzle(
    rng: np.random.Generator,
    split: str,
    index: int,
    pool: np.ndarray,
    labels: np.ndarray,
    grid: int,
    kinds: Sequence[str],
    all_digit_options: bool,
) -> DigitPuzzle:
    """Draw one question: scans from this split's pool, shuffled colours, two named cells, balanced options."""
    n_cells = grid * grid
    kind = kinds[rng.integers(len(kinds))]
    scans = rng.choice(pool, size=n_cells)
    colours = tuple(rng.permutation(list(PALETTE)[:n_cells]).tolist())
    first_cell, second_cell = (int(c) for c in rng.choice(n_cells, size=2, replace=False))
    # "Which digit is larger" needs two different digits; redraw the second scan until it differs.
    while kind == PARITY_AND_ORDER and labels[scans[first_cell]] == labels[scans[second_cell]]:
        scans[second_cell] = rng.choice(pool)
    digits = tuple(int(labels[s]) for s in scans)
    first, second = colours[first_cell], colours[second_cell]
    correct = _correct_answer(kind, digits[first_cell], digits[second_cell], first, second)
    if kind == READ_CELL or (all_digit_options and kind in NUMERIC_KINDS):
        pool = _answer_pool(kind, first, second)
        choices = [correct, *(option for option in pool if option != correct)]
        order = np.asarray([choices.index(option) for option in pool])
    else:
        others = [option for option in _answer_pool(kind, first, second) if option != correct]
        distractors = rng.choice(others, size=N_OPTIONS - 1, replace=False).tolist()
        choices = [correct, *distractors]
        order = rng.permutation(len(choices))
    return DigitPuzzle(
        split=split,
        index=index,
        kind=kind,
        grid=grid,
        scan_indices=tuple(int(s) for s in scans),
        digits=digits,
        colours=colours,
        asked_cells=(first_cell, second_cell),
        choices=tuple(choices[i] for i in order),
        answer_index=int(np.flatnonzero(order == 0)[0]),
    )


def compose_digit_puzzles(
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 300,
    grid: int = 2,
    kinds: Sequence[str] = KINDS,
    scan_fractions: Sequence[float] = (0.7, 0.1, 0.2),
    all_digit_options: bool = False,
) -> dict[str, list[DigitPuzzle]]:
    """Choose scans, colours, named cells and options for every split, without drawing anything.

    Each split has its own random stream, so changing ``n_train`` leaves validation and test unchanged.
    ``all_digit_options`` offers the ten digits, in order, as the options of the numeric kinds instead of four drawn
    ones (``READ_CELL`` always does).
    """
    if not 2 <= grid * grid <= len(PALETTE):
        raise ValueError(f"grid must give between 2 and {len(PALETTE)} cells, got {grid}x{grid}")
    unknown = set(kinds) - {*KINDS, READ_CELL}
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {(*KINDS, READ_CELL)}, got {kinds}")
    scans = load_digit_scans()
    pools = partition_scans(len(scans.labels), seed, scan_fractions)
    sizes = dict(zip(SPLITS, (n_train, n_val, n_test)))
    puzzles = {}
    for split_number, split in enumerate(SPLITS):
        rng = np.random.default_rng((seed, split_number))
        puzzles[split] = [
            _compose_puzzle(rng, split, i, pools[split], scans.labels, grid, kinds, all_digit_options)
            for i in range(sizes[split])
        ]
        logger.info("digit reasoning %s: %d questions from %d scans", split, sizes[split], len(pools[split]))
    return puzzles


def render_puzzle(puzzle: DigitPuzzle, scans: DigitScans, cell_px: int = MERGED_PATCH_PX) -> Image.Image:
    """Draw the grid: each cell filled with its colour, the scan in black ink with a thin margin."""
    if cell_px <= 0 or cell_px % MERGED_PATCH_PX:
        raise ValueError(f"cell_px must be a multiple of {MERGED_PATCH_PX} (one Qwen2-VL merged token), got {cell_px}")
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


def puzzle_to_row(puzzle: DigitPuzzle, image: Image.Image) -> dict:
    """One M3CoT-schema row (DESIGN §1.5)."""
    first_cell, second_cell = puzzle.asked_cells
    first, second = puzzle.colours[first_cell], puzzle.colours[second_cell]
    a, b = puzzle.digits[first_cell], puzzle.digits[second_cell]
    return {
        "id": puzzle.uid,
        "category": f"digit-grid-{puzzle.grid}x{puzzle.grid}",
        "image_id": puzzle.uid,
        "question": QUESTION_OF_KIND[puzzle.kind].format(first=first, second=second),
        "choices": list(puzzle.choices),
        "context": "",
        "answer": option_letter(puzzle.answer_index),
        "rationale": _rationale(puzzle.kind, a, b, first, second),
        "split": puzzle.split,
        "image": image,
        "domain": DOMAIN_OF_KIND[puzzle.kind],
        "topic": puzzle.kind,
    }


def build_digit_reasoning(
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 300,
    grid: int = 2,
    cell_px: int = MERGED_PATCH_PX,
    kinds: Sequence[str] = KINDS,
    scan_fractions: Sequence[float] = (0.7, 0.1, 0.2),
    all_digit_options: bool = False,
) -> dict[str, list[dict]]:
    """The dataset as M3CoT-schema rows per split, images as PIL; row i is puzzle i of `compose_digit_puzzles`."""
    puzzles = compose_digit_puzzles(seed, n_train, n_val, n_test, grid, kinds, scan_fractions, all_digit_options)
    scans = load_digit_scans()
    return {
        split: [puzzle_to_row(p, render_puzzle(p, scans, cell_px)) for p in split_puzzles]
        for split, split_puzzles in puzzles.items()
    }


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
        }
    )


def write_digit_reasoning(out_dir: str | Path, **kwargs) -> dict[str, Path]:
    """Write ``<split>.parquet`` per split (keyword arguments as for `build_digit_reasoning`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    features = m3cot_features()
    paths = {}
    for split, rows in build_digit_reasoning(**kwargs).items():
        paths[split] = out_dir / f"{split}.parquet"
        Dataset.from_list(rows, features=features).to_parquet(str(paths[split]))
        logger.info("wrote %d rows to %s", len(rows), paths[split])
    return paths
