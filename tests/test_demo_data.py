"""The digit-grid reasoning data: deterministic, leak-free, consistent with the scans drawn, and loadable."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import numpy as np
import pytest
from datasets import load_dataset
from sklearn.datasets import load_digits

from ivtlr.demo_data import (
    KINDS,
    PALETTE,
    READ_CELL,
    SPLITS,
    build_digit_reasoning,
    compose_digit_puzzles,
    write_digit_reasoning,
)

M3COT_FIELDS = {
    "id", "category", "image_id", "question", "choices", "context", "answer", "rationale", "split", "image",
    "domain", "topic",
}
SMALL = dict(n_train=24, n_val=6, n_test=12)
LETTERS = ("A", "B", "C", "D")


@pytest.fixture(scope="module")
def sklearn_digits():
    return load_digits()


@pytest.fixture(scope="module")
def many_puzzles():
    return compose_digit_puzzles(seed=3, n_train=3000, n_val=10, n_test=3000)


def split_steps(rationale: str) -> list[str]:
    """DESIGN §1.2's splitter for rationales of at most three sentences (no merging needed)."""
    pieces = rationale.replace("\n", " ").split(". ")
    return pieces[:-1] if pieces and not pieces[-1] else pieces


def expected_answer(topic: str, first: str, a: int, second: str, b: int) -> str:
    """The right option text, computed from the question's own wording."""
    if topic == "sum_last_digit":
        return str((a + b) % 10)
    if topic == "difference_mod_10":
        return str((a - b) % 10)
    assert topic == "parity_and_order" and a != b
    parity = "even" if (a + b) % 2 == 0 else "odd"
    return f"{parity} sum; the {first if a > b else second} digit is larger"


def test_rows_have_exactly_the_m3cot_schema():
    rows = build_digit_reasoning(seed=0, **SMALL)
    assert [len(rows[s]) for s in SPLITS] == [24, 6, 12]
    for split, split_rows in rows.items():
        for row in split_rows:
            assert set(row) == M3COT_FIELDS
            assert row["split"] == split and row["context"] == ""
            assert row["answer"] in LETTERS and len(row["choices"]) == 4 == len(set(row["choices"]))
            assert row["topic"] in KINDS and row["image"].mode == "RGB"
    assert len({row["id"] for split_rows in rows.values() for row in split_rows}) == 42


def test_same_seed_gives_identical_rows_and_pixels():
    first, again, other = (build_digit_reasoning(seed=s, **SMALL) for s in (5, 5, 6))

    def flat(rows):
        return [
            ({k: v for k, v in row.items() if k != "image"}, row["image"].tobytes())
            for split in SPLITS
            for row in rows[split]
        ]

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


def test_answer_letters_are_uniform_and_option_values_carry_no_hint(many_puzzles):
    puzzles = many_puzzles["train"]
    letters = Counter(p.answer_index for p in puzzles)
    assert all(0.22 < letters[i] / len(puzzles) < 0.28 for i in range(4)), letters
    # Among numeric options, the correct one must not be predictable from its rank (e.g. "pick the smallest").
    numeric = [p for p in puzzles if p.kind != "parity_and_order"]
    ranks = Counter(sorted(p.choices).index(p.choices[p.answer_index]) for p in numeric)
    assert all(0.21 < ranks[r] / len(numeric) < 0.29 for r in range(4)), ranks


def test_each_kind_is_asked_about_equally_often(many_puzzles):
    kinds = Counter(p.kind for p in many_puzzles["train"])
    assert set(kinds) == set(KINDS)
    assert all(0.29 < n / 3000 < 0.37 for n in kinds.values()), kinds


@pytest.mark.parametrize(("grid", "cell_px"), [(2, 28), (3, 28), (2, 56)])
def test_correct_choice_matches_the_scans_drawn_in_the_named_cells(grid, cell_px, sklearn_digits):
    """Find the named colours in the picture, check the ink there is the scan's, and recompute the answer."""
    rows = build_digit_reasoning(seed=2, n_train=30, n_val=1, n_test=1, grid=grid, cell_px=cell_px)["train"]
    puzzles = compose_digit_puzzles(seed=2, n_train=30, n_val=1, n_test=1, grid=grid)["train"]
    scale = 3 * cell_px // 28
    margin = (cell_px - 8 * scale) // 2
    for row, puzzle in zip(rows, puzzles):
        pixels = np.asarray(row["image"])
        assert pixels.shape == (grid * cell_px, grid * cell_px, 3)
        named = re.findall("|".join(PALETTE), row["question"])
        assert len(named) == 2
        digits = []
        for colour in named:
            corners = [tuple(pixels[r * cell_px, c * cell_px]) for r in range(grid) for c in range(grid)]
            cell = corners.index(PALETTE[colour])
            r, c = divmod(cell, grid)
            scan_index = puzzle.scan_indices[cell]
            # Recover the 8x8 scan from block centres: ink darkens the cell colour in proportion to 0..16.
            channel = int(np.argmax(PALETTE[colour]))
            top, left = r * cell_px + margin + scale // 2, c * cell_px + margin + scale // 2
            centres = pixels[top : top + 8 * scale : scale, left : left + 8 * scale : scale, channel]
            recovered = np.rint(16 * (1 - centres / PALETTE[colour][channel]))
            np.testing.assert_array_equal(recovered, sklearn_digits.images[scan_index])
            digits.append(int(sklearn_digits.target[scan_index]))
        correct = row["choices"][LETTERS.index(row["answer"])]
        assert correct == expected_answer(row["topic"], named[0], digits[0], named[1], digits[1])
        reads = f"The {named[0]} cell shows {digits[0]}. The {named[1]} cell shows {digits[1]}. "
        assert row["rationale"].startswith(reads)


def _best_rule_accuracy(train, test, seen) -> float:
    """Bayes-optimal reader that sees only ``seen(puzzle)``: learn P(answer | kind, seen) on train, apply to test.

    Option texts name colours, so they are normalised to "first"/"second" (the named order) before counting.
    Distractors are uniform over the remaining answers, so the best option is the most probable answer.
    """

    def normalised(p, option):
        first, second = (p.colours[c] for c in p.asked_cells)
        return option.replace(first, "<first>").replace(second, "<second>")

    counts = defaultdict(Counter)
    for p in train:
        counts[p.kind, seen(p)][normalised(p, p.choices[p.answer_index])] += 1
    hits = 0
    for p in test:
        table = counts[p.kind, seen(p)]
        guess = max(range(4), key=lambda i: (table[normalised(p, p.choices[i])], -i))
        hits += guess == p.answer_index
    return hits / len(test)


def test_one_cell_is_not_enough_but_both_named_cells_are(many_puzzles):
    train, test = many_puzzles["train"], many_puzzles["test"]
    text_only = _best_rule_accuracy(train, test, lambda p: None)
    first_cell = _best_rule_accuracy(train, test, lambda p: p.digits[p.asked_cells[0]])
    second_cell = _best_rule_accuracy(train, test, lambda p: p.digits[p.asked_cells[1]])
    both_cells = _best_rule_accuracy(train, test, lambda p: tuple(p.digits[c] for c in p.asked_cells))
    assert text_only < 0.32
    assert first_cell < 0.40 and second_cell < 0.40
    assert both_cells == 1.0
    for kind in KINDS:  # also per kind: parity-and-order is the leakiest (about 0.43 in theory)
        kind_train, kind_test = ([p for p in ps if p.kind == kind] for ps in (train, test))
        for cell in (0, 1):
            assert _best_rule_accuracy(kind_train, kind_test, lambda p: p.digits[p.asked_cells[cell]]) < 0.5


def test_rationale_splits_into_read_read_combine_steps():
    rows = build_digit_reasoning(seed=4, n_train=60, n_val=1, n_test=1)["train"]
    for row in rows:
        steps = split_steps(row["rationale"])
        assert len(steps) == 3 and all(steps), row["rationale"]
        assert all(re.fullmatch(r"The \w+ cell shows \d", step) for step in steps[:2])


def test_parquet_round_trip_keeps_fields_and_pixels(tmp_path):
    paths = write_digit_reasoning(tmp_path / "digits", seed=7, n_train=6, n_val=3, n_test=4)
    assert {split: p.name for split, p in paths.items()} == {s: f"{s}.parquet" for s in SPLITS}
    expected = build_digit_reasoning(seed=7, n_train=6, n_val=3, n_test=4)
    loaded = load_dataset(
        "parquet", data_files={s: str(p) for s, p in paths.items()}, cache_dir=str(tmp_path / "cache")
    )
    for split in SPLITS:
        assert set(loaded[split].column_names) == M3COT_FIELDS
        assert len(loaded[split]) == len(expected[split])
        for got, want in zip(loaded[split], expected[split]):
            assert {k: v for k, v in got.items() if k != "image"} == {k: v for k, v in want.items() if k != "image"}
            assert got["image"].size == want["image"].size
            assert np.array_equal(np.asarray(got["image"].convert("RGB")), np.asarray(want["image"]))


@pytest.mark.parametrize("bad", [dict(cell_px=30), dict(grid=1), dict(grid=4), dict(kinds=("riddle",))])
def test_rejects_settings_that_break_the_design(bad):
    with pytest.raises(ValueError):
        build_digit_reasoning(**{**SMALL, **bad})


def test_reading_questions_offer_all_ten_digits_and_answer_with_the_named_cell(sklearn_digits):
    """The pre-training kind: one named cell, every digit an option (no guessing among four), a one-step rationale."""
    rows = build_digit_reasoning(seed=5, n_train=40, n_val=1, n_test=1, kinds=(READ_CELL,))["train"]
    puzzles = compose_digit_puzzles(seed=5, n_train=40, n_val=1, n_test=1, kinds=(READ_CELL,))["train"]
    for row, puzzle in zip(rows, puzzles):
        cell = puzzle.asked_cells[0]
        colour, digit = puzzle.colours[cell], int(sklearn_digits.target[puzzle.scan_indices[cell]])
        assert row["question"] == f"Which digit is in the {colour} cell?" and row["topic"] == READ_CELL
        assert row["choices"] == [str(d) for d in range(10)]
        assert row["answer"] == "ABCDEFGHIJ"[digit]
        assert split_steps(row["rationale"]) == [f"The {colour} cell shows {digit}."]


def test_all_digit_options_lists_the_ten_digits_in_order_for_numeric_kinds():
    puzzles = compose_digit_puzzles(seed=6, n_train=300, n_val=1, n_test=1, all_digit_options=True)["train"]
    assert {p.kind for p in puzzles} == set(KINDS)
    for puzzle in puzzles:
        a, b = (puzzle.digits[c] for c in puzzle.asked_cells)
        if puzzle.kind == "parity_and_order":
            assert len(puzzle.choices) == 4
            continue
        assert puzzle.choices == tuple(str(d) for d in range(10))
        assert puzzle.answer_index == expected_answer_digit(puzzle.kind, a, b)


def expected_answer_digit(kind: str, a: int, b: int) -> int:
    return (a + b) % 10 if kind == "sum_last_digit" else (a - b) % 10
