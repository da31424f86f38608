"""One IVT-LR training step (forward + backward): the cached engine against the original's algorithm and a plain
forward of a sequence just as long.

Variants, measured side by side on the same weights and the same batch:

- ``cached``: ``IVTLR(recompute=False)``, sdpa — the prompt once, then only the K+1 new rows of each latent step;
- ``recompute``: ``IVTLR(recompute=True)`` — the original: the whole prefix re-run at every step with eager
  attention returning every attention map, every pass kept in the autograd graph;
- ``plain``: the transformers model's own forward with ``labels`` over a latent-free sequence of the cached
  path's final length (prompt, ordinary text where the inserted rows would be, the same answer), sdpa.

The plain step is the floor: the final IVT-LR sequence cannot be trained for less than one ordinary pass over it.
Run ``ivtlr bench engine --help`` for the options.
"""
from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ivtlr.bench.common import (BenchModelSizes, Measurement, Target, bench_setup, benchmark_parser, chat_prompts,
                                filler_ids, format_table, load_average, machine_info, measure_all, parse_benchmark_args,
                                report)
from ivtlr import IVTLR
from ivtlr.testing import FAMILIES, TinyBundle

logger = logging.getLogger("bench_engine")

VARIANTS = ("cached", "recompute", "plain")
DEFAULT_OUT = Path("benchmarks") / "results" / "engine.json"  # relative to where it runs
@dataclass(frozen=True)
class BenchConfig(BenchModelSizes):
    """Model and batch shape. The default: Qwen2-VL architecture, a 280x280 image (100 merged image tokens),
    K=32, 3 latents, ~300 input tokens, ~400 after the 3*(32+1) inserted rows, batch 4."""

    image_size: int = 280
    num_selected_patches: int = 32
    num_latents: int = 3
    question_tokens: int = 80  # text in the prompt besides the image tokens and the chat template
    answer_tokens: int = 100  # labelled tokens after the latents, EOS included
    batch_size: int = 4

    @property
    def inserted_rows(self) -> int:
        """Rows the latent chain adds beyond the latent slots themselves: K patches per step."""
        return self.num_latents * self.num_selected_patches


QUICK = BenchConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                    image_size=112, num_selected_patches=4, question_tokens=8, answer_tokens=8, batch_size=2)


@dataclass
class Batches:
    """The same samples twice: with latent slots (for the engine) and as a plain sequence of equal final length."""

    latent: dict[str, torch.Tensor]
    plain: dict[str, torch.Tensor]
    prompt_length: int
    image_tokens: int


def build_batches(bundle: TinyBundle, config: BenchConfig, dtype: torch.dtype, device: torch.device) -> Batches:
    """Identical-length samples (one image each, different pictures), so every variant sees one dense batch."""
    enc = chat_prompts(bundle, config.question_tokens, config.image_size, config.batch_size)
    prompt = enc["input_ids"]
    batch, prompt_length = prompt.shape
    answer = torch.tensor(filler_ids(bundle, config.answer_tokens - 1) + [bundle.eos_token_id]).expand(batch, -1)
    latents = torch.full((batch, config.num_latents), bundle.latent_token_id)
    filler = torch.tensor(filler_ids(bundle, config.inserted_rows + config.num_latents)).expand(batch, -1)

    def sample(middle: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = torch.cat([prompt, middle, answer], dim=1)
        labels = torch.cat([torch.full_like(prompt, -100), torch.full_like(middle, -100), answer], dim=1)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "labels": labels.to(device), "pixel_values": enc["pixel_values"].to(device, dtype),
                "image_grid_thw": enc["image_grid_thw"].to(device)}

    plain = sample(filler)
    # Qwen's own forward needs the token types to place its multimodal rotary positions.
    plain["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"],
                                            torch.zeros(batch, plain["input_ids"].shape[1] - prompt_length,
                                                        dtype=enc["mm_token_type_ids"].dtype)], dim=1).to(device)
    image_tokens = int((prompt[0] == bundle.image_token_id).sum())
    return Batches(latent=sample(latents), plain=plain, prompt_length=prompt_length, image_tokens=image_tokens)


def training_steps(bundle: TinyBundle, config: BenchConfig, batches: Batches,
                   latent_grad: str) -> dict[str, Callable[[], float]]:
    """One forward + backward per variant; each returns its loss (so the variants can be compared)."""
    model = bundle.model

    def engine_step(engine: IVTLR) -> Callable[[], float]:
        def step() -> float:
            out = engine(**batches.latent)
            out.loss.backward()
            if out.attention_mask.shape[1] != batches.plain["input_ids"].shape[1]:
                raise RuntimeError(f"final length {out.attention_mask.shape[1]} differs from the plain "
                                   f"sequence's {batches.plain['input_ids'].shape[1]}")
            return out.loss.item()
        return step

    def plain_step() -> float:
        loss = model(**batches.plain).loss
        loss.backward()
        return loss.item()

    common = {"latent_token_id": bundle.latent_token_id, "num_selected_patches": config.num_selected_patches,
              "latent_grad": latent_grad}
    return {"cached": engine_step(IVTLR(model, recompute=False, **common)),
            "recompute": engine_step(IVTLR(model, recompute=True, **common)),
            "plain": plain_step}


def targets(results: dict[str, Measurement]) -> list[Target]:
    """The goals the project tracks for the cached training step."""
    cached, recompute, plain = (results[v] for v in VARIANTS)
    return [
        Target("recompute time / cached time", recompute.median_ms / cached.median_ms, 3.0, at_most=False),
        Target("cached time / plain time", cached.median_ms / plain.median_ms, 1.3, at_most=True),
        Target("cached peak memory / plain peak memory", cached.peak_mib / plain.peak_mib, 1.3, at_most=True),
    ]


def results_table(results: dict[str, Measurement]) -> str:
    cached, plain = results["cached"], results["plain"]
    rows = [[name, m.median_ms, m.peak_mib, m.median_ms / plain.median_ms, m.peak_mib / plain.peak_mib,
             m.median_ms / cached.median_ms] for name, m in results.items()]
    return format_table(["variant", "ms/step", "peak MiB", "time/plain", "mem/plain", "time/cached"], rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__.split("\n\n")[0], DEFAULT_OUT, warmup=2, unit="step")
    parser.add_argument("--latent-grad", default="detach", choices=("detach", "full"),
                        help="gradient through the fed-back hidden states: none (the original) or full (Coconut)")
    parser.add_argument("--family", default="qwen2_vl", choices=FAMILIES,
                        help="model type of the tiny model; its image is sized to Qwen2-VL's number of image tokens")
    return parse_benchmark_args(parser, argv)  # under --quick, the loss-recording call in main() is the warmup


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, log the table and target verdicts, write the JSON record and return it."""
    args = parse_args(argv)
    device, dtype, config, bundle = bench_setup(args, BenchConfig(), QUICK)
    bundle.model.train()
    batches = build_batches(bundle, config, dtype, device)
    final_length = batches.plain["input_ids"].shape[1]
    logger.info("batch %d, prompt %d tokens (%d image), input %d tokens, final %d tokens; %s %s, %d threads",
                config.batch_size, batches.prompt_length, batches.image_tokens, batches.latent["input_ids"].shape[1],
                final_length, device, args.dtype, torch.get_num_threads())
    machine = machine_info(device)  # before the run, so that its load is the one the run started under
    steps = training_steps(bundle, config, batches, args.latent_grad)
    # Every step starts as after `optimizer.zero_grad()`: the previous step's gradients are gone.
    drop_gradients = functools.partial(bundle.model.zero_grad, set_to_none=True)

    losses = {}  # the first call of each variant, which also warms it up
    for name, step in steps.items():
        drop_gradients()
        losses[name] = step()
    results = measure_all(steps, device, args.warmup, args.repeats, prepare=drop_gradients)
    return report(
        "engine_training_step", results_table(results), targets(results), args.out,
        machine={**machine, "load_average_1min_after": load_average()},
        config={**asdict(config), "dtype": args.dtype, "latent_grad": args.latent_grad, "quick": args.quick,
                "repeats": args.repeats, "warmup": args.warmup, "prompt_length": batches.prompt_length,
                "image_tokens": batches.image_tokens, "input_length": batches.latent["input_ids"].shape[1],
                "final_length": final_length, "family": args.family},
        results={name: {**m.as_dict(), "loss": losses[name]} for name, m in results.items()})
