"""Qwen3-VL: deepstack features travel with every visual row (inserted patch copies included), its native
interleaved M-RoPE, its torchvision-free processor, and the CLI end to end on a tiny model."""
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
from PIL import Image

from engine_inputs import SampleSpec, make_batch
from ivtlr import IVTLR
from ivtlr.backbones import get_backbone, load_processor
from ivtlr.checkpoint import checkpoint_dirs
from ivtlr.loading import load_checkpoint
from ivtlr.cli import main
from ivtlr.config import load_config
from ivtlr.data import Example, build_generation_batch, load_examples
from ivtlr.testing import build_tiny, build_tokenizer, make_test_image
from schema_files import digit_image, write_m3cot_files
from test_engine import _assert_grads_close, _step
from test_eval import decode, run_eval
from test_infer import assert_outlines, printed_lines, qwen_pixels
from train_runs import REPO, metrics, single_thread, train_in_process, write_config

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


@pytest.mark.parametrize("positions", ["original", "mrope"])
def test_stage_zero_is_the_transformers_forward(bundle, positions):
    """No latent: the engine's logits and loss are the transformers model's own, deepstack and (for mrope) the
    model's own interleaved M-RoPE positions included."""
    batch = make_batch(bundle, [SampleSpec(QUESTION, 0)])
    engine = IVTLR(bundle.model, bundle.latent_token_id, positions=positions)
    length = batch["input_ids"].shape[1]
    if positions == "original":
        extra = {"position_ids": torch.arange(length).view(1, 1, -1).expand(3, 1, -1)}
    else:
        extra = {"mm_token_type_ids": (batch["input_ids"] == bundle.image_token_id).int()}
    with torch.no_grad(), recorded_positions(bundle.model) as seen:
        out = engine(**batch)
        plain = bundle.model(**batch, **extra)
    assert seen[0].shape == (3, 1, length) and torch.equal(seen[0], seen[1])
    if positions == "mrope":
        assert int(seen[0].amax()) < length - 1  # the image's rows share positions: truly multimodal
    assert (out.logits - plain.logits).abs().max() < 1e-5
    assert abs(out.loss.item() - plain.loss.item()) < 1e-5


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


def test_processor_loads_a_hub_layout_without_torchvision(tmp_path):
    """Qwen3-VL checkpoints ship a Qwen2-VL fast image processor and a video processor config: the image-only
    processor loads them with the PIL image processor, patch 16, merge 2."""
    tokenizer = build_tokenizer(FAMILY)
    tokenizer.save_pretrained(tmp_path)
    image_config = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                    "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image_config))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {**image_config, "video_processor_type": "Qwen3VLVideoProcessor", "fps": 2}))
    processor = load_processor(str(tmp_path), FAMILY)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert (processor.image_processor.patch_size, processor.image_processor.merge_size) == (16, 2)
    encoded = processor(text=["<|vision_start|><|image_pad|><|vision_end|>Hi"], images=[make_test_image((320, 320))],
                        return_tensors="pt")
    assert encoded["image_grid_thw"].tolist() == [[1, 20, 20]]  # configs/qwen3vl_m3cot.yaml: 320 px -> 100 tokens
    assert int((encoded["input_ids"] == processor.image_token_id).sum()) == 100
    assert encoded["mm_token_type_ids"].sum() == 100

    processor.save_pretrained(tmp_path / "saved")
    again = load_processor(str(tmp_path / "saved"), FAMILY)
    image = make_test_image((70, 50), seed=1)
    first = processor(text=["<|image_pad|>x"], images=[image], return_tensors="pt")
    second = again(text=["<|image_pad|>x"], images=[image], return_tensors="pt")
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def test_config_file_is_the_qwen2_vl_recipe_on_qwen3_vl():
    """Every key of the Qwen2-VL M3CoT config, with Qwen3-VL-8B, K = 32 and as many image tokens (320 px, 100)."""
    config = load_config(REPO / "configs" / "qwen3vl_m3cot.yaml")
    qwen2 = load_config(REPO / "configs" / "qwen2vl_m3cot.yaml")
    assert (config.model, config.num_selected_patches, config.image_size) == ("Qwen/Qwen3-VL-8B-Instruct", 32, 320)
    assert config.name == "qwen3vl_m3cot"
    differing = {key for key, value in vars(config).items() if vars(qwen2)[key] != value}
    assert differing == {"model", "image_size", "name"}


# ------------------------------------------------------------------------------------------------ CLI end to end
@pytest.mark.usefixtures(single_thread.__name__)
def test_train_eval_infer_end_to_end(tmp_path, capsys):
    """``ivtlr train`` stages 0..3 on M3CoT-schema files, ``ivtlr eval`` on the last checkpoint (each answer is what
    the loaded checkpoint generates), ``ivtlr infer --explain`` (the outlined cells are the selected patches)."""
    files = write_m3cot_files(tmp_path / "data", n_train=4, n_test=2)
    config = write_config(tmp_path, files, model=f"tiny:{FAMILY}", image_size=96, num_selected_patches=2,
                          num_epochs=4, use_lora=True, lr=1e-2)
    run_dir = train_in_process(config)
    records = metrics(run_dir)
    assert [r["stage"] for r in records] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r["latents"] for r in records] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(r["grad_norm"] > 0 for r in records)
    checkpoint = checkpoint_dirs(run_dir / "checkpoints")[-1]

    answers, summary = run_eval(config, tmp_path / "eval", "eval.max_new_tokens=5", "eval.batch_size=2",
                                "--checkpoint", str(checkpoint))
    engine, components, meta = load_checkpoint(checkpoint)
    assert (meta.stage, meta.n_latent, meta.image_size, engine.num_selected_patches) == (3, 3, 96, 2)
    assert summary["run"]["n_latent"] == 3 and summary["overall"]["count"] == 2
    examples = list(load_examples("m3cot", "test", data_files=files))
    batch = build_generation_batch(components.processor, examples, 3, engine.latent_token_id,
                                   image_size=meta.image_size)
    generated = engine.generate(**batch, max_new_tokens=5, return_dict=True)
    assert [r["messages"][1] for r in answers] == [
        decode(components.tokenizer, generated.sequences[b, : generated.lengths[b]]) for b in range(len(examples))]

    capsys.readouterr()
    question, choices = "Which digit is written in the image?", ["one", "three", "seven", "nine"]
    image_path, picture = tmp_path / "digit.png", tmp_path / "explain.png"
    digit_image(1001, size=40).save(image_path)
    assert main(["infer", "--checkpoint", str(checkpoint), "--image", str(image_path), "--question", question,
                 "--choices", *choices, "--max-new-tokens", "5", "--explain", str(picture)]) == 0
    example = Example("q", Image.open(image_path).convert("RGB"), question, choices, "A", "")
    batch = build_generation_batch(components.processor, [example], meta.n_latent, engine.latent_token_id,
                                   image_size=meta.image_size)
    out = engine.generate(**batch, max_new_tokens=5, return_dict=True)
    text = components.tokenizer.decode(out.sequences[0, : out.lengths[0]].tolist(), skip_special_tokens=True)
    assert capsys.readouterr().out.splitlines()[-2:] == printed_lines(text, choices)
    selected = [step.tolist() for step in out.selected[0]]
    grid = engine.image_grid(batch, 0)
    assert grid == (3, 3) and [len(s) for s in selected] == [2, 2, 2]
    assert_outlines(picture, meta.image_size, grid, selected)
