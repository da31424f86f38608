"""``ivtlr serve CONFIG [key=value ...] (--checkpoint DIR | --original STATE.pth --base MODEL) [--host --port]``.

Serves the model over HTTP in the OpenAI chat completions schema (uvicorn), answering every request in flight in
one continuously batched chain. The options and the config are checked before torch loads.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ivtlr.backbones import check_tiny_family
from ivtlr.config import load_config
from ivtlr.errors import UserError
from ivtlr.evaluation.arguments import add_device_argument, add_model_arguments, at_least, check_model_arguments
from ivtlr.serving.limits import ServeLimits

logger = logging.getLogger(__name__)
DEFAULTS = ServeLimits()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (the training config of the served run)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    add_model_arguments(parser, required=False, patches_default="the config's, else the family's")
    add_device_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    parser.add_argument("--model-name", default=None,
                        help="the name clients send as `model` (default: the config's name)")
    parser.add_argument("--max-batch", type=at_least(1), default=DEFAULTS.max_active,
                        help=f"requests advanced together (default: {DEFAULTS.max_active})")
    parser.add_argument("--max-queue", type=at_least(1), default=DEFAULTS.max_queue,
                        help=f"requests waiting beyond the batch before 429 (default: {DEFAULTS.max_queue})")
    parser.add_argument("--max-tokens", type=at_least(1), default=DEFAULTS.max_tokens,
                        help=f"largest max_tokens a request may ask (default: {DEFAULTS.max_tokens})")
    parser.add_argument("--max-prompt-tokens", type=at_least(1), default=DEFAULTS.max_prompt_tokens,
                        help=f"largest encoded prompt (default: {DEFAULTS.max_prompt_tokens})")
    parser.add_argument("--max-image-pixels", type=at_least(1), default=DEFAULTS.max_image_pixels,
                        help=f"largest decoded image, width x height (default: {DEFAULTS.max_image_pixels})")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULTS.max_body_bytes / 2**20,
                        help=f"largest request body in MiB (default: {DEFAULTS.max_body_bytes / 2**20:g})")
    parser.add_argument("--local-image-dir", type=Path, default=None,
                        help="allow file:// images under this directory (default: data URLs only)")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="let the server fetch http(s):// images (default: data URLs only)")
    parser.add_argument("--shutdown-timeout", type=float, default=60.0,
                        help="seconds to finish requests in flight after SIGTERM (default: 60)")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    check_tiny_family(config.model)
    check_model_arguments(args)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number (0-65535)")
    if args.local_image_dir is not None and not args.local_image_dir.is_dir():
        raise UserError(f"--local-image-dir {args.local_image_dir} is not a folder")
    if args.max_body_mb <= 0:
        raise UserError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    limits = ServeLimits(max_body_bytes=int(args.max_body_mb * 2**20), max_image_pixels=args.max_image_pixels,
                         max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                         default_max_tokens=min(config.eval.max_new_tokens, args.max_tokens),
                         max_active=args.max_batch, max_queue=args.max_queue, local_image_dir=args.local_image_dir,
                         allow_remote_images=args.allow_remote_images)
    try:
        import fastapi  # noqa: F401 - the app's framework, checked before the model loads
        import uvicorn
    except ImportError as error:
        raise UserError(f"ivtlr serve needs the serve extra ({error.name} is missing): pip install 'ivtlr[serve]'"
                        ) from error

    from ivtlr.evaluation.cli import load_model
    from ivtlr.loading import resolve_device
    from ivtlr.serving.app import create_app

    model = load_model(args, config, resolve_device(args.device))
    app = create_app(model, model_name=args.model_name or config.name, limits=limits)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0
