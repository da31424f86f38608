"""``ivtlr eval CONFIG [key=value ...] (--checkpoint DIR | --original STATE.pth --base MODEL)``.

Answers the config's evaluation split (``dataset.eval_split`` of M3CoT, ScienceQA or local files) in batches of
``eval.batch_size``, writes the predictions JSONL (resumable) and a summary JSON, and prints the accuracy table.
Without ``--checkpoint`` or ``--original`` it evaluates ``model`` from the config as it is (zero-shot baselines,
smoke runs). Under ``accelerate launch --num_processes N -m ivtlr eval ...`` the processes share the questions out
and the main one merges their answers into the same predictions file (:mod:`ivtlr.evaluation.sharding`).

The config, the options and the output folder are checked before torch and the data loaders are imported, so a
mistake in any of them is one line within a second.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ivtlr.backbones import check_tiny_family
from ivtlr.config import Config, ConfigError, load_config
from ivtlr.errors import UserError, check_output_dir
from ivtlr.files import write_text_atomically
from ivtlr.evaluation.records import format_summary_table
from ivtlr.evaluation.arguments import add_device_argument, add_model_arguments, check_model_arguments
from ivtlr.evaluation.provenance import checkpoint_identity, config_model_identity, data_identity, original_identity

if TYPE_CHECKING:
    import torch
    from accelerate import PartialState

    from ivtlr.data import ExampleSequence
    from ivtlr.loading import LoadedModel
    from ivtlr.evaluation.runner import GenerationSettings

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (the training config of the run being evaluated)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.batch_size=16")
    add_model_arguments(parser, required=False, patches_default="the config's, else the family's")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the predictions and the summary (default: save_path/name/eval)")
    add_device_argument(parser)
    parser.add_argument("--fresh", action="store_true",
                        help="start the predictions file again (an existing one is moved aside, not deleted)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_arguments(args: argparse.Namespace, out: Path) -> None:
    """What ``ivtlr eval`` and ``ivtlr probe`` can refuse before importing torch: the weights' paths, the output."""
    check_model_arguments(args)
    check_output_dir(out, "--out" if args.out is not None else "save_path/name")


def load_model(args: argparse.Namespace, config: Config, device: torch.device) -> LoadedModel:
    """The weights the options name, else the config's model as it is; says when the config disagrees with them."""
    import torch

    from ivtlr.evaluation.arguments import load_requested_model
    from ivtlr.loading import load_config_model

    dtype = torch.bfloat16 if config.bf16 and device.type == "cuda" else torch.float32
    if args.checkpoint is None and args.original is None:
        logger.warning("no --checkpoint or --original: evaluating %s as it is", config.model)
        return load_config_model(config, device, dtype)
    patches = args.num_selected_patches if args.num_selected_patches is not None else config.num_selected_patches
    model = load_requested_model(args, device, mode=config.mode, num_selected_patches=patches,
                                 image_size=config.image_size, dtype=dtype)
    if model.mode != config.mode:  # only a checkpoint can disagree: an --original is loaded in the config's mode
        logger.warning("the checkpoint was trained in mode %s (config says %s): evaluating as %s",
                       model.mode, config.mode, model.mode)
    if model.base_model != config.model:
        logger.warning("the weights were trained from %s, not the config's model %s: evaluating %s (the config's "
                       "model is not used)", model.base_model, config.model, model.base_model)
    return model


def load_eval_examples(config: Config) -> ExampleSequence:
    from ivtlr.data import load_examples
    from ivtlr.data.builtin import resolve_source

    dataset = config.dataset
    source, data_files = resolve_source(dataset)
    return load_examples(source, dataset.eval_split, data_files=data_files, keep_no_image=dataset.keep_no_image,
                         use_context=dataset.use_context, limit=dataset.limit)


def weights_identity(args: argparse.Namespace, config: Config) -> dict[str, str]:
    """What the answers come from, by content (:mod:`ivtlr.evaluation.provenance`)."""
    if args.checkpoint is not None:
        return checkpoint_identity(args.checkpoint)
    if args.original is not None:
        return original_identity(args.original, args.base)
    return config_model_identity(config.model)


def provenance_of(args: argparse.Namespace, config: Config, model: LoadedModel, settings: GenerationSettings
                  ) -> dict:
    """Everything that changes an answer: weights, data, generation settings (not the batch size: answers are
    batch-invariant)."""
    from ivtlr.data.builtin import resolve_source

    dataset = config.dataset
    _, data_files = resolve_source(dataset)
    return {"weights": weights_identity(args, config), "mode": model.mode, "n_latent": settings.n_latent,
            "num_selected_patches": model.engine.num_selected_patches, "max_new_tokens": settings.max_new_tokens,
            "image_size": settings.image_size, "answer_rule": config.eval.answer_rule, "dtype": str(model.dtype),
            "dataset": {"source": dataset.source, "split": dataset.eval_split, "files": data_identity(data_files),
                        "limit": dataset.limit, "use_context": dataset.use_context,
                        "keep_no_image": dataset.keep_no_image}}


def run_label(args: argparse.Namespace) -> str:
    """Names the weights in the output file names, so evaluations of different checkpoints never mix."""
    if args.checkpoint is not None:
        return args.checkpoint.resolve().name
    return args.original.stem if args.original is not None else "untrained"


def launch_state() -> PartialState:
    """Accelerate's view of this launch: one process when started plainly, N under ``accelerate launch``. torchrun
    does not pass ``--cpu`` on to the processes, so a machine without a GPU (or ``ACCELERATE_USE_CPU=1``) asks for
    CPU processes (gloo) here, as the trainer's Accelerator does."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))


def process_device(state: PartialState, device: str | None) -> torch.device:
    """``--device`` (default: cuda if available, else cpu) for one process; with N, each process's own device
    (``--device cpu`` puts them all on the CPU; naming one accelerator for all of them is refused)."""
    import torch

    from ivtlr.loading import resolve_device

    if state.num_processes == 1:
        return resolve_device(device)
    if device is None and state.device.type != "cpu":
        return state.device
    if device is None or device.split(":")[0] == "cpu":
        return torch.device("cpu")  # accelerate names it cpu:0; one-process runs say cpu
    raise UserError(f"--device {device} with {state.num_processes} processes would put every process on it: "
                    "leave --device out under `accelerate launch` (each process answers on its own device)")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    check_tiny_family(config.model)
    out = args.out if args.out is not None else config.run_dir / "eval"
    check_arguments(args, out)
    from ivtlr.evaluation.runner import GenerationSettings, evaluate, evaluation_summary, group_keys_for
    from ivtlr.evaluation.sharding import evaluate_sharded, part_files

    state = launch_state()
    device = process_device(state, args.device)
    with state.main_process_first():  # a hub split is downloaded and cached once
        examples = load_eval_examples(config)  # the data is checked before a model is loaded
    if not len(examples):
        raise ConfigError(f"no usable questions in {config.dataset.source} split {config.dataset.eval_split!r} "
                          f"(data_files={config.dataset.data_files}); the warnings above name the skipped rows")
    model = load_model(args, config, device)
    n_latent = model.n_latent(config.eval.n_latent, fallback=config.max_latent_stage)
    settings = GenerationSettings(n_latent=n_latent, max_new_tokens=config.eval.max_new_tokens,
                                  image_size=model.image_size)
    stem = f"{run_label(args)}_{config.dataset.eval_split}_{model.mode}_latent{n_latent}"
    predictions, summary_path = out / f"predictions_{stem}.jsonl", out / f"summary_{stem}.json"
    logger.info("evaluating %s (mode %s, %d latent steps, K=%d) on %d questions -> %s", model.source, model.mode,
                n_latent, model.engine.num_selected_patches, len(examples), predictions)
    start = time.perf_counter()
    provenance = provenance_of(args, config, model, settings)
    options = {"batch_size": config.eval.batch_size, "answer_rule": config.eval.answer_rule,
               "progress": not args.no_progress, "provenance": provenance, "fresh": args.fresh}
    if state.num_processes == 1 and not part_files(predictions):
        records = evaluate(model, examples, predictions, settings, **options)
    else:  # N processes, or the parts of an interrupted N-process run to merge (sharding.py)
        merged = evaluate_sharded(model, examples, predictions, settings, state=state, **options)
        if state.num_processes > 1:
            state.destroy_process_group()
        if merged is None:
            return 0  # not the main process: the main one merged the parts and reports
        records = merged
    run_info = {"model": model.source, "mode": model.mode, "n_latent": n_latent,
                "num_selected_patches": model.engine.num_selected_patches, "dataset": config.dataset.source,
                "split": config.dataset.eval_split, "answer_rule": config.eval.answer_rule,
                "max_new_tokens": config.eval.max_new_tokens, "batch_size": config.eval.batch_size,
                "device": str(device), "predictions": str(predictions), "weights": provenance["weights"],
                "wall_seconds_this_run": time.perf_counter() - start}
    if state.num_processes > 1:
        run_info["processes"] = state.num_processes
    summary = evaluation_summary(records, group_keys_for(examples), run_info)
    write_text_atomically(summary_path, json.dumps(summary, indent=2) + "\n")
    logger.info("wrote %s", summary_path)
    rules = ", ".join(f"{rule} {100 * accuracy:.2f} %" for rule, accuracy in summary["accuracy_by_rule"].items())
    print(f"{format_summary_table(summary)}\n\naccuracy by answer rule: {rules}")  # noqa: T201 - the command's result
    return 0
