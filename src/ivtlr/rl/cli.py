"""``ivtlr rl CONFIG [key=value ...]``: GRPO on latent chains, from the checkpoint ``load_model_path`` names.

The same command on a CPU, one GPU or under ``accelerate launch`` (DDP). The config and the output folder are checked
before torch, transformers and Accelerate are imported.
"""
from __future__ import annotations

import argparse
import logging

from ivtlr.training.cli import checked_run_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run configuration with an rl: section (configs/tiny_rl.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. rl.steps=50 "
                             "load_model_path=runs/tiny_cpu/checkpoints/checkpoint-00000256")


def run(args: argparse.Namespace) -> int:
    config = checked_run_config(args)
    from accelerate.logging import get_logger

    from ivtlr.rl import train_rl

    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
    result = train_rl(config)
    get_logger(__name__).info("%d optimizer steps, rollouts at %.1f answers/s; newest checkpoint: %s", result.steps,
                              result.rollouts_per_s, result.checkpoint)
    return 0
