"""Bad training data never crashes deep inside the model: rows are skipped and counted, or the run stops with an
error that names the problem."""
from __future__ import annotations

import logging

import pytest
from ivtlr.errors import UserError
from schema_files import m3cot_rows, write_rows
from train_runs import column, single_thread, train_in_process, write_config

pytestmark = pytest.mark.usefixtures(single_thread.__name__)


def _bad_rows() -> list[dict]:
    """Four broken rows and two good ones, in the M3CoT schema."""
    rows = m3cot_rows("train", 6)
    rows[0]["image"] = "images/not-there.png"  # missing image file
    rows[1]["image"] = b"\x89PNG\r\n\x1a\n this is not an image"  # corrupt image
    rows[2]["choices"] = []  # no options
    rows[3]["answer"] = "F"  # four options: A-D
    return rows


def test_invalid_rows_are_skipped_and_counted(tmp_path, caplog):
    files = {"train": write_rows(tmp_path / "data", "train", _bad_rows(), "m3cot", fmt="jsonl")}
    with caplog.at_level(logging.WARNING):
        run_dir = train_in_process(write_config(tmp_path, files, num_epochs=2))
    assert column(run_dir, "samples") == [2, 2]  # only the two good rows, every epoch
    message = next(r.getMessage() for r in caplog.records if "invalid rows" in r.getMessage())
    assert "skipped 4 invalid rows" in message
    for reason in ("missing image", "corrupt image", "no options", "answer outside the options"):
        assert f"'{reason}': 1" in message


def test_no_valid_row_is_a_clear_error(tmp_path, monkeypatch):
    """A user error (one line, exit 2; raised here with IVTLR_DEBUG=1)."""
    monkeypatch.setenv("IVTLR_DEBUG", "1")
    files = {"train": write_rows(tmp_path / "data", "train", _bad_rows()[:4], "m3cot", fmt="jsonl")}
    with pytest.raises(UserError, match="no usable training examples"):
        train_in_process(write_config(tmp_path, files))


def _long_and_short_rows() -> list[dict]:
    rows = m3cot_rows("train", 2)
    rows[0]["rationale"] = "The digit is drawn with a single stroke. " * 20 + "So it is a one."
    return rows


def test_sequences_over_max_length_are_skipped_with_a_count(tmp_path, caplog):
    files = {"train": write_rows(tmp_path / "data", "train", _long_and_short_rows(), "m3cot")}
    with caplog.at_level(logging.WARNING):
        run_dir = train_in_process(write_config(tmp_path, files, num_epochs=2, max_length=300))
    assert column(run_dir, "samples") == [1, 1]
    messages = [record.getMessage() for record in caplog.records]
    assert any("'digits-train-0'" in m and "more than max_length=300" in m and "(2 skipped so far)" in m
               for m in messages)
    assert any(m.endswith("2 samples longer than max_length were skipped") for m in messages)


def test_a_batch_with_nothing_under_max_length_is_a_clear_error(tmp_path, monkeypatch):
    """A user error (one line, exit 2; raised here with IVTLR_DEBUG=1) that says which setting to change."""
    monkeypatch.setenv("IVTLR_DEBUG", "1")
    files = {"train": write_rows(tmp_path / "data", "train", _long_and_short_rows(), "m3cot")}
    with pytest.raises(UserError, match="longer than max_length=20: raise max_length"):
        train_in_process(write_config(tmp_path, files, max_length=20))
