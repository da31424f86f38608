"""``ivtlr demo [options]``: the options are checked before the demo (torch, transformers) is imported, so a mistake
is one line within a second."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ivtlr.errors import UserError, check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="smoke run of the whole pipeline in well under a minute (tiny data, 1 epoch per stage)")
    parser.add_argument("--out", type=Path, default=Path("ivtlr_demo"), help="report folder (default: ivtlr_demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the training order")
    parser.add_argument("--full", action="store_true",
                        help="also train the ablations: latent text only and latent vision only, under the paper's "
                             "objective and with the supervision that applies to each (about twice the demo's time)")
    parser.add_argument("--rl", action="store_true",
                        help="also run GRPO (ivtlr rl) from the supervised IVT-LR checkpoint, and probe the result "
                             "(about 2 more minutes on a 2-core CPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="runs trained in parallel processes (default: one per core, at most 2)")


def run(args: argparse.Namespace) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = args.workers if args.workers is not None else max(1, min(2, cores))
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    check_output_dir(args.out, "--out")
    from ivtlr.demo.run import run as run_demo_command

    return run_demo_command(args, workers, cores)
