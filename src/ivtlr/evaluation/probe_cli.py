"""``ivtlr probe CONFIG [key=value ...] (--checkpoint DIR | --original STATE.pth --base MODEL)``.

Answers a split under counterfactual latent chains (fewer latent steps, other K, interventions on the latent text and
the latent vision; :mod:`ivtlr.evaluation.probe`) and writes ``probe.json``, ``probe.md``, ``probe.png`` and the
per-question answers (``probe_answers.jsonl``) to ``--out`` (default: save_path/name/probe/<weights>_<split>).
Conditions the model's family cannot run are skipped, and the report names them with the reason.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ivtlr.backbones import check_tiny_family
from ivtlr.config import ConfigError, load_config
from ivtlr.files import write_text_atomically
from ivtlr.machine import cpu_model_name
from ivtlr.evaluation.arguments import PROBE_GROUPS, add_device_argument, add_model_arguments
from ivtlr.evaluation.cli import check_arguments, load_eval_examples, load_model, run_label, weights_identity

if TYPE_CHECKING:
    from ivtlr.evaluation.probe import ConditionResult

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (the training config of the run being probed)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.batch_size=16")
    add_model_arguments(parser, required=False, patches_default="the config's, else the family's")
    parser.add_argument("--split", default=None, help="split to answer (default: the config's dataset.eval_split)")
    parser.add_argument("--conditions", nargs="+", choices=PROBE_GROUPS, default=list(PROBE_GROUPS),
                        help="condition groups: count (0..N-1 latent steps), k (K/4, K/2, 2K), text (latent text "
                             "interventions), vision (latent vision interventions); default: all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and random-patch draws")
    parser.add_argument("--read-latents", action="store_true",
                        help="also decode each latent step's state to text and report how often it is the written "
                             "step it replaced")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    add_device_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"dataset.eval_split={args.split}"] if args.split else [])
    config = load_config(args.config, overrides)
    check_tiny_family(config.model)
    out = args.out if args.out is not None else \
        config.run_dir / "probe" / f"{run_label(args)}_{config.dataset.eval_split}"
    check_arguments(args, out)
    from ivtlr.loading import resolve_device
    from ivtlr.evaluation.probe import plan_conditions, probe_summary, run_probe, skipped_conditions
    from ivtlr.evaluation.probe_report import markdown_table, skipped_note, write_probe_outputs
    from ivtlr.evaluation.readback import readback_agreement

    device = resolve_device(args.device)
    examples = load_eval_examples(config)
    if not len(examples):
        raise ConfigError(f"no usable questions in {config.dataset.source} split {config.dataset.eval_split!r}")
    model = load_model(args, config, device)
    n_latent = model.n_latent(config.eval.n_latent, fallback=config.max_latent_stage)
    k = model.engine.num_selected_patches
    image_donors = not model.engine.backbone.has_row_features
    try:
        conditions = plan_conditions(n_latent, k, args.conditions, image_donors=image_donors)
    except ValueError as error:
        raise ConfigError(f"{error} (mode {model.mode})") from error
    skipped = skipped_conditions(k, args.conditions, image_donors=image_donors)
    logger.info("probing %s (mode %s, %d latent steps, K=%d): %d conditions x %d questions -> %s", model.source,
                model.mode, n_latent, k, len(conditions), len(examples), out)
    start = time.perf_counter()
    results = run_probe(model, list(examples), conditions, batch_size=config.eval.batch_size,
                        max_new_tokens=config.eval.max_new_tokens, image_size=model.image_size,
                        rule=config.eval.answer_rule, seed=args.seed, progress=not args.no_progress)
    run_info = {"model": model.source, "weights": weights_identity(args, config), "mode": model.mode,
                "n_latent": n_latent, "num_selected_patches": k,
                "split": config.dataset.eval_split, "questions": len(examples),
                "answer_rule": config.eval.answer_rule, "max_new_tokens": config.eval.max_new_tokens,
                "batch_size": config.eval.batch_size, "seed": args.seed, "device": str(device),
                "cpu": cpu_model_name(), "wall_seconds": time.perf_counter() - start}
    readback = readback_agreement(model, list(examples), results[0].latents) if args.read_latents else None
    summary = probe_summary(results, run_info, readback, skipped)
    write_probe_outputs(summary, out)
    write_answers(results, out / "probe_answers.jsonl")
    print("\n\n".join(filter(None, [markdown_table(summary), skipped_note(summary)])))  # noqa: T201 - the result
    return 0


def write_answers(results: list[ConditionResult], path: Path) -> None:
    """One line per condition and question: what was generated, the option read from it, and whether it is right."""
    lines = []
    for result in results:
        for i, qid in enumerate(result.ids):
            lines.append(json.dumps({"condition": result.condition.name, "group": result.condition.group, "id": qid,
                                     "text": result.texts[i], "prediction": result.letters[i],
                                     "correct": result.correct[i], "n_generated_tokens": result.n_tokens[i]}))
    write_text_atomically(path, "\n".join(lines) + "\n")
