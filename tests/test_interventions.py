"""Each latent intervention changes exactly what it says and nothing else, checked against independent computations:
the as-trained run of the same batch, one full decoder pass over the final sequence, a batch of one."""
from __future__ import annotations

import pytest
import torch

from engine_inputs import SampleSpec, make_batch
from ivtlr import IVTLR
from ivtlr.method.interventions import LatentIntervention
from ivtlr.method.recompute import eager_attention
from ivtlr.testing import TinyBundle, build_tiny
from test_generation import prompt_batch, unpadded

K = 3
N_LATENT = 3
SPECS = [SampleSpec("What is in the picture?", N_LATENT, seed=1),
         SampleSpec("Which digit is written in the top left corner of this image?", N_LATENT, seed=2),
         SampleSpec("What colour is the background here?", N_LATENT, seed=3)]
SEEDS = [11, 12, 13]


@pytest.fixture(scope="module")
def bundle() -> TinyBundle:
    bundle = build_tiny("qwen2_vl")
    # A final norm with unequal weights: otherwise every last-layer hidden state has the same norm (sqrt(D)) and a
    # norm check could not fail.
    norm = bundle.model.model.language_model.norm.weight
    norm.data = torch.rand(norm.shape, generator=torch.Generator().manual_seed(0)) + 0.5
    return bundle


@pytest.fixture(scope="module")
def engine(bundle) -> IVTLR:
    return IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=K, eos_token_id=bundle.eos_token_id,
                 pad_token_id=bundle.pad_token_id).eval()


@pytest.fixture(scope="module")
def batch(bundle) -> dict:
    batch = make_batch(bundle, SPECS)
    batch.pop("labels")
    return batch


@pytest.fixture(scope="module")
def trained(engine, batch):
    with torch.no_grad():
        return engine(**batch)


def run(engine, batch, **options):
    with torch.no_grad():
        return engine(**batch, intervention=LatentIntervention(**options))


def latent_rows(out, b: int) -> torch.Tensor:
    return out.inputs_embeds[b, out.latent_positions[b]]


def image_rows(engine, batch) -> list[torch.Tensor]:
    return engine.image_token_embeddings(**batch)


def full_pass_hidden(engine, out, b: int) -> torch.Tensor:
    """Last-layer hidden states of sample b's final sequence in one decoder pass (no cache): independent of the
    chain's step-by-step computation. Positions are the 'original' 1-D range."""
    n = int(out.attention_mask[b].sum())
    embeds = out.inputs_embeds[b : b + 1, :n]
    positions = torch.arange(n).view(1, 1, n).expand(engine.backbone.position_rows, 1, n)
    with torch.no_grad():
        return engine.backbone.run_decoder(embeds, torch.ones(1, n, dtype=torch.long), positions, None
                                           ).last_hidden_state[0]


def test_as_trained_option_is_the_plain_chain(engine, batch, trained):
    out = run(engine, batch)
    assert torch.equal(out.inputs_embeds, trained.inputs_embeds) and torch.equal(out.logits, trained.logits)


def test_zeros_zero_the_latent_rows_and_leave_the_prompt_and_first_patches(engine, batch, trained):
    out = run(engine, batch, text="zeros")
    for b in range(len(SPECS)):
        assert torch.count_nonzero(latent_rows(out, b)) == 0
        first_latent = out.latent_positions[b][0]
        # Everything before the first latent row (prompt and step 1's patches) is untouched; so is step 1's choice.
        assert torch.equal(out.inputs_embeds[b, :first_latent], trained.inputs_embeds[b, :first_latent])
        assert torch.equal(out.selected[b][0], trained.selected[b][0])
        assert torch.count_nonzero(latent_rows(trained, b)) > 0


def test_noise_has_the_norm_of_the_hidden_state_it_replaces(engine, batch, trained):
    out = run(engine, batch, text="noise", seeds=SEEDS)
    for b in range(len(SPECS)):
        hidden = full_pass_hidden(engine, out, b)
        for position in out.latent_positions[b]:
            replaced = hidden[position - K - 1]  # the row before the step's K patches: what the slot would receive
            noise = out.inputs_embeds[b, position]
            assert noise.norm() == pytest.approx(float(replaced.norm()), rel=1e-4)
            assert torch.cosine_similarity(noise, replaced, dim=0).abs() < 0.5
    # The as-trained slots do receive the hidden state itself (what the noise replaces).
    hidden = full_pass_hidden(engine, trained, 0)
    for position in trained.latent_positions[0]:
        torch.testing.assert_close(trained.inputs_embeds[0, position], hidden[position - K - 1], atol=1e-4,
                                   rtol=1e-4)


def test_noise_depends_on_the_seed_only(engine, batch):
    first, again = run(engine, batch, text="noise", seeds=SEEDS), run(engine, batch, text="noise", seeds=SEEDS)
    other = run(engine, batch, text="noise", seeds=[s + 100 for s in SEEDS])
    assert torch.equal(latent_rows(first, 0), latent_rows(again, 0))
    assert not torch.allclose(latent_rows(first, 0), latent_rows(other, 0))


def test_donor_latents_are_the_partners_rows(engine, batch, trained):
    partners = [1, 2, 0]  # a derangement
    donors = [latent_rows(trained, p) for p in partners]
    out = run(engine, batch, text="donor", donor_latents=donors)
    for b, p in enumerate(partners):
        torch.testing.assert_close(latent_rows(out, b), latent_rows(trained, p), atol=0, rtol=0)
        assert not torch.allclose(latent_rows(out, b), latent_rows(trained, b))


def test_token_condition_feeds_the_latent_token_embedding(engine, batch, bundle):
    out = run(engine, batch, text="token")
    token = engine.backbone.input_embeddings()(torch.tensor([bundle.latent_token_id]))[0]
    for b in range(len(SPECS)):
        assert torch.equal(latent_rows(out, b), token.expand(N_LATENT, -1))


@pytest.mark.parametrize("vision", ["random", "least"])
def test_other_patches_differ_from_top_k_and_are_valid_image_rows(engine, batch, trained, vision):
    out = run(engine, batch, vision=vision, seeds=SEEDS)
    images = image_rows(engine, batch)
    for b in range(len(SPECS)):
        chosen = torch.cat(out.selected[b]).tolist()
        assert len(chosen) == K * N_LATENT and len(set(chosen)) == len(chosen)  # never one patch twice
        assert all(0 <= i < images[b].shape[0] for i in chosen)
        first = set(out.selected[b][0].tolist())
        top = set(trained.selected[b][0].tolist())
        assert first != top
        if vision == "least":
            assert not first & top  # the K least attended never include one of the K most attended
        for step, position in enumerate(out.latent_positions[b]):
            inserted = out.inputs_embeds[b, position - K : position]
            assert torch.equal(inserted, images[b][out.selected[b][step]])


def test_no_patches_inserts_nothing_and_keeps_the_latent_rows(engine, batch, trained):
    out = run(engine, batch, vision="none")
    for b in range(len(SPECS)):
        assert all(len(step) == 0 for step in out.selected[b])
        assert int(out.attention_mask[b].sum()) == int(trained.attention_mask[b].sum()) - K * N_LATENT
        positions = out.latent_positions[b]
        assert positions == list(range(positions[0], positions[0] + N_LATENT))  # latents now back to back


def test_donor_image_reads_the_trained_indices_from_the_other_image(engine, batch, trained):
    images = image_rows(engine, batch)
    partners = [2, 0, 1]
    out = run(engine, batch, vision="donor", donor_image_embeds=[images[p] for p in partners])
    for b, p in enumerate(partners):
        assert torch.equal(out.selected[b][0], trained.selected[b][0])  # step 1 ranks on the untouched prompt
        for step, position in enumerate(out.latent_positions[b]):
            inserted = out.inputs_embeds[b, position - K : position]
            assert torch.equal(inserted, images[p][out.selected[b][step]])
            assert not torch.equal(inserted, images[b][out.selected[b][step]])


def test_donor_image_of_another_size_is_refused(engine, bundle, batch):
    small = make_batch(bundle, [SampleSpec("Q?", N_LATENT, image_size=(168, 112))])
    small.pop("labels")
    other = image_rows(engine, small)[0]
    with pytest.raises(ValueError, match="image tokens"):
        run(engine, batch, vision="donor", donor_image_embeds=[other] * len(SPECS))


def test_missing_per_sample_inputs_are_refused_before_running(engine, batch):
    with pytest.raises(ValueError, match="seeds for each of the 3 samples"):
        run(engine, batch, text="noise")
    with pytest.raises(ValueError, match="donor_latents"):
        run(engine, batch, text="donor", donor_latents=[torch.zeros(3, 8)])
    with pytest.raises(ValueError, match="latent text condition"):
        LatentIntervention(text="shuffle")


CONDITIONS = [dict(), dict(text="zeros"), dict(text="noise"), dict(text="token"), dict(text="donor"),
              dict(vision="random"), dict(vision="least"), dict(vision="none"), dict(vision="donor"),
              dict(num_selected_patches=1), dict(text="noise", vision="random", num_selected_patches=5)]


def _intervention(options: dict, indices: list[int], donor_latents, donor_images) -> LatentIntervention:
    return LatentIntervention(**options, seeds=[SEEDS[i] for i in indices],
                              donor_latents=[donor_latents[i] for i in indices],
                              donor_image_embeds=[donor_images[i] for i in indices])


def test_every_condition_is_batch_invariant_and_shares_the_prefill_exactly(engine, bundle, trained, batch):
    """generate_variants on the batch (one shared prompt pass) == each condition alone on a batch of one."""
    donor_latents = [latent_rows(trained, (b + 1) % 3) for b in range(3)]
    donor_images = [image_rows(engine, batch)[(b + 1) % 3] for b in range(3)]
    prompts = prompt_batch(bundle, SPECS)
    together = engine.generate_variants(**prompts, max_new_tokens=6, measure_attention=True, interventions=[
        _intervention(options, [0, 1, 2], donor_latents, donor_images) for options in CONDITIONS])
    for b, spec in enumerate(SPECS):
        alone_prompt = prompt_batch(bundle, [spec])
        for options, batched in zip(CONDITIONS, together):
            alone = engine.generate(**alone_prompt, max_new_tokens=6, return_dict=True, measure_attention=True,
                                    intervention=_intervention(options, [b], donor_latents, donor_images))
            assert unpadded(batched, b) == unpadded(alone, 0), (options, b)
            assert [s.tolist() for s in batched.selected[b]] == [s.tolist() for s in alone.selected[0]], options
            torch.testing.assert_close(batched.latents[b], alone.latents[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched.answer_attention[b], alone.answer_attention[0], atol=1e-5, rtol=1e-4)


def test_answer_attention_matches_an_eager_full_pass(engine, bundle):
    """The attention mass the answer tokens pay to latent and patch rows, against the attention maps of one eager pass
    over prompt + chain + generated answer."""
    spec = SPECS[1]
    out = engine.generate(**prompt_batch(bundle, [spec]), max_new_tokens=6, return_dict=True, measure_attention=True)
    answer = out.sequences[0, : int(out.lengths[0])]
    prompt = prompt_batch(bundle, [spec])
    ids = torch.cat([prompt["input_ids"][0], answer]).unsqueeze(0)
    with torch.no_grad():
        final = engine(ids, torch.ones_like(ids), pixel_values=prompt["pixel_values"],
                       image_grid_thw=prompt["image_grid_thw"])
    n = int(final.attention_mask[0].sum())
    positions = torch.arange(n).view(1, 1, n).expand(engine.backbone.position_rows, 1, n)
    with torch.no_grad(), eager_attention(engine.backbone):
        maps = engine.backbone.run_decoder(final.inputs_embeds[:, :n], torch.ones(1, n, dtype=torch.long), positions,
                                           None, output_attentions=True).attentions
    mean_map = torch.stack([a[0].float() for a in maps]).mean(dim=(0, 1))  # (n, n) over layers and heads
    latent = final.latent_positions[0]
    patches = [p for position in latent for p in range(position - K, position)]
    queries = range(n - len(answer) - 1, n - 1)  # the rows that predict each answer token
    expected_latent = mean_map[list(queries)][:, latent].sum(-1).mean()
    expected_patches = mean_map[list(queries)][:, patches].sum(-1).mean()
    assert float(out.answer_attention[0, 0]) == pytest.approx(float(expected_latent), rel=1e-4, abs=1e-6)
    assert float(out.answer_attention[0, 1]) == pytest.approx(float(expected_patches), rel=1e-4, abs=1e-6)
    assert float(expected_latent) > 0 and float(expected_patches) > 0
