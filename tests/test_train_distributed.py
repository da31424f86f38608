"""Multi-process training under ``accelerate launch`` with the shipped configs.

DDP runs here on two CPU processes (gloo). Accelerate enables FSDP and DeepSpeed only for GPU backends, so those
launches need two GPUs (and DeepSpeed installed); the FSDP layer-wrapping choice is checked on any machine, and
test_train_fsdp_cpu.py runs the engine sharded over two CPU processes.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from schema_files import write_m3cot_files, write_scienceqa_files
from train_runs import (accelerate_command, column, final_weights, max_difference, run_subprocess, single_thread,
                        train_in_process, write_config)

from ivtlr.checkpoint import latest_checkpoint
from ivtlr.loading import load_checkpoint
from ivtlr.modeling import build_engine, load_components
from ivtlr.testing.tiny import FAMILIES
from ivtlr.training.model import fsdp_wrap_classes

pytestmark = pytest.mark.usefixtures(single_thread.__name__)
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP / DeepSpeed launches need two GPUs")


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    # 6 questions, global batch 4: the last batch of each epoch is short (2 questions, one per process).
    files = write_m3cot_files(tmp_path / "data", n_train=6, n_test=1)
    config = write_config(tmp_path, files, num_epochs=2, batch_size_training=4, name="single")
    single = train_in_process(config)
    run_subprocess(accelerate_command("cpu_ddp.yaml", config, "name=ddp", "batch_size_training=2"))
    ddp = tmp_path / "runs" / "ddp"
    assert column(ddp, "samples") == column(single, "samples") == [4, 2, 4, 2]
    assert column(ddp, "latents") == [0, 0, 1, 1]
    assert column(ddp, "loss") == pytest.approx(column(single, "loss"), rel=1e-4)
    assert max_difference(final_weights(ddp), final_weights(single)) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_wraps_every_decoder_layer_and_the_model_own_blocks(family):
    """What ivtlr promises for FSDP: with the classes `fsdp_wrap_classes` names (the trainer passes them when the
    launch config names none), every decoder layer the backbone runs and every block the model itself marks
    unsplittable gets its own shard, and nothing else does. Checked through accelerate's own policy, against the
    modules picked out here from the model's declared `_no_split_modules` and the decoder's layer list."""
    components = load_components(f"tiny:{family}")
    engine = build_engine(components)
    names = fsdp_wrap_classes(components.model)
    built = {type(module).__name__ for module in engine.modules()}
    assert set(names) <= built, f"names a class the model does not build: {set(names) - built}"
    layers = list(engine.backbone.decoder().layers)
    unsplittable = set(components.model._no_split_modules) | {type(layer).__name__ for layer in layers}
    expected = [module for module in engine.modules() if type(module).__name__ in unsplittable]

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=names)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, engine)
    wrapped = [module for module in engine.modules() if policy(module)]
    assert [id(module) for module in wrapped] == [id(module) for module in expected]
    assert all(any(layer is module for module in wrapped) for layer in layers)
    # The engine the trainer prepares is no transformers model: a launch config naming no classes (the shipped
    # fsdp.yaml, test_config) would find no `_no_split_modules` on it and shard nothing layer by layer.
    assert not getattr(engine, "_no_split_modules", None)


@TWO_GPUS
@pytest.mark.parametrize("family", ["qwen2_vl", "chameleon"])
def test_two_process_fsdp_trains_and_saves_a_loadable_checkpoint(tmp_path, family):
    files = write_scienceqa_files(tmp_path / "data", n_train=4, n_test=1)
    config = write_config(tmp_path, files, schema="scienceqa", model=f"tiny:{family}", num_epochs=2,
                          image_size=56 if family == "qwen2_vl" else 32, use_lora=True)
    run_subprocess(accelerate_command("fsdp.yaml", config))
    run_dir = tmp_path / "runs" / "run"
    _, _, meta = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    assert meta.step == len(column(run_dir, "step")) and meta.weights == "lora"


@TWO_GPUS
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_two_process_deepspeed_zero2_trains(tmp_path):
    files = write_m3cot_files(tmp_path / "data", n_train=4, n_test=1)
    config = write_config(tmp_path, files, num_epochs=2, use_lora=True, bf16=True)
    run_subprocess(accelerate_command("deepspeed_zero2.yaml", config))
    assert latest_checkpoint(tmp_path / "runs" / "run" / "checkpoints") is not None
