"""``ivtlr train | rl | eval | probe | infer | serve | demo | bench``: one entry point, each imported when used."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable

from ivtlr.errors import UserError

#: command -> (module, help). The module provides ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "train": ("ivtlr.training.cli", "train a model with the progressive latent curriculum (Accelerate-ready)"),
    "rl": ("ivtlr.rl.cli", "reinforcement learning after training: GRPO on the latent chain's own choices"),
    "eval": ("ivtlr.evaluation.cli", "generate and score answers on a test split"),
    "probe": ("ivtlr.evaluation.probe_cli", "do the latents matter? accuracy under counterfactual latent chains"),
    "infer": ("ivtlr.evaluation.infer", "answer one question about one image, optionally drawing the chosen patches"),
    "serve": ("ivtlr.serving.cli", "serve a model over HTTP: OpenAI chat completions, continuous batching"),
    "demo": ("ivtlr.demo.cli", "train and score IVT-LR and its baselines on bundled digit images, on a CPU"),
}
#: ``ivtlr bench NAME`` runs ``ivtlr.bench.NAME.main(argv)``: prints a table, writes JSON.
BENCHMARKS = ("engine", "inference", "rl", "scaling", "serve")


def _bench(argv: list[str]) -> int:
    """``ivtlr bench NAME [args]`` runs the installed benchmark ``ivtlr.bench.NAME`` (no source checkout needed)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: ivtlr bench {{{','.join(BENCHMARKS)}}} [options]")  # noqa: T201 - CLI usage text
        return 0
    if argv[0] not in BENCHMARKS:
        raise UserError(f"no benchmark {argv[0]!r}: choose one of {', '.join(BENCHMARKS)}")
    # The table and the verdicts are the command's output: plain lines on stdout.
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
    importlib.import_module(f"{__package__}.bench.{argv[0]}").main(argv[1:])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ivtlr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    sub.add_parser("bench", help="run a benchmark script (prints a table, writes JSON)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "bench":
        return _run(args, lambda: _bench(rest))
    module = importlib.import_module(COMMANDS[args.command][0])
    command_parser = argparse.ArgumentParser(prog=f"ivtlr {args.command}", description=COMMANDS[args.command][1])
    module.add_arguments(command_parser)
    # intermixed: `key=value` overrides may follow options (`ivtlr eval CONFIG --checkpoint DIR lr=1e-5`)
    command_args = command_parser.parse_intermixed_args(rest)
    return _run(args, lambda: int(module.run(command_args) or 0))


def _run(args: argparse.Namespace, command: Callable[[], int]) -> int:
    """Run a command; a user error is one line that says what to fix (the traceback with -v or IVTLR_DEBUG=1)."""
    try:
        return command()
    except UserError as error:
        if args.verbose or os.environ.get("IVTLR_DEBUG") == "1":
            raise
        print(f"ivtlr {args.command}: error: {error}", file=sys.stderr)  # noqa: T201 - the command's error
        return 2


if __name__ == "__main__":
    sys.exit(main())
