"""The cached latent chain against independent computations: the recompute path and a batch of one."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from engine_inputs import SampleSpec, make_batch
from ivtlr import IVTLR
from ivtlr.backbones import get_backbone
from ivtlr.testing import FAMILIES, build_tiny

QUESTION = "Which digit is written in the top left corner of this image?"


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ("sdpa", "eager")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def bundle(request):
    family, attn = request.param
    return build_tiny(family, attn_implementation=attn)


def _step(engine: IVTLR, batch: dict, recompute: bool):
    """Forward + backward; returns the output and every parameter's gradient."""
    engine.recompute = recompute
    engine.zero_grad()
    out = engine(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in engine.named_parameters() if p.grad is not None}
    engine.zero_grad()
    return out, grads


def _assert_grads_close(got: dict, want: dict, rel: float = 1e-3):
    """Each gradient within ``rel`` of the reference. A gradient below 1e-5 of the largest one is zero in exact
    arithmetic (a key bias without rotary positions, as in many vision towers, shifts all of a query's scores alike):
    there both sides must be rounding noise of that size."""
    assert got.keys() == want.keys() and want
    floor = 1e-5 * max(float(w.norm()) for w in want.values())
    for name in want:
        scale = float(want[name].norm())
        if scale < floor:
            assert float(got[name].norm()) < 10 * floor, name
            continue
        err = float((got[name] - want[name]).norm()) / scale
        assert err < rel, (name, err)


@pytest.mark.parametrize("latent_grad", ["detach", "full"])
def test_cached_matches_recompute(bundle, latent_grad):
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=4, latent_grad=latent_grad)
    batch = make_batch(bundle, [SampleSpec(QUESTION, n_latent=3)])
    cached, cached_grads = _step(engine, batch, recompute=False)
    ref, ref_grads = _step(engine, batch, recompute=True)
    assert cached.logits.shape == ref.logits.shape
    assert (cached.logits - ref.logits).abs().max() < 1e-4
    assert abs(cached.loss.item() - ref.loss.item()) < 1e-4
    assert [s.tolist() for s in cached.selected[0]] == [s.tolist() for s in ref.selected[0]]
    assert len(cached.selected[0]) == 3 and all(len(s) == 4 for s in cached.selected[0])
    _assert_grads_close(cached_grads, ref_grads)


def test_full_latent_grad_differs_from_detach(bundle):
    """Sanity for the pair above: the two modes give different gradients, so each comparison can fail."""
    batch = make_batch(bundle, [SampleSpec(QUESTION, n_latent=3)])
    _, detach = _step(IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=4), batch, False)
    _, full = _step(IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=4, latent_grad="full"),
                    batch, False)
    assert max(float((detach[n] - full[n]).norm() / full[n].norm().clamp(min=1e-12)) for n in full) > 1e-2


MIXED = [
    SampleSpec("What is in the picture?", 3, image_size=(112, 112), seed=1),
    SampleSpec(QUESTION, 1, answer="Therefore, the answer is A", image_size=(56, 84), seed=2),
    SampleSpec("Count?", 0, image_size=(84, 56), seed=3),
    SampleSpec("What colour is the background here?", 2, image_size=(56, 56), seed=4),
]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("options", [{}, {"positions": "mrope"}], ids=["original", "mrope"])
def test_mixed_batch_equals_batch_of_one(bundle, padding_side, options):
    if options.get("positions") == "mrope" and get_backbone(bundle.model).position_rows == 1:
        pytest.skip("the family has no multimodal rotary positions")
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=3, **options)
    with torch.no_grad():
        out = engine(**make_batch(bundle, MIXED, padding_side))
        for i, spec in enumerate(MIXED):
            alone = engine(**make_batch(bundle, [spec]))
            length = alone.logits.shape[1]
            assert int(out.attention_mask[i].sum()) == length
            assert (out.logits[i, :length] - alone.logits[0]).abs().max() < 1e-4, i
            assert abs(out.loss_per_sample[i].item() - alone.loss.item()) < 1e-4, i
            assert [s.tolist() for s in out.selected[i]] == [s.tolist() for s in alone.selected[0]], i
            assert len(out.selected[i]) == spec.n_latent


def test_full_latent_grad_flows_through_fed_back_hidden_state():
    """Directional derivative of the loss (finite differences, float64) matches `full` autograd, not `detach`.

    The final norm's weight shapes every fed-back hidden state, so with `full` the gradient must include the
    chain; under `detach` it only sees the final pass and misses that part.
    """
    bundle = build_tiny("qwen2_vl", attn_implementation="eager")
    bundle.model.double()
    batch = make_batch(bundle, [SampleSpec(QUESTION, n_latent=3)])
    batch["pixel_values"] = batch["pixel_values"].double()
    param = bundle.model.model.language_model.norm.weight
    direction = torch.randn(param.shape, generator=torch.Generator().manual_seed(0), dtype=param.dtype)
    grads = {}
    for mode in ("full", "detach"):
        engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=4, latent_grad=mode)
        engine.zero_grad()
        out = engine(**batch)
        out.loss.backward()
        grads[mode] = float((param.grad * direction).sum())
        selection = [s.tolist() for s in out.selected[0]]
    eps = 1e-3  # the models' RMSNorm computes in float32, so smaller steps drown in rounding
    losses = []
    with torch.no_grad():
        for sign in (1, -1):
            param.add_(sign * eps * direction)
            out = engine(**batch)
            assert [s.tolist() for s in out.selected[0]] == selection  # same selection: locally differentiable
            losses.append(out.loss.item())
            param.sub_(sign * eps * direction)
    numeric = (losses[0] - losses[1]) / (2 * eps)
    assert abs(grads["full"] - numeric) < 1e-3 * abs(numeric)
    assert abs(grads["detach"] - numeric) > 5e-2 * abs(numeric)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("latent_grad", ["detach", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(family, latent_grad):
    bundle = build_tiny(family)
    batch = make_batch(bundle, [SampleSpec(QUESTION, 3), SampleSpec("Count?", 1, image_size=(84, 56))])
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=4, latent_grad=latent_grad)
    engine.train()
    ref, ref_grads = _step(engine, batch, recompute=False)
    bundle.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert engine._gradient_checkpointing_active()
    out, grads = _step(engine, batch, recompute=False)
    bundle.model.gradient_checkpointing_disable()
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    assert [s.tolist() for s in out.selected[0]] == [s.tolist() for s in ref.selected[0]]
    _assert_grads_close(grads, ref_grads, rel=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_wrapped_model_cached_matches_recompute(family):
    bundle = build_tiny(family)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    model = get_peft_model(bundle.model, config)
    engine = IVTLR(model, bundle.latent_token_id, num_selected_patches=4)
    batch = make_batch(bundle, [SampleSpec(QUESTION, 2), SampleSpec("Count?", 1, seed=5)])
    cached, cached_grads = _step(engine, batch, recompute=False)
    ref, ref_grads = _step(engine, batch, recompute=True)
    assert cached_grads and all("lora_" in n for n in cached_grads)
    assert (cached.logits - ref.logits).abs().max() < 1e-4
    _assert_grads_close(cached_grads, ref_grads)


def test_exhausted_image_takes_what_is_left():
    """16 image tokens, K=6, 3 steps: 6 + 6 + the 4 left, all distinct, and the same as the recompute path."""
    bundle = build_tiny("qwen2_vl")
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=6)
    batch = make_batch(bundle, [SampleSpec(QUESTION, 3)])
    with torch.no_grad():
        out = engine(**batch)
        engine.recompute = True
        ref = engine(**batch)
    sizes = [len(s) for s in out.selected[0]]
    assert sizes == [6, 6, 4]
    assert sorted(torch.cat(out.selected[0]).tolist()) == list(range(16))
    assert [s.tolist() for s in out.selected[0]] == [s.tolist() for s in ref.selected[0]]
    assert (out.logits - ref.logits).abs().max() < 1e-4


@pytest.mark.parametrize("order", ["position", "score"])
def test_patch_order(order):
    bundle = build_tiny("qwen2_vl")
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=5, patch_order=order)
    batch = make_batch(bundle, [SampleSpec(QUESTION, 2)])
    with torch.no_grad():
        out = engine(**batch)
        engine.recompute = True
        ref = engine(**batch)
    for step in out.selected[0]:
        if order == "position":
            assert step.tolist() == sorted(step.tolist())
    assert [s.tolist() for s in out.selected[0]] == [s.tolist() for s in ref.selected[0]]


def test_stage_zero_is_a_plain_forward():
    """No latent token: the same loss and logits as the transformers model's own forward."""
    bundle = build_tiny("qwen2_vl")
    engine = IVTLR(bundle.model, bundle.latent_token_id)
    batch = make_batch(bundle, [SampleSpec(QUESTION, 0)])
    positions = torch.arange(batch["input_ids"].shape[1]).view(1, 1, -1).expand(3, 1, -1)
    with torch.no_grad():
        out = engine(**batch)
        plain = bundle.model(**batch, position_ids=positions)
    assert (out.logits - plain.logits).abs().max() < 1e-5
    assert abs(out.loss.item() - plain.loss.item()) < 1e-5


def test_unknown_model_type_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32))
    with pytest.raises(ValueError, match="unsupported model type.*qwen2_vl.*chameleon"):
        IVTLR(model, latent_token_id=3)


def test_bad_inputs_get_clear_errors():
    bundle = build_tiny("qwen2_vl")
    engine = IVTLR(bundle.model, bundle.latent_token_id)
    batch = make_batch(bundle, [SampleSpec(QUESTION, 2)])
    split = batch["input_ids"].clone()
    first = int((split[0] == bundle.latent_token_id).nonzero()[0])
    split[0, first + 1] = bundle.tokenizer.convert_tokens_to_ids("<|im_end|>")
    split[0, first + 3] = bundle.latent_token_id
    with pytest.raises(ValueError, match="consecutive"):
        engine(**{**batch, "input_ids": split})
    with pytest.raises(ValueError, match="pixel_values"):
        engine(**{k: v for k, v in batch.items() if k != "pixel_values"})
    with pytest.raises(ValueError, match="latent_grad"):
        IVTLR(bundle.model, bundle.latent_token_id, latent_grad="sometimes")
    with pytest.raises(ValueError, match="mrope"):
        IVTLR(build_tiny("chameleon").model, 3, positions="mrope")


def test_ablations_latent_text_only_and_latent_vision_only():
    """K=0 inserts no patches (Coconut); latent_text=False keeps the latent token's embedding in the slot."""
    bundle = build_tiny("qwen2_vl")
    batch = make_batch(bundle, [SampleSpec(QUESTION, 2)])
    with torch.no_grad():
        text_only = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=0)(**batch)
        vision_only = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=4, latent_text=False)(**batch)
        full = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=4)(**batch)
    prompt_and_rest = batch["attention_mask"].sum().item()
    assert text_only.logits.shape[1] == prompt_and_rest and all(len(s) == 0 for s in text_only.selected[0])
    latent_row = bundle.model.get_input_embeddings().weight[bundle.latent_token_id]
    for pos in vision_only.latent_positions[0]:
        assert torch.equal(vision_only.inputs_embeds[0, pos], latent_row)
        assert not torch.equal(full.inputs_embeds[0, pos], latent_row)
    assert [len(s) for s in vision_only.selected[0]] == [4, 4]


def test_the_recompute_reference_leaves_the_models_attention_as_it_was(bundle):
    """The reference switches the model to eager attention for its maps, then restores every implementation,
    the text decoder's row-capturing one included (the user's model is not left changed)."""
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=2)
    reference = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=2, recompute=True)
    # `config._attn_implementation` is transformers' own record of the kernel: ours to leave as the user set it.
    before = (bundle.model.config._attn_implementation, engine.backbone.attn_implementation)
    assert before[1].startswith("ivtlr_rows_")
    with torch.no_grad():
        reference(**make_batch(bundle, [SampleSpec(QUESTION, 2)]))
    assert (bundle.model.config._attn_implementation, engine.backbone.attn_implementation) == before
