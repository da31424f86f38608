"""The training-step and scaling benchmarks run end to end at tiny sizes, and the memory measurement is exact."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ivtlr.bench import engine as bench_engine
from ivtlr.bench.common import cpu_peak_bytes

FLOAT32 = 4


def test_cpu_peak_follows_the_calls_own_allocations_and_frees():
    held_before = [torch.empty(3_000_000)]

    def allocate_and_free() -> None:
        held_before.clear()  # freeing memory allocated before the call must not lower the peak below zero
        first = torch.empty(1_000_000)
        second = torch.empty(2_000_000)  # 3M floats held
        del first  # 2M
        third = torch.empty(500_000)  # 2.5M
        del second, third

    assert cpu_peak_bytes(allocate_and_free) == 3_000_000 * FLOAT32


def test_quick_run_measures_all_three_variants(run_quick_benchmark):
    written = run_quick_benchmark(bench_engine)

    results = written["results"]
    assert set(results) == set(bench_engine.VARIANTS)
    for variant in results.values():
        assert variant["median_ms"] > 0
        assert variant["peak_bytes"] > 0
        assert len(variant["times_ms"]) == 1
    # The cached chain and the original's recomputation compute the same loss on the same batch.
    assert results["cached"]["loss"] == pytest.approx(results["recompute"]["loss"], rel=1e-4)

    config = written["config"]
    inserted = config["num_latents"] * config["num_selected_patches"]
    assert config["final_length"] == config["input_length"] + inserted
    assert [isinstance(t["passed"], bool) for t in written["targets"]] == [True] * 3
    assert written["machine"]["torch"] == torch.__version__
    assert written["machine"]["torch_threads"] == 1


def test_scaling_benchmark_sweeps_every_axis_and_reports_ratios(run_quick_benchmark, tmp_path):
    """``ivtlr bench scaling --quick``: every point of every axis measured (or skipped with a note), the ratios
    computed from the same run's figures, the plot written."""
    from ivtlr.bench import scaling

    report = run_quick_benchmark(scaling)
    points = report["results"]["points"]
    quick = scaling.QUICK
    training = [p for p in points if p["kind"] == "training"]
    answering = [p for p in points if p["kind"] == "answering"]
    per_family_training = len(quick.latent_steps) + len(quick.image_tokens) - 1
    assert len(training) == per_family_training * len(quick.families)
    per_family_answering = len(quick.batches) + (len(quick.image_tokens) - 1) * len(quick.answering_image_batches)
    assert len(answering) == per_family_answering * len(quick.families)
    for point in answering:
        assert set(point["ms"]) == {"ivtlr", "nocot"}
        # the floors recounted from the configuration: one pass per latent step and per answer token; K + 1 rows
        # per step on top of a prompt of at least the question's tokens plus the image's
        passes = point["floors"]["passes"]
        assert passes == (quick.default_latents + quick.answer_tokens) / quick.answer_tokens
        inserted = quick.default_latents * (quick.num_selected_patches + 1)
        most = (quick.question_tokens + point["image_tokens"] + quick.answer_tokens - 1 + inserted) / (
            quick.question_tokens + point["image_tokens"] + quick.answer_tokens - 1)
        assert 1 < point["floors"]["rows"] <= most
    for point in training:
        assert set(point["ms"]) == {"cached", "chain", "recompute", "plain"}
        assert set(point["paired"]) >= {"cached/plain", "chain/plain", "cached/chain"}
        assert all(v is None or v > 0 for v in point["ms"].values())
    names = [t["name"] for t in report["targets"]]
    assert any("cached / plain" in n for n in names) and any("latency" in n for n in names)
    assert Path(report["config"]["plot"]).stat().st_size > 0


@pytest.mark.parametrize("latents", [2, 5])
def test_the_floors_run_the_chains_final_sequence_in_its_passes(latents):
    """The scaling benchmark's plain and chain-floor steps run exactly the chain's final sequence: as long as the
    engine's own output (also once the image is used up: 16 image tokens, K = 4, 5 steps insert 4, 4, 4, 4, 0), and
    with 1-D positions (Chameleon) the chain floor's loss is the model's own loss of the plain sequence."""
    from ivtlr import IVTLR
    from ivtlr.bench import scaling

    config = scaling.QUICK
    bundle, side = scaling.model_for("chameleon", config, 16, scaling.pixels_per_token_side("chameleon"))
    batches = scaling.training_batches(bundle, side, config, latents=latents)
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=config.num_selected_patches)
    with torch.no_grad():
        final_length = engine(**batches.latent).logits.shape[1]
        floor = scaling.chain_floor_loss(engine, batches.plain, batches.widths, batches.vision)
        own = bundle.model(**batches.plain).loss
    assert sum(batches.widths) == batches.plain["input_ids"].shape[1] == final_length
    torch.testing.assert_close(floor, own, atol=1e-5, rtol=1e-5)


def test_rl_benchmark_times_an_rl_step_against_a_training_step_at_the_same_batch(run_quick_benchmark):
    """``ivtlr bench rl --quick``: an ordinary training run and an RL run from its checkpoint, each step timed from the
    runs' own metrics, the ratio taken from the same run's figures."""
    from ivtlr.bench import rl

    written = run_quick_benchmark(rl)

    training, grpo = written["results"]["training"], written["results"]["rl"]
    assert len(training["steps_s"]) == rl.QUICK.training_steps and len(grpo["steps_s"]) == rl.QUICK.steps
    for value in (training["step_s"], grpo["step_s"], grpo["rollout_s"], grpo["update_s"],
                  grpo["rollout_answers_per_s"], grpo["rollout_questions_per_s"]):
        assert value > 0
    assert grpo["rollout_questions_per_s"] == pytest.approx(grpo["rollout_answers_per_s"] / rl.QUICK.group)
    assert written["results"]["rl_step_over_training_step"] == pytest.approx(grpo["step_s"] / training["step_s"])
    assert written["config"]["batch"] == rl.QUICK.questions * rl.QUICK.group == training["samples_per_step"]
    assert written["machine"]["cpu"] and written["machine"]["torch_threads"] == 1
