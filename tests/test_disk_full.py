"""A full disk is one clear line (exit 2) saying to free space and rerun, and leaves nothing half-written behind:
training and evaluation write onto a small tmpfs (skipped where this process may not mount one)."""
from __future__ import annotations

import subprocess

import pytest

from ivtlr.checkpoint import checkpoint_dirs
from schema_files import write_m3cot_files
from test_eval import TINY, write_config
from train_runs import subprocess_env, train_command
from train_runs import write_config as write_training_config


@pytest.fixture
def small_disk(tmp_path):
    """A folder on its own tmpfs of 16 KiB."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_training_on_a_full_disk_says_so_and_leaves_no_partial_checkpoint(tmp_path, small_disk):
    files = write_m3cot_files(tmp_path / "data", n_train=2, n_test=1)
    config = write_training_config(tmp_path, files, max_latent_stage=1, save_path=str(small_disk / "runs"))
    result = subprocess.run(train_command(config), capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    (error,) = [line for line in result.stderr.splitlines() if "ivtlr train: error:" in line]
    assert "error: no space left on the device" in error and "rerun the same command" in error
    assert "Traceback" not in result.stderr
    checkpoints = small_disk / "runs" / "run" / "checkpoints"
    leftovers = [p.name for p in checkpoints.iterdir()] if checkpoints.exists() else []
    assert leftovers == [p.name for p in checkpoint_dirs(checkpoints)]  # no hidden half-written directory


def test_evaluation_on_a_full_disk_says_so(tmp_path, small_disk, capsys):
    from ivtlr.cli import main

    files = write_m3cot_files(tmp_path / "data", n_train=1, n_test=3)
    config = write_config(tmp_path, files, **TINY)
    (small_disk / "filler").write_bytes(b"x" * 12 * 1024)  # one 4 KiB page left: the provenance record fits
    assert main(["eval", str(config), "--out", str(small_disk / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: no space left on the device of" in err and "rerun the same command" in err
