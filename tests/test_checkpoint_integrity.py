"""Checkpoint integrity: nothing in a run directory is unpickled with code execution, every file is checked against
its SHA-256 digest, and a resume skips damaged checkpoints for the newest intact one (bit-exact from there)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from schema_files import write_m3cot_files
from train_runs import checkpoint_weights, final_weights, single_thread, train_in_process, write_config

from ivtlr.checkpoint import (DESCRIPTION_DIGEST_KEY, FORMAT_VERSION, FULL_WEIGHTS_FILE, META_FILE, TRAINING_STATE_DIR,
                              CheckpointError, checkpoint_dirs, latest_checkpoint, load_weights, read_meta,
                              verify_checkpoint)
from ivtlr.loading import load_checkpoint
from ivtlr.modeling import load_components
from ivtlr.training.state import LEGACY_RNG_FILE, LEGACY_SCHEDULER_FILE, RNG_FILE, SCHEDULER_FILE

pytestmark = pytest.mark.usefixtures(single_thread.__name__)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-epoch run (one step per epoch, full weights) keeping all 3 checkpoints: (config, run_dir)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("finished")
    files = write_m3cot_files(root / "data", n_train=2, n_test=1)
    config = write_config(root, files, num_epochs=3, max_latent_stage=2, keep_last=3)
    run_dir = train_in_process(config)
    torch.set_num_threads(threads)
    return config, run_dir


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run, its config, and its final weights: (config, run_dir, weights)."""
    config, run_dir = finished
    copy = shutil.copytree(run_dir, tmp_path / "runs" / run_dir.name)
    return config, copy, _cloned(final_weights(run_dir))


def _cloned(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies, not views of a file a test then damages."""
    return {key: value.clone() for key, value in weights.items()}


def _rerun(config: Path, run_dir: Path) -> Path:
    """``ivtlr train`` again; with IVTLR_DEBUG=1 a refused checkpoint raises here instead of exiting with status 2."""
    with mock.patch.dict(os.environ, {"IVTLR_DEBUG": "1"}):
        return train_in_process(config, f"save_path={run_dir.parent}")


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a), [key for key in a if not torch.equal(a[key], b[key])]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _flip(file: Path) -> None:
    """Invert one byte in the middle: damage that keeps the size."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def _reseal(checkpoint: Path) -> None:
    """Rewrite ``ivtlr.json``'s manifest and digest for the files as they are now, as someone planting a file that
    should pass every integrity check would."""
    data = json.loads((checkpoint / META_FILE).read_text())
    data.pop(DESCRIPTION_DIGEST_KEY, None)
    data["files"] = {str(f.relative_to(checkpoint)): {"size": f.stat().st_size, "sha256": _sha256(f.read_bytes())}
                     for f in sorted(checkpoint.rglob("*")) if f.is_file() and f.name != META_FILE}
    data[DESCRIPTION_DIGEST_KEY] = _sha256(json.dumps(data, sort_keys=True).encode())
    (checkpoint / META_FILE).write_text(json.dumps(data))


class _Payload:
    """Unpickling this creates ``marker``: the stand-in for code a planted pickle would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


# ------------------------------------------------------------------------------------------------ 1: safe loading
def test_training_state_loads_with_weights_only_and_no_allowed_globals(finished):
    for checkpoint in checkpoint_dirs(finished[1] / "checkpoints"):
        for file in (checkpoint / TRAINING_STATE_DIR).iterdir():
            torch.load(file, weights_only=True)


@pytest.mark.parametrize("name", ["optimizer.bin", SCHEDULER_FILE, RNG_FILE.format(0)])
def test_a_planted_pickle_with_a_resealed_manifest_is_refused_without_running(run, tmp_path, name):
    config, run_dir, _ = run
    newest = latest_checkpoint(run_dir / "checkpoints")
    marker = tmp_path / "payload-ran"
    torch.save(_Payload(marker), newest / TRAINING_STATE_DIR / name)
    _reseal(newest)
    assert verify_checkpoint(newest, training_state=True)  # the manifest vouches for it: only safe loading stops it
    with pytest.raises(CheckpointError, match=re.escape(str(newest / TRAINING_STATE_DIR / name))
                       + ".*cannot be loaded safely.*Unsupported global"):
        _rerun(config, run_dir)
    assert not marker.exists()


def test_a_pickle_placed_outside_the_manifest_is_refused_without_running(run, tmp_path):
    config, run_dir, _ = run
    newest = latest_checkpoint(run_dir / "checkpoints")
    planted = newest / TRAINING_STATE_DIR / LEGACY_SCHEDULER_FILE  # what Accelerate unpickles with weights_only=False
    marker = tmp_path / "payload-ran"
    torch.save(_Payload(marker), planted)
    with pytest.raises(CheckpointError, match=re.escape(str(planted)) + " is not in the manifest"):
        _rerun(config, run_dir)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ 2: digests
def test_the_manifest_records_each_file_size_and_sha256(finished):
    checkpoint = latest_checkpoint(finished[1] / "checkpoints")
    description = json.loads((checkpoint / META_FILE).read_text())
    assert description["format_version"] == FORMAT_VERSION == 2
    files = sorted(str(f.relative_to(checkpoint)) for f in checkpoint.rglob("*") if f.is_file() and f.name != META_FILE)
    assert sorted(description["files"]) == files
    for name, entry in description["files"].items():
        data = (checkpoint / name).read_bytes()
        assert entry == {"size": len(data), "sha256": _sha256(data)}


def test_overwritten_weights_of_the_same_size_are_named(run):
    _, run_dir, _ = run
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    weights = checkpoint / FULL_WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # tensor bytes, not the header: safetensors still reads the file
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(str(weights)) + " does not match its SHA-256 digest"):
        load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match=re.escape(str(weights)) + " does not match its SHA-256 digest"):
        load_weights(load_components("tiny:qwen2_vl", image_size=56).model, checkpoint)


def test_an_edited_value_of_the_description_is_named(run):
    _, run_dir, _ = run
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    description = json.loads((checkpoint / META_FILE).read_text())
    description["epoch"] = 1  # still valid JSON, still a plausible value
    (checkpoint / META_FILE).write_text(json.dumps(description, indent=2))
    with pytest.raises(CheckpointError, match=re.escape(str(checkpoint / META_FILE)) + " does not match its own"):
        read_meta(checkpoint)


def _as_format_1(checkpoint: Path) -> None:
    """Rewrite a checkpoint as ivtlr format 1 wrote it: Accelerate's scheduler and RNG files, sizes-only manifest."""
    state = checkpoint / TRAINING_STATE_DIR
    shutil.move(state / SCHEDULER_FILE, state / LEGACY_SCHEDULER_FILE)
    rng = torch.load(state / RNG_FILE.format(0), weights_only=True)
    numpy = rng["numpy"]
    torch.save({"step": 0, "random_state": rng["python"], "torch_manual_seed": rng["torch"],
                "numpy_random_seed": (numpy["name"], numpy["key"].numpy().astype(np.uint32), numpy["position"],
                                      numpy["has_gauss"], numpy["gauss"])}, state / LEGACY_RNG_FILE.format(0))
    (state / RNG_FILE.format(0)).unlink()
    description = json.loads((checkpoint / META_FILE).read_text())
    del description[DESCRIPTION_DIGEST_KEY]
    description["format_version"] = 1
    description["files"] = {str(f.relative_to(checkpoint)): f.stat().st_size for f in sorted(checkpoint.rglob("*"))
                            if f.is_file() and f.name != META_FILE}
    (checkpoint / META_FILE).write_text(json.dumps(description, indent=2))


def test_a_format_1_checkpoint_loads_and_resumes_bit_exactly(run):
    config, run_dir, weights = run
    checkpoints = checkpoint_dirs(run_dir / "checkpoints")
    shutil.rmtree(checkpoints[-1])
    _as_format_1(checkpoints[-2])
    engine, _, meta = load_checkpoint(checkpoints[-2])
    assert meta.format_version == 1 and meta.files[FULL_WEIGHTS_FILE]["size"] > 0
    _rerun(config, run_dir)  # the last epoch again, from the format 1 checkpoint's optimizer, scheduler and RNG
    _assert_equal(final_weights(run_dir), weights)
    assert read_meta(latest_checkpoint(run_dir / "checkpoints")).format_version == FORMAT_VERSION


# ------------------------------------------------------------------------------------------------ 3: fallback
def test_with_no_intact_checkpoint_resuming_is_a_clear_error(run):
    config, run_dir, _ = run
    checkpoints = checkpoint_dirs(run_dir / "checkpoints")
    for checkpoint in checkpoints:
        _flip(checkpoint / FULL_WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume") as error:
        _rerun(config, run_dir)
    assert all(checkpoint.name in str(error.value) for checkpoint in checkpoints)


def test_pruning_keeps_the_new_checkpoint_below_damaged_later_ones(run):
    config, run_dir, weights = run
    first, second, third = checkpoint_dirs(run_dir / "checkpoints")
    _flip(second / FULL_WEIGHTS_FILE)
    _flip(third / FULL_WEIGHTS_FILE)
    # Resumes from the first, saves the second again and prunes with keep_last=1: the damaged third must not be all
    # that is left.
    train_in_process(config, f"save_path={run_dir.parent}", "num_epochs=2", "keep_last=1")
    assert [c.name for c in checkpoint_dirs(run_dir / "checkpoints")] == [second.name, third.name]
    verify_checkpoint(second, training_state=True)
    _rerun(config, run_dir)  # skips the damaged third, continues from the second
    _assert_equal(final_weights(run_dir), weights)


# ------------------------------------------------------------------------------------------------ 6: corruption
def test_every_flipped_file_is_refused_on_load_and_skipped_on_resume(finished, tmp_path, caplog):
    config, source = finished
    reference = _cloned(final_weights(source))
    newest = latest_checkpoint(source / "checkpoints")
    names = sorted(str(f.relative_to(newest)) for f in newest.rglob("*") if f.is_file())
    assert META_FILE in names and sum(name.startswith(TRAINING_STATE_DIR) for name in names) == 3
    for index, name in enumerate(names):
        run_dir = shutil.copytree(source, tmp_path / str(index) / source.name)
        damaged = latest_checkpoint(run_dir / "checkpoints")
        _flip(damaged / name)
        named = re.escape(str(damaged / name))
        with pytest.raises(CheckpointError, match=named):
            verify_checkpoint(damaged, training_state=True)
        if not name.startswith(TRAINING_STATE_DIR):
            with pytest.raises(CheckpointError, match=named):
                load_checkpoint(damaged)
        caplog.clear()
        _rerun(config, run_dir)
        assert f"skipping damaged checkpoint {damaged}" in caplog.text, name
        _assert_equal(checkpoint_weights(damaged), reference)  # the last epoch trained again, bit for bit
        verify_checkpoint(damaged, training_state=True)
