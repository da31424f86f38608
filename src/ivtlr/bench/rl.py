"""An RL step (GRPO on latent chains, ``ivtlr rl``) against an ordinary training step (``ivtlr train``) over the same
number of sequences, in one run on the same machine.

- ``training``: ``ivtlr train`` at the last curriculum stage (3 latent steps, the rationale all latent) with
  ``batch_size_training = questions * group``, one micro-batch per optimizer step; seconds per optimizer step from
  its ``metrics.jsonl`` (``samples / samples_per_s``: data loading and collation included). Its final checkpoint is
  the RL run's starting point, so no separate SFT run is needed.
- ``rl``: ``ivtlr rl`` from that checkpoint, ``questions`` questions x ``group`` rollouts per step (3 latent steps,
  sigma 0.03, tau 0.01, answers sampled up to ``max_new_tokens``), all in one rollout pass and one replay pass; the
  rollout seconds, the update seconds and the rollout answers/s each step logs.

Both runs use the demo's tiny Qwen2-VL (56 px digit puzzles, K = 1) and the built-in digit puzzles. Every figure is
the median over the steps after the first (which pays for lazy initialisation); with one step, that step.
Run ``ivtlr bench rl --help`` for the options.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ivtlr.bench.common import apply_cpu_settings, format_table, machine_info, report
from ivtlr.config import Config
from ivtlr.metrics_log import JSONL_FILE

logger = logging.getLogger("bench_rl")

DEFAULT_OUT = Path("benchmarks") / "results" / "rl.json"  # relative to where it runs
N_LATENT = 3  # the digit puzzles' reasoning steps: the last curriculum stage
SIGMA, TAU = 0.03, 0.01
TRAINING_LR, RL_LR = 1e-3, 1e-5
#: The demo's tiny model and data, shared by both runs.
BASE_CONFIG = {"model": "tiny:qwen2_vl", "image_size": 56, "num_selected_patches": 1, "use_lora": False,
               "max_latent_stage": N_LATENT, "epochs_per_stage": 1, "mode": "ivtlr", "patch_order": "position",
               "gradient_accumulation_steps": 1, "log_with": ["jsonl"], "seed": 0}


@dataclass(frozen=True)
class Sizes:
    """How much each run does: ``questions * group`` sequences per optimizer step in both."""

    questions: int
    group: int
    steps: int  # RL steps
    training_steps: int
    max_new_tokens: int

    @property
    def batch(self) -> int:
        return self.questions * self.group


QUICK = Sizes(questions=2, group=2, steps=2, training_steps=2, max_new_tokens=4)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=8, help="questions per RL step (default: 8)")
    parser.add_argument("--group", type=int, default=8, help="rollouts per question, G (default: 8)")
    parser.add_argument("--steps", type=int, default=5, help="RL steps measured (default: 5)")
    parser.add_argument("--training-steps", type=int, default=4, help="ordinary training steps (default: 4)")
    parser.add_argument("--max-new-tokens", type=int, default=24,
                        help="answer tokens a rollout may sample (default: 24, the demo's eval budget)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--keep-denormals", action="store_true",
                        help="leave the CPU's denormal handling as it is (default: flush denormals to zero)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if min(args.questions, args.steps, args.training_steps, args.max_new_tokens) < 1 or args.group < 2:
        parser.error("--questions, --steps, --training-steps and --max-new-tokens must be >= 1, --group >= 2")
    return args


def sizes_of(args: argparse.Namespace) -> Sizes:
    if args.quick:
        return QUICK
    return Sizes(args.questions, args.group, args.steps, args.training_steps, args.max_new_tokens)


def main(argv: list[str] | None = None) -> dict:
    """Run both, log the table, write the JSON record and return it."""
    args = parse_args(argv)
    apply_cpu_settings(args)
    sizes = sizes_of(args)
    machine = machine_info(torch.device(args.device))  # before the runs: the load they started under
    logger.info("%d questions x %d rollouts = %d sequences per step; %s, %d threads", sizes.questions, sizes.group,
                sizes.batch, args.device, torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="ivtlr-bench-rl-") as scratch, accelerate_device(args.device):
        training_run = training_config(sizes, Path(scratch))
        checkpoint = run_training(training_run)
        training = training_figures(read_metrics(training_run), sizes)
        rl_run = rl_config(sizes, Path(scratch), checkpoint)
        run_rl(rl_run)
        rl = rl_figures(read_metrics(rl_run), sizes)
    ratio = rl["step_s"] / training["step_s"]
    machine = {**machine, "load_average_1min_after": os.getloadavg()[0]}
    return report("rl_step", results_table(training, rl, ratio, sizes, machine), [], args.out, machine=machine,
                  config={**asdict(sizes), "batch": sizes.batch, "n_latent": N_LATENT, "sigma": SIGMA, "tau": TAU,
                          "training_lr": TRAINING_LR, "rl_lr": RL_LR, "device": args.device, "quick": args.quick,
                          "model": BASE_CONFIG["model"], "image_size": BASE_CONFIG["image_size"],
                          "num_selected_patches": BASE_CONFIG["num_selected_patches"]},
                  results={"training": training, "rl": rl, "rl_step_over_training_step": ratio})


# ---------------------------------------------------------------------------------------------------- the runs
@contextmanager
def accelerate_device(device: str) -> Iterator[None]:
    """The trainers' Accelerator takes CUDA whenever it is there; ``--device cpu`` must hold on a GPU machine too."""
    previous = os.environ.get("ACCELERATE_USE_CPU")
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = previous


def training_config(sizes: Sizes, scratch: Path) -> Config:
    """One epoch at stage 3 (``resume: 3`` with one epoch per stage): the rationale fully latent, as RL's chains."""
    return Config.from_dict({
        **BASE_CONFIG, "name": "training", "save_path": str(scratch), "resume": N_LATENT, "num_epochs": N_LATENT + 1,
        "batch_size_training": sizes.batch, "lr": TRAINING_LR,
        "dataset": {"source": "digits", "limit": sizes.batch * sizes.training_steps}})


def rl_config(sizes: Sizes, scratch: Path, checkpoint: Path) -> Config:
    return Config.from_dict({
        **BASE_CONFIG, "name": "rl", "save_path": str(scratch), "load_model_path": str(checkpoint), "lr": RL_LR,
        "dataset": {"source": "digits", "limit": sizes.batch * sizes.training_steps},
        "rl": {"steps": sizes.steps, "questions_per_step": sizes.questions, "group_size": sizes.group,
               "n_latent": N_LATENT, "sigma": SIGMA, "tau": TAU, "max_new_tokens": sizes.max_new_tokens}})


def run_training(config: Config) -> Path:
    """``ivtlr train`` in this process; its final checkpoint."""
    from ivtlr.training import train
    from ivtlr.training.accelerate_state import fresh_accelerate_state

    with fresh_accelerate_state():
        result = train(config)
    if result.checkpoint is None:
        raise RuntimeError(f"the training run {config.run_dir} saved no checkpoint")
    return result.checkpoint


def run_rl(config: Config) -> None:
    from ivtlr.rl import train_rl
    from ivtlr.training.accelerate_state import fresh_accelerate_state

    with fresh_accelerate_state():
        train_rl(config)


def read_metrics(config: Config) -> list[dict]:
    path = config.run_dir / JSONL_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------- figures
def steady(values: Sequence[float]) -> list[float]:
    """The steps after the first, whose time includes lazy initialisation (all of them when there is one)."""
    return list(values[1:]) if len(values) > 1 else list(values)


def training_figures(records: list[dict], sizes: Sizes) -> dict:
    steps = [r for r in records if "samples_per_s" in r]
    if len(steps) != sizes.training_steps or any(r["samples"] != sizes.batch for r in steps):
        raise RuntimeError(f"expected {sizes.training_steps} training steps of {sizes.batch} samples, got "
                           f"{[r['samples'] for r in steps]}")
    seconds = [r["samples"] / r["samples_per_s"] for r in steps]
    return {"step_s": statistics.median(steady(seconds)), "steps_s": seconds, "samples_per_step": sizes.batch}


def rl_figures(records: list[dict], sizes: Sizes) -> dict:
    steps = [r for r in records if "rollout_seconds" in r]
    if len(steps) != sizes.steps:
        raise RuntimeError(f"expected {sizes.steps} RL steps, got {len(steps)}")
    rollout = [r["rollout_seconds"] for r in steps]
    update = [r["update_seconds"] for r in steps]
    total = [a + b for a, b in zip(rollout, update)]
    answers_per_s = statistics.median(steady([r["rollouts_per_s"] for r in steps]))
    return {"step_s": statistics.median(steady(total)), "rollout_s": statistics.median(steady(rollout)),
            "update_s": statistics.median(steady(update)), "rollout_answers_per_s": answers_per_s,
            "rollout_questions_per_s": answers_per_s / sizes.group,
            "answer_tokens": statistics.mean(r["answer_tokens"] for r in steps),
            "steps_s": total, "rollouts_s": rollout, "updates_s": update}


def results_table(training: dict, rl: dict, ratio: float, sizes: Sizes, machine: dict) -> str:
    rows = [[f"training step s (batch {sizes.batch})", training["step_s"]],
            [f"RL step s ({sizes.questions} questions x G={sizes.group})", rl["step_s"]],
            ["  rollout s", rl["rollout_s"]],
            ["  update s", rl["update_s"]],
            ["RL step / training step", ratio],
            ["rollout answers/s", rl["rollout_answers_per_s"]],
            ["rollout questions/s", rl["rollout_questions_per_s"]],
            ["answer tokens per rollout (mean)", rl["answer_tokens"]],
            ["cpu", f"{machine['cpu']} (torch threads: {machine['torch_threads']})"]]
    if "gpu" in machine:
        rows.append(["gpu", machine["gpu"]])
    return format_table(["measure", "median"], rows)
