"""``ivtlr train`` end to end: tiny Qwen2-VL (LoRA, M3CoT files) and tiny Chameleon (full weights, ScienceQA files)
through curriculum stages 0..3, then the last checkpoint loaded on its own and used to generate."""
from __future__ import annotations

import pytest
import torch
from schema_files import write_m3cot_files, write_scienceqa_files
from train_runs import checkpoint_weights, metrics, single_thread, train_in_process, write_config

from ivtlr.checkpoint import checkpoint_dirs
from ivtlr.loading import load_checkpoint
from ivtlr.data import build_generation_batch, load_examples
from ivtlr.modeling import load_components

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

CASES = {
    "qwen2_vl": dict(model="tiny:qwen2_vl", schema="m3cot", write=write_m3cot_files, use_lora=True, lr=1e-2),
    "chameleon": dict(model="tiny:chameleon", schema="scienceqa", write=write_scienceqa_files, use_lora=False,
                      lr=1e-3, image_size=32, num_selected_patches=4),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_curriculum_stages_0_to_3_and_the_checkpoint_generates(tmp_path, family):
    case = dict(CASES[family])
    schema, write = case.pop("schema"), case.pop("write")
    files = write(tmp_path / "data", n_train=4, n_test=2)
    config = write_config(tmp_path, files, schema=schema, num_epochs=4, **case)
    run_dir = train_in_process(config)

    records = metrics(run_dir)
    assert [r["stage"] for r in records] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r["latents"] for r in records] == [0, 0, 1, 1, 2, 2, 3, 3]  # one latent step per stage
    assert all(r["samples"] == 2 and r["grad_norm"] > 0 for r in records)
    checkpoints = checkpoint_dirs(run_dir / "checkpoints")
    assert [c.name for c in checkpoints] == [f"checkpoint-{s:08d}" for s in (2, 4, 6, 8)]  # one per stage end

    engine, components, meta = load_checkpoint(checkpoints[-1])
    assert (meta.stage, meta.n_latent, meta.step, meta.weights) == (3, 3, 8, "lora" if case["use_lora"] else "full")
    assert engine.num_selected_patches == (case.get("num_selected_patches") or 2)
    # The loaded model carries the trained tensors, which differ from the untrained base.
    saved = checkpoint_weights(checkpoints[-1])
    loaded = {name: p for name, p in engine.base_model.named_parameters()}
    if case["use_lora"]:
        lora_b = [name for name in saved if "lora_B" in name]
        assert lora_b and all(float(saved[name].abs().max()) > 0 for name in lora_b)  # LoRA B starts at zero
        for name in lora_b:
            assert torch.equal(loaded[name.replace(".weight", ".default.weight")], saved[name])
    else:
        base = load_components(meta.base_model, image_size=meta.image_size).model.state_dict()
        for name, tensor in saved.items():
            assert torch.equal(loaded[name], tensor)
        assert any(not torch.equal(base[name], tensor) for name, tensor in saved.items())

    test = load_examples(schema, "test", data_files={"test": str(files["test"])})
    batch = build_generation_batch(components.processor, list(test), meta.n_latent, components.latent_token_id,
                                   image_size=meta.image_size)
    out = engine.generate(**batch, max_new_tokens=6, return_dict=True)
    assert out.sequences.shape[0] == 2 and 1 <= out.sequences.shape[1] <= 6
    assert [len(steps) for steps in out.selected] == [3, 3]  # the chain ran meta.n_latent steps per question
    assert all(isinstance(text, str) for text in components.tokenizer.batch_decode(out.sequences))
