"""Qwen3-VL: deepstack features travel with every visual row (inserted patch copies included), its native
interleaved M-RoPE, its grid and the released image settings. The checks every family passes (the CLI end to end,
the released processor without torchvision, stage zero with either positions) are in ``tests/test_families.py``."""
from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from engine_inputs import SampleSpec, make_batch
from ivtlr import IVTLR
from ivtlr.backbones import get_backbone, load_processor
from ivtlr.config import load_config
from ivtlr.testing import build_processor, build_tiny, build_tokenizer, make_test_image
from test_engine import _assert_grads_close, _step
from test_infer import qwen_pixels
from train_runs import REPO

QUESTION = "Which digit is written in the top left corner of this image?"
FAMILY = "qwen3_vl"


@pytest.fixture(scope="module")
def bundle():
    return build_tiny(FAMILY)


def _reference_deepstack(model, batch: dict) -> list[torch.Tensor]:
    """Per deepstack layer, (N, D): the vision tower's own deepstack features of every image token, in order."""
    with torch.no_grad():
        out = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    return [torch.cat(list(layer)) for layer in out.deepstack_features]


@dataclass
class DeepstackCall:
    mask: torch.Tensor  # (B, L) visual_pos_masks
    added: torch.Tensor  # (B, L, D) what the call added to every row: output - input hidden states


@contextmanager
def recorded_deepstack(model) -> Iterator[list[DeepstackCall]]:
    """Every call of the text decoder's ``_deepstack_process``, with what it added to each row.

    A private method of transformers' Qwen3-VL, wrapped (not asserted on) because it is where the model adds the
    deepstack features: what is checked is ours, that each inserted copy carries its source token's features."""
    decoder = model.model.language_model
    calls: list[DeepstackCall] = []
    original = decoder._deepstack_process

    def recording(hidden_states, visual_pos_masks, visual_embeds):
        out = original(hidden_states, visual_pos_masks, visual_embeds)
        calls.append(DeepstackCall(visual_pos_masks.clone(), (out - hidden_states).detach()))
        return out

    decoder._deepstack_process = recording
    try:
        yield calls
    finally:
        del decoder._deepstack_process


# ------------------------------------------------------------------------------------------------ deepstack
def test_deepstack_layers_of_the_tiny_model(bundle):
    """Two deepstack layers (vision blocks 0 and 1) feed decoder layers 0 and 1, with non-zero features."""
    batch = make_batch(bundle, [SampleSpec(QUESTION, 0)])
    reference = _reference_deepstack(bundle.model, batch)
    n_image = int((batch["input_ids"] == bundle.image_token_id).sum())
    assert len(reference) == 2 and all(r.shape == (n_image, 64) for r in reference)
    assert all(float(r.abs().min(dim=-1).values.max()) > 0 for r in reference)
    embedded = get_backbone(bundle.model).embed(batch["input_ids"], batch)
    assert embedded.row_features.shape == (*batch["input_ids"].shape, 2, 64)
    image = batch["input_ids"] == bundle.image_token_id
    assert torch.equal(embedded.row_features[~image], torch.zeros_like(embedded.row_features[~image]))
    for layer, ref in enumerate(reference):
        assert torch.equal(embedded.row_features[image][:, layer], ref)


def test_decoder_visual_kwargs_packs_visual_rows_in_mask_order(bundle):
    backbone = get_backbone(bundle.model)
    features = torch.randn(2, 5, 3, 8)
    visual = torch.tensor([[False, True, True, False, False], [True, False, False, False, True]])
    kwargs = backbone.decoder_visual_kwargs(features, visual)
    assert torch.equal(kwargs["visual_pos_masks"], visual)
    rows = [(0, 1), (0, 2), (1, 0), (1, 4)]  # row-major, what boolean indexing of the decoder's hidden states gives
    assert len(kwargs["deepstack_visual_embeds"]) == 3
    for layer, embeds in enumerate(kwargs["deepstack_visual_embeds"]):
        assert torch.equal(embeds, torch.stack([features[b, i, layer] for b, i in rows]))
    assert backbone.decoder_visual_kwargs(features, torch.zeros_like(visual)) == {}
    assert backbone.decoder_visual_kwargs(features, None) == {}
    assert backbone.decoder_visual_kwargs(None, None) == {}


def test_inserted_copies_get_their_source_tokens_additions_cached(bundle):
    """Cached chain: each latent pass adds, after decoder layers 0 and 1, to each inserted copy exactly what the
    prompt pass added to its source image token (and what the vision tower computes); nothing to other rows."""
    k, n_latent = 4, 3
    batch = make_batch(bundle, [SampleSpec(QUESTION, n_latent)])
    reference = _reference_deepstack(bundle.model, batch)
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=k)
    with torch.no_grad(), recorded_deepstack(bundle.model) as calls:
        out = engine(**batch)
    n_layers = len(reference)
    assert len(calls) == n_layers * (1 + n_latent)  # the prompt pass and one per latent step
    prompt = [calls[layer] for layer in range(n_layers)]
    image = batch["input_ids"][0] == bundle.image_token_id
    image = image[: prompt[0].mask.shape[1]]
    for layer, call in enumerate(prompt):
        assert torch.equal(call.mask[0], image)
        torch.testing.assert_close(call.added[0, image], reference[layer], rtol=0, atol=1e-5)
        assert float(call.added[0, ~image].abs().max()) == 0
    for step, chosen in enumerate(out.selected[0]):
        assert len(chosen) == k
        for layer in range(n_layers):
            call = calls[n_layers * (step + 1) + layer]
            assert call.mask[0].tolist() == [True] * k + [False] * (call.mask.shape[1] - k)
            copies = call.added[0, :k]
            torch.testing.assert_close(copies, prompt[layer].added[0, image][chosen], rtol=0, atol=1e-5)
            torch.testing.assert_close(copies, reference[layer][chosen], rtol=0, atol=1e-5)
            assert float(copies.norm(dim=-1).min()) > 0.1
            assert float(call.added[0, k:].abs().max()) == 0  # the latent row (and the answer) get nothing


def test_inserted_copies_get_their_source_tokens_additions_recompute(bundle):
    """Recompute reference, final pass over the whole sequence: every copy row gets what its source row gets."""
    k, n_latent = 3, 2
    batch = make_batch(bundle, [SampleSpec(QUESTION, n_latent)])
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=k, recompute=True)
    with torch.no_grad(), recorded_deepstack(bundle.model) as calls:
        out = engine(**batch)
    n_layers = len(bundle.model.config.vision_config.deepstack_visual_indexes)
    final = calls[-n_layers:]
    source_rows = (batch["input_ids"][0] == bundle.image_token_id).nonzero().flatten()
    length = int(out.attention_mask[0].sum())
    expected_mask = torch.zeros(length, dtype=torch.bool)
    expected_mask[source_rows] = True
    for step, latent_row in enumerate(out.latent_positions[0]):
        expected_mask[latent_row - k:latent_row] = True
    for call in final:
        assert torch.equal(call.mask[0], expected_mask)
        for step, latent_row in enumerate(out.latent_positions[0]):
            copies = call.added[0, latent_row - k:latent_row]
            sources = call.added[0, source_rows[out.selected[0][step]]]
            torch.testing.assert_close(copies, sources, rtol=0, atol=1e-5)
            assert float(copies.norm(dim=-1).min()) > 0.1
        assert float(call.added[0, ~expected_mask].abs().max()) == 0


def _zero_deepstack(model):
    """A copy of ``model`` whose vision tower returns all-zero deepstack features (and the same merged tokens)."""
    zeroed = copy.deepcopy(model)
    for merger in zeroed.model.visual.deepstack_merger_list:
        torch.nn.init.zeros_(merger.linear_fc2.weight)
        torch.nn.init.zeros_(merger.linear_fc2.bias)
    return zeroed


@pytest.mark.parametrize("latent_grad", ["detach", "full"])
def test_cached_matches_recompute_with_deepstack(bundle, latent_grad):
    """Cached == recompute (logits, loss, selections, gradients, the deepstack mergers' included); a model whose
    deepstack features are zero gives clearly different logits, so deepstack is part of what is compared."""
    batch = make_batch(bundle, [SampleSpec(QUESTION, 3), SampleSpec("Count?", 2, image_size=(56, 84), seed=4)])
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=4, latent_grad=latent_grad)
    cached, cached_grads = _step(engine, batch, recompute=False)
    ref, ref_grads = _step(engine, batch, recompute=True)
    assert (cached.logits - ref.logits).abs().max() < 1e-4
    assert abs(cached.loss.item() - ref.loss.item()) < 1e-4
    assert [[s.tolist() for s in b] for b in cached.selected] == [[s.tolist() for s in b] for b in ref.selected]
    _assert_grads_close(cached_grads, ref_grads, rel=1e-3)
    # Deepstack layer 0 is added after decoder layer 0, so the answer's loss reaches its merger. (Layer 1 is added
    # after the tiny decoder's last layer: it changes only the visual rows' own outputs, which carry no label.)
    deepstack_grads = [n for n in cached_grads if "deepstack_merger_list.0." in n]
    assert deepstack_grads and all(float(cached_grads[n].norm()) > 0 for n in deepstack_grads)

    zeroed = IVTLR(_zero_deepstack(bundle.model), bundle.latent_token_id, num_selected_patches=4,
                   latent_grad=latent_grad)
    with torch.no_grad():
        without = zeroed(**batch)
    assert float(_reference_deepstack(zeroed.base_model, batch)[0].abs().max()) == 0
    real = cached.attention_mask.bool()
    assert (without.logits - cached.logits)[real].abs().max() > 1e-2


def test_copies_without_their_deepstack_would_be_caught(bundle):
    """The comparison above fails for an engine whose inserted copies lose their deepstack additions."""
    batch = make_batch(bundle, [SampleSpec(QUESTION, 3)])
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=4)
    backbone = engine.backbone
    honest = backbone.decoder_visual_kwargs
    passes = itertools.count()

    def copies_dropped(row_features, visual):
        kwargs = honest(row_features, visual)
        if kwargs and next(passes) > 0:  # the first pass with visual rows is the prompt; the rest are copies
            kwargs["deepstack_visual_embeds"] = [torch.zeros_like(e) for e in kwargs["deepstack_visual_embeds"]]
        return kwargs

    with torch.no_grad():
        ref = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=4, recompute=True)(**batch)
        backbone.decoder_visual_kwargs = copies_dropped
        try:
            broken = engine(**batch)
        finally:
            del backbone.decoder_visual_kwargs
    assert next(passes) > 1
    assert (broken.logits - ref.logits).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ positions
@contextmanager
def recorded_positions(model) -> Iterator[list[torch.Tensor]]:
    """The position ids the text decoder's rotary embedding receives, call by call."""
    seen: list[torch.Tensor] = []
    handle = model.model.language_model.rotary_emb.register_forward_pre_hook(
        lambda module, args: seen.append(args[1].clone()))
    try:
        yield seen
    finally:
        handle.remove()


def test_mrope_positions_are_native_for_the_prompt_and_sequential_after(bundle):
    k = 3
    batch = make_batch(bundle, [SampleSpec(QUESTION, 2)])
    prompt_length = int((batch["input_ids"][0] == bundle.latent_token_id).nonzero()[0])
    prompt = batch["input_ids"][:, :prompt_length]
    with torch.no_grad(), recorded_positions(bundle.model) as native:
        bundle.model(input_ids=prompt, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                     mm_token_type_ids=(prompt == bundle.image_token_id).int())
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=k, positions="mrope")
    with torch.no_grad(), recorded_positions(bundle.model) as seen:
        engine(**batch)
    assert len(seen) == 3  # the prompt pass and one pass per latent step
    assert torch.equal(seen[0], native[0])
    start = int(native[0].amax()) + 1
    assert start < prompt_length
    first_step = torch.arange(start, start + k + 1)
    assert torch.equal(seen[1], first_step.view(1, 1, -1).expand(3, 1, -1))
    rest = seen[2].shape[-1]
    assert torch.equal(seen[2], torch.arange(start + k + 1, start + k + 1 + rest).view(1, 1, -1).expand(3, 1, -1))


def test_mrope_cached_matches_recompute(bundle):
    batch = make_batch(bundle, [SampleSpec(QUESTION, 3), SampleSpec("Count?", 1, image_size=(84, 56), seed=2)])
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=4, positions="mrope")
    cached, cached_grads = _step(engine, batch, recompute=False)
    ref, ref_grads = _step(engine, batch, recompute=True)
    assert (cached.logits - ref.logits).abs().max() < 1e-4
    _assert_grads_close(cached_grads, ref_grads, rel=1e-3)
    original = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=4)
    with torch.no_grad():
        assert (original(**batch).logits - cached.logits).abs().max() > 1e-3  # the positions really differ


# ------------------------------------------------------------------------------------------------ processor and grid
def test_backbone_settings(bundle):
    backbone = get_backbone(bundle.model)
    assert type(backbone).__name__ == "Qwen3VLBackbone"
    assert backbone.default_num_selected_patches == 32
    assert backbone.position_rows == 3
    assert backbone.attention_modules() == [layer.self_attn for layer in bundle.model.model.language_model.layers]
    assert backbone.eos_token_id == bundle.tokenizer.eos_token_id
    assert IVTLR(bundle.model, bundle.latent_token_id).num_selected_patches == 32


@pytest.mark.parametrize("size", [(96, 48), (40, 70), (128, 128)])
def test_image_grid_and_processor_view(bundle, size):
    """The grid holds the image tokens row-major; the drawn picture is the processor's own resized image."""
    image = make_test_image(size, seed=3)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = bundle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = bundle.processor(text=[text], images=[image], return_tensors="pt")
    backbone = get_backbone(bundle.model)
    rows, cols = backbone.image_grid(encoded, 0)
    assert rows * cols == int((encoded["input_ids"] == bundle.image_token_id).sum())
    image_processor = bundle.processor.image_processor
    view = backbone.processor_view(image_processor, image, encoded, 0)
    assert view.size == (cols * 32, rows * 32)
    fed = qwen_pixels(encoded, image_processor)
    assert np.abs(np.asarray(view).astype(float) - fed).max() < 0.01
    if size == (96, 48):
        assert cols > rows  # PIL sizes are (width, height): a wide picture has more columns


@pytest.mark.parametrize(("image_size", "grid"), [(96, (3, 3)), (128, (4, 4))])
def test_image_size_sets_the_token_grid(bundle, image_size, grid):
    """A tiny model built for ``image_size`` px (a config's ``image_size``) sees a square picture of that size as
    merged tokens of 32 px."""
    processor = build_processor(FAMILY, bundle.tokenizer, image_size)
    encoded = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"],
                        images=[make_test_image((image_size, image_size))], return_tensors="pt")
    assert get_backbone(bundle.model).image_grid(encoded, 0) == grid


def test_released_image_settings_reach_the_loaded_processor(tmp_path):
    """Qwen3-VL checkpoints' image settings (a Qwen2-VL image processor with patch 16, merge 2) reach the family's
    loader: 320 px, the config file's size, is 20x20 patches, 100 image tokens. (Loading without torchvision, whatever
    the hub names, is checked for every family in tests/test_families.py.)"""
    build_tokenizer(FAMILY).save_pretrained(tmp_path)
    image_config = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                    "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image_config))
    processor = load_processor(str(tmp_path), FAMILY)
    assert (processor.image_processor.patch_size, processor.image_processor.merge_size) == (16, 2)
    encoded = processor(text=["<|vision_start|><|image_pad|><|vision_end|>Hi"], images=[make_test_image((320, 320))],
                        return_tensors="pt")
    assert encoded["image_grid_thw"].tolist() == [[1, 20, 20]]  # configs/qwen3vl_m3cot.yaml: 320 px -> 100 tokens
    assert int((encoded["input_ids"] == processor.image_token_id).sum()) == 100
    assert encoded["mm_token_type_ids"].sum() == 100


def test_config_file_is_the_qwen2_vl_recipe_on_qwen3_vl():
    """Every key of the Qwen2-VL M3CoT config, with Qwen3-VL-8B, K = 32 and as many image tokens (320 px, 100)."""
    config = load_config(REPO / "configs" / "qwen3vl_m3cot.yaml")
    qwen2 = load_config(REPO / "configs" / "qwen2vl_m3cot.yaml")
    assert (config.model, config.num_selected_patches, config.image_size) == ("Qwen/Qwen3-VL-8B-Instruct", 32, 320)
    assert config.name == "qwen3vl_m3cot"
    differing = {key for key, value in vars(config).items() if vars(qwen2)[key] != value}
    assert differing == {"model", "image_size", "name"}
