"""The optional vision bottleneck: rows after the prompt see the picture only through the patches the latent steps
insert. Checked against one eager decoder pass over the chain's final sequence with a mask built by hand, against
batches of one, gradient checkpointing and a full forward over what generation wrote."""
from __future__ import annotations

import pytest
import torch

from engine_inputs import SampleSpec, make_batch
from ivtlr import IVTLR
from ivtlr.backbones import get_backbone
from ivtlr.checkpoint import latest_checkpoint, read_meta
from ivtlr.loading import load_checkpoint
from ivtlr.config import Config, ConfigError
from ivtlr.testing import FAMILIES, build_tiny
from schema_files import write_m3cot_files
from test_engine import MIXED, QUESTION, _assert_grads_close
from train_runs import train_in_process, write_config

K = 3


def _image_rows(tiny, batch: dict, sample: int) -> torch.Tensor:
    """Positions of the image tokens in the sample's unpadded ids (the family's own embedding says which)."""
    backbone = get_backbone(tiny.model)
    vision = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    real = batch["attention_mask"][sample].bool()
    return backbone.embed(batch["input_ids"], vision).image_mask[sample][real].nonzero().flatten()


def _hand_masked_pass(tiny, embeds: torch.Tensor, prompt_len: int, image_rows: torch.Tensor) -> torch.Tensor:
    """Hidden states of one eager decoder pass over a final sequence (1, L, D): causal, and no row from the first
    latent slot on attends to the prompt's image rows."""
    length = embeds.shape[1]
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))
    blocked_rows = torch.arange(length) >= prompt_len
    allowed[blocked_rows.nonzero().flatten()[:, None], image_rows[None, :]] = False
    mask = torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
    backbone = get_backbone(tiny.model)
    previous = tiny.model.config._attn_implementation
    tiny.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = backbone.decoder()(inputs_embeds=embeds, attention_mask=mask,
                                     position_ids=torch.arange(length).unsqueeze(0), use_cache=False, return_dict=True)
    finally:
        tiny.model.set_attn_implementation(previous)
    return backbone.logits(out.last_hidden_state)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen3_vl"])
def test_the_chain_equals_one_pass_whose_later_rows_cannot_see_the_prompt_image(family):
    """Qwen3-VL adds deepstack features inside its decoder, which a plain decoder call would not: it is covered by
    the batch and checkpointing tests below."""
    tiny = build_tiny(family)
    batch = make_batch(tiny, [SampleSpec(QUESTION, 3)])
    with torch.no_grad():
        open_chain = IVTLR(tiny.model, tiny.latent_token_id, num_selected_patches=K)(**batch)
        out = IVTLR(tiny.model, tiny.latent_token_id, num_selected_patches=K, vision_bottleneck=True)(**batch)
    length = int(out.attention_mask[0].sum())
    prompt_len = out.latent_positions[0][0] - K
    expected = _hand_masked_pass(tiny, out.inputs_embeds[:1, :length], prompt_len, _image_rows(tiny, batch, 0))
    assert torch.allclose(out.logits[0, :length], expected[0], atol=1e-4)
    # the bottleneck changes what the rows after the prompt compute, and nothing before
    assert torch.equal(out.logits[0, :prompt_len], open_chain.logits[0, :prompt_len])
    assert not torch.allclose(out.logits[0, prompt_len:length], open_chain.logits[0, prompt_len:length], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_mixed_batch_equals_batches_of_one(family):
    if family == "llava_onevision":
        pytest.skip("pictures of different sizes give LLaVA-OneVision different view counts (see test_engine)")
    tiny = build_tiny(family)
    engine = IVTLR(tiny.model, tiny.latent_token_id, num_selected_patches=K, vision_bottleneck=True)
    with torch.no_grad():
        out = engine(**make_batch(tiny, MIXED, "left"))
        for b, spec in enumerate(MIXED):
            alone = engine(**make_batch(tiny, [spec]))
            n = int(alone.attention_mask[0].sum())
            assert torch.allclose(out.logits[b, :n], alone.logits[0, :n], atol=1e-4)
            assert [s.tolist() for s in out.selected[b]] == [s.tolist() for s in alone.selected[0]]


@pytest.mark.parametrize("latent_grad", ["detach", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(latent_grad):
    """Checkpointing re-runs the final sequence (detach) or every pass (full) uncached, through the 4-D mask."""
    tiny = build_tiny("qwen2_vl")
    engine = IVTLR(tiny.model, tiny.latent_token_id, num_selected_patches=K, latent_grad=latent_grad,
                   vision_bottleneck=True).train()
    batch = make_batch(tiny, [SampleSpec(QUESTION, 3), SampleSpec("What?", 1)])

    def step():
        engine.zero_grad()
        out = engine(**batch)
        out.loss.backward()
        return out.loss.item(), {n: p.grad.clone() for n, p in engine.named_parameters() if p.grad is not None}

    plain_loss, plain = step()
    tiny.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        checkpointed_loss, checkpointed = step()
    finally:
        tiny.model.gradient_checkpointing_disable()
    assert checkpointed_loss == pytest.approx(plain_loss, abs=1e-5)
    _assert_grads_close(checkpointed, plain)


def test_generation_continues_the_bottlenecked_chain():
    """Greedy tokens from the cached chain are the argmax of a full forward over the prompt and those tokens."""
    tiny = build_tiny("qwen2_vl")
    engine = IVTLR(tiny.model, tiny.latent_token_id, num_selected_patches=K, vision_bottleneck=True).eval()
    batch = make_batch(tiny, [SampleSpec(QUESTION, 2, answer="")])
    prompt = {k: v for k, v in batch.items() if k != "labels"}
    prompt["input_ids"], prompt["attention_mask"] = batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1]
    with torch.no_grad():
        tokens = engine.generate(**prompt, max_new_tokens=6, eos_token_id=-1)
        full = dict(prompt, input_ids=torch.cat([prompt["input_ids"], tokens], 1),
                    attention_mask=torch.ones(1, prompt["input_ids"].shape[1] + tokens.shape[1], dtype=torch.long))
        logits = engine(**full).logits
    n = tokens.shape[1]
    assert logits[0, -n - 1:-1].argmax(-1).tolist() == tokens[0].tolist()


def test_the_recompute_path_refuses_it():
    tiny = build_tiny("qwen2_vl")
    engine = IVTLR(tiny.model, tiny.latent_token_id, num_selected_patches=K, vision_bottleneck=True, recompute=True)
    with pytest.raises(ValueError, match="cached chain"):
        engine(**make_batch(tiny, [SampleSpec(QUESTION, 2)]))


def test_a_run_with_the_bottleneck_records_it_and_its_checkpoint_loads_with_it(tmp_path):
    files = write_m3cot_files(tmp_path / "data", n_train=4, n_test=2, fmt="jsonl")
    run = train_in_process(write_config(tmp_path, files, num_epochs=2, max_latent_stage=1, vision_bottleneck=True))
    checkpoint = latest_checkpoint(run / "checkpoints")
    assert read_meta(checkpoint).vision_bottleneck is True
    engine, _, _ = load_checkpoint(checkpoint)
    assert engine.vision_bottleneck is True
    with pytest.raises(ConfigError, match="vision_bottleneck"):
        Config(mode="latent_text_only", vision_bottleneck=True).check_values()
    with pytest.raises(ConfigError, match="vision_bottleneck"):
        Config(mode="cot", vision_bottleneck=True).check_values()
