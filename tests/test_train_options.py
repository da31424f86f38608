"""Training options beyond the original YAML keys: optimizer reset, warmup, gradient checkpointing, the built-in
digits data."""
from __future__ import annotations

import pytest
from schema_files import write_m3cot_files
from train_runs import column, final_weights, max_difference, single_thread, train_in_process, write_config

from ivtlr.data.builtin import CACHE_ENV, digit_data_files

pytestmark = pytest.mark.usefixtures(single_thread.__name__)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return write_m3cot_files(tmp_path_factory.mktemp("two"), n_train=2, n_test=1)


def test_reset_optimizer_changes_only_the_steps_after_a_stage_switch(tmp_path, two):
    runs = {reset: train_in_process(write_config(tmp_path, two, num_epochs=3, batch_size_training=1, lr=1e-2,
                                                 reset_optimizer=reset, name=f"reset-{reset}"))
            for reset in (True, False)}
    kept, reset = column(runs[False], "loss"), column(runs[True], "loss")
    assert reset[:3] == kept[:3]  # stage 0, and the first stage-1 loss (computed before the reset step's update)
    assert reset[3:] != kept[3:]
    assert max_difference(final_weights(runs[True]), final_weights(runs[False])) > 1e-4


def test_warmup_steps_ramp_the_learning_rate(tmp_path, two):
    config = write_config(tmp_path, two, num_epochs=4, lr=1e-2, warmup_steps=2)
    assert column(train_in_process(config), "lr") == pytest.approx([0.0, 5e-3, 1e-2, 1e-2])


def test_gradient_checkpointing_trains_to_the_same_weights(tmp_path, two):
    runs = [train_in_process(write_config(tmp_path, two, num_epochs=3, gradient_checkpointing=flag, name=str(flag)))
            for flag in (False, True)]
    assert column(runs[0], "loss") == pytest.approx(column(runs[1], "loss"), rel=1e-5)
    assert max_difference(final_weights(runs[0]), final_weights(runs[1])) < 1e-5


def test_digits_source_trains_on_the_cached_puzzles(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    config = write_config(tmp_path, {}, dataset={"source": "digits", "limit": 2})
    assert column(train_in_process(config), "samples") == [2]
    files = digit_data_files()
    assert sorted(files) == ["test", "train", "validation"]
    stamp = (tmp_path / "cache" / "digits" / "train.parquet").stat().st_mtime_ns
    digit_data_files()  # written once, then reused
    assert (tmp_path / "cache" / "digits" / "train.parquet").stat().st_mtime_ns == stamp
