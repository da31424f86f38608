"""The engine under FSDP2 on two CPU processes, sharded with the trainer's layer choice (``fsdp_wrap_classes``).

Accelerate turns FSDP on for GPU backends only, so ``accelerate launch`` with fsdp.yaml cannot run here; this test
shards with ``torch.distributed.fsdp.fully_shard`` directly (what Accelerate's FSDP2 path calls) and checks that
one sharded LoRA step over the latent chain equals the same step taken by one unsharded process.
Run as a script, this file is the per-process worker (``torchrun --nproc_per_node 2 <this file> ...``).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from schema_files import write_m3cot_files
from train_runs import subprocess_env

from ivtlr.data import Curriculum, CurriculumDataset, IVTLRCollator, load_examples
from ivtlr.method.engine import IVTLR
from ivtlr.modeling import Components, apply_lora, build_engine, load_components
from ivtlr.training.model import fsdp_wrap_classes

IMAGE_SIZE = {"qwen2_vl": 56, "chameleon": 32}
STAGE = 2  # two latent steps: the decoder layers run several times per forward
LR = 1e-2


def _engine(family: str) -> tuple[Components, IVTLR]:
    components = load_components(f"tiny:{family}", image_size=IMAGE_SIZE[family])
    torch.manual_seed(0)  # LoRA's A matrices
    components.model = apply_lora(components.model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                  trainable_token_ids=[components.latent_token_id])
    return components, build_engine(components, num_selected_patches=2).train()


def _half_batches(components: Components, data_file: str, family: str) -> list[dict]:
    """Four questions at STAGE, split in two micro-batches of two (one per process)."""
    dataset = CurriculumDataset(load_examples("m3cot", "train", data_files={"train": data_file}),
                                Curriculum(epochs_per_stage=1, max_latent_stage=3), epoch=STAGE)
    collate = IVTLRCollator(components.processor, components.latent_token_id, image_size=IMAGE_SIZE[family])
    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw")
    return [{k: v for k, v in collate([dataset[i], dataset[i + 1]]).items() if k in keys} for i in (0, 2)]


def _trainable(engine: IVTLR) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in engine.named_parameters() if p.requires_grad}


def _worker(family: str, data_file: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    components, engine = _engine(family)
    names = set(fsdp_wrap_classes(components.model))
    for module in [m for m in engine.modules() if type(m).__name__ in names]:
        fully_shard(module, mesh=mesh)
    fully_shard(engine, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in engine.parameters() if p.requires_grad], lr=LR)
    batch = _half_batches(components, data_file, family)[dist.get_rank()]
    engine(**batch).loss.backward()  # FSDP averages the two processes' gradients
    optimizer.step()
    weights = _trainable(engine)
    if dist.get_rank() == 0:
        torch.save(weights, out)
    dist.destroy_process_group()


# Qwen2-VL shards both decoder layers and vision blocks; Chameleon's layer choice is checked in
# test_train_distributed.py (a launch costs ~20 s of process start-up here).
@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_a_sharded_step_equals_the_unsharded_step(tmp_path, family):
    data_file = str(write_m3cot_files(tmp_path / "data", n_train=4, n_test=1)["train"])
    out = tmp_path / "sharded.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__)), family, data_file, str(out)]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    components, engine = _engine(family)
    optimizer = torch.optim.AdamW([p for p in engine.parameters() if p.requires_grad], lr=LR)
    for batch in _half_batches(components, data_file, family):
        (engine(**batch).loss / 2).backward()
    optimizer.step()
    sharded, reference = torch.load(out), _trainable(engine)
    assert sharded.keys() == reference.keys()
    assert max(float((sharded[k] - reference[k]).abs().max()) for k in reference) < 1e-5
    assert any(float(reference[k].abs().max()) > 0 for k in reference if "lora_B" in k)  # the step moved weights


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
