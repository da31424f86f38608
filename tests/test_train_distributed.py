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

from ivtlr.checkpoint import latest_checkpoint, load_checkpoint
from ivtlr.modeling import build_engine, load_components
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


@pytest.mark.parametrize("family, absent", [("qwen2_vl", set()), ("chameleon", {"ChameleonSwinDecoderLayer"})])
def test_fsdp_wraps_the_decoder_layers_and_the_model_own_blocks(family, absent):
    components = load_components(f"tiny:{family}")
    engine = build_engine(components)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=fsdp_wrap_classes(components.model))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, engine)
    wrapped = [module for module in engine.modules() if policy(module)]
    assert all(any(layer is module for module in wrapped) for layer in engine.backbone.decoder().layers)
    assert {type(module).__name__ for module in wrapped} == set(components.model._no_split_modules) - absent
    # What the shipped fsdp.yaml alone would do: fall back to the wrapped module's `_no_split_modules`. The engine
    # has none (nothing would be sharded layer by layer) and Chameleon's names a class its models do not build.
    default = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    assert not any(fsdp2_prepare_auto_wrap_policy(default, engine)(module) for module in engine.modules())
    if absent:
        with pytest.raises(ValueError, match=next(iter(absent))):
            fsdp2_prepare_auto_wrap_policy(default, components.model)


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
