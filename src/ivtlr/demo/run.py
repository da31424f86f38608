"""``ivtlr demo``: IVT-LR and its baselines trained from scratch on bundled handwritten digits, on a CPU, in minutes.

The task (``ivtlr.demo_data``): follow two pointers through a grid of digit cells, each cell's digit naming the
colour of the next cell to read; the answer is the digit reached. Every reasoning step reads the image, and which
cell it reads depends on what the step before read: the interleaved vision-text reasoning IVT-LR is made for.

The demo is a user of the package, not a second implementation: it writes the data as M3CoT-schema parquet, saves a
tiny random Qwen2-VL (with a tokenizer fitted to the data) as an ordinary model directory, trains every variant with
:func:`ivtlr.training.train` from :class:`ivtlr.config.Config` objects, and scores each final checkpoint with the
evaluation harness. Runs build on each other through ``load_model_path`` (and ``resume``), as a user would chain them:

1. visual pre-training: read the digit in one named cell. The methods compared start from a VLM that can already see;
   a random tiny model cannot. Every variant, No-CoT included, starts from it.
2. stage 0 of the curriculum (the written rationale) is shared by CoT and the latent variants; each continues from its
   checkpoint at the first epoch of stage 1. No-CoT trains as many epochs from the pre-trained model.

The latent variants are IVT-LR under the paper's objective and IVT-LR with step and region supervision
(``ivtlr.method.supervision``), which trains two epochs per latent stage; ``--full`` adds the two ablations (latent
text only, latent vision only) under either objective. IVT-LR with and without supervision is probed (``ivtlr probe
--read-latents``) in its worker, overlapping the other runs.

Independent runs go to parallel worker processes (``ivtlr.demo.scheduler``; one per core by default, one thread each:
on small CPUs that beats one run on every core), each training and then evaluating its run. Nothing is chosen on the
test split: the recipe was fixed on the validation split, and the report gives both.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ivtlr.demo import report as report_lib
from ivtlr.config import Config, DatasetConfig, EvalConfig, RLConfig
from ivtlr.data import load_examples
from ivtlr.data.curriculum import format_prompt_text, split_rationale, target_text
from ivtlr.data.example import option_letter
from ivtlr.data.digits import (DIGIT_CHOICES, FOLLOW_POINTERS, MERGED_PATCH_PX, READ_CELL, DigitPuzzle,
                               compose_digit_puzzles, write_digit_reasoning, write_puzzles)
from ivtlr.demo.pictures import explain_questions
from ivtlr.demo.report import (DEFAULT_VARIANTS, PROBED_VARIANTS, RL_VARIANTS, VARIANT_LABELS, VARIANT_MODES,
                               VARIANTS)
from ivtlr.demo.scheduler import JobScheduler
from ivtlr.evaluation import GenerationSettings, evaluate, evaluation_summary
from ivtlr.loading import load
from ivtlr.evaluation.probe import plan_conditions, probe_summary, run_probe
from ivtlr.evaluation.probe_report import write_probe_outputs
from ivtlr.evaluation.readback import readback_agreement
from ivtlr.files import write_text_atomically
from ivtlr.machine import cpu_model_name
from ivtlr.metrics_log import JSONL_FILE
from ivtlr.testing import build_tiny

logger = logging.getLogger(__name__)

PRETRAIN_RUN = "pretrain_reading"
STAGE0_RUN = "stage0_cot"


@dataclass(frozen=True)
class DemoRecipe:
    """Everything the demo trains with; ``FULL`` holds the settings the validation split favoured within the budget."""

    # Data: a 2x2 grid of digit scans; 56 px cells are 2x2 merged Qwen2-VL tokens each (16 image tokens).
    n_train: int
    n_val: int
    n_test: int
    grid: int
    cell_px: int
    # Model: a tiny Qwen2-VL built from its config; weights re-drawn at the usual 0.02 std (see build_base_model).
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    initializer_range: float
    # Training.
    n_pretrain: int  # reading questions of the visual pre-training
    reading_warmup_share: float  # of them, showing one scan in every cell (see ``compose_digit_puzzles``)
    pretrain_epochs: int
    stage0_epochs: int  # written-rationale epochs shared by CoT and the latent variants
    epochs_per_stage: int  # epochs of each latent stage 1..max_latent_stage (CoT keeps training as long)
    supervised_epochs_per_stage: int  # the same for the supervised variants
    max_latent_stage: int  # every reasoning step latent in the last stage
    batch_size: int
    lr: float
    warmup_steps: int
    num_selected_patches: int  # K: one digit cell per latent step
    step_supervision: float  # weights of the supervised variants' losses (ivtlr.method.supervision)
    region_supervision: float
    # Evaluation.
    eval_batch_size: int
    max_new_tokens: int
    n_explained: int  # test questions drawn with the patches each latent step chose
    # RL (``--rl``): GRPO from the supervised IVT-LR checkpoint (``ivtlr rl``; see ``RLConfig`` for each key).
    rl_steps: int = 60
    rl_questions_per_step: int = 16
    rl_group_size: int = 8
    rl_lr: float = 5e-5
    rl_sigma: float = 0.03
    rl_tau: float = 0.01
    rl_temperature: float = 1.0
    rl_weight_latent: float = 0.01

    @property
    def image_size(self) -> int:
        return self.grid * self.cell_px

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, cols) of the merged image-token grid, what ``selected`` indices are laid out on."""
        side = self.image_size // MERGED_PATCH_PX
        return side, side

    @property
    def total_epochs(self) -> int:
        return self.stage0_epochs + self.epochs_per_stage * self.max_latent_stage


FULL = DemoRecipe(n_train=2000, n_val=300, n_test=1000, grid=2, cell_px=56, hidden_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=4, intermediate_size=256, vocab_size=600, initializer_range=0.02,
                  n_pretrain=2000, reading_warmup_share=0.5, pretrain_epochs=5, stage0_epochs=4, epochs_per_stage=1,
                  supervised_epochs_per_stage=2,
                  max_latent_stage=3, batch_size=16, lr=1e-3, warmup_steps=50, num_selected_patches=4,
                  step_supervision=1.0, region_supervision=0.5, eval_batch_size=100, max_new_tokens=48,
                  n_explained=4)
#: A smoke run of the whole pipeline (the test suite's): every variant, one epoch per stage, a handful of questions.
QUICK = replace(FULL, n_train=16, n_val=8, n_test=8, hidden_size=32, intermediate_size=64, num_heads=2,
                num_kv_heads=2, vocab_size=400, n_pretrain=16, pretrain_epochs=1, stage0_epochs=1, epochs_per_stage=1,
                supervised_epochs_per_stage=1, batch_size=8, warmup_steps=0, eval_batch_size=8, n_explained=2,
                rl_steps=2, rl_questions_per_step=4, rl_group_size=2)


# ---------------------------------------------------------------------------------------------------- building blocks
@dataclass(frozen=True)
class DemoData:
    """``<split>.parquet`` paths (M3CoT schema) of the reasoning questions and of the reading pre-training ones, and
    the reasoning puzzles by id (what each step reads, for the report)."""

    reasoning: dict[str, str]
    reading: dict[str, str]
    puzzles: dict[str, DigitPuzzle]


def write_data(recipe: DemoRecipe, directory: Path, seed: int) -> DemoData:
    """The digit puzzles in the M3CoT schema, read back by the ordinary M3CoT loader. Both sets draw their scans from
    the same disjoint split pools, so pre-training never sees a validation or test scan."""
    puzzles = compose_digit_puzzles(seed=seed, n_train=recipe.n_train, n_val=recipe.n_val, n_test=recipe.n_test,
                                    grid=recipe.grid, kind=FOLLOW_POINTERS)
    reasoning = write_puzzles(directory / "reasoning", puzzles, recipe.cell_px)
    reading = write_digit_reasoning(directory / "reading", seed=seed, grid=recipe.grid, cell_px=recipe.cell_px,
                                    kind=READ_CELL, n_train=recipe.n_pretrain, n_val=recipe.n_val, n_test=1,
                                    warmup_share=recipe.reading_warmup_share)
    return DemoData(reasoning={split: str(path) for split, path in reasoning.items()},
                    reading={split: str(path) for split, path in reading.items()},
                    puzzles={p.uid: p for split in ("validation", "test") for p in puzzles[split]})


def tokenizer_corpus(data: DemoData) -> list[str]:
    """The training splits' prompts and targets: fitted to them, the tiny BPE makes each word one token, which
    keeps sequences (and CPU time) short. Only training splits are read."""
    corpus = []
    for data_files in (data.reasoning, data.reading):
        for example in load_examples("m3cot", "train", data_files=data_files):
            corpus.append(format_prompt_text(example.question, example.choices))
            corpus.append(target_text(split_rationale(example.rationale), example.answer))
    return corpus


#: The prompt's fixed parts, one token each in the demo's tokenizer: the ten option lines would otherwise take five
#: byte-level tokens apiece, half of every sequence (and of the CPU time).
PROMPT_WHOLE_TOKENS = ("[Question]:", "[Options]:\n", "Answer:\n",
                       *(f"({option_letter(d)}).{choice}\n" for d, choice in enumerate(DIGIT_CHOICES)))


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
                        vocab_size=recipe.vocab_size, whole_tokens=PROMPT_WHOLE_TOKENS)
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


#: ``save_every_steps`` so large that a run saves at stage ends only (null would also save every epoch end).
_ONLY_AT_STAGE_ENDS = 10**9


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


@dataclass(frozen=True)
class DemoJob:
    """One training run of the demo and the evaluation of its final checkpoint, run by one worker process."""

    name: str
    config: Config
    parent: str | None  # the job whose final checkpoint this one loads (``load_model_path``, set once it exists)
    first_epoch: int  # where its epochs sit in the whole schedule (epoch 0 = the first reasoning epoch)
    steps: int  # optimizer steps it takes (for the progress bar)
    cost: float  # relative CPU cost of its training and evaluation, for the progress bar and the ETA
    label: str  # what the progress log and the training-curve legend call it
    eval_data: dict[str, str] = field(default_factory=dict)
    eval_splits: tuple[str, ...] = ()
    eval_dir: Path | None = None
    eval_batch_size: int = 1
    max_new_tokens: int = 1
    probe_dir: Path | None = None  # where ``ivtlr probe`` of its checkpoint (validation split) goes, if probed
    seed: int = 0
    rl: bool = False  # ``ivtlr rl`` (GRPO from the parent's checkpoint) instead of ``ivtlr train``

    @property
    def progress_log(self) -> Path:
        """Its metrics log, one line per optimizer step: what the scheduler's progress bar counts."""
        return self.config.run_dir / JSONL_FILE


@dataclass(frozen=True)
class JobResult:
    name: str
    checkpoint: str
    train_seconds: float
    eval_seconds: float  # evaluation and probe
    started: float  # time.time() at the job's start and end, for the phase timings
    finished: float
    summaries: dict[str, dict]
    probe: dict | None = None


#: CPU time of one optimizer step relative to a written-rationale one (reading and No-CoT sequences are shorter;
#: latent steps add passes), as measured in the full recipe; and of answering one question, in the same unit.
_STEP_COST = {"reading": 0.7, "cot": 1.0, "nocot": 0.75, "latent_text_only": 1.3, "latent_vision_only": 1.3,
              "ivtlr": 1.3, "latent_text_only_supervised": 1.4, "latent_vision_only_supervised": 1.4,
              "ivtlr_supervised": 1.5, "ivtlr_rl": 30.0}
_QUESTION_COST = 0.03
#: Probe answers (every condition of the validation split) cost less than evaluated questions: one prompt pass serves
#: every condition at the trained number of latent steps.
_PROBE_ANSWER_COST = 0.01


def supervision_keys(recipe: DemoRecipe, variant: str) -> dict[str, float]:
    """The supervision a variant trains with: for a ``*_supervised`` variant, the losses that apply to its mode
    (the step loss needs latent text, the region loss latent vision)."""
    if not variant.endswith("_supervised"):
        return {}
    mode = VARIANT_MODES[variant]
    keys = {}
    if mode != "latent_vision_only":
        keys["step_supervision"] = recipe.step_supervision
    if mode != "latent_text_only":
        keys["region_supervision"] = recipe.region_supervision
    return keys


def plan_jobs(recipe: DemoRecipe, model_dir: Path, data: DemoData, out: Path, seed: int,
              variants: Sequence[str] = DEFAULT_VARIANTS) -> dict[str, DemoJob]:
    """Every run, parents before children: pre-training, stage 0, No-CoT, then CoT and the latent variants."""
    common = dict(model_dir=model_dir, runs_dir=out / "runs", seed=seed)
    evaluation = dict(eval_batch_size=recipe.eval_batch_size, max_new_tokens=recipe.max_new_tokens)
    steps_per_epoch = -(-recipe.n_train // recipe.batch_size)
    split_sizes = {"validation": recipe.n_val, "test": recipe.n_test}

    def job(name: str, config: Config, parent: str | None, first_epoch: int, cost_kind: str, label: str,
            steps_per_epoch: int = steps_per_epoch, **eval_keys) -> DemoJob:
        steps = steps_per_epoch * (config.num_epochs - config.resume)
        questions = sum(split_sizes[split] for split in eval_keys.get("eval_splits", ()))
        probed = name in PROBED_VARIANTS
        probe_answers = len(plan_conditions(recipe.max_latent_stage, recipe.num_selected_patches)) * recipe.n_val
        return DemoJob(name, config, parent, first_epoch, steps, steps * _STEP_COST[cost_kind]
                       + questions * _QUESTION_COST + probed * probe_answers * _PROBE_ANSWER_COST, label,
                       eval_dir=out / "eval" / name, probe_dir=out / "probe" / name if probed else None, seed=seed,
                       **evaluation, **eval_keys)

    reasoning_eval = dict(eval_data=data.reasoning, eval_splits=("validation", "test"))
    jobs = {
        PRETRAIN_RUN: job(PRETRAIN_RUN, run_config(recipe, name=PRETRAIN_RUN, mode="cot", data_files=data.reading,
                                                   num_epochs=recipe.pretrain_epochs,
                                                   epochs_per_stage=recipe.pretrain_epochs, **common),
                          None, -recipe.pretrain_epochs, "reading", "visual pre-training (reading one cell)",
                          steps_per_epoch=-(-recipe.n_pretrain // recipe.batch_size), eval_data=data.reading,
                          eval_splits=("validation",)),
        STAGE0_RUN: job(STAGE0_RUN, run_config(recipe, name=STAGE0_RUN, mode="cot", data_files=data.reasoning,
                                               num_epochs=recipe.stage0_epochs, epochs_per_stage=recipe.stage0_epochs,
                                               **common),
                        PRETRAIN_RUN, 0, "cot", "stage 0 (written rationale, shared)"),
        "nocot": job("nocot", run_config(recipe, name="nocot", mode="nocot", data_files=data.reasoning,
                                         num_epochs=recipe.total_epochs, epochs_per_stage=recipe.total_epochs,
                                         **common),
                     PRETRAIN_RUN, 0, "nocot", VARIANT_LABELS["nocot"], **reasoning_eval),
    }
    # The method first (the costliest continuations): on two workers it then never waits for the last slot.
    order = ("ivtlr_supervised", "ivtlr", "cot", "latent_text_only_supervised", "latent_vision_only_supervised",
             "latent_text_only", "latent_vision_only")
    for variant in (v for v in order if v in variants):
        # Stage 0 ran in its own run (its length is its own): a continuation starts at the first epoch of stage 1,
        # ``resume = epochs_per_stage``, and trains every latent stage.
        schedule = replace(recipe, epochs_per_stage=recipe.supervised_epochs_per_stage) \
            if variant.endswith("_supervised") else recipe
        config = run_config(schedule, name=variant, mode=VARIANT_MODES[variant], data_files=data.reasoning,
                            resume=schedule.epochs_per_stage, **common, **supervision_keys(recipe, variant))
        jobs[variant] = job(variant, config, STAGE0_RUN, recipe.stage0_epochs, variant, VARIANT_LABELS[variant],
                            **reasoning_eval)
    if "ivtlr_rl" in variants:
        config = rl_config(recipe, jobs["ivtlr_supervised"].config)
        evaluated = job("ivtlr_rl", config, "ivtlr_supervised", recipe.total_epochs, "ivtlr_rl",
                        VARIANT_LABELS["ivtlr_rl"], steps_per_epoch=0, **reasoning_eval)
        jobs["ivtlr_rl"] = replace(evaluated, steps=recipe.rl_steps, rl=True,
                                   cost=evaluated.cost + recipe.rl_steps * _STEP_COST["ivtlr_rl"])
    return jobs


def rl_config(recipe: DemoRecipe, supervised: Config) -> Config:
    """``ivtlr rl`` from the supervised IVT-LR run, as a user would write it: that run's config with its own name,
    the RL settings and lr, one checkpoint at the end (``load_model_path`` is set once the parent's exists)."""
    settings = RLConfig(steps=recipe.rl_steps, questions_per_step=recipe.rl_questions_per_step,
                        group_size=recipe.rl_group_size, sigma=recipe.rl_sigma, tau=recipe.rl_tau,
                        temperature=recipe.rl_temperature, weight_latent=recipe.rl_weight_latent,
                        max_new_tokens=recipe.max_new_tokens)
    return replace(supervised, name="ivtlr_rl", resume=0, lr=recipe.rl_lr, warmup_steps=0, save_every_steps=None,
                   step_supervision=0.0, region_supervision=0.0, rl=settings)


# ---------------------------------------------------------------------------------------------------- running
def train_run(config: Config, rl: bool = False) -> Path:
    """``ivtlr train`` (``ivtlr rl`` with ``rl``) in this process; returns the run's final checkpoint."""
    from ivtlr.rl import train_rl
    from ivtlr.training import train
    from ivtlr.training.accelerate_state import fresh_accelerate_state

    with fresh_accelerate_state():
        result = train_rl(config) if rl else train(config)
    if result.checkpoint is None:
        raise RuntimeError(f"run {config.name} saved no checkpoint")
    return result.checkpoint


def evaluate_checkpoint(checkpoint: Path, data_files: Mapping[str, str], splits: Sequence[str], out_dir: Path, *,
                        batch_size: int, max_new_tokens: int, progress: bool = True) -> dict[str, dict]:
    """``ivtlr eval`` of one checkpoint on each split (the model loaded once): predictions JSONL and the summary per
    split, as the harness writes them; returns the summaries by split."""
    model = load(checkpoint, device="cpu")
    settings = GenerationSettings(n_latent=model.n_latent(None), max_new_tokens=max_new_tokens,
                                  image_size=model.image_size)
    summaries = {}
    for split in splits:
        examples = load_examples("m3cot", split, data_files=dict(data_files))
        records = evaluate(model, examples, out_dir / f"predictions_{split}.jsonl", settings, batch_size=batch_size,
                           progress=progress)
        run_info = {"checkpoint": str(checkpoint), "mode": model.mode, "split": split, "n_latent": settings.n_latent,
                    "num_selected_patches": model.engine.num_selected_patches}
        summaries[split] = evaluation_summary(records, ("domain", "topic"), run_info)
        (out_dir / f"summary_{split}.json").write_text(json.dumps(summaries[split], indent=2) + "\n")
    return summaries


def probe_checkpoint(checkpoint: Path, data_files: Mapping[str, str], split: str, out_dir: Path, *, batch_size: int,
                     max_new_tokens: int, seed: int, progress: bool = True) -> dict:
    """``ivtlr probe --read-latents`` of one checkpoint on one split: every condition group, and what the latents
    read back as; writes probe.json/md/png."""
    model = load(checkpoint, device="cpu")
    examples = list(load_examples("m3cot", split, data_files=dict(data_files)))
    n_latent, k = model.n_latent(None), model.engine.num_selected_patches
    start = time.perf_counter()
    results = run_probe(model, examples, plan_conditions(n_latent, k), batch_size=batch_size,
                        max_new_tokens=max_new_tokens, image_size=model.image_size, seed=seed, progress=progress)
    run_info = {"model": f"checkpoint {checkpoint}", "mode": model.mode, "n_latent": n_latent,
                "num_selected_patches": k, "split": split, "questions": len(examples), "answer_rule": "original",
                "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed, "device": "cpu",
                "cpu": cpu_model_name(), "wall_seconds": time.perf_counter() - start}
    readback = readback_agreement(model, examples, results[0].latents)
    summary = probe_summary(results, run_info, readback)
    write_probe_outputs(summary, out_dir)
    return summary


def execute_job(job: DemoJob, parent_checkpoint: str | None, threads: int) -> JobResult:
    """Train one run (continuing its parent's checkpoint) and evaluate it; runs in a worker process, whose log and
    progress bars go to ``<run dir>/worker.log`` (the main process shows one bar for all workers)."""
    job.config.run_dir.mkdir(parents=True, exist_ok=True)
    with (job.config.run_dir / "worker.log").open("a") as log, contextlib.redirect_stderr(log):
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            return _train_and_evaluate(job, parent_checkpoint, threads)
        finally:
            root.removeHandler(handler)


def _train_and_evaluate(job: DemoJob, parent_checkpoint: str | None, threads: int) -> JobResult:
    torch.set_num_threads(threads)
    started = time.time()
    config = job.config if parent_checkpoint is None else replace(job.config, load_model_path=parent_checkpoint)
    checkpoint = train_run(config, rl=job.rl)
    trained = time.time()
    summaries = {}
    if job.eval_splits and job.eval_dir is not None:
        summaries = evaluate_checkpoint(checkpoint, job.eval_data, job.eval_splits, job.eval_dir,
                                        batch_size=job.eval_batch_size, max_new_tokens=job.max_new_tokens,
                                        progress=False)
    probe = None
    if job.probe_dir is not None:  # here, so that it overlaps the training of the other runs
        probe = probe_checkpoint(checkpoint, job.eval_data, "validation", job.probe_dir,
                                 batch_size=job.eval_batch_size, max_new_tokens=job.max_new_tokens, seed=job.seed,
                                 progress=False)
    finished = time.time()
    return JobResult(job.name, str(checkpoint), trained - started, finished - trained, started, finished, summaries,
                     probe)


# ---------------------------------------------------------------------------------------------------- command
#: Subfolders of ``--out`` the demo writes; a new demo run clears them (a stale run directory would be resumed).
OUTPUT_PARTS = ("data", "base_model", "runs", "eval", "explain")


def run(args: argparse.Namespace, workers: int, cores: int) -> int:
    """The demo with the options ``ivtlr.demo.cli`` checked."""
    for name in ("accelerate.checkpointing", "accelerate.accelerator"):  # a line per saved file otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    recipe = QUICK if args.quick else FULL
    variants = tuple(v for v in VARIANTS if v not in RL_VARIANTS) if args.full else DEFAULT_VARIANTS
    if args.rl:
        variants += RL_VARIANTS
    report = run_demo(recipe, args.out, seed=args.seed, quick=args.quick, workers=workers, cores=cores,
                      variants=variants)
    print(report_lib.results_table(report))  # noqa: T201 - the command's result
    return 0


def run_demo(recipe: DemoRecipe, out: Path, *, seed: int = 0, quick: bool = False, workers: int = 2,
             cores: int = 2, variants: Sequence[str] = DEFAULT_VARIANTS) -> dict:
    """Data -> base model -> pre-training -> stage 0 and No-CoT -> every variant (parallel where independent) ->
    evaluation -> report files; returns the report."""
    started = time.time()
    for part in OUTPUT_PARTS:
        shutil.rmtree(out / part, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    data = write_data(recipe, out / "data", seed)
    model_dir = build_base_model(recipe, tokenizer_corpus(data), out / "base_model", seed)
    jobs = plan_jobs(recipe, model_dir, data, out, seed, variants)
    setup_done = time.time()
    results = JobScheduler(jobs, execute_job, workers, cores).run()
    training_done = time.time()

    rows = {}
    for variant in (v for v in VARIANTS if v in variants):
        records = report_lib.read_records(out / "eval" / variant / "predictions_test.jsonl")
        summaries = results[variant].summaries
        rows[variant] = report_lib.variant_row(records, summaries["test"], summaries["validation"],
                                               results[variant].train_seconds, data.puzzles, recipe.token_grid)
    curves = {job.label: report_lib.read_loss_curve(job.config.run_dir / JSONL_FILE, job.first_epoch,
                                                    job.config.resume) for job in jobs.values() if not job.rl}
    stage_starts = [recipe.stage0_epochs + recipe.epochs_per_stage * s for s in range(recipe.max_latent_stage)]
    curve_path = report_lib.plot_training_curves(curves, stage_starts, out / "training_curve.png")
    explained = explain_questions(Path(results["ivtlr_supervised"].checkpoint), data.reasoning, data.puzzles,
                                  recipe.n_explained, out / "explain")
    probes = {variant: results[variant].probe for variant in PROBED_VARIANTS if variant in results}
    rl_curve = None
    if "ivtlr_rl" in jobs:
        rl_curve = report_lib.plot_rl_curve(report_lib.read_records(jobs["ivtlr_rl"].progress_log),
                                            out / "rl_curve.png").name
    phases = {"data and base model": setup_done - started}
    phases.update({jobs[name].label: result.finished - result.started for name, result in results.items()})
    phases["report"] = time.time() - training_done
    report = {"quick": quick, "seed": seed, "cpu": cpu_model_name(), "workers": workers,
              "threads_per_worker": max(1, cores // workers), "wall_seconds": time.time() - started,
              "phase_seconds": phases, "recipe": asdict(recipe),
              "pretraining": {"reading_validation_accuracy":
                              results[PRETRAIN_RUN].summaries["validation"]["overall"]["accuracy"],
                              "train_seconds": results[PRETRAIN_RUN].train_seconds},
              "stage0_seconds": results[STAGE0_RUN].train_seconds, "variants": rows,
              "targets": report_lib.target_checks(rows, probes),
              "checkpoints": {name: result.checkpoint for name, result in results.items()},
              "probes": probes,
              "files": {"training_curve": curve_path.name, "rl_curve": rl_curve,
                        "explain": [str(p.relative_to(out)) for p in explained],
                        "probes": {variant: f"probe/{variant}/probe.png" for variant in probes}}}
    write_text_atomically(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomically(out / "report.md", report_lib.markdown_report(report))
    logger.info("demo report written to %s (report.md, report.json, %s, %d explain pictures) in %s",
                out, curve_path.name, len(explained), report_lib.minutes(report["wall_seconds"]))
    return report
