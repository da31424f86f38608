"""Answering questions: IVT-LR generation from the latent chain's cache, against the original's generation, direct
answering (No-CoT) and explicit chain-of-thought decoding, on the same weights and the same questions.

Variants (each question: one image, the same prompt; every variant generates a fixed number of tokens, since no
EOS can stop it, so that only the method differs):

- ``ivtlr_b1`` / ``ivtlr_b16``: ``IVTLR.generate`` at batch 1 and batch 16 — the prompt once, K+1 new rows per
  latent step on the cache, then decoding from that same cache;
- ``original_b1``: the original's generation (batch 1 only): the latent chain recomputed from scratch at every
  step with eager attention maps (``IVTLR(recompute=True)``), then one pass without cache over the whole final
  sequence plus the first new token, then token-by-token decoding on the cache that pass built;
- ``nocot_b1``: the transformers model's own ``generate`` on the prompt without latents, the same answer length;
- ``cot_b1``: the same ``generate`` writing an explicit rationale (``cot_tokens`` new tokens).

Run ``ivtlr bench inference --help`` for the options.
"""
from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ivtlr.bench.common import (BenchModelSizes, Target, bench_setup, benchmark_parser, chat_prompts, format_table,
                                machine_info, parse_benchmark_args, report, time_interleaved)
from ivtlr import IVTLR
from ivtlr.testing import TinyBundle

logger = logging.getLogger("bench_inference")

DEFAULT_OUT = Path("benchmarks") / "results" / "inference.json"  # relative to where it runs
@dataclass(frozen=True)
class BenchConfig(BenchModelSizes):
    """The engine benchmark's model (Qwen2-VL architecture, a 280x280 image -> 100 merged image tokens, K=32,
    3 latents) answering with ``answer_tokens`` tokens ("AR steps"; the paper reports about 10)."""

    image_size: int = 280
    num_selected_patches: int = 32
    num_latents: int = 3
    question_tokens: int = 80  # text in the prompt besides the image tokens and the chat template
    answer_tokens: int = 10
    cot_tokens: int = 100  # an explicit rationale and the answer
    batch_size: int = 16


QUICK = BenchConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                    image_size=112, num_selected_patches=4, question_tokens=8, answer_tokens=4, cot_tokens=12,
                    batch_size=4)


@dataclass(frozen=True)
class Variant:
    name: str
    batch_size: int
    new_tokens: int  # generated per question
    run: Callable[[], int]  # one call; returns the number of tokens it generated per question


def prompt_batch(bundle: TinyBundle, config: BenchConfig, batch_size: int, device: torch.device) -> dict:
    """``batch_size`` chat prompts of equal length, each with its own picture (no padding anywhere)."""
    encoded = chat_prompts(bundle, config.question_tokens, config.image_size, batch_size)
    return {key: value.to(device) for key, value in encoded.items()}


def with_latents(prompts: dict, n_latent: int, latent_token_id: int) -> dict:
    """The engine's input: the prompts followed by ``n_latent`` latent slots."""
    batch = prompts["input_ids"].shape[0]
    latents = torch.full((batch, n_latent), latent_token_id, device=prompts["input_ids"].device)
    input_ids = torch.cat([prompts["input_ids"], latents], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": prompts["pixel_values"], "image_grid_thw": prompts["image_grid_thw"]}


@torch.no_grad()
def original_style_generate(engine: IVTLR, batch: dict, max_new_tokens: int) -> torch.Tensor:
    """The original's generation for one question: recomputed chain, uncached re-prefill, then cached decoding.

    Its positions are the plain 1-D range over the growing sequence (repeated over the M-RoPE rows).
    """
    model, backbone = engine.base_model, engine.backbone
    embed = backbone.input_embeddings()
    chain = engine(**batch)  # `recompute=True`: the prefix re-run at every latent step
    token = chain.logits[:, -1].argmax(-1)
    generated = [token]
    embeds = torch.cat([chain.inputs_embeds, embed(token)[:, None]], dim=1)
    length = embeds.shape[1]
    positions = torch.arange(length, device=embeds.device).expand(backbone.position_rows, 1, -1)
    out = model(inputs_embeds=embeds, position_ids=positions, use_cache=True)
    while len(generated) < max_new_tokens:
        token = out.logits[:, -1].argmax(-1)
        generated.append(token)
        if len(generated) == max_new_tokens:
            break
        positions = torch.full((backbone.position_rows, 1, 1), length, device=embeds.device)
        length += 1
        out = model(inputs_embeds=embed(token)[:, None], position_ids=positions, cache=out.cache, use_cache=True)
    return torch.stack(generated, dim=1)


def variants(bundle: TinyBundle, config: BenchConfig, device: torch.device) -> list[Variant]:
    model = bundle.model
    options = {"num_selected_patches": config.num_selected_patches, "pad_token_id": bundle.pad_token_id}
    cached = IVTLR(model, bundle.latent_token_id, **options)
    recompute = IVTLR(model, bundle.latent_token_id, recompute=True, **options)
    prompts = {n: prompt_batch(bundle, config, n, device) for n in sorted({1, config.batch_size})}
    latent = {n: with_latents(p, config.num_latents, bundle.latent_token_id) for n, p in prompts.items()}
    answer, cot = config.answer_tokens, config.cot_tokens

    def ours(n: int) -> Callable[[], int]:
        # No EOS: every question decodes exactly `answer` tokens.
        return lambda: cached.generate(**latent[n], max_new_tokens=answer, eos_token_id=[]).shape[1]

    def plain_generate(new_tokens: int) -> Callable[[], int]:
        # min_new_tokens keeps EOS from ending the answer early: a fixed length, as for the engine.
        def run() -> int:
            out = model.generate(**prompts[1], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            return out.shape[1] - prompts[1]["input_ids"].shape[1]
        return run

    return [
        Variant("ivtlr_b1", 1, answer, ours(1)),
        Variant(f"ivtlr_b{config.batch_size}", config.batch_size, answer, ours(config.batch_size)),
        Variant("original_b1", 1, answer, lambda: original_style_generate(recompute, latent[1], answer).shape[1]),
        Variant("nocot_b1", 1, answer, plain_generate(answer)),
        Variant("cot_b1", 1, cot, plain_generate(cot)),
    ]


@dataclass
class Result:
    name: str
    batch_size: int
    new_tokens: int
    call_ms: float  # median wall time of one call (a batch)

    @property
    def ms_per_question(self) -> float:
        return self.call_ms / self.batch_size

    @property
    def questions_per_second(self) -> float:
        return 1e3 / self.ms_per_question

    def as_dict(self) -> dict:
        return {**asdict(self), "ms_per_question": self.ms_per_question,
                "questions_per_second": self.questions_per_second}


def targets(results: dict[str, Result], batch_size: int) -> list[Target]:
    ours1, ours_batched = results["ivtlr_b1"], results[f"ivtlr_b{batch_size}"]
    return [
        Target(f"ivtlr batch-{batch_size} q/s / original-style q/s",
               ours_batched.questions_per_second / results["original_b1"].questions_per_second, 10.0, at_most=False),
        Target("ivtlr batch-1 latency / No-CoT latency (same answer length)",
               ours1.call_ms / results["nocot_b1"].call_ms, 1.3, at_most=True),
        Target("explicit CoT latency / ivtlr batch-1 latency", results["cot_b1"].call_ms / ours1.call_ms, 5.0,
               at_most=False),
    ]


def results_table(results: dict[str, Result]) -> str:
    nocot = results["nocot_b1"]
    rows = [[r.name, r.batch_size, r.new_tokens, r.call_ms, r.ms_per_question, r.questions_per_second,
             r.ms_per_question / nocot.ms_per_question] for r in results.values()]
    return format_table(["variant", "batch", "new tokens/q", "ms/call", "ms/question", "questions/s",
                         "time/No-CoT"], rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__.split("\n\n")[0], DEFAULT_OUT, warmup=1, unit="call")
    return parse_benchmark_args(parser, argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, log the table and target verdicts, write the JSON record and return it."""
    args = parse_args(argv)
    device, _, config, bundle = bench_setup(args, BenchConfig(), QUICK)
    bundle.model.eval()
    chosen = variants(bundle, config, device)
    with torch.no_grad():
        for variant in chosen:  # also the first, untimed call of each
            produced = variant.run()
            if produced != variant.new_tokens:
                raise RuntimeError(f"{variant.name} generated {produced} tokens per question, "
                                   f"not {variant.new_tokens}: the comparison would not be fair")
        times = time_interleaved({v.name: v.run for v in chosen}, device, args.warmup, args.repeats)
    results = {v.name: Result(v.name, v.batch_size, v.new_tokens, statistics.median(times[v.name]) * 1e3)
               for v in chosen}
    prompt_length = prompt_batch(bundle, config, 1, device)["input_ids"].shape[1]
    logger.info("prompt %d tokens, %d latents x (K=%d + 1) rows, answers of %d tokens (CoT %d); %s %s, %d threads",
                prompt_length, config.num_latents, config.num_selected_patches, config.answer_tokens,
                config.cot_tokens, device, args.dtype, torch.get_num_threads())
    return report(
        "inference", results_table(results), targets(results, config.batch_size), args.out,
        machine=machine_info(device),
        config={**asdict(config), "dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup,
                "quick": args.quick, "prompt_length": prompt_length},
        results={name: r.as_dict() for name, r in results.items()})
