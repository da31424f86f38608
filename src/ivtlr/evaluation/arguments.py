"""The options the commands that run a model share (``ivtlr eval``, ``probe``, ``infer``), and the checks of them
that need no model: importable without torch, so that a wrong option is one line within a second."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ivtlr.errors import UserError

if TYPE_CHECKING:
    import torch

    from ivtlr.loading import LoadedModel

#: Condition groups of ``ivtlr probe``, in report order (:mod:`ivtlr.evaluation.probe`).
PROBE_GROUPS = ("count", "k", "text", "vision")


class ModelArgumentError(UserError, ValueError):
    """``--checkpoint``/``--original``/``--base`` that name no usable weights."""


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool, patches_default: str) -> None:
    """The options naming the weights, declared once so ``ivtlr eval`` and ``ivtlr infer`` read them alike.

    ``patches_default`` completes the help of ``--num-selected-patches``: what K is when it is not given.
    """
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--checkpoint", type=Path, help="a checkpoint directory written by `ivtlr train`")
    source.add_argument("--original", type=Path, metavar="STATE_DICT.pth",
                        help="a checkpoint in the original IVT-LR release format (needs --base)")
    parser.add_argument("--base", help="base model (hub id or directory) of an --original checkpoint")
    parser.add_argument("--num-selected-patches", type=int, default=None,
                        help=f"K for an --original checkpoint (default: {patches_default})")


def check_model_arguments(args: argparse.Namespace) -> None:
    """What can be told about the weights before loading anything: the named files exist, ``--base`` is there."""
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        raise ModelArgumentError(f"--checkpoint {args.checkpoint} is not a folder: give a checkpoint directory "
                                 "written by `ivtlr train` (run_dir/checkpoints/checkpoint-N)")
    if args.original is not None:
        if not args.original.is_file():
            raise ModelArgumentError(f"--original {args.original} is not a file: give the released state dict (.pth)")
        if not args.base:
            raise ModelArgumentError("--original needs --base (the base model the checkpoint was trained from)")


def at_least(minimum: int):
    """An argparse type: an integer of at least ``minimum`` (a negative token budget would silently mean none)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``, declared once for the commands that run a model; ``loading.resolve_device`` reads it."""
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def load_requested_model(args: argparse.Namespace, device: torch.device, *, mode: str,
                         num_selected_patches: int | None, image_size: int | None,
                         dtype: torch.dtype | None = None) -> LoadedModel:
    """The model ``--checkpoint`` or ``--original``/``--base`` names (one of them must be given), through
    :func:`ivtlr.load`. ``mode``, ``num_selected_patches`` and ``image_size`` apply to an ``--original`` checkpoint
    only, which does not record them; each command fills them from its own options."""
    import torch

    from ivtlr.loading import load

    dtype = dtype or torch.float32
    if args.checkpoint is not None:
        return load(args.checkpoint, device=device, dtype=dtype)
    check_model_arguments(args)
    return load(args.original, base=args.base, mode=mode, num_selected_patches=num_selected_patches,
                image_size=image_size, device=device, dtype=dtype)
