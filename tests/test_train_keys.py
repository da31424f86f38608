"""Every key of the original IVT-LR YAML changes what a training run does, observed in its outputs
(metrics.jsonl, checkpoint weights and files), not in the parsed config."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file
from schema_files import m3cot_rows, write_m3cot_files, write_rows
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_runs import column, final_weights, max_difference, metrics, single_thread, train_in_process, write_config

from ivtlr.checkpoint import FULL_WEIGHTS_FILE, checkpoint_dirs, latest_checkpoint
from ivtlr.modeling import load_components
from ivtlr.training.datasets import epoch_order

pytestmark = pytest.mark.usefixtures(single_thread.__name__)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two training questions: one optimizer step per epoch at batch 2."""
    return write_m3cot_files(tmp_path_factory.mktemp("two"), n_train=2, n_test=1)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return write_m3cot_files(tmp_path_factory.mktemp("four"), n_train=4, n_test=1)


def test_save_path_and_name_choose_the_run_directory(tmp_path, two):
    config = write_config(tmp_path, two, save_path=str(tmp_path / "elsewhere"), name="my-run")
    run_dir = train_in_process(config)
    assert run_dir == tmp_path / "elsewhere" / "my-run"
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "config.yaml").is_file()
    assert [c.name for c in checkpoint_dirs(run_dir / "checkpoints")] == ["checkpoint-00000001"]
    assert not (tmp_path / "runs").exists()


def test_epochs_per_stage_sets_the_latents_of_each_epoch(tmp_path, two):
    one = train_in_process(write_config(tmp_path, two, num_epochs=4, epochs_per_stage=1, name="one"))
    two_per_stage = train_in_process(write_config(tmp_path, two, num_epochs=4, epochs_per_stage=2, name="two"))
    assert column(one, "latents") == [0, 1, 2, 3]
    assert column(two_per_stage, "latents") == [0, 0, 1, 1]
    assert column(two_per_stage, "stage") == [0, 0, 1, 1]


def test_max_latent_stage_caps_the_latents(tmp_path, two):
    run_dir = train_in_process(write_config(tmp_path, two, num_epochs=4, max_latent_stage=1))
    assert column(run_dir, "stage") == [0, 1, 2, 3]
    assert column(run_dir, "latents") == [0, 1, 1, 1]


@pytest.mark.parametrize("pad, expected", [(True, 2.0), (False, 1.0)])
def test_pad_latent_to_max_fills_short_rationales_past_the_last_stage(tmp_path, pad, expected):
    rows = m3cot_rows("train", 2)
    for row in rows:
        row["rationale"] = "The digit has one closed loop."  # a single reasoning step
    files = {"train": write_rows(tmp_path / "data", "train", rows, "m3cot")}
    # resume=3 starts at epoch 3 (stage 3 > max_latent_stage 2): every step is removed.
    config = write_config(tmp_path, files, num_epochs=4, max_latent_stage=2, resume=3, pad_latent_to_max=pad)
    assert column(train_in_process(config), "latents") == [expected]


def test_resume_starts_at_that_epoch_from_the_checkpoint_of_the_epoch_before(tmp_path, two):
    config = write_config(tmp_path, two, num_epochs=3, lr=1e-2)
    run_dir = train_in_process(config)
    uninterrupted = final_weights(run_dir)
    (run_dir / "metrics.jsonl").unlink()
    train_in_process(config, "resume=1")
    assert column(run_dir, "epoch") == [1, 2]
    assert column(run_dir, "step") == [2, 3]  # continues the step count of the epoch-0 checkpoint
    assert max_difference(final_weights(run_dir), uninterrupted) == 0.0


def test_resume_without_a_checkpoint_starts_that_epoch_from_the_base_model(tmp_path, two):
    run_dir = train_in_process(write_config(tmp_path, two, num_epochs=3, resume=2))
    assert column(run_dir, "epoch") == [2] and column(run_dir, "latents") == [2]


def test_load_model_path_gives_the_initial_weights(tmp_path, two):
    source = train_in_process(write_config(tmp_path, two, lr=1e-2, name="source"))
    checkpoint = latest_checkpoint(source / "checkpoints")
    # lr=0: the run only carries its initial weights, which must be the loaded ones.
    run_dir = train_in_process(write_config(tmp_path, two, lr=0.0, name="target", load_model_path=str(checkpoint)))
    assert max_difference(final_weights(run_dir), final_weights(source)) == 0.0
    base = load_components("tiny:qwen2_vl", image_size=56).model.state_dict()
    assert max_difference(final_weights(run_dir), {k: base[k] for k in final_weights(run_dir)}) > 0


def test_seed_changes_initialisation_and_order_and_repeats_exactly(tmp_path, two):
    losses = {name: column(train_in_process(write_config(tmp_path, two, seed=seed, name=name)), "loss")
              for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    assert losses["a"] == losses["b"]
    assert losses["a"] != losses["c"]
    assert epoch_order(16, 0, 0) != epoch_order(16, 1, 0) and epoch_order(16, 0, 0) != epoch_order(16, 0, 1)
    assert sorted(epoch_order(16, 1, 0)) == list(range(16))


@pytest.mark.parametrize("bf16, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_bf16_trains_and_saves_bfloat16_weights(tmp_path, two, bf16, dtype):
    run_dir = train_in_process(write_config(tmp_path, two, bf16=bf16))
    weights = load_file(str(latest_checkpoint(run_dir / "checkpoints") / FULL_WEIGHTS_FILE))
    assert {tensor.dtype for tensor in weights.values()} == {dtype}
    assert torch.isfinite(torch.tensor(column(run_dir, "loss"))).all()


@pytest.mark.parametrize("batch_size, steps", [(1, 4), (2, 2), (4, 1)])
def test_batch_size_training_sets_the_batches_per_epoch(tmp_path, four, batch_size, steps):
    run_dir = train_in_process(write_config(tmp_path, four, batch_size_training=batch_size))
    assert column(run_dir, "samples") == [batch_size] * steps


@pytest.mark.parametrize("accumulation, samples", [(1, [1, 1, 1, 1]), (2, [2, 2]), (3, [3, 1])])
def test_gradient_accumulation_steps_sets_the_optimizer_steps(tmp_path, four, accumulation, samples):
    config = write_config(tmp_path, four, batch_size_training=1, gradient_accumulation_steps=accumulation)
    assert column(train_in_process(config), "samples") == samples


def test_gradient_accumulation_matches_one_larger_batch(tmp_path, four):
    """Two micro-batches of 2 accumulated give the update of one batch of 4 (the loss is the token mean of the
    whole window, not a mean of micro-batch means)."""
    accumulated = train_in_process(write_config(tmp_path, four, num_epochs=2, gradient_accumulation_steps=2,
                                                name="accumulated"))
    large = train_in_process(write_config(tmp_path, four, num_epochs=2, batch_size_training=4, name="large"))
    assert column(accumulated, "loss") == pytest.approx(column(large, "loss"), rel=1e-5)
    assert column(accumulated, "grad_norm") == pytest.approx(column(large, "grad_norm"), rel=1e-4)
    # Adam turns rounding-level gradient differences into at most ~lr-sized steps on near-zero gradients.
    assert max_difference(final_weights(accumulated), final_weights(large)) < 1e-4


def test_num_epochs_sets_the_epochs_trained(tmp_path, two):
    run_dir = train_in_process(write_config(tmp_path, two, num_epochs=3))
    assert column(run_dir, "epoch") == [0, 1, 2]
    assert latest_checkpoint(run_dir / "checkpoints").name == "checkpoint-00000003"


def test_lr_scales_the_first_update(tmp_path, two):
    """LoRA's B matrices start at zero and Adam's first step moves each weight by about lr, so the trained B
    norms are proportional to lr."""
    norms = {}
    for lr in (1e-3, 1e-2):
        run_dir = train_in_process(write_config(tmp_path, two, use_lora=True, lr=lr, name=f"lr{lr}"))
        weights = final_weights(run_dir)
        norms[lr] = torch.stack([weights[k].norm() for k in sorted(weights) if "lora_B" in k])
        assert column(run_dir, "lr") == [lr]
    assert torch.allclose(norms[1e-2] / norms[1e-3], torch.tensor(10.0), rtol=1e-3)


def test_debug_trains_a_small_subset_and_saves_nothing(tmp_path, four):
    run_dir = train_in_process(write_config(tmp_path, four, batch_size_training=1, num_epochs=2, debug=True,
                                            log_with=["jsonl", "tensorboard"]))
    assert column(run_dir, "samples") == [1, 1, 1, 1]  # 2 steps x 1 sample per epoch instead of 4
    assert not checkpoint_dirs(run_dir / "checkpoints")
    assert not (run_dir / "ivtlr").exists()  # no tracker


def test_project_names_the_tensorboard_directory(tmp_path, two):
    run_dir = train_in_process(write_config(tmp_path, two, num_epochs=2, project="my-project",
                                            log_with=["jsonl", "tensorboard"]))
    events = EventAccumulator(str(run_dir / "my-project"))
    events.Reload()
    assert [event.value for event in events.Scalars("loss")] == pytest.approx(column(run_dir, "loss"))
    assert [event.step for event in events.Scalars("loss")] == column(run_dir, "step")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_a_clear_error(tmp_path, two):
    config = write_config(tmp_path, two, log_with=["jsonl", "wandb"])
    with pytest.raises(ImportError, match=r"pip install 'ivtlr\[wandb\]'"):
        train_in_process(config)


def test_metrics_record_every_field(tmp_path, two):
    (record,) = metrics(train_in_process(write_config(tmp_path, two)))
    assert set(record) == {"step", "epoch", "stage", "loss", "lr", "grad_norm", "samples", "latents",
                           "samples_per_s"}
