"""A loss, gradient norm or weight that turns inf/NaN stops training with one line (exit 2) and is never saved as
the newest checkpoint; ``on_nonfinite: skip`` skips the update of such a step instead."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from schema_files import write_m3cot_files
from train_runs import (checkpoint_weights, column, metrics, single_thread, train_exit_status, train_in_process,
                        write_config)

from ivtlr.checkpoint import checkpoint_dirs, read_meta, verify_checkpoint
from ivtlr.data import IVTLRCollator

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

#: AdamW at its second step with these moves a weight p by about -(lr * weight_decay * p + lr / 0.19 * sign(g)):
#: beyond float32's 3.4e38 for |p| >= 0.1 (both terms within it, so torch computes the step).
OVERFLOWING = ("lr=6e37", "weight_decay=5")


def _one_line_error(capsys) -> str:
    """The error, the last line on stderr (the progress bar redraws itself with carriage returns)."""
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ivtlr train: error: ") and "Traceback" not in err, err[-2000:]
    return last


def _checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the run's intact checkpoints, each checked to hold finite weights only; no stray directory."""
    root = run_dir / "checkpoints"
    checkpoints = checkpoint_dirs(root)
    assert sorted(p.name for p in root.iterdir()) == [c.name for c in checkpoints]
    for checkpoint in checkpoints:
        verify_checkpoint(checkpoint, training_state=True)
        assert all(torch.isfinite(t).all() for t in checkpoint_weights(checkpoint).values()), checkpoint
    return [read_meta(c).step for c in checkpoints]


@pytest.fixture
def one_good_step(tmp_path) -> tuple[Path, Path]:
    """A run of one step (checkpoint 1) whose stage lasts 3 epochs: epoch 2 (step 2) saves nothing by itself."""
    files = write_m3cot_files(tmp_path / "data", n_train=2, n_test=1)  # batch 2: one step per epoch
    config = write_config(tmp_path, files, name="k", num_epochs=1, epochs_per_stage=3, save_every_steps=100)
    return config, train_in_process(config)


def test_a_loss_turning_non_finite_stops_before_saving(one_good_step, capsys):
    config, run_dir = one_good_step
    # Step 2 overflows the weights (its own loss is finite); step 3's loss is NaN and would end the run with a save.
    assert train_exit_status(config, "num_epochs=3", *OVERFLOWING) == 2
    error = _one_line_error(capsys)
    assert "step 3" in error and "loss" in error and "on_nonfinite" in error
    assert _checkpoint_steps(run_dir) == [1]
    assert column(run_dir, "step") == [1, 2]


def test_non_finite_weights_are_never_saved(one_good_step, capsys):
    config, run_dir = one_good_step
    # Step 2's loss and gradients are finite, but its update leaves inf/NaN weights, due to be saved right away.
    assert train_exit_status(config, "num_epochs=3", *OVERFLOWING, "save_every_steps=1") == 2
    error = _one_line_error(capsys)
    assert "step 2" in error and "non-finite" in error
    assert _checkpoint_steps(run_dir) == [1]


@pytest.fixture
def nan_second_batch(monkeypatch):
    """The second batch of the run gets NaN pixels (a corrupt image that decoded to NaN): its loss is NaN."""
    collate = IVTLRCollator.__call__
    calls = []

    def poisoned(self, examples):
        batch = collate(self, examples)
        calls.append(len(calls))
        if len(calls) == 2:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        return batch

    monkeypatch.setattr(IVTLRCollator, "__call__", poisoned)


@pytest.fixture
def every_step_saved(tmp_path) -> Path:
    files = write_m3cot_files(tmp_path / "data", n_train=2, n_test=1)
    return write_config(tmp_path, files, name="k", num_epochs=2, batch_size_training=1, save_every_steps=1)


def test_a_nan_batch_stops_the_run_at_its_step(every_step_saved, nan_second_batch, capsys):
    assert train_exit_status(every_step_saved) == 2
    error = _one_line_error(capsys)
    assert "step 2" in error and "nan" in error.lower()
    run_dir = every_step_saved.parent / "runs" / "k"
    assert _checkpoint_steps(run_dir) == [1]
    assert column(run_dir, "step") == [1]


def test_skip_mode_skips_the_update_of_a_nan_batch(every_step_saved, nan_second_batch):
    run_dir = train_in_process(every_step_saved, "on_nonfinite=skip")
    assert column(run_dir, "step") == [1, 2, 3, 4]
    assert [record.get("skipped", False) for record in metrics(run_dir)] == [False, True, False, False]
    assert _checkpoint_steps(run_dir) == [1, 2, 3, 4]
    weights = [checkpoint_weights(c) for c in checkpoint_dirs(run_dir / "checkpoints")]
    assert all(torch.equal(weights[1][key], weights[0][key]) for key in weights[0])  # step 2 changed nothing
    assert any(not torch.equal(weights[2][key], weights[1][key]) for key in weights[0])  # step 3 trained
