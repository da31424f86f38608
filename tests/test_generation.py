"""Batched latent generation against independent computations: one-at-a-time generation and teacher forcing."""
from __future__ import annotations

import pytest
import torch

from engine_inputs import SampleSpec, collate, encode_sample
from ivtlr import IVTLR
from ivtlr.testing import FAMILIES, TinyBundle, build_tiny

MAX_NEW = 8
K = 3
# Different questions (prompt lengths), image sizes and numbers of latents in one batch.
MIXED = [
    SampleSpec("What is in the picture?", 3, image_size=(112, 112), seed=1),
    SampleSpec("Which digit is written in the top left corner of this image?", 1, image_size=(56, 84), seed=2),
    SampleSpec("Count?", 0, image_size=(84, 56), seed=3),
    SampleSpec("What colour is the background here?", 2, image_size=(56, 56), seed=4),
]


@pytest.fixture(scope="module", params=FAMILIES)
def bundle(request) -> TinyBundle:
    return build_tiny(request.param)


def prompt_batch(bundle: TinyBundle, specs: list[SampleSpec], padding_side: str = "left") -> dict:
    """Prompt + latent slots of each spec (its answer cut off), padded into one batch."""
    samples = []
    for spec in specs:
        sample = encode_sample(bundle, spec)
        end = int((sample["labels"] == -100).sum())
        samples.append({**sample, "input_ids": sample["input_ids"][:end], "labels": sample["labels"][:end]})
    batch = collate(bundle, samples, padding_side)
    batch.pop("labels")
    return batch


def engine_for(bundle: TinyBundle, **options) -> IVTLR:
    return IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=K, eos_token_id=bundle.eos_token_id,
                 pad_token_id=bundle.pad_token_id, **options)


def unpadded(out, b: int) -> list[int]:
    return out.sequences[b, : int(out.lengths[b])].tolist()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_greedy_equals_one_at_a_time(bundle, padding_side):
    engine = engine_for(bundle)
    batched = engine.generate(**prompt_batch(bundle, MIXED, padding_side), max_new_tokens=MAX_NEW, return_dict=True)
    assert batched.sequences.shape == (len(MIXED), int(batched.lengths.max()))
    for b, spec in enumerate(MIXED):
        alone = engine.generate(**prompt_batch(bundle, [spec]), max_new_tokens=MAX_NEW, return_dict=True)
        assert unpadded(batched, b) == unpadded(alone, 0), b
        assert [s.tolist() for s in batched.selected[b]] == [s.tolist() for s in alone.selected[0]], b
        assert len(batched.selected[b]) == spec.n_latent


def test_greedy_ids_equal_teacher_forced_recompute_argmax(bundle):
    """Decoding from the chain's cache gives, token by token, the argmax of the original's algorithm (re-run
    from scratch on prompt + latents + the ids generated so far)."""
    engine = engine_for(bundle)
    reference = engine_for(bundle, recompute=True)
    compared = 0
    for spec in MIXED[:2]:
        batch = prompt_batch(bundle, [spec])
        generated = engine.generate(**batch, max_new_tokens=5, eos_token_id=[])
        ids = batch["input_ids"]
        vision = {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask")}
        # A random model may emit an image placeholder id; fed back as input it would be read as an image token,
        # so the comparison of that question stops there (the cached decoder embeds it as text).
        tokens = generated[0].tolist()
        tokens = tokens[: tokens.index(bundle.image_token_id)] if bundle.image_token_id in tokens else tokens
        with torch.no_grad():
            for token in tokens:
                logits = reference(ids, **vision).logits
                assert int(logits[0, -1].argmax()) == token
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
                compared += 1
    assert compared >= 4


def test_each_sample_stops_at_its_own_eos(bundle):
    engine = engine_for(bundle)
    batch = prompt_batch(bundle, MIXED)
    free = engine.generate(**batch, max_new_tokens=MAX_NEW, eos_token_id=[], return_dict=True)
    assert free.lengths.tolist() == [MAX_NEW] * len(MIXED)
    eos = int(free.sequences[1, 0])  # sample 1's first token: it stops at once
    pad = -7
    stopped = engine.generate(**batch, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=pad, return_dict=True)
    for b in range(len(MIXED)):
        run = free.sequences[b].tolist()
        expected = run[: run.index(eos) + 1] if eos in run else run
        assert unpadded(stopped, b) == expected, b
        assert stopped.sequences[b, len(expected):].eq(pad).all(), b
    assert stopped.lengths[1] == 1 and int(stopped.lengths.max()) > 1


def test_max_new_tokens_bounds_every_sample(bundle):
    engine = engine_for(bundle)
    out = engine.generate(**prompt_batch(bundle, MIXED), max_new_tokens=3, eos_token_id=[], return_dict=True)
    longer = engine.generate(**prompt_batch(bundle, MIXED), max_new_tokens=6, eos_token_id=[], return_dict=True)
    assert out.sequences.shape == (len(MIXED), 3)
    assert torch.equal(out.sequences, longer.sequences[:, :3])


def test_sampling_is_reproducible_per_seed(bundle):
    engine = engine_for(bundle)
    batch = prompt_batch(bundle, MIXED)

    def sample(seed: int, **options) -> torch.Tensor:
        return engine.generate(**batch, max_new_tokens=MAX_NEW, eos_token_id=[], do_sample=True,
                               generator=torch.Generator().manual_seed(seed), **options)

    greedy = engine.generate(**batch, max_new_tokens=MAX_NEW, eos_token_id=[])
    first = sample(0)
    assert torch.equal(first, sample(0))
    assert not torch.equal(first, sample(1))
    assert not torch.equal(first, greedy)
    # Sampling from the single most likely token is greedy decoding, whatever the seed and temperature.
    assert torch.equal(sample(3, top_k=1, temperature=0.5), greedy)
    assert torch.equal(sample(4, top_p=1e-6), greedy)


@pytest.mark.parametrize("n_latent", [0, 1, 2, 3])
def test_number_of_latents_is_what_the_prompt_asks_for(n_latent):
    """Each latent slot in the prompt is one step of K patches; the ids follow the final sequence's argmax."""
    bundle = build_tiny("qwen2_vl")
    engine = engine_for(bundle)
    spec = SampleSpec("What is in the picture?", n_latent, seed=1)
    batch = prompt_batch(bundle, [spec])
    out = engine.generate(**batch, max_new_tokens=2, eos_token_id=[], return_dict=True)
    assert [len(s) for s in out.selected[0]] == [K] * n_latent
    with torch.no_grad():
        final = engine(**batch)
    assert int(out.sequences[0, 0]) == int(final.logits[0, -1].argmax())
    assert final.logits.shape[1] == batch["input_ids"].shape[1] + K * n_latent
