"""Step and region supervision of latent steps (``ivtlr.method.supervision``) against independent computations: the
model's own forward on the fed row and the step's tokens, an eager full pass's attention maps, the recompute path,
batches of one, and a manual greedy decode."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine_inputs import SampleSpec, make_batch
from ivtlr import IVTLR
from ivtlr.backbones import RegionView, box_token_mask, get_backbone
from ivtlr.method.supervision import decode_latent_states
from ivtlr.testing import FAMILIES, build_tiny
from test_engine import MIXED, QUESTION, _assert_grads_close

K = 3


@pytest.fixture(scope="module", params=FAMILIES)
def bundle(request):
    return build_tiny(request.param)


def _targets(batch_size: int, slots: int, seed: int = 0) -> torch.Tensor:
    """Step token ids per latent slot (-100 padded), different lengths, one slot left without a step."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.full((batch_size, slots, 6), -100)
    for b in range(batch_size):
        for slot in range(slots):
            if (b + slot) % 4 == 3:
                continue
            n = 2 + (b + slot) % 5
            out[b, slot, :n] = torch.randint(5, 60, (n,), generator=generator)
    return out


def _regions(batch_size: int, slots: int) -> torch.Tensor:
    """A box per latent slot, fractions of the picture, cycling over quadrants; one slot without a box."""
    quadrants = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0)]
    out = torch.full((batch_size, slots, 4), float("nan"))
    for b in range(batch_size):
        for slot in range(slots):
            if (b + slot) % 4 != 2:
                out[b, slot] = torch.tensor(quadrants[(b + 2 * slot) % 4])
    return out


def _step_with(engine: IVTLR, batch: dict, recompute: bool, **supervision):
    """Forward + backward of loss + step loss + region loss; the output and every parameter's gradient."""
    engine.recompute = recompute
    engine.zero_grad()
    out = engine(**batch, **supervision)
    total = out.loss
    for extra in (out.step_loss, out.region_loss):
        if extra is not None:
            total = total + extra
    total.backward()
    grads = {n: p.grad.clone() for n, p in engine.named_parameters() if p.grad is not None}
    engine.zero_grad()
    engine.recompute = False
    return out, grads


# ------------------------------------------------------------------------------------------------ step loss
def _own_step_loss(model, row: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own forward and loss on [fed row, step tokens]: position 0 (the row) predicts the first token."""
    embed = model.get_input_embeddings()
    inputs = torch.cat([row.unsqueeze(0), embed(tokens.unsqueeze(0))[0]]).unsqueeze(0)
    labels = torch.cat([torch.tensor([-100]), tokens]).unsqueeze(0)
    return model(inputs_embeds=inputs, labels=labels).loss


def test_step_loss_equals_the_models_own_loss_on_the_fed_row(bundle):
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=K)
    batch = make_batch(bundle, [SampleSpec(QUESTION, 3), SampleSpec("Count?", 2, seed=3)])
    targets = _targets(2, 3)
    with torch.no_grad():
        out = engine(**batch, step_targets=targets)
        expected = []
        for b in range(2):
            for slot, position in enumerate(out.latent_positions[b]):
                tokens = targets[b, slot][targets[b, slot] != -100]
                if len(tokens):
                    expected.append(_own_step_loss(bundle.model, out.inputs_embeds[b, position], tokens))
    assert len(expected) == len(out.step_losses) == 5
    assert torch.allclose(out.step_losses, torch.stack(expected), atol=1e-5)
    assert out.step_loss == pytest.approx(float(torch.stack(expected).mean()), abs=1e-5)


def test_step_loss_trains_the_pass_that_produced_the_latent_in_detach_mode():
    """In ``detach`` mode the main loss never reaches the chain's passes; the step loss does (its gradient differs
    from the one through the decoding pass alone), and turning it on changes nothing of the main loss."""
    tiny = build_tiny("qwen2_vl")
    engine = IVTLR(tiny.model, tiny.latent_token_id, num_selected_patches=K)
    batch = make_batch(tiny, [SampleSpec(QUESTION, 3)])
    targets = _targets(1, 3)
    plain = engine(**batch)
    plain_grads = torch.autograd.grad(plain.loss, [p for p in engine.parameters() if p.requires_grad],
                                      allow_unused=True)
    out = engine(**batch, step_targets=targets)
    assert torch.equal(out.loss, plain.loss) and torch.equal(out.logits, plain.logits)
    params = [p for p in engine.parameters() if p.requires_grad]
    main_grads = torch.autograd.grad(out.loss, params, retain_graph=True, allow_unused=True)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(main_grads, plain_grads))
    through_chain = torch.autograd.grad(out.step_loss, params, allow_unused=True)
    # The decoding pass alone: the same losses on fed rows cut from the graph.
    with torch.no_grad():
        rows = [out.inputs_embeds[0, p].clone() for p in out.latent_positions[0]]
    steps = [targets[0, s][targets[0, s] != -100] for s in range(3)]
    alone = torch.stack([_own_step_loss(tiny.model, r, t) for r, t in zip(rows, steps) if len(t)]).mean()
    decoding_only = torch.autograd.grad(alone, params, allow_unused=True)
    difference = sum(float((a - (b if b is not None else 0)).norm()) for a, b in zip(through_chain, decoding_only)
                     if a is not None)
    assert difference > 1e-4 * sum(float(a.norm()) for a in through_chain if a is not None)


# ------------------------------------------------------------------------------------------------ region loss
def _eager_region_losses(bundle, out, layouts_image_index, masks, taken_by_step):
    """The region loss of each step from one eager pass over the final sequence: the averaged attention row of the
    query before each latent slot, over the prompt's image rows."""
    backbone = get_backbone(bundle.model)
    previous = bundle.model.config._attn_implementation
    bundle.model.set_attn_implementation("eager")
    try:
        length = int(out.attention_mask[0].sum())
        embeds = out.inputs_embeds[:1, :length]
        positions = torch.arange(length).unsqueeze(0)
        with torch.no_grad():
            result = backbone.decoder()(inputs_embeds=embeds, position_ids=positions, output_attentions=True,
                                        use_cache=False, return_dict=True)
    finally:
        bundle.model.set_attn_implementation(previous)
    prompt_len = out.latent_positions[0][0] - K
    queries = [prompt_len - 1] + out.latent_positions[0][:-1]
    losses = []
    for step, query in enumerate(queries):
        row = torch.stack([a[0, :, query].float() for a in result.attentions]).mean(dim=(0, 1))
        scores = row[layouts_image_index]
        selectable = ~taken_by_step[step]
        if masks[step] is None:
            continue
        inside = masks[step] & selectable
        losses.append(math.log(float(scores[selectable].sum())) - math.log(float(scores[inside].sum())))
    return losses


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen3_vl"])
def test_region_loss_equals_one_from_an_eager_full_pass(family):
    """Qwen3-VL adds deepstack features inside its decoder, which a plain decoder call over the final embeddings
    would not: it is covered by cached == recompute below."""
    tiny = build_tiny(family)
    engine = IVTLR(tiny.model, tiny.latent_token_id, num_selected_patches=K)
    batch = make_batch(tiny, [SampleSpec(QUESTION, 3)])
    regions = _regions(1, 3)
    with torch.no_grad():
        out = engine(**batch, step_regions=regions)
    backbone = get_backbone(tiny.model)
    vision = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    embedded = backbone.embed(batch["input_ids"], vision)
    image_index = embedded.image_mask[0].nonzero().flatten()
    views = backbone.region_views(vision, 0)
    masks = [None if torch.isnan(box).any() else box_token_mask(views, tuple(box.tolist()), len(image_index))
             for box in regions[0]]
    taken, taken_by_step = torch.zeros(len(image_index), dtype=torch.bool), []
    for chosen in out.selected[0]:
        taken_by_step.append(taken.clone())
        taken[chosen] = True
    expected = _eager_region_losses(tiny, out, image_index, masks, taken_by_step)
    assert len(expected) == len(out.region_losses) == 2
    assert out.region_losses.tolist() == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------------------------------------ both, every family
@pytest.mark.parametrize("latent_grad", ["detach", "full"])
def test_cached_matches_recompute_with_supervision(bundle, latent_grad):
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=K, latent_grad=latent_grad)
    batch = make_batch(bundle, [SampleSpec(QUESTION, 3)])
    supervision = {"step_targets": _targets(1, 3), "step_regions": _regions(1, 3)}
    cached, cached_grads = _step_with(engine, batch, False, **supervision)
    ref, ref_grads = _step_with(engine, batch, True, **supervision)
    assert torch.allclose(cached.step_losses, ref.step_losses, atol=1e-4)
    assert torch.allclose(cached.region_losses, ref.region_losses, atol=1e-4)
    assert len(cached.region_losses) == 2 and len(cached.step_losses) == 3
    _assert_grads_close(cached_grads, ref_grads)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_supervision_of_a_mixed_batch_equals_batches_of_one(bundle, padding_side):
    if bundle.family == "llava_onevision":
        pytest.skip("LLaVA-OneVision regions need square pictures (see test_region_views_cover_every_image_token)")
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=K)
    targets, regions = _targets(len(MIXED), 3), _regions(len(MIXED), 3)
    with torch.no_grad():
        out = engine(**make_batch(bundle, MIXED, padding_side), step_targets=targets, step_regions=regions)
        step_terms, region_terms = [], []
        for i, spec in enumerate(MIXED):
            alone = engine(**make_batch(bundle, [spec]), step_targets=targets[i:i + 1], step_regions=regions[i:i + 1])
            step_terms += alone.step_losses.tolist()
            region_terms += alone.region_losses.tolist()
    assert out.step_losses.tolist() == pytest.approx(step_terms, abs=1e-4)
    assert out.region_losses.tolist() == pytest.approx(region_terms, abs=1e-4)
    assert len(step_terms) == 5 and len(region_terms) == 5


def test_gradient_checkpointing_keeps_the_supervision_gradients():
    tiny = build_tiny("qwen2_vl")
    engine = IVTLR(tiny.model, tiny.latent_token_id, num_selected_patches=K).train()
    batch = make_batch(tiny, [SampleSpec(QUESTION, 3)])
    supervision = {"step_targets": _targets(1, 3), "step_regions": _regions(1, 3)}
    _, plain = _step_with(engine, batch, False, **supervision)
    tiny.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        _, checkpointed = _step_with(engine, batch, False, **supervision)
    finally:
        tiny.model.gradient_checkpointing_disable()
    _assert_grads_close(checkpointed, plain)


# ------------------------------------------------------------------------------------------------ geometry
def test_box_token_mask_takes_the_cells_whose_centre_is_inside():
    views = [RegionView(first=0, rows=2, cols=4), RegionView(first=8, rows=1, cols=2)]
    mask = box_token_mask(views, (0.0, 0.0, 0.5, 1.0), 11)
    assert mask.nonzero().flatten().tolist() == [0, 1, 4, 5, 8]
    tiny_box = box_token_mask(views, (0.9, 0.1, 0.95, 0.2), 11)  # inside one cell, covering no centre
    assert tiny_box.nonzero().flatten().tolist() == [3, 9]
    with pytest.raises(ValueError, match="region box"):
        box_token_mask(views, (0.5, 0.0, 0.5, 1.0), 11)


@pytest.mark.parametrize("family", FAMILIES)
def test_region_views_cover_every_image_token(family):
    """Each family's views tile exactly the image tokens the model gets, and a box around one grid cell names that
    cell's token in every view (its place on the grid ``--explain`` draws selections on)."""
    tiny = build_tiny(family)
    batch = make_batch(tiny, [SampleSpec(QUESTION, 1, image_size=(112, 112))])
    backbone = get_backbone(tiny.model)
    vision = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    n_tokens = int(backbone.embed(batch["input_ids"], vision).image_mask[0].sum())
    views = backbone.region_views(vision, 0)
    assert sum(v.rows * v.cols for v in views) == n_tokens
    assert [v.first for v in views] == [sum(w.rows * w.cols for w in views[:i]) for i in range(len(views))]
    grid_rows, grid_cols = backbone.image_grid(vision, 0)
    assert sum(v.rows for v in views) == grid_rows and all(v.cols == grid_cols for v in views)
    first = views[0]
    for row, col in [(0, 0), (first.rows - 1, first.cols - 1), (first.rows // 2, 0)]:
        box = (col / first.cols, row / first.rows, (col + 1) / first.cols, (row + 1) / first.rows)
        expected = []
        for view in views:  # the same part of the picture in each view
            r = min(int((row + 0.5) / first.rows * view.rows), view.rows - 1)
            c = min(int((col + 0.5) / first.cols * view.cols), view.cols - 1)
            expected.append(view.first + r * view.cols + c)
        assert box_token_mask(views, box, n_tokens).nonzero().flatten().tolist() == expected


# ------------------------------------------------------------------------------------------------ read back
def test_decoded_latents_equal_a_manual_greedy_decode(bundle):
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=K)
    batch = make_batch(bundle, [SampleSpec(QUESTION, 3)])
    with torch.no_grad():
        out = engine(**batch)
        states = torch.stack([out.inputs_embeds[0, p] for p in out.latent_positions[0]])
        decoded = decode_latent_states(get_backbone(bundle.model), states, max_new_tokens=4)
        embed = bundle.model.get_input_embeddings()
        for i, state in enumerate(states):
            inputs, tokens = state[None, None], []
            for _ in range(4):  # no cache: the model's own forward over the whole sequence each time
                logits = bundle.model(inputs_embeds=inputs).logits[0, -1]
                tokens.append(int(logits.argmax()))
                inputs = torch.cat([inputs, embed(torch.tensor([[tokens[-1]]]))], dim=1)
            assert decoded[i].tolist() == tokens, i


def test_step_targets_and_regions_only_add_outputs():
    """Supervision inputs leave the loss, logits and selections exactly as without them (off = the paper)."""
    tiny = build_tiny("chameleon")
    engine = IVTLR(tiny.model, tiny.latent_token_id, num_selected_patches=K)
    batch = make_batch(tiny, [SampleSpec(QUESTION, 3), SampleSpec("Count?", 2, seed=3)])
    with torch.no_grad():
        plain = engine(**batch)
        supervised = engine(**batch, step_targets=_targets(2, 3), step_regions=_regions(2, 3))
    assert plain.step_loss is None and plain.region_loss is None
    assert torch.equal(plain.loss, supervised.loss) and torch.equal(plain.logits, supervised.logits)
    assert [[s.tolist() for s in steps] for steps in plain.selected] == \
        [[s.tolist() for s in steps] for steps in supervised.selected]
    assert F.mse_loss(plain.inputs_embeds, supervised.inputs_embeds) == 0
