"""Sources: local parquet and JSONL in the M3CoT / ScienceQA schemas, through the hub-data code path."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from schema_files import (digit_image, m3cot_rows, png_bytes, scienceqa_rows, write_m3cot_files, write_rows,
                          write_scienceqa_files)

from ivtlr.data import Example, detect_schema, load_examples
from ivtlr.data.example import decode_image

FORMATS = ("parquet", "jsonl")
SOURCES_LOGGER = "ivtlr.data.sources"


def load(tmp_path: Path, *args, **kwargs) -> list[Example]:
    """`load_examples` with a per-test datasets cache, so test runs leave nothing behind."""
    return list(load_examples(*args, cache_dir=str(tmp_path / "hf-cache"), **kwargs))


def assert_same_pixels(image: Image.Image, expected: Image.Image) -> None:
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))


@pytest.mark.parametrize("fmt", FORMATS)
def test_m3cot_rows_become_examples_field_by_field(tmp_path, fmt):
    files = write_m3cot_files(tmp_path, n_train=5, n_test=3, fmt=fmt)
    examples = load(tmp_path, "m3cot", "train", data_files=files)
    rows = m3cot_rows("train", 5)
    assert [example.id for example in examples] == [row["id"] for row in rows]
    for example, row in zip(examples, rows):
        assert example.question == row["question"]
        assert example.choices == row["choices"]
        assert example.answer == row["answer"]
        assert example.rationale == row["rationale"]
        assert example.metadata == {
            "source": "m3cot",
            "split": "train",
            "domain": row["domain"],
            "topic": row["topic"],
            "category": row["category"],
            "image_id": row["image_id"],
            "context": row["context"],
        }
        assert_same_pixels(example.image, row["image"])
    assert [example.id for example in load(tmp_path, "m3cot", "test", data_files=files)] == [
        "digits-test-0",
        "digits-test-1",
        "digits-test-2",
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_scienceqa_rows_get_split_ids_letters_and_lecture_plus_solution(tmp_path, fmt):
    files = write_scienceqa_files(tmp_path, n_train=8, n_test=2, fmt=fmt)
    examples = load(tmp_path, "scienceqa", "train", data_files=files)
    rows = scienceqa_rows("train", 8)
    assert [example.id for example in examples] == [f"train-{index}" for index in range(8)]
    for example, row in zip(examples, rows):
        assert example.answer == "ABCD"[row["answer"]]
        assert example.answer_text == row["choices"][row["answer"]]
        assert example.metadata["subject"] == row["subject"]
        assert example.metadata["grade"] == row["grade"]
        assert example.metadata["context"] == row["hint"]
        assert_same_pixels(example.image, row["image"])
    # The helper's rows cover every explanation case: row 0 has neither, 3 only a solution, 5 only a lecture.
    lecture, solution = rows[1]["lecture"], rows[1]["solution"]
    assert lecture and solution and examples[1].rationale == f"{lecture} {solution}"
    assert not rows[3]["lecture"] and examples[3].rationale == rows[3]["solution"]
    assert not rows[5]["solution"] and examples[5].rationale == rows[5]["lecture"]
    assert not rows[0]["lecture"] and not rows[0]["solution"]
    assert examples[0].rationale == rows[0]["choices"][rows[0]["answer"]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_without_image_are_dropped_and_counted_unless_kept(tmp_path, fmt, caplog):
    files = write_scienceqa_files(tmp_path, n_train=3, n_test=1, n_text_only=2, fmt=fmt)
    caplog.set_level(logging.INFO, logger=SOURCES_LOGGER)
    dropped = load(tmp_path, "scienceqa", "train", data_files=files)
    assert [example.id for example in dropped] == ["train-0", "train-1", "train-2"]
    assert "dropped 2 rows without an image" in caplog.text
    kept = load(tmp_path, "scienceqa", "train", data_files=files, keep_no_image=True)
    assert [example.id for example in kept] == ["train-0", "train-1", "train-2", "train-3", "train-4"]
    assert [example.image is None for example in kept] == [False, False, False, True, True]


def test_context_is_added_to_the_question_only_on_request(tmp_path):
    m3cot = write_m3cot_files(tmp_path / "m3cot", n_train=1, n_test=1)
    plain = load(tmp_path, "m3cot", "train", data_files=m3cot)[0]
    with_context = load(tmp_path, "m3cot", "train", data_files=m3cot, use_context=True)[0]
    assert plain.question == "Which digit is written in the image?"
    assert with_context.question == (
        "Context: The image is a scan of a handwritten digit.\nWhich digit is written in the image?"
    )
    scienceqa = write_scienceqa_files(tmp_path / "sqa", n_train=0, n_test=1, n_text_only=1)
    hinted = load(tmp_path, "scienceqa", "train", data_files=scienceqa, use_context=True, keep_no_image=True)[0]
    assert hinted.question.startswith("Context: Count from zero.\nWhich word names the digit")


def test_limit_counts_kept_examples(tmp_path):
    rows = m3cot_rows("train", 5)
    rows[0]["choices"] = []
    files = {"train": write_rows(tmp_path, "train", rows, "m3cot")}
    examples = load(tmp_path, "m3cot", "train", data_files=files, limit=3)
    assert [example.id for example in examples] == ["digits-train-1", "digits-train-2", "digits-train-3"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_schema_is_detected_from_the_columns(tmp_path, fmt):
    m3cot = write_m3cot_files(tmp_path / "m3cot", n_train=2, n_test=1, fmt=fmt)
    scienceqa = write_scienceqa_files(tmp_path / "sqa", n_train=2, n_test=1, fmt=fmt)
    assert [example.metadata["source"] for example in load(tmp_path, "auto", "test", data_files=m3cot)] == ["m3cot"]
    assert [example.id for example in load(tmp_path, "auto", "test", data_files=scienceqa)] == ["test-0"]


def test_detect_schema_rejects_tables_it_cannot_place():
    assert detect_schema(["question", "choices", "answer", "rationale", "image"]) == "m3cot"
    assert detect_schema(["question", "choices", "answer", "lecture", "solution"]) == "scienceqa"
    with pytest.raises(ValueError, match="cannot tell"):
        detect_schema(["question", "choices", "answer"])
    with pytest.raises(ValueError, match="need question, choices and answer"):
        detect_schema(["question", "rationale"])


def test_files_of_the_other_schema_are_refused(tmp_path):
    scienceqa = write_scienceqa_files(tmp_path, n_train=1, n_test=1)
    with pytest.raises(ValueError, match="source 'm3cot' given, but the columns .* are those of 'scienceqa'"):
        load(tmp_path, "m3cot", "train", data_files=scienceqa)


def _m3cot_with(defect: str) -> list[dict]:
    """Four good rows, row 1 carrying `defect`."""
    rows = m3cot_rows("train", 4)
    bad = rows[1]
    if defect == "no options":
        bad["choices"] = []
    elif defect == "answer outside the options":
        bad["answer"] = "E"
    elif defect == "missing image":
        bad["image"] = "images/not-there.png"
    elif defect == "corrupt image":
        bad["image"] = png_bytes(bad["image"])[:60]
    elif defect == "empty question":
        bad["question"] = "  "
    return rows


DEFECTS = ("no options", "answer outside the options", "missing image", "corrupt image", "empty question")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("defect", DEFECTS)
def test_defective_row_is_skipped_and_counted(tmp_path, fmt, defect, caplog):
    files = {"train": write_rows(tmp_path, "train", _m3cot_with(defect), "m3cot", fmt)}
    examples = load(tmp_path, "m3cot", "train", data_files=files)
    assert [example.id for example in examples] == ["digits-train-0", "digits-train-2", "digits-train-3"]
    assert f"skipped 1 invalid rows: {{'{defect}': 1}}" in caplog.text


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("defect", DEFECTS)
def test_defective_row_raises_naming_it_when_strict(tmp_path, fmt, defect):
    files = {"train": write_rows(tmp_path, "train", _m3cot_with(defect), "m3cot", fmt)}
    with pytest.raises(ValueError, match=f"example 'digits-train-1': {defect}"):
        load(tmp_path, "m3cot", "train", data_files=files, strict=True)


def test_options_written_as_one_string_are_not_split_into_characters(tmp_path, caplog):
    """JSONL keeps such a string as it is (a parquet writer with a list schema would split it on writing)."""
    rows = m3cot_rows("train", 3)
    for row in rows:
        row["choices"] = str(row["choices"])  # "['one', 'two', ...]": a common export mistake
    files = {"train": write_rows(tmp_path, "train", rows, "m3cot", "jsonl")}
    assert len(load(tmp_path, "m3cot", "train", data_files=files)) == 0
    assert "skipped 3 invalid rows: {'options are one string, not a list': 3}" in caplog.text


def test_a_second_row_with_an_id_already_seen_is_skipped_and_counted(tmp_path, caplog):
    """Predictions and resuming are keyed by id: a duplicate would silently vanish from the summary."""
    rows = m3cot_rows("train", 4)
    rows[2]["id"] = rows[0]["id"]
    files = {"train": write_rows(tmp_path, "train", rows, "m3cot", "jsonl")}
    examples = load(tmp_path, "m3cot", "train", data_files=files)
    assert [example.id for example in examples] == ["digits-train-0", "digits-train-1", "digits-train-3"]
    assert "skipped 1 invalid rows: {'duplicate id': 1}" in caplog.text
    with pytest.raises(ValueError, match="duplicate id: digits-train-0"):
        load(tmp_path, "m3cot", "train", data_files=files, strict=True)


def test_scienceqa_answer_index_outside_the_options_is_skipped(tmp_path, caplog):
    rows = scienceqa_rows("train", 3)
    rows[2]["answer"] = 4
    files = {"train": write_rows(tmp_path, "train", rows, "scienceqa")}
    assert [example.id for example in load(tmp_path, "scienceqa", "train", data_files=files)] == ["train-0", "train-1"]
    assert "{'answer outside the options': 1}" in caplog.text


def test_image_that_is_not_an_image_is_a_corrupt_image(tmp_path):
    rows = m3cot_rows("train", 2)
    rows[0]["image"] = b"definitely not a picture"
    files = {"train": write_rows(tmp_path, "train", rows, "m3cot", "jsonl")}
    with pytest.raises(ValueError, match="'digits-train-0': corrupt image"):
        load(tmp_path, "m3cot", "train", data_files=files, strict=True)


def test_bad_source_arguments_fail_clearly(tmp_path):
    files = write_m3cot_files(tmp_path, n_train=1, n_test=1)
    with pytest.raises(ValueError, match="unknown source 'm3c0t'"):
        load(tmp_path, "m3c0t", "train", data_files=files)
    with pytest.raises(ValueError, match=r"no data files for split 'validation'; given splits: \['test', 'train'\]"):
        load(tmp_path, "m3cot", "validation", data_files=files)
    with pytest.raises(ValueError, match="needs data_files"):
        load(tmp_path, "auto", "train")
    csv = tmp_path / "train.csv"
    csv.write_text("question\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load(tmp_path, "m3cot", "train", data_files=str(csv))
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        load(tmp_path, "m3cot", "train", data_files=str(tmp_path / "nowhere.parquet"))


def test_split_can_span_several_files_with_their_own_image_folders(tmp_path):
    first = write_rows(tmp_path / "a", "train", scienceqa_rows("train", 2), "scienceqa", "jsonl")
    second = write_rows(tmp_path / "b", "train", scienceqa_rows("validation", 1), "scienceqa", "jsonl")
    examples = load(tmp_path, "scienceqa", "train", data_files={"train": [first, second]})
    assert [example.id for example in examples] == ["train-0", "train-1", "train-2"]
    assert_same_pixels(examples[2].image, scienceqa_rows("validation", 1)[0]["image"])


def test_transparent_pixels_decode_over_white():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    decoded = decode_image(png_bytes(rgba))
    assert decoded.mode == "RGB"
    assert np.asarray(decoded).tolist() == [[[255, 255, 255], [10, 20, 30]]]


def test_example_sequence_decodes_a_fresh_image_per_access(tmp_path):
    examples = load_examples(
        "m3cot", "train", data_files=write_m3cot_files(tmp_path, n_train=3, n_test=1), cache_dir=str(tmp_path / "c")
    )
    first, again = examples[0].image, examples[0].image
    assert first is not again
    assert_same_pixels(first, digit_image(0))
    assert [example.id for example in examples[1:]] == ["digits-train-1", "digits-train-2"]


HUB_PROBE = """
from ivtlr.data import load_examples
from ivtlr.errors import DataFileError
for source in ("m3cot", "LightChen2333/M3CoT", "scienceqa", "derek-thomas/ScienceQA"):
    try:
        load_examples(source, "test")
    except DataFileError as error:
        print(source, "->", error)
"""


def test_hub_sources_ask_the_hub_for_their_dataset(tmp_path):
    """Offline, the hub call fails with a user error whose message shows which dataset `load_dataset` was asked
    for."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", HUB_PROBE], env=env, capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result.stderr
    for line, hub_id in zip(lines, ["LightChen2333/M3CoT"] * 2 + ["derek-thomas/ScienceQA"] * 2):
        assert f"Couldn't reach '{hub_id}'" in line
