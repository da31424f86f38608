"""The digit-grid pointer puzzles: deterministic, leak-free, consistent with the scans drawn, and loadable."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import numpy as np
import pytest
from datasets import load_dataset
from sklearn.datasets import load_digits

from ivtlr.data.digits import (FOLLOW_POINTERS, PALETTE, READ_CELL, SPLITS, build_digit_reasoning,
                               compose_digit_puzzles, write_digit_reasoning)
from ivtlr.data.curriculum import split_rationale

M3COT_FIELDS = {
    "id", "category", "image_id", "question", "choices", "context", "answer", "rationale", "split", "image",
    "domain", "topic", "step_boxes",  # the schema's optional column: the cell each step reads
}
SMALL = dict(n_train=24, n_val=6, n_test=12)
LETTERS = "ABCDEFGHIJ"
COLOURS_2X2 = ("red", "green", "blue", "yellow")  # digit d points to COLOURS_2X2[d % 4] on a 2x2 grid


@pytest.fixture(scope="module")
def sklearn_digits():
    return load_digits()


@pytest.fixture(scope="module")
def many_puzzles():
    return compose_digit_puzzles(seed=3, n_train=4000, n_val=10, n_test=4000)


def split_steps(rationale: str) -> list[str]:
    """The curriculum's splitter for rationales of at most three sentences (no merging needed)."""
    pieces = rationale.replace("\n", " ").split(". ")
    return pieces[:-1] if pieces and not pieces[-1] else pieces


def test_rows_have_exactly_the_m3cot_schema():
    rows = build_digit_reasoning(seed=0, **SMALL)
    assert [len(rows[s]) for s in SPLITS] == [24, 6, 12]
    for split, split_rows in rows.items():
        for row in split_rows:
            assert set(row) == M3COT_FIELDS
            assert row["split"] == split and row["context"] == ""
            assert row["choices"] == [str(d) for d in range(10)] and row["answer"] in LETTERS
            assert row["topic"] == FOLLOW_POINTERS and row["image"].mode == "RGB"
            assert_boxes_frame_the_cells_the_steps_name(row)
    assert len({row["id"] for split_rows in rows.values() for row in split_rows}) == 42


def assert_boxes_frame_the_cells_the_steps_name(row: dict) -> None:
    """Each step's box is one whole cell, of the colour the step names (read off the picture's pixels)."""
    steps = split_rationale(row["rationale"])
    pixels = np.asarray(row["image"])
    assert len(row["step_boxes"]) == len(steps)
    for step, (x0, y0, x1, y1) in zip(steps, row["step_boxes"]):
        colour = re.search(r"in the (\w+) cell", step).group(1)
        assert x1 - x0 == y1 - y0 == pixels.shape[0] // 2  # a 2x2 grid
        assert tuple(pixels[int(y0) + 1, int(x0) + 1]) == PALETTE[colour]
        assert tuple(pixels[int(y1) - 2, int(x1) - 2]) == PALETTE[colour]


def test_same_seed_gives_identical_rows_and_pixels():
    first, again, other = (build_digit_reasoning(seed=s, **SMALL) for s in (5, 5, 6))

    def flat(rows):
        return [({k: v for k, v in row.items() if k != "image"}, row["image"].tobytes())
                for split in SPLITS for row in rows[split]]

    assert flat(first) == flat(again)
    assert flat(first) != flat(other)


def test_validation_and_test_do_not_depend_on_training_size():
    small = compose_digit_puzzles(seed=1, n_train=5, n_val=7, n_test=7)
    large = compose_digit_puzzles(seed=1, n_train=50, n_val=7, n_test=7)
    assert small["validation"] == large["validation"] and small["test"] == large["test"]


def test_splits_draw_from_disjoint_scans(many_puzzles, sklearn_digits):
    used = {split: {s for p in puzzles for s in p.scan_indices} for split, puzzles in many_puzzles.items()}
    assert not used["train"] & used["validation"]
    assert not used["train"] & used["test"]
    assert not used["validation"] & used["test"]
    assert max(max(u) for u in used.values()) < len(sklearn_digits.target)
    assert len(used["train"]) > 1000  # training sees most of its ~1258-scan pool, not a handful


def _cell_contents(pixels: np.ndarray, grid: int, cell_px: int, scans) -> tuple[list[str], list[np.ndarray]]:
    """Each cell's colour (from its corner pixel) and the 8x8 ink recovered from block centres."""
    scale = 3 * cell_px // 28
    margin = (cell_px - 8 * scale) // 2
    colours, inks = [], []
    for cell in range(grid * grid):
        r, c = divmod(cell, grid)
        corner = tuple(int(v) for v in pixels[r * cell_px, c * cell_px])
        colour = next(name for name, rgb in PALETTE.items() if rgb == corner)
        channel = int(np.argmax(PALETTE[colour]))
        top, left = r * cell_px + margin + scale // 2, c * cell_px + margin + scale // 2
        centres = pixels[top: top + 8 * scale: scale, left: left + 8 * scale: scale, channel]
        colours.append(colour)
        inks.append(np.rint(16 * (1 - centres / PALETTE[colour][channel])))
    return colours, inks


@pytest.mark.parametrize(("grid", "cell_px"), [(2, 28), (2, 56), (3, 28)])
def test_answer_follows_the_pointers_drawn_in_the_picture(grid, cell_px, sklearn_digits):
    """Find the named colour in the picture, read each cell's scan back from its pixels, follow the pointers with the
    documented rule (digit d -> the (d mod n)-th palette colour), and recompute the rationale and the answer."""
    rows = build_digit_reasoning(seed=2, n_train=30, n_val=1, n_test=1, grid=grid, cell_px=cell_px)["train"]
    puzzles = compose_digit_puzzles(seed=2, n_train=30, n_val=1, n_test=1, grid=grid)["train"]
    palette = list(PALETTE)[: grid * grid]
    for row, puzzle in zip(rows, puzzles):
        pixels = np.asarray(row["image"])
        assert pixels.shape == (grid * cell_px, grid * cell_px, 3)
        colours, inks = _cell_contents(pixels, grid, cell_px, sklearn_digits)
        for ink, scan_index in zip(inks, puzzle.scan_indices):
            np.testing.assert_array_equal(ink, sklearn_digits.images[scan_index])
        digits = [int(sklearn_digits.target[s]) for s in puzzle.scan_indices]
        start = re.fullmatch(r"Start at the (\w+) cell and follow two pointers\. Which digit do you reach\?",
                             row["question"])[1]
        path = [colours.index(start)]
        for _ in range(2):
            path.append(colours.index(palette[digits[path[-1]] % len(palette)]))
        assert len(set(path)) == 3  # never a cell twice: IVT-LR inserts each patch once
        assert row["answer"] == LETTERS[digits[path[-1]]]
        assert split_steps(row["rationale"]) == [
            f"{digits[path[0]]} in the {colours[path[0]]} cell", f"{digits[path[1]]} in the {colours[path[1]]} cell",
            f"{digits[path[2]]} in the {colours[path[2]]} cell ends the path."]
        assert puzzle.step_cells == tuple(path)


def test_every_step_opens_with_the_digit_it_reads_and_names_no_next_colour():
    """The position before a step predicts the step's first token: the digit, so it has to look at the cell; where
    to look next is left for the model to work out from that digit."""
    for row in build_digit_reasoning(seed=4, n_train=60, n_val=1, n_test=1)["train"]:
        steps = split_steps(row["rationale"])
        assert len(steps) == 3, steps
        assert all(re.fullmatch(r"\d in the \w+ cell( ends the path\.)?", step) for step in steps), steps


def _best_reader_accuracy(train, test, seen) -> float:
    """Bayes-optimal reader that sees only ``seen(puzzle)``: learn P(answer | seen) on train, apply to test."""
    counts: dict = defaultdict(Counter)
    for p in train:
        counts[seen(p)][p.answer_digit] += 1
    return sum(counts[seen(p)].most_common(1)[0][0] == p.answer_digit if counts[seen(p)] else False
               for p in test) / len(test)


def test_the_answer_takes_every_hop(many_puzzles):
    """Text, the start cell, or the first two cells read leave the answer at about chance; the path's end gives it.
    Picking the digit of one cell other than the start is right only when it happens to be the third cell."""
    train, test = many_puzzles["train"], many_puzzles["test"]
    start_colour = lambda p: p.colours[p.path[0]]  # noqa: E731
    assert _best_reader_accuracy(train, test, start_colour) < 0.16
    assert _best_reader_accuracy(train, test, lambda p: (start_colour(p), p.digits[p.path[0]])) < 0.16
    assert _best_reader_accuracy(train, test, lambda p: tuple(p.digits[c] for c in p.path[:2])) < 0.16
    assert _best_reader_accuracy(train, test, lambda p: p.digits[p.path[-1]]) == 1.0
    rng = np.random.default_rng(0)
    one_other = [p.digits[int(rng.choice([c for c in range(4) if c != p.path[0]]))] == p.answer_digit for p in test]
    assert np.mean(one_other) < 0.45


def test_answers_spread_over_the_ten_digits_and_start_colours_are_balanced(many_puzzles):
    puzzles = many_puzzles["train"]
    answers = Counter(p.answer_digit for p in puzzles)
    assert all(0.06 < answers[d] / len(puzzles) < 0.14 for d in range(10)), answers
    starts = Counter(p.colours[p.path[0]] for p in puzzles)
    assert set(starts) == set(COLOURS_2X2) and all(0.2 < n / len(puzzles) < 0.3 for n in starts.values())


def test_parquet_round_trip_keeps_fields_and_pixels(tmp_path):
    paths = write_digit_reasoning(tmp_path / "digits", seed=7, n_train=6, n_val=3, n_test=4)
    assert {split: p.name for split, p in paths.items()} == {s: f"{s}.parquet" for s in SPLITS}
    expected = build_digit_reasoning(seed=7, n_train=6, n_val=3, n_test=4)
    loaded = load_dataset("parquet", data_files={s: str(p) for s, p in paths.items()},
                          cache_dir=str(tmp_path / "cache"))
    for split in SPLITS:
        assert set(loaded[split].column_names) == M3COT_FIELDS
        assert len(loaded[split]) == len(expected[split])
        for got, want in zip(loaded[split], expected[split]):
            assert {k: v for k, v in got.items() if k != "image"} == {k: v for k, v in want.items() if k != "image"}
            assert np.array_equal(np.asarray(got["image"].convert("RGB")), np.asarray(want["image"]))


@pytest.mark.parametrize("bad", [dict(cell_px=30), dict(grid=1), dict(grid=4), dict(kind="riddle")])
def test_rejects_settings_that_break_the_design(bad):
    with pytest.raises(ValueError):
        build_digit_reasoning(**{**SMALL, **bad})


def test_reading_questions_answer_with_the_named_cell(sklearn_digits):
    """The pre-training kind: one named cell, a one-step rationale of the colour, then the digit."""
    rows = build_digit_reasoning(seed=5, n_train=40, n_val=1, n_test=1, kind=READ_CELL)["train"]
    puzzles = compose_digit_puzzles(seed=5, n_train=40, n_val=1, n_test=1, kind=READ_CELL)["train"]
    for row, puzzle in zip(rows, puzzles):
        (cell,) = puzzle.path
        colour, digit = puzzle.colours[cell], int(sklearn_digits.target[puzzle.scan_indices[cell]])
        assert row["question"] == f"Which digit is in the {colour} cell?" and row["topic"] == READ_CELL
        assert row["choices"] == [str(d) for d in range(10)] and row["answer"] == LETTERS[digit]
        assert split_steps(row["rationale"]) == [f"{colour} {digit}."]


def test_warmup_reading_questions_show_one_scan_everywhere_in_training_only():
    puzzles = compose_digit_puzzles(seed=8, n_train=2000, n_val=300, n_test=300, kind=READ_CELL, warmup_share=0.25)
    same = [len(set(p.scan_indices)) == 1 for p in puzzles["train"]]
    assert 0.2 < np.mean(same) < 0.3
    assert not any(len(set(p.scan_indices)) == 1 for split in ("validation", "test") for p in puzzles[split])
    plain = compose_digit_puzzles(seed=8, n_train=10, n_val=300, n_test=300, kind=READ_CELL)
    assert plain["validation"] == puzzles["validation"] and plain["test"] == puzzles["test"]
    with pytest.raises(ValueError, match="warmup_share"):
        compose_digit_puzzles(seed=8, n_train=10, n_val=1, n_test=1, warmup_share=0.5)  # not for pointer questions
