"""``ivtlr train CONFIG [key=value ...]``: the same command on a CPU, one GPU or under ``accelerate launch``."""
from __future__ import annotations

import argparse
import logging

from accelerate.logging import get_logger

from ..config import load_config
from .trainer import train

logger = get_logger(__name__)  # main process only


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run configuration (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. lr=1e-4 dataset.limit=64 (dotted keys reach sections)")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)  # one line per saved file otherwise
    result = train(load_config(args.config, args.overrides))
    logger.info("trained %d optimizer steps at %.2f samples/s; newest checkpoint: %s", result.steps,
                result.samples_per_s, result.checkpoint)
    return 0
