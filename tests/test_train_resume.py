"""A run killed mid-stage and re-run with the same command ends with the weights of an uninterrupted run."""
from __future__ import annotations

import subprocess
import time

import pytest
import yaml
from schema_files import write_m3cot_files
from train_runs import (column, final_weights, max_difference, single_thread, subprocess_env, train_command,
                        train_in_process, write_config)

from ivtlr.checkpoint import checkpoint_dirs, read_meta

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

# LoRA with dropout: the resumed run must also restore the RNG that draws the dropout masks.
RUN = dict(num_epochs=4, batch_size_training=1, use_lora=True, lora_dropout=0.1, lr=1e-2, save_every_steps=3)


def _kill_after_first_checkpoint(command: list[str], checkpoints, timeout: float = 240) -> None:
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not checkpoint_dirs(checkpoints) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert process.returncode == -9, f"the run ended before it could be killed: {stderr.decode()[-3000:]}"


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    files = write_m3cot_files(tmp_path / "data", n_train=4, n_test=1)  # 4 steps per epoch, 16 in all
    reference = train_in_process(write_config(tmp_path, files, name="reference", **RUN))
    config = write_config(tmp_path, files, name="interrupted", **RUN)
    run_dir = tmp_path / "runs" / "interrupted"

    _kill_after_first_checkpoint(train_command(config), run_dir / "checkpoints")
    stopped_at = read_meta(checkpoint_dirs(run_dir / "checkpoints")[-1])
    assert stopped_at.step < 16
    train_in_process(config)  # the same command again

    assert max_difference(final_weights(run_dir), final_weights(reference)) < 1e-5
    assert column(run_dir, "step") == list(range(1, 17))  # each step logged once, resumed steps included
    assert column(run_dir, "loss")[stopped_at.step:] == pytest.approx(column(reference, "loss")[stopped_at.step:],
                                                                     rel=1e-5)
    # Every 3 steps plus every stage end (4 steps per stage), the last being the end of training.
    assert [read_meta(c).step for c in checkpoint_dirs(run_dir / "checkpoints")] == [3, 4, 6, 8, 9, 12, 15, 16]


def test_rerunning_a_finished_run_trains_nothing(tmp_path):
    files = write_m3cot_files(tmp_path / "data", n_train=2, n_test=1)
    config = write_config(tmp_path, files, num_epochs=2)
    run_dir = train_in_process(config)
    before = final_weights(run_dir)
    train_in_process(config)
    assert column(run_dir, "step") == [1, 2]
    assert max_difference(final_weights(run_dir), before) == 0.0


def test_rerunning_a_finished_run_with_changed_settings_keeps_its_config(tmp_path, caplog):
    files = write_m3cot_files(tmp_path / "data", n_train=2, n_test=1)
    config = write_config(tmp_path, files, num_epochs=2)
    run_dir = train_in_process(config)
    recorded = (run_dir / "config.yaml").read_bytes()
    train_in_process(config, "lr=0.5", "keep_last=1")
    assert (run_dir / "config.yaml").read_bytes() == recorded  # nothing trained: the run's record stays
    assert "nothing trains" in caplog.text
    assert "lr: 0.001 -> 0.5" in caplog.text and "keep_last: None -> 1" in caplog.text
    assert column(run_dir, "step") == [1, 2]


def test_continuing_a_run_with_changed_settings_records_them_and_says_so(tmp_path, caplog):
    files = write_m3cot_files(tmp_path / "data", n_train=2, n_test=1)
    config = write_config(tmp_path, files, num_epochs=1)
    run_dir = train_in_process(config)
    train_in_process(config, "num_epochs=2")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["num_epochs"] == 2
    assert "settings that differ" in caplog.text and "num_epochs: 1 -> 2" in caplog.text
    assert column(run_dir, "step") == [1, 2]
