"""``ivtlr infer``: answer one multiple-choice question about one image, and show where each latent step looked.

    ivtlr infer --checkpoint DIR --image cat.png --question "Which animal?" --choices cat dog --explain steps.png

prints the generated text and the option it names. ``--explain`` draws the image as the model saw it (resized, and
cropped where the processor crops) with the patches each latent step inserted outlined in that step's colour.
The options and the image are checked before torch and the model load: a mistake in them is one line in a second.
"""
from __future__ import annotations

import argparse
import io
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from ivtlr.config import AnswerRule
from ivtlr.errors import UserError
from ivtlr.evaluation.arguments import (add_device_argument, add_model_arguments, at_least,
                                        check_model_arguments)
from ivtlr.evaluation.explain import save_selection_png
from ivtlr.modes import MODES
from ivtlr.evaluation.answers import EXTRACTION_RULES, extract_answer

if TYPE_CHECKING:
    from ivtlr.loading import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class InferenceResult:
    text: str
    answer: str | None  # the option letter the text commits to, if any
    n_tokens: int
    selected: list[list[int]]  # per latent step, indices into the image-token grid (row-major)
    grid_hw: tuple[int, int] | None  # (rows, cols) of the image-token grid
    seen_image: Image.Image  # the picture the model saw, on which the grid is laid
    latent_texts: list[str] | None = None  # with ``read_latents``: what each latent step's state decodes to


def answer_question(model: LoadedModel, image: Image.Image, question: str, choices: list[str], *,
                    n_latent: int | None = None, max_new_tokens: int = 64, image_size: int | None = None,
                    rule: AnswerRule = "original", read_back: bool = False) -> InferenceResult:
    """Prompt as in training, run the latent chain, decode, and read the answer letter; with ``read_back``, also
    decode each latent step's state to text (:func:`ivtlr.evaluation.readback.read_latents`)."""
    from ivtlr.data import Example, resize_image
    from ivtlr.evaluation.readback import read_latents
    from ivtlr.evaluation.runner import GenerationSettings, generate_answers

    image = image.convert("RGB")
    image_size = image_size if image_size is not None else model.image_size
    settings = GenerationSettings(n_latent=model.n_latent(n_latent), max_new_tokens=max_new_tokens,
                                  image_size=image_size)
    # The gold answer is unknown here; generation reads only the question, the options and the image.
    example = Example(id="question", image=image, question=question, choices=list(choices), answer="", rationale="")
    (answer,), batch = generate_answers(model, [example], settings)
    has_image = bool((batch["input_ids"] == model.engine.backbone.image_token_id).any())
    return InferenceResult(
        text=answer.text, answer=extract_answer(answer.text, choices, rule), n_tokens=answer.n_tokens,
        selected=[step.tolist() for step in answer.selected],
        grid_hw=model.engine.image_grid(batch, 0) if has_image else None,
        seen_image=model.engine.backbone.processor_view(model.processor.image_processor,
                                                        resize_image(image, image_size), batch, 0),
        latent_texts=read_latents(model, answer.latents) if read_back and answer.latents is not None else None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, required=True, patches_default="the family's")
    parser.add_argument("--mode", choices=MODES, default="ivtlr", help="mode of an --original checkpoint")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--question", required=True)
    parser.add_argument("--choices", nargs="+", required=True, help="the options, in order (A, B, ...)")
    parser.add_argument("--n-latent", type=at_least(0), default=None,
                        help="latent steps (default: the checkpoint's final stage; 3 for --original)")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=64)
    parser.add_argument("--image-size", type=at_least(1), default=None,
                        help="resize the image to this square first (default: the checkpoint's training size)")
    parser.add_argument("--answer-rule", choices=EXTRACTION_RULES, default="original")
    parser.add_argument("--explain", type=Path, metavar="OUT.png", help="draw each latent step's patches")
    parser.add_argument("--read-latents", action="store_true",
                        help="decode each latent step's state to text (printed, and under each step of --explain)")
    add_device_argument(parser)


class InferInputError(UserError, ValueError):
    """An ``--image`` that cannot be read as a picture, or options the prompt cannot letter."""


def check_image(path: Path) -> bytes:
    """The bytes of ``--image`` once PIL has decoded them (here, with PIL alone: importing the data pipeline costs
    seconds), or one line saying why they cannot be a picture."""
    try:
        encoded = path.read_bytes()
    except FileNotFoundError as error:
        raise InferInputError(f"--image {path} does not exist") from error
    except IsADirectoryError as error:
        raise InferInputError(f"--image {path} is a folder: give one picture file") from error
    except OSError as error:
        raise InferInputError(f"--image {path} cannot be read ({error.strerror or error})") from error
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image.load()
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InferInputError(f"--image {path} is not a picture PIL can read ({error})") from error
    return encoded


def run(args: argparse.Namespace) -> int:
    if len(args.choices) > len(string.ascii_uppercase):  # ivtlr.data.example.OPTION_LETTERS
        raise InferInputError(f"{len(args.choices)} --choices, but options are lettered A-Z: give at most "
                              f"{len(string.ascii_uppercase)}")
    check_model_arguments(args)
    encoded = check_image(args.image)
    from ivtlr.data.example import decode_image
    from ivtlr.evaluation.arguments import load_requested_model
    from ivtlr.loading import resolve_device

    image = decode_image(encoded)  # as training decodes it: transparency over white, high bit depths by their range
    model = load_requested_model(args, resolve_device(args.device), mode=args.mode,
                                 num_selected_patches=args.num_selected_patches, image_size=args.image_size)
    result = answer_question(model, image, args.question, args.choices, n_latent=args.n_latent,
                             max_new_tokens=args.max_new_tokens, image_size=args.image_size, rule=args.answer_rule,
                             read_back=args.read_latents)
    named = f" ({args.choices[ord(result.answer) - ord('A')]})" if result.answer else ""
    lines = [f"latent step {i + 1} says: {text}" for i, text in enumerate(result.latent_texts or [])]
    lines += [f"generated: {result.text}", f"answer: {result.answer or 'none'}{named}"]
    print("\n".join(lines))  # noqa: T201 - the command's result
    if args.explain is not None:
        if result.grid_hw is None or not result.selected:
            logger.warning("no latent vision to draw (no image or no latent steps): %s shows the image only",
                           args.explain)
        try:
            labels = [f"step {i + 1}: {text}" for i, text in enumerate(result.latent_texts)] \
                if result.latent_texts else None
            save_selection_png(args.explain, result.seen_image, result.grid_hw or (1, 1), result.selected,
                               step_labels=labels)
        except OSError as error:  # the answer is printed already: a picture that cannot be written is not fatal
            logger.warning("could not write the --explain picture %s: %s", args.explain, error)
    return 0
