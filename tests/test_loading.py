"""``ivtlr.load``, the one door to a model: each kind of source gives the model the specific loader gives, with its
latent token id and the settings it was trained with; a source it cannot use is refused in one clear error."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import ivtlr
from fixture_processor import QWEN_FIXTURE, base_with_processor
from ivtlr import IVTLR
from ivtlr.checkpoint import latest_checkpoint, read_meta
from ivtlr.data import Example, build_generation_batch
from ivtlr.loading import ModelLoadError, load_checkpoint
from ivtlr.testing import build_tiny, make_test_image
from schema_files import write_m3cot_files
from train_runs import train_in_process, write_config


def _batch(processor, latent_token_id: int, n_latent: int = 2, image_size: int = 56) -> dict:
    example = Example("q", make_test_image((image_size, image_size)), "Which digit?", ["one", "two"], "A", "")
    return build_generation_batch(processor, [example], n_latent, latent_token_id, image_size=image_size)


def _logits(engine: IVTLR, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return engine(**batch).logits


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    files = write_m3cot_files(root / "data", n_train=4, n_test=1)
    return latest_checkpoint(train_in_process(write_config(root, files, num_epochs=2)) / "checkpoints")


def test_a_checkpoint_loads_as_the_checkpoint_loader_builds_it(trained_checkpoint):
    loaded = ivtlr.load(trained_checkpoint, device="cpu")
    engine, components, meta = load_checkpoint(trained_checkpoint)
    assert loaded.latent_token_id == meta.latent_token_id == components.tokenizer.convert_tokens_to_ids("<|latent|>")
    expected_settings = {k: v for k, v in dataclasses.asdict(read_meta(trained_checkpoint)).items() if k != "files"}
    assert loaded.settings == expected_settings
    assert (loaded.mode, loaded.trained_n_latent, loaded.image_size) == (meta.mode, meta.n_latent, meta.image_size)
    batch = _batch(components.processor, meta.latent_token_id, meta.n_latent, meta.image_size)
    torch.testing.assert_close(_logits(loaded.engine, batch), _logits(engine, batch), rtol=0, atol=0)
    assert not loaded.engine.training


def test_a_checkpoint_refuses_settings_it_records_itself(trained_checkpoint):
    with pytest.raises(ModelLoadError, match="records mode, num_selected_patches itself"):
        ivtlr.load(trained_checkpoint, mode="cot", num_selected_patches=2)


def test_an_original_state_dict_loads_as_from_original_builds_it(tmp_path):
    base = base_with_processor(tmp_path / "base")
    state = QWEN_FIXTURE / "ivtlr_state.pth"
    loaded = ivtlr.load(state, base=base, num_selected_patches=4, image_size=112, device="cpu")
    reference = IVTLR.from_original(base, state, num_selected_patches=4, tokenizer=loaded.tokenizer,
                                    attn_implementation="sdpa")
    assert loaded.latent_token_id == reference.latent_token_id
    assert loaded.settings == {"mode": "ivtlr", "num_selected_patches": 4, "image_size": 112,
                               "base_model": str(base)}
    batch = _batch(loaded.processor, loaded.latent_token_id, image_size=112)
    torch.testing.assert_close(_logits(loaded.engine, batch), _logits(reference.eval(), batch), rtol=0, atol=0)


def test_a_model_name_loads_the_base_with_latent_tokens():
    loaded = ivtlr.load("tiny:qwen2_vl", image_size=56, mode="ivtlr", num_selected_patches=3, positions="mrope")
    bundle = build_tiny("qwen2_vl", image_size=56)
    assert loaded.latent_token_id == loaded.tokenizer.convert_tokens_to_ids("<|latent|>")
    assert loaded.engine.num_selected_patches == 3 and loaded.engine.positions == "mrope"
    assert loaded.settings["positions"] == "mrope" and loaded.trained_n_latent is None
    shared = set(bundle.model.state_dict()) & set(loaded.engine.base_model.state_dict())
    assert shared and all(torch.equal(bundle.model.state_dict()[k], loaded.engine.base_model.state_dict()[k])
                          for k in shared if "embed_tokens" not in k and "lm_head" not in k)


def test_a_file_without_its_base_is_refused(tmp_path):
    state = tmp_path / "weights.pth"
    state.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="needs base="):
        ivtlr.load(state)
