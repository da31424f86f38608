"""`IVTLR.from_original` on state dicts that do not fit: clear errors, vocabulary resizing."""
from __future__ import annotations

import pytest
import torch

from ivtlr import IVTLR
from ivtlr.original import OriginalCheckpointError
from test_original_fixtures import FIXTURES

QWEN = FIXTURES / "qwen2vl"


def _state() -> dict:
    return torch.load(QWEN / "ivtlr_state.pth", weights_only=True)


def test_corrupt_state_dict_is_named(tmp_path):
    bad = tmp_path / "ivtlr_state.pth"
    bad.write_bytes((QWEN / "ivtlr_state.pth").read_bytes()[:1000])
    with pytest.raises(OriginalCheckpointError, match="ivtlr_state.pth"):
        IVTLR.from_original(QWEN / "base", bad, num_selected_patches=4, latent_token_id=10)


def test_keys_that_do_not_map_are_listed(tmp_path):
    state = _state()
    state["base_causallm.base_model.model.model.layers.7.self_attn.q_proj.base_layer.weight"] = torch.zeros(64, 64)
    state["some_other_wrapper.weight"] = torch.zeros(1)
    path = tmp_path / "state.pth"
    torch.save(state, path)
    with pytest.raises(OriginalCheckpointError, match="some_other_wrapper.weight"):
        IVTLR.from_original(QWEN / "base", path, num_selected_patches=4, latent_token_id=10)
    del state["some_other_wrapper.weight"]
    torch.save(state, path)
    with pytest.raises(OriginalCheckpointError, match=r"layers\.7\.self_attn\.q_proj"):
        IVTLR.from_original(QWEN / "base", path, num_selected_patches=4, latent_token_id=10)


def test_a_state_dict_that_maps_nothing_or_half_an_adapter_is_an_error(tmp_path):
    """An empty state dict used to evaluate the untrained base model with only an info line."""
    path = tmp_path / "state.pth"
    torch.save({}, path)
    with pytest.raises(OriginalCheckpointError, match="holds no model weights"):
        IVTLR.from_original(QWEN / "base", path, num_selected_patches=4, latent_token_id=10)
    state = _state()
    dropped = next(k for k in state if ".lora_B." in k)
    del state[dropped]
    torch.save(state, path)
    with pytest.raises(OriginalCheckpointError, match="LoRA weights the adapter needs") as error:
        IVTLR.from_original(QWEN / "base", path, num_selected_patches=4, latent_token_id=10)
    assert dropped.split(".lora_B.")[0].split("base_model.model.")[-1] in str(error.value)


def test_embedding_rows_follow_the_state_dict_vocabulary(tmp_path):
    """Released checkpoints were saved after adding tokens: the model is resized to the state dict's rows."""
    state = _state()
    extra = 3
    for key in ("base_causallm.base_model.model.model.embed_tokens.weight",
                "base_causallm.base_model.model.lm_head.weight", "embedding.weight"):
        rows = state[key]
        state[key] = torch.cat([rows, rows[-1:].repeat(extra, 1) + 0.01])
    path = tmp_path / "state.pth"
    torch.save(state, path)
    engine = IVTLR.from_original(QWEN / "base", path, num_selected_patches=4, latent_token_id=10, eos_token_id=2)
    embeddings = engine.base_model.get_input_embeddings().weight
    assert embeddings.shape[0] == 64 + extra
    assert torch.equal(embeddings[-extra:], state["embedding.weight"][-extra:])
    cases = torch.load(QWEN / "cases.pt", weights_only=True)
    case = cases["cases"]["n_latent_1"]
    with torch.no_grad():
        out = engine(input_ids=case["input_ids"], attention_mask=case["attention_mask"],
                     pixel_values=case["pixel_values"], image_grid_thw=case["image_grid_thw"])
    assert out.logits.shape[-1] == 64 + extra
    assert (out.logits[..., :64] - case["final_logits"]).abs().max() < 1e-4


def test_missing_token_ids_get_a_clear_error(tmp_path):
    (tmp_path / "state.pth").write_bytes((QWEN / "ivtlr_state.pth").read_bytes())
    with pytest.raises(ValueError, match="latent_token_id"):
        IVTLR.from_original(QWEN / "base", tmp_path / "state.pth", num_selected_patches=4)
