"""The inference benchmark runs end to end at tiny sizes, and its original-style path generates the engine's ids."""
from __future__ import annotations


import pytest
import torch


from ivtlr import IVTLR
from ivtlr.bench import inference as bench_inference
from ivtlr.testing import build_tiny


def test_original_style_generation_gives_the_engines_ids():
    """Recomputed chain + uncached re-prefill + cached decoding (the original) and decoding from the chain's own
    cache (ours) are the same greedy computation."""
    config = bench_inference.QUICK
    bundle = build_tiny("qwen2_vl", image_size=config.image_size)
    prompts = bench_inference.prompt_batch(bundle, config, 1, torch.device("cpu"))
    batch = bench_inference.with_latents(prompts, config.num_latents, bundle.latent_token_id)
    options = {"num_selected_patches": config.num_selected_patches}
    ours = IVTLR(bundle.model, bundle.latent_token_id, **options).generate(**batch, max_new_tokens=6,
                                                                            eos_token_id=[])
    original = bench_inference.original_style_generate(
        IVTLR(bundle.model, bundle.latent_token_id, recompute=True, **options), batch, 6)
    assert ours.shape == (1, 6)
    assert torch.equal(ours, original)


def test_quick_run_times_every_variant(run_quick_benchmark):
    written = run_quick_benchmark(bench_inference)
    config = written["config"]
    batch = config["batch_size"]
    results = written["results"]
    assert set(results) == {"ivtlr_b1", f"ivtlr_b{batch}", "original_b1", "nocot_b1", "cot_b1"}
    for name, result in results.items():
        assert result["call_ms"] > 0
        assert result["new_tokens"] == (config["cot_tokens"] if name == "cot_b1" else config["answer_tokens"])
        assert result["ms_per_question"] == pytest.approx(result["call_ms"] / result["batch_size"])
    assert results[f"ivtlr_b{batch}"]["batch_size"] == batch
    assert [isinstance(t["passed"], bool) for t in written["targets"]] == [True] * 3
    assert written["machine"]["torch_threads"] == 1
