"""A run continued with a changed lr, weight_decay or warmup_steps trains with the new value from its next step on,
as config.yaml then records, never with the one restored from the checkpoint's optimizer state."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
from schema_files import write_m3cot_files
from train_runs import checkpoint_weights, column, final_weights, metrics, single_thread, train_in_process, write_config

from ivtlr.checkpoint import checkpoint_dirs

pytestmark = pytest.mark.usefixtures(single_thread.__name__)


def test_a_changed_lr_and_weight_decay_drive_the_next_step(tmp_path, caplog):
    files = write_m3cot_files(tmp_path / "data", n_train=2, n_test=1)  # batch 2: one step per epoch
    config = write_config(tmp_path, files, name="k", num_epochs=1, lr=1e-3, weight_decay=0.01)
    run_dir = train_in_process(config)
    shutil.copytree(tmp_path / "runs", tmp_path / "same")
    before = checkpoint_weights(checkpoint_dirs(run_dir / "checkpoints")[-1])

    # One more step each: with the recorded settings, and with lr and weight_decay changed.
    same = train_in_process(config, "num_epochs=2", f"save_path={tmp_path / 'same'}")
    with caplog.at_level(logging.INFO):
        changed = train_in_process(config, "num_epochs=2", "lr=0.003", "weight_decay=2.0")

    assert column(changed, "lr") == [1e-3, 3e-3]
    assert "from step 2: lr 0.001 -> 0.003, weight_decay 0.01 -> 2.0" in caplog.text
    assert metrics(changed)[1]["changed"] == {"lr": [1e-3, 3e-3], "weight_decay": [0.01, 2.0]}
    # AdamW moves p to p * (1 - lr * wd) - lr * u, u the same in both runs (same weights, gradient and moments):
    # u from the unchanged run, then the changed run's weights follow.
    after_same, after_changed = final_weights(same), final_weights(changed)
    trained = [key for key in before if not torch.equal(after_same[key], before[key])]
    assert trained
    for key in before:
        p = before[key]
        if key in trained:
            u = (p * (1 - 1e-3 * 0.01) - after_same[key]) / 1e-3
            expected = p * (1 - 3e-3 * 2.0) - 3e-3 * u
        else:  # no gradient reaches it: AdamW leaves it alone whatever the settings
            expected = p
        torch.testing.assert_close(after_changed[key], expected, rtol=1e-5, atol=2e-6, msg=key)


def test_a_changed_warmup_follows_its_schedule_from_the_next_step(tmp_path):
    files = write_m3cot_files(tmp_path / "data", n_train=2, n_test=1)
    config = write_config(tmp_path, files, name="k", num_epochs=1, batch_size_training=1, lr=1e-3)
    run_dir = train_in_process(config)  # steps 1 and 2 without warmup
    train_in_process(config, "num_epochs=2", "warmup_steps=4")
    # Linear warmup over 4 steps: step s (1-based) trains at lr * (s - 1) / 4 while s <= 4.
    assert column(run_dir, "lr") == pytest.approx([1e-3, 1e-3, 1e-3 * 2 / 4, 1e-3 * 3 / 4])
