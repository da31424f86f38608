"""Checkpoints: complete or invisible, pruned to ``keep_last``, loadable without the training config, and damaged
files reported by name."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from schema_files import write_m3cot_files
from train_runs import checkpoint_weights, single_thread, train_in_process, write_config

from ivtlr.checkpoint import (ADAPTER_FILE, FULL_WEIGHTS_FILE, META_FILE, CheckpointError, checkpoint_dirs,
                              clean_temporary_dirs, latest_checkpoint, load_weights, read_meta)
from ivtlr.loading import load_checkpoint
from ivtlr.data import build_generation_batch, load_examples
from ivtlr.modeling import apply_lora, load_components

pytestmark = pytest.mark.usefixtures(single_thread.__name__)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-epoch run (one step per epoch) that kept its last 2 checkpoints; returns (config, run_dir)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    files = write_m3cot_files(root / "data", n_train=2, n_test=2)
    config = write_config(root, files, num_epochs=4, max_latent_stage=2, keep_last=2, patch_order="score",
                          num_selected_patches=3)
    run_dir = train_in_process(config)
    torch.set_num_threads(threads)
    return config, run_dir, files


@pytest.fixture
def copy(trained, tmp_path):
    """A copy of the newest checkpoint, alone in a fresh directory (no run directory, no config)."""
    return shutil.copytree(latest_checkpoint(trained[1] / "checkpoints"), tmp_path / "moved")


def test_keep_last_keeps_the_newest(trained):
    assert [c.name for c in checkpoint_dirs(trained[1] / "checkpoints")] == ["checkpoint-00000003",
                                                                             "checkpoint-00000004"]


def test_checkpoint_dirs_sort_by_step_and_skip_unfinished_ones(tmp_path):
    for name in ("checkpoint-00000010", "checkpoint-00000009", ".tmp-checkpoint-00000011", "checkpoint-x"):
        (tmp_path / name).mkdir()
    assert [c.name for c in checkpoint_dirs(tmp_path)] == ["checkpoint-00000009", "checkpoint-00000010"]
    clean_temporary_dirs(tmp_path)
    assert not (tmp_path / ".tmp-checkpoint-00000011").exists() and (tmp_path / "checkpoint-00000010").exists()


def test_loads_without_the_training_config_and_generates(trained, copy):
    _, run_dir, files = trained
    engine, components, meta = load_checkpoint(copy)
    assert (meta.num_selected_patches, meta.n_latent, meta.stage, meta.patch_order, meta.image_size) == \
        (3, 2, 3, "score", 56)
    assert (engine.num_selected_patches, engine.patch_order, engine.positions) == (3, "score", "original")
    assert not engine.training
    params = dict(engine.base_model.named_parameters())
    assert all(torch.equal(params[name], tensor) for name, tensor in checkpoint_weights(copy).items())
    examples = list(load_examples("m3cot", "test", data_files={"test": str(files["test"])}))
    batch = build_generation_batch(components.processor, examples, meta.n_latent, components.latent_token_id,
                                   image_size=meta.image_size)
    moved = engine.generate(**batch, max_new_tokens=5)
    original, _, _ = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    assert torch.equal(moved, original.generate(**batch, max_new_tokens=5))


def test_a_truncated_file_is_named(copy):
    weights = copy / FULL_WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{weights}.*truncated"):
        load_checkpoint(copy)


def test_a_damaged_file_of_the_right_size_is_named(copy):
    weights = copy / FULL_WEIGHTS_FILE
    weights.write_bytes(b"\0" * weights.stat().st_size)
    model = load_components("tiny:qwen2_vl", image_size=56).model
    with pytest.raises(CheckpointError, match=f"{weights} does not match its SHA-256 digest"):
        load_weights(model, copy)


@pytest.mark.parametrize("damage", ["missing", "not json"])
def test_a_missing_or_invalid_description_is_named(copy, damage):
    meta = copy / META_FILE
    if damage == "missing":
        meta.unlink()
    else:
        meta.write_text("{not json")
    with pytest.raises(CheckpointError, match=str(meta)):
        load_checkpoint(copy)


def test_a_missing_file_is_named(copy):
    (copy / "training_state" / "optimizer.bin").unlink()
    with pytest.raises(CheckpointError, match="optimizer.bin is missing"):
        read_meta(copy)


def test_full_weights_do_not_load_into_a_lora_model(copy, tmp_path):
    components = load_components("tiny:qwen2_vl", image_size=56)
    lora = apply_lora(components.model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj"],
                      trainable_token_ids=[components.latent_token_id])
    with pytest.raises(CheckpointError, match="holds full weights but the model is LoRA-wrapped"):
        load_weights(lora, copy)
    description = json.loads((copy / META_FILE).read_text())
    assert description["weights"] == "full" and not (copy / ADAPTER_FILE).exists()


def test_rerunning_over_a_damaged_newest_checkpoint_resumes_from_the_one_before(trained, tmp_path, caplog):
    config, run_dir, _ = trained
    moved_run = shutil.copytree(run_dir, tmp_path / "runs" / "run")
    newest = latest_checkpoint(moved_run / "checkpoints")
    before = {key: value.clone() for key, value in checkpoint_weights(newest).items()}  # not views of the file
    (newest / FULL_WEIGHTS_FILE).write_bytes(b"")
    train_in_process(config, f"save_path={tmp_path / 'runs'}", "num_epochs=5")
    assert f"skipping damaged checkpoint {newest}" in caplog.text and str(newest / FULL_WEIGHTS_FILE) in caplog.text
    # Epoch 3 trained again from checkpoint 3 gives checkpoint 4 back, bit for bit; then epoch 4.
    assert [c.name for c in checkpoint_dirs(moved_run / "checkpoints")] == ["checkpoint-00000004",
                                                                            "checkpoint-00000005"]
    again = checkpoint_weights(newest)
    assert before.keys() == again.keys() and all(torch.equal(before[k], again[k]) for k in before)
