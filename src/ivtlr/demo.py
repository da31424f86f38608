"""``ivtlr demo``: IVT-LR and its baselines trained from scratch on the bundled digit puzzles, on a CPU, in minutes.

The demo is a user of the package, not a second implementation: it writes the digit data as M3CoT-schema parquet,
saves a tiny random Qwen2-VL (with a tokenizer fitted to the data) as an ordinary model directory, trains every
variant with :func:`ivtlr.training.train` from :class:`ivtlr.config.Config` objects, and scores each final checkpoint
with the evaluation harness.

Runs build on each other through ``load_model_path`` (and ``resume``), exactly as a user would chain runs:

1. visual pre-training: read the digit in one named cell (the training split's images). The methods compared start
   from a VLM that can already see; a random tiny model cannot, and learning to find and read a cell inside the
   reasoning task alone takes longer than the demo's budget. Every variant, No-CoT included, starts from this.
2. stage 0 of the curriculum (full written rationale) is the same for CoT and for the three latent variants, so it is
   trained once and every one of them continues from its checkpoint at the first epoch of stage 1.
3. No-CoT trains from the pre-trained model for as many epochs as stage 0 and the latent stages together.

Nothing is chosen on the test split: the recipe below was fixed on the validation split, and the report gives both.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .config import Config, DatasetConfig, EvalConfig
from .data import load_examples
from .data.curriculum import format_prompt_text, split_rationale, target_text
from .demo_data import DIFFERENCE_MOD_10, READ_CELL, SUM_LAST_DIGIT, write_digit_reasoning
from .evaluation import GenerationSettings, evaluate, evaluation_summary, load_checkpoint_model
from .explain import save_selection_png
from .inference import answer_question
from .tiny import build_tiny

logger = logging.getLogger(__name__)

#: The report's rows, in the paper's order: baselines, then the two ablations, then the method.
VARIANTS = ("nocot", "cot", "latent_text_only", "latent_vision_only", "ivtlr")
VARIANT_LABELS = {
    "nocot": "No-CoT",
    "cot": "CoT",
    "latent_text_only": "latent text only (Coconut, K=0)",
    "latent_vision_only": "latent vision only",
    "ivtlr": "IVT-LR",
}
LATENT_VARIANTS = ("latent_text_only", "latent_vision_only", "ivtlr")
PRETRAIN_RUN = "pretrain_reading"
STAGE0_RUN = "stage0_cot"
#: Acceptance targets on the test split (the issue's): IVT-LR >= CoT, >= No-CoT + 10 points, <= 1/5 of CoT's AR steps.
TARGET_MARGIN_OVER_NOCOT = 0.10
TARGET_AR_FRACTION_OF_COT = 0.2


@dataclass(frozen=True)
class DemoRecipe:
    """Everything the demo trains with. ``FULL`` holds the settings the validation split favoured within the CPU
    budget: 2x2-token cells and the 0.02 init read digits faster; ten ordered options and the reading pre-training
    turned chance-level runs into learning ones; two latent steps (the two reads), because with the third (the
    arithmetic) latent too every latent variant stayed at chance on validation (README, known limits)."""

    # Data: a 2x2 grid of digit scans; 56 px cells are 2x2 merged Qwen2-VL tokens each (16 image tokens).
    n_train: int
    n_val: int
    n_test: int
    grid: int
    cell_px: int
    kinds: tuple[str, ...]  # question kinds (``ivtlr.demo_data.KINDS``)
    all_digit_options: bool  # the ten digits as options, in order (see ``ivtlr.demo_data``), rather than four
    # Model: a tiny Qwen2-VL built from its config; weights re-drawn at the usual 0.02 std (see build_base_model).
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    initializer_range: float
    # Training.
    n_pretrain: int  # reading questions of the visual pre-training (one per training image)
    pretrain_epochs: int
    stage0_epochs: int  # written-rationale epochs shared by CoT and the latent variants
    epochs_per_stage: int  # epochs of each latent stage 1..max_latent_stage (CoT keeps training as long)
    max_latent_stage: int
    batch_size: int
    lr: float
    warmup_steps: int
    num_selected_patches: int  # K: one digit cell per latent step
    # Evaluation.
    eval_batch_size: int
    max_new_tokens: int
    n_explained: int  # test questions drawn with the patches each latent step chose

    @property
    def image_size(self) -> int:
        return self.grid * self.cell_px

    @property
    def total_epochs(self) -> int:
        return self.stage0_epochs + self.epochs_per_stage * self.max_latent_stage


FULL = DemoRecipe(n_train=2000, n_val=200, n_test=300, grid=2, cell_px=56,
                  kinds=(SUM_LAST_DIGIT, DIFFERENCE_MOD_10), all_digit_options=True, hidden_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=4, intermediate_size=256, vocab_size=600, initializer_range=0.02,
                  n_pretrain=2000, pretrain_epochs=10, stage0_epochs=6, epochs_per_stage=2, max_latent_stage=2,
                  batch_size=16, lr=1e-3, warmup_steps=50,
                  num_selected_patches=4, eval_batch_size=50, max_new_tokens=64, n_explained=4)
#: A smoke run of the whole pipeline (the test suite's): every variant, one epoch per stage, a handful of questions.
QUICK = replace(FULL, n_train=16, n_val=8, n_test=8, hidden_size=32, intermediate_size=64, num_heads=2,
                num_kv_heads=2, vocab_size=400, n_pretrain=16, pretrain_epochs=1, stage0_epochs=1, epochs_per_stage=1,
                batch_size=8, warmup_steps=0, eval_batch_size=8, max_new_tokens=48, n_explained=2)


# ---------------------------------------------------------------------------------------------------- building blocks
@dataclass(frozen=True)
class DemoData:
    """``<split>.parquet`` paths (M3CoT schema) of the reasoning questions and of the reading pre-training ones."""

    reasoning: dict[str, str]
    reading: dict[str, str]


def write_data(recipe: DemoRecipe, directory: Path, seed: int) -> DemoData:
    """The digit puzzles in the M3CoT schema, read back by the ordinary M3CoT loader. Both sets draw their scans from
    the same disjoint split pools, so pre-training never sees a validation or test scan."""
    common = dict(seed=seed, grid=recipe.grid, cell_px=recipe.cell_px)
    reasoning = write_digit_reasoning(directory / "reasoning", n_train=recipe.n_train, n_val=recipe.n_val,
                                      n_test=recipe.n_test, kinds=recipe.kinds,
                                      all_digit_options=recipe.all_digit_options, **common)
    reading = write_digit_reasoning(directory / "reading", n_train=recipe.n_pretrain, n_val=recipe.n_val,
                                    n_test=recipe.n_val, kinds=(READ_CELL,), **common)
    return DemoData(reasoning={split: str(path) for split, path in reasoning.items()},
                    reading={split: str(path) for split, path in reading.items()})


def tokenizer_corpus(data: DemoData) -> list[str]:
    """The training splits' prompts and targets: fitted to them, the tiny BPE makes each word one token, which
    keeps sequences (and CPU time) short. Only training splits are read."""
    corpus = []
    for data_files in (data.reasoning, data.reading):
        for example in load_examples("m3cot", "train", data_files=data_files):
            corpus.append(format_prompt_text(example.question, example.choices))
            corpus.append(target_text(split_rationale(example.rationale), example.answer))
    return corpus


def build_base_model(recipe: DemoRecipe, corpus: Sequence[str], directory: Path, seed: int) -> Path:
    """Save a tiny random Qwen2-VL as an ordinary model directory (config, weights, processor) that ``Config.model``
    can name like any checkpoint on disk.

    ``build_tiny`` draws weights with a wide 0.1 std so that untrained models have peaked attention for the engine
    tests; a model trained from scratch learns to read the digits markedly faster from the usual 0.02, so the weights
    are drawn again from the same config with that std.
    """
    bundle = build_tiny("qwen2_vl", seed=seed, hidden_size=recipe.hidden_size, num_layers=recipe.num_layers,
                        num_heads=recipe.num_heads, num_kv_heads=recipe.num_kv_heads,
                        intermediate_size=recipe.intermediate_size, image_size=recipe.image_size, corpus=corpus,
                        vocab_size=recipe.vocab_size)
    config = bundle.model.config
    for part in (config, config.text_config, config.vision_config):
        part.initializer_range = recipe.initializer_range
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = type(bundle.model)._from_config(config, attn_implementation="sdpa")
    model.generation_config = bundle.model.generation_config
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    bundle.processor.save_pretrained(str(directory))
    logger.info("tiny Qwen2-VL (%d parameters, %d-token vocabulary) saved to %s",
                sum(p.numel() for p in model.parameters()), len(bundle.tokenizer), directory)
    return directory


def run_config(recipe: DemoRecipe, *, name: str, mode: str, model_dir: Path, data_files: dict[str, str],
               runs_dir: Path, seed: int, **keys) -> Config:
    """One training run of the demo as a user would write it in YAML (``configs/tiny_cpu.yaml`` is the same shape).

    Full fine-tuning (the weights are random, LoRA would have nothing to adapt); checkpoints only at stage ends.
    """
    config = Config(
        project="ivtlr-demo", save_path=str(runs_dir), name=name, mode=mode, model=str(model_dir), seed=seed,
        dataset=DatasetConfig(source="m3cot", data_files=dict(data_files), eval_split="test"),
        image_size=recipe.image_size, use_lora=False, num_selected_patches=recipe.num_selected_patches,
        max_latent_stage=recipe.max_latent_stage, pad_latent_to_max=True, epochs_per_stage=recipe.epochs_per_stage,
        num_epochs=recipe.epochs_per_stage * (recipe.max_latent_stage + 1), batch_size_training=recipe.batch_size,
        gradient_accumulation_steps=1, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
        save_every_steps=_ONLY_AT_STAGE_ENDS, keep_last=1, log_with=["jsonl"],
        eval=EvalConfig(batch_size=recipe.eval_batch_size, max_new_tokens=recipe.max_new_tokens))
    return replace(config, **keys)


#: ``save_every_steps`` so large that a run saves at stage ends only (null would also save every epoch end).
_ONLY_AT_STAGE_ENDS = 10**9


@dataclass(frozen=True)
class PlannedRun:
    """A training run of the demo: its config, the run it starts from, where its epochs sit in the whole schedule
    (epoch 0 = the first reasoning epoch) and its share of the time."""

    config: Config
    parent: str | None  # the run whose final checkpoint this one loads (``load_model_path``, set once it exists)
    first_epoch: int
    cost: float  # relative CPU cost, for the ETA
    label: str  # what the ETA and the training-curve legend call it


def plan_runs(recipe: DemoRecipe, model_dir: Path, data: DemoData, runs_dir: Path, seed: int
              ) -> dict[str, PlannedRun]:
    """Every training run, in the order they must run: pre-training, stage 0, then one run per variant."""
    common = dict(model_dir=model_dir, runs_dir=runs_dir, seed=seed)
    runs = {
        PRETRAIN_RUN: PlannedRun(
            run_config(recipe, name=PRETRAIN_RUN, mode="cot", data_files=data.reading,
                       num_epochs=recipe.pretrain_epochs, epochs_per_stage=recipe.pretrain_epochs, **common),
            parent=None, first_epoch=-recipe.pretrain_epochs, cost=_EPOCH_COST["reading"] * recipe.pretrain_epochs,
            label="visual pre-training (reading one cell)"),
        STAGE0_RUN: PlannedRun(
            run_config(recipe, name=STAGE0_RUN, mode="cot", data_files=data.reasoning,
                       num_epochs=recipe.stage0_epochs, epochs_per_stage=recipe.stage0_epochs, **common),
            parent=PRETRAIN_RUN, first_epoch=0, cost=_EPOCH_COST["cot"] * recipe.stage0_epochs,
            label="stage 0 (written rationale, shared)"),
        "nocot": PlannedRun(
            run_config(recipe, name="nocot", mode="nocot", data_files=data.reasoning,
                       num_epochs=recipe.total_epochs, epochs_per_stage=recipe.total_epochs, **common),
            parent=PRETRAIN_RUN, first_epoch=0, cost=_EPOCH_COST["nocot"] * recipe.total_epochs,
            label=VARIANT_LABELS["nocot"]),
    }
    later_epochs = recipe.epochs_per_stage * recipe.max_latent_stage
    for variant in ("cot", *LATENT_VARIANTS):
        config = run_config(recipe, name=variant, mode=variant, data_files=data.reasoning,
                            resume=recipe.epochs_per_stage, **common)
        runs[variant] = PlannedRun(config, parent=STAGE0_RUN, first_epoch=recipe.stage0_epochs,
                                   cost=_EPOCH_COST[variant] * later_epochs, label=VARIANT_LABELS[variant])
    return runs


#: CPU time of an epoch relative to a written-rationale one (No-CoT sequences are shorter; latent steps add passes),
#: as measured in the full recipe.
_EPOCH_COST = {"reading": 0.85, "cot": 1.0, "nocot": 0.85, "latent_text_only": 1.15, "latent_vision_only": 1.15,
               "ivtlr": 1.15}
#: CPU time of evaluating one variant on validation and test, in the same unit.
_EVAL_COST = 0.3


class Eta:
    """Logs how far the demo is and how long it should still take, from the planned relative costs."""

    def __init__(self, total_cost: float):
        self.total, self.done, self.start = total_cost, 0.0, time.perf_counter()

    def advance(self, cost: float, what: str) -> None:
        self.done += cost
        elapsed = time.perf_counter() - self.start
        left = elapsed * max(self.total - self.done, 0.0) / self.done
        logger.info("demo: %s done (%.0f%%); %s elapsed, about %s left", what, 100 * self.done / self.total,
                    _minutes(elapsed), _minutes(left))


def _minutes(seconds: float) -> str:
    whole = max(0, round(seconds))
    return f"{whole // 60}m{whole % 60:02d}s"


# ---------------------------------------------------------------------------------------------------- running
def train_run(config: Config) -> Path:
    """``ivtlr train`` in this process; returns the run's final checkpoint."""
    from accelerate.state import AcceleratorState, GradientState

    from .training import train

    try:
        result = train(config)
    finally:
        # Every run builds its own Accelerator: forget the process-wide state the previous one left.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    if result.checkpoint is None:
        raise RuntimeError(f"run {config.name} saved no checkpoint")
    return result.checkpoint


def evaluate_checkpoint(checkpoint: Path, data_files: dict[str, str], splits: Sequence[str], out_dir: Path,
                        recipe: DemoRecipe) -> dict[str, dict]:
    """``ivtlr eval`` of one checkpoint on each split (the model loaded once): predictions JSONL and the summary per
    split, as the harness writes them; returns the summaries by split."""
    model = load_checkpoint_model(checkpoint, torch.device("cpu"))
    settings = GenerationSettings(n_latent=model.n_latent(None), max_new_tokens=recipe.max_new_tokens,
                                  image_size=model.image_size)
    summaries = {}
    for split in splits:
        examples = load_examples("m3cot", split, data_files=data_files)
        records = evaluate(model, examples, out_dir / f"predictions_{split}.jsonl", settings,
                           batch_size=recipe.eval_batch_size)
        run_info = {"checkpoint": str(checkpoint), "mode": model.mode, "split": split, "n_latent": settings.n_latent,
                    "num_selected_patches": model.engine.num_selected_patches}
        summaries[split] = evaluation_summary(records, ("domain", "topic"), run_info)
        (out_dir / f"summary_{split}.json").write_text(json.dumps(summaries[split], indent=2) + "\n")
    return summaries


#: Outline colours of latent steps 1, 2, 3 that no digit cell has (the cells are red, green, blue, yellow).
EXPLAIN_STEP_COLORS = ("black", "magenta", "cyan")


def explain_questions(checkpoint: Path, data_files: dict[str, str], count: int, out_dir: Path) -> list[Path]:
    """Draw, for the first ``count`` test questions, the image cells each latent step of the model inserted."""
    model = load_checkpoint_model(checkpoint, torch.device("cpu"))
    examples = load_examples("m3cot", "test", data_files=data_files, limit=count)
    paths = []
    for example in examples:
        result = answer_question(model, example.image, example.question, example.choices)
        title = f"{example.question}  answered {result.answer or '-'}, gold {example.answer}"
        path = out_dir / f"{example.id}.png"
        save_selection_png(path, result.seen_image, result.grid_hw, result.selected, scale=3, title=title,
                           step_colors=EXPLAIN_STEP_COLORS)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------- report
def variant_row(summary_test: dict, summary_val: dict, train_seconds: float) -> dict:
    """The report's numbers for one variant: test accuracy, AR steps (generated tokens), s/question."""
    test, val = summary_test["overall"], summary_val["overall"]
    return {"accuracy": test["accuracy"], "ar_steps": test["avg_generated_tokens"],
            "seconds_per_question": test["seconds_per_question"], "validation_accuracy": val["accuracy"],
            "test_questions": test["count"], "unanswered": test["unanswered"],
            "accuracy_by_topic": {topic: stats["accuracy"] for topic, stats in summary_test["groups"]["topic"].items()},
            "train_seconds": train_seconds}


def target_checks(rows: dict[str, dict]) -> dict[str, bool]:
    """The acceptance targets, on the test split."""
    ivtlr, cot, nocot = rows["ivtlr"], rows["cot"], rows["nocot"]
    return {"ivtlr_accuracy_at_least_cot": ivtlr["accuracy"] >= cot["accuracy"],
            "ivtlr_accuracy_at_least_nocot_plus_10_points":
                ivtlr["accuracy"] >= nocot["accuracy"] + TARGET_MARGIN_OVER_NOCOT,
            "ivtlr_ar_steps_at_most_a_fifth_of_cot":
                ivtlr["ar_steps"] <= TARGET_AR_FRACTION_OF_COT * cot["ar_steps"]}


def results_table(report: dict) -> str:
    """The markdown table of every variant's numbers."""
    lines = ["| variant | test accuracy (%) | validation accuracy (%) | AR steps | s/question | training (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for variant, row in report["variants"].items():
        lines.append(f"| {VARIANT_LABELS[variant]} | {100 * row['accuracy']:.1f} | "
                     f"{100 * row['validation_accuracy']:.1f} | {row['ar_steps']:.1f} | "
                     f"{row['seconds_per_question']:.4f} | {row['train_seconds']:.0f} |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    recipe = report["recipe"]
    lines = ["# IVT-LR demo: digit-grid reasoning, tiny Qwen2-VL trained from scratch on a CPU", "",
             f"{recipe['n_train']} training questions, {recipe['n_test']} test questions "
             f"({'quick smoke run' if report['quick'] else 'full recipe'}); wall time "
             f"{_minutes(report['wall_seconds'])} on {report['threads']} CPU thread(s).", "", results_table(report), "",
             "AR steps: generated tokens per question (EOS included). s/question: generation wall time per question "
             f"in batches of {recipe['eval_batch_size']}. Training (s) excludes the shared runs: visual pre-training "
             f"({recipe['pretrain_epochs']} epochs, {report['pretraining']['train_seconds']:.0f} s; it reads the named "
             f"cell's digit in {100 * report['pretraining']['reading_validation_accuracy']:.1f} % of validation "
             f"images) and, for CoT and the latent variants, stage 0 ({recipe['stage0_epochs']} epochs, "
             f"{report['stage0_seconds']:.0f} s).", "",
             "Targets (test split):", ""]
    lines += [f"- {name.replace('_', ' ')}: {'met' if met else 'NOT met'}" for name, met in report["targets"].items()]
    lines += ["", f"![training curves]({report['files']['training_curve']})", "",
              "Image cells each latent step of IVT-LR inserted, for a few test questions:", ""]
    lines += [f"![{Path(p).stem}]({p})" for p in report["files"]["explain"]]
    return "\n".join(lines) + "\n"


def read_loss_curve(run_dir: Path, first_epoch: int, resume_epoch: int) -> tuple[list[float], list[float]]:
    """(epochs into the whole schedule, loss) per optimizer step, from the run's ``metrics.jsonl``."""
    from .metrics_log import JSONL_FILE

    records = [json.loads(line) for line in (run_dir / JSONL_FILE).read_text().splitlines() if line]
    per_epoch: dict[int, int] = {}
    for record in records:
        per_epoch[record["epoch"]] = per_epoch.get(record["epoch"], 0) + 1
    seen: dict[int, int] = {}
    xs, ys = [], []
    for record in records:
        epoch = record["epoch"]
        seen[epoch] = seen.get(epoch, 0) + 1
        xs.append(first_epoch + epoch - resume_epoch + seen[epoch] / per_epoch[epoch])
        ys.append(record["loss"])
    return xs, ys


def plot_training_curves(curves: dict[str, tuple[list[float], list[float]]], stage_starts: Sequence[float],
                         path: Path) -> Path:
    """Training loss against epochs, one line per run (a running mean over a tenth of an epoch), dotted lines where
    latent stages begin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.8))
    for label, (xs, ys) in curves.items():
        steps_per_epoch = sum(1 for x in xs if x <= xs[0] + 1) or 1
        axes.plot(xs, running_mean(ys, max(1, steps_per_epoch // 10)), label=label, linewidth=1.2)
    for stage, start in enumerate(stage_starts, start=1):
        axes.axvline(start, color="grey", linestyle=":", linewidth=1)
        axes.text(start, 0.02, f" stage {stage}", transform=axes.get_xaxis_transform(), fontsize=8, rotation=90,
                  va="bottom")
    axes.set_xlabel("epoch")
    axes.set_ylabel("training loss (per labelled token)")
    axes.set_yscale("log")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.set_title("IVT-LR demo: training loss")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value - (values[index - window] if index >= window else 0.0)
        out.append(total / min(index + 1, window))
    return out


# ---------------------------------------------------------------------------------------------------- command
#: Subfolders of ``--out`` the demo writes; a new demo run clears them (a stale run directory would be resumed).
OUTPUT_PARTS = ("data", "base_model", "runs", "eval", "explain")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="smoke run of the whole pipeline in well under a minute (tiny data, 1 epoch per stage)")
    parser.add_argument("--out", type=Path, default=Path("ivtlr_demo"), help="report folder (default: ivtlr_demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the training order")


def run(args: argparse.Namespace) -> int:
    for name in ("accelerate.checkpointing", "accelerate.accelerator"):  # a line per saved file otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    recipe = QUICK if args.quick else FULL
    report = run_demo(recipe, args.out, seed=args.seed, quick=args.quick)
    print(results_table(report))  # noqa: T201 - the command's result
    return 0


def run_demo(recipe: DemoRecipe, out: Path, *, seed: int = 0, quick: bool = False) -> dict:
    """Data -> base model -> pre-training -> stage 0 -> every variant -> evaluation -> report files; returns the
    report."""
    started = time.perf_counter()
    for part in OUTPUT_PARTS:
        shutil.rmtree(out / part, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    data = write_data(recipe, out / "data", seed)
    model_dir = build_base_model(recipe, tokenizer_corpus(data), out / "base_model", seed)
    runs = plan_runs(recipe, model_dir, data, out / "runs", seed)
    eta = Eta(sum(r.cost for r in runs.values()) + _EVAL_COST * (len(VARIANTS) + 1))

    checkpoints, train_seconds, curves, rows = {}, {}, {}, {}
    for name, planned in runs.items():
        config = planned.config
        if planned.parent is not None:
            config = replace(config, load_model_path=str(checkpoints[planned.parent]))
        run_started = time.perf_counter()
        checkpoints[name] = train_run(config)
        train_seconds[name] = time.perf_counter() - run_started
        eta.advance(planned.cost, f"training {planned.label}")
        curves[planned.label] = read_loss_curve(config.run_dir, planned.first_epoch, config.resume)
        if name == PRETRAIN_RUN:
            reading = evaluate_checkpoint(checkpoints[name], data.reading, ["validation"], out / "eval" / name,
                                          recipe)["validation"]
            eta.advance(_EVAL_COST, "evaluating the reading of the pre-trained model")
        elif name in VARIANTS:
            eval_dir = out / "eval" / name
            summaries = evaluate_checkpoint(checkpoints[name], data.reasoning, ["validation", "test"], eval_dir, recipe)
            rows[name] = variant_row(summaries["test"], summaries["validation"], train_seconds[name])
            eta.advance(_EVAL_COST, f"evaluating {planned.label}")

    stage_starts = [recipe.stage0_epochs + recipe.epochs_per_stage * s for s in range(recipe.max_latent_stage)]
    curve_path = plot_training_curves(curves, stage_starts, out / "training_curve.png")
    explained = explain_questions(checkpoints["ivtlr"], data.reasoning, recipe.n_explained, out / "explain")
    report = {"quick": quick, "seed": seed, "threads": torch.get_num_threads(),
              "wall_seconds": time.perf_counter() - started, "recipe": asdict(recipe),
              "pretraining": {"reading_validation_accuracy": reading["overall"]["accuracy"],
                              "train_seconds": train_seconds[PRETRAIN_RUN]},
              "stage0_seconds": train_seconds[STAGE0_RUN], "variants": rows, "targets": target_checks(rows),
              "checkpoints": {name: str(path) for name, path in checkpoints.items()},
              "files": {"training_curve": curve_path.name,
                        "explain": [str(p.relative_to(out)) for p in explained]}}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown_report(report))
    logger.info("demo report written to %s (report.md, report.json, %s, %d explain pictures) in %s",
                out, curve_path.name, len(explained), _minutes(report["wall_seconds"]))
    return report
