"""A predictions file only ever holds answers of one model under one set of settings, written by one process; data
files that cannot be read are named (with the line) in one error line."""
from __future__ import annotations

import json

import pytest

from ivtlr.cli import main
from ivtlr.evaluation.provenance import exclusive_writer
from ivtlr.evaluation.records import read_jsonl
from schema_files import m3cot_rows, write_m3cot_files, write_rows
from test_eval import TINY, run_eval, write_config
from train_runs import train_in_process
from train_runs import write_config as write_training_config


@pytest.fixture
def files(tmp_path):
    return write_m3cot_files(tmp_path / "data", n_train=2, n_test=3)


def eval_exit(config, out, *extra) -> int:
    return main(["eval", str(config), *extra, "--out", str(out), "--no-progress"])


def test_checkpoints_of_the_same_name_from_two_runs_never_share_answers(tmp_path, files, capsys):
    """runA/checkpoint-N then runB/checkpoint-N into one folder: the second is refused (not reported under runA's
    answers); --fresh starts again and keeps the old file aside."""
    run_a = train_in_process(write_training_config(tmp_path, files, name="runA", seed=1, max_latent_stage=1))
    run_b = train_in_process(write_training_config(tmp_path, files, name="runB", seed=2, max_latent_stage=1))
    (checkpoint_a,), (checkpoint_b,) = (sorted((run / "checkpoints").iterdir()) for run in (run_a, run_b))
    assert checkpoint_a.name == checkpoint_b.name
    config = write_config(tmp_path, files, **TINY)
    out = tmp_path / "out"
    records_a, _ = run_eval(config, out, "--checkpoint", str(checkpoint_a))
    capsys.readouterr()
    assert eval_exit(config, out, "--checkpoint", str(checkpoint_b)) == 2
    err = capsys.readouterr().err
    assert "was made by other weights or settings" in err and "weights.path" in err and "--fresh" in err
    records_b, summary = run_eval(config, out, "--checkpoint", str(checkpoint_b), "--fresh")
    assert summary["run"]["weights"]["path"] == str(checkpoint_b.resolve())
    assert len(records_b) == 3 and len(list(out.glob("predictions_*.jsonl.replaced-*"))) == 1


def test_changed_generation_settings_are_refused(tmp_path, files, capsys):
    config = write_config(tmp_path, files, **TINY)
    out = tmp_path / "out"
    run_eval(config, out)
    assert eval_exit(config, out, "eval.max_new_tokens=7") == 2
    assert "max_new_tokens: 5 -> 7" in capsys.readouterr().err
    assert eval_exit(config, out, "model=tiny:chameleon") == 2
    assert "weights.model: 'tiny:qwen2_vl' -> 'tiny:chameleon'" in capsys.readouterr().err
    run_eval(config, out)  # the same settings again resume (nothing left to answer)


def test_predictions_without_a_record_of_their_origin_are_refused(tmp_path, files, capsys):
    config = write_config(tmp_path, files, **TINY)
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions_untrained_test_ivtlr_latent2.jsonl").write_text(json.dumps({"id": "x"}) + "\n")
    assert eval_exit(config, out) == 2
    assert "no predictions_untrained_test_ivtlr_latent2.provenance.json" in capsys.readouterr().err


def test_a_second_writer_is_refused_while_the_first_holds_the_file(tmp_path, files, capsys):
    config = write_config(tmp_path, files, **TINY)
    out = tmp_path / "out"
    predictions = out / "predictions_untrained_test_ivtlr_latent2.jsonl"
    with exclusive_writer(predictions):  # an evaluation in progress
        assert eval_exit(config, out) == 2
        assert "is being written by process" in capsys.readouterr().err
    records, _ = run_eval(config, out)  # once it is done, the next one runs
    ids = [r["id"] for r in read_jsonl(predictions)]
    assert len(ids) == len(set(ids)) == 3


def test_an_empty_data_file_is_one_clear_line(tmp_path, capsys):
    empty = tmp_path / "test.jsonl"
    empty.write_text("")
    config = write_config(tmp_path, {"test": empty}, **TINY)
    assert eval_exit(config, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{empty}: the file is empty" in err and "Traceback" not in err and "StopIteration" not in err


def test_a_non_utf8_byte_names_the_file_and_the_line(tmp_path, capsys):
    path = write_rows(tmp_path / "data", "test", m3cot_rows("test", 3), "m3cot", "jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1][:20] + b"\xff" + lines[1][20:]
    path.write_bytes(b"".join(lines))
    config = write_config(tmp_path, {"test": path}, **TINY)
    assert eval_exit(config, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{path}: cannot be read as json: line 2 is not UTF-8 (byte 0xff at column 21)" in err
    assert "Traceback" not in err
