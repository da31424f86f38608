"""``ivtlr train CONFIG [key=value ...]``: the same command on a CPU, one GPU or under ``accelerate launch``.

The config and the output folder are checked before the trainer (torch, transformers, Accelerate) is imported, so a
mistake in either is one line within a second, not a traceback after the model loaded.
"""
from __future__ import annotations

import argparse
import logging

from ivtlr.backbones import check_tiny_family
from ivtlr.config import Config, load_config
from ivtlr.errors import check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run configuration (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. lr=1e-4 dataset.limit=64 (dotted keys reach sections)")


def checked_run_config(args: argparse.Namespace) -> Config:
    """The config with its overrides, its output folder and its tiny family checked (``ivtlr train`` and ``ivtlr
    rl``), before anything heavy is imported."""
    config = load_config(args.config, args.overrides)
    check_output_dir(config.run_dir, "save_path/name")
    check_tiny_family(config.model)
    return config


def run(args: argparse.Namespace) -> int:
    config = checked_run_config(args)
    from accelerate.logging import get_logger

    from ivtlr.training.trainer import train

    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)  # one line per saved file otherwise
    result = train(config)
    get_logger(__name__).info("trained %d optimizer steps at %.2f samples/s; newest checkpoint: %s", result.steps,
                              result.samples_per_s, result.checkpoint)  # main process only
    return 0
