"""Token batches: chat-templated prompt with its image, latent slots, then the labelled target.

Each sample is encoded on its own (the processor expands the image placeholder into that image's tokens),
so the prompt/latent/target boundaries are exact, and then padded into one batch. Only the target text
and the closing EOS carry labels. The engine re-lays samples out for the latent chain itself, so plain
right padding is enough for training; generation batches may be left padded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from PIL import Image

from ivtlr.config import ConfigError
from ivtlr.data.curriculum import TrainingItem, format_prompt_text
from ivtlr.data.example import Example
from ivtlr.data.prompt_cache import DEFAULT_CACHE_BYTES, PromptCache, tensor_bytes

if TYPE_CHECKING:
    from transformers import ProcessorMixin

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Processor outputs with one entry per token: extended over latents/target and padded with zeros.
TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")

ImageSize = int | tuple[int, int]
PaddingSide = Literal["left", "right"]


def resize_image(image: Image.Image, image_size: ImageSize | None) -> Image.Image:
    """Resize to a fixed (width, height) before the processor; an int means a square. None keeps the image."""
    if image_size is None:
        return image
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    return image.resize((width, height), Image.Resampling.BICUBIC)


def chat_prompt(processor: ProcessorMixin, prompt: str, has_image: bool) -> str:
    """The prompt inside the model's chat template, image first, ready for the answer to follow."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@dataclass
class _EncodedPrompt:
    """One sample's prompt tokens, its per-token type ids and its image tensors."""

    input_ids: list[int]
    token_types: dict[str, list[int]]
    image_tensors: dict[str, torch.Tensor]


def _encode_prompt(
    processor: ProcessorMixin, prompt: str, image: Image.Image | None, image_size: ImageSize | None
) -> _EncodedPrompt:
    text = chat_prompt(processor, prompt, image is not None)
    images = None if image is None else [resize_image(image, image_size)]
    encoded = processor(text=[text], images=images, return_tensors="pt")
    token_types = {key: encoded[key][0].tolist() for key in TOKEN_TYPE_KEYS if key in encoded}
    image_tensors = {
        key: value for key, value in encoded.items() if key not in ("input_ids", "attention_mask", *TOKEN_TYPE_KEYS)
    }
    return _EncodedPrompt(encoded["input_ids"][0].tolist(), token_types, image_tensors)


def _encoded_bytes(prompt: _EncodedPrompt) -> int:
    tokens = len(prompt.input_ids) * (1 + len(prompt.token_types))
    return tensor_bytes(list(prompt.image_tensors.values()), tokens)


def _pad(rows: list[list[int]], value: int, side: PaddingSide) -> torch.Tensor:
    width = max(len(row) for row in rows)
    padded = [
        row + [value] * (width - len(row)) if side == "right" else [value] * (width - len(row)) + row for row in rows
    ]
    return torch.tensor(padded, dtype=torch.long)


def _batch(
    sequences: list[list[int]],
    labels: list[list[int]] | None,
    prompts: list[_EncodedPrompt],
    pad_token_id: int,
    side: PaddingSide,
) -> dict[str, torch.Tensor]:
    """Pad the sequences (and their labels and token types) and concatenate the image tensors in sample order."""
    batch = {
        "input_ids": _pad(sequences, pad_token_id, side),
        "attention_mask": _pad([[1] * len(sequence) for sequence in sequences], 0, side),
    }
    if labels is not None:
        batch["labels"] = _pad(labels, IGNORE_INDEX, side)
    for key in prompts[0].token_types:
        rows = [
            prompt.token_types[key] + [0] * (len(sequence) - len(prompt.input_ids))
            for prompt, sequence in zip(prompts, sequences)
        ]
        batch[key] = _pad(rows, 0, side)
    image_keys = {key for prompt in prompts for key in prompt.image_tensors}
    for key in sorted(image_keys):
        batch[key] = torch.cat([prompt.image_tensors[key] for prompt in prompts if key in prompt.image_tensors])
    return batch


def _pad_token_id(processor: ProcessorMixin) -> int:
    tokenizer = processor.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class IVTLRCollator:
    """Turn `TrainingItem`s into a training batch: prompt (label -100), latents (-100), target + EOS (labelled).

    `max_length` bounds the collated sequence (prompt with its image tokens, latents, target, EOS): a
    longer sample raises a `ValueError` naming it, or with `skip_too_long` is left out of the batch and
    counted in `skipped_too_long`.

    `step_targets` / `step_regions` add what step and region supervision read (`ivtlr.method.supervision`): per latent
    slot the token ids of the written step it replaced (the step's text and its newline), and the region that step reads
    as fractions of the picture.

    Encoded prompts are kept between epochs (`ivtlr.data.prompt_cache`, keyed by the item's id, prompt and picture
    size) up to `prompt_cache_bytes`; 0 encodes every prompt again.
    """

    def __init__(
        self,
        processor: ProcessorMixin,
        latent_token_id: int,
        *,
        max_length: int | None = None,
        image_size: ImageSize | None = None,
        skip_too_long: bool = False,
        eos_token_id: int | None = None,
        step_targets: bool = False,
        step_regions: bool = False,
        prompt_cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        self.processor = processor
        self.prompts: PromptCache[_EncodedPrompt] = PromptCache(prompt_cache_bytes, _encoded_bytes)
        self.step_targets, self.step_regions = step_targets, step_regions
        self.latent_token_id = latent_token_id
        self.max_length = max_length
        self.image_size = image_size
        self.skip_too_long = skip_too_long
        self.eos_token_id = processor.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        self.pad_token_id = _pad_token_id(processor)
        self.skipped_too_long = 0

    def target_ids(self, target: str) -> list[int]:
        return self.processor.tokenizer(target, add_special_tokens=False)["input_ids"] + [self.eos_token_id]

    def _fits(self, item: TrainingItem, prompt_length: int, length: int) -> bool:
        if self.max_length is None or length <= self.max_length:
            return True
        message = (
            f"example {item.id!r} is {length} tokens long (prompt {prompt_length}, latents {item.n_latent}, "
            f"target {length - prompt_length - item.n_latent}), more than max_length={self.max_length}"
        )
        if not self.skip_too_long:
            raise ValueError(message)
        self.skipped_too_long += 1
        logger.warning("skipping %s (%d skipped so far)", message, self.skipped_too_long)
        return False

    def __call__(self, items: Sequence[TrainingItem]) -> dict[str, torch.Tensor]:
        sequences, labels, prompts, kept = [], [], [], []
        for item in items:
            key = (item.id, item.prompt, None if item.image is None else item.image.size)
            prompt = self.prompts.get(key, lambda item=item: _encode_prompt(self.processor, item.prompt, item.image,
                                                                             self.image_size))
            target = self.target_ids(item.target)
            unlabelled = prompt.input_ids + [self.latent_token_id] * item.n_latent
            if not self._fits(item, len(prompt.input_ids), len(unlabelled) + len(target)):
                continue
            sequences.append(unlabelled + target)
            labels.append([IGNORE_INDEX] * len(unlabelled) + target)
            prompts.append(prompt)
            kept.append(item)
        if not sequences:
            raise ConfigError(f"every sample of the batch is longer than max_length={self.max_length}: raise "
                              "max_length (or set it to null)")
        batch = _batch(sequences, labels, prompts, self.pad_token_id, side="right")
        if self.step_targets:
            batch["step_targets"] = self._step_targets(kept)
        if self.step_regions:
            batch["step_regions"] = _step_regions(kept)
        return batch

    def _step_targets(self, items: Sequence[TrainingItem]) -> torch.Tensor:
        """(B, S, T): per latent slot, its written step's ids (text, then the newline that ends it), -100 after."""
        ids = [[self.processor.tokenizer(f"{step}\n", add_special_tokens=False)["input_ids"] if step else []
                for step in item.latent_steps] for item in items]
        slots = max((len(item_ids) for item_ids in ids), default=0)
        width = max((len(step) for item_ids in ids for step in item_ids), default=0)
        out = torch.full((len(items), slots, width), IGNORE_INDEX, dtype=torch.long)
        for b, item_ids in enumerate(ids):
            for slot, step in enumerate(item_ids):
                out[b, slot, : len(step)] = torch.tensor(step, dtype=torch.long)
        return out


def _step_regions(items: Sequence[TrainingItem]) -> torch.Tensor:
    """(B, S, 4): per latent slot, its step's box as (x0, y0, x1, y1) fractions of the picture (clipped to it), NaN
    where it has none. Fractions survive the resize to ``image_size``, which scales the whole picture."""
    slots = max((len(item.latent_boxes) for item in items), default=0)
    out = torch.full((len(items), slots, 4), float("nan"))
    for b, item in enumerate(items):
        for slot, box in enumerate(item.latent_boxes):
            if box is None or item.image is None:
                continue
            width, height = item.image.size
            x0, y0, x1, y1 = box
            fractions = [min(max(x0 / width, 0.0), 1.0), min(max(y0 / height, 0.0), 1.0),
                         min(max(x1 / width, 0.0), 1.0), min(max(y1 / height, 0.0), 1.0)]
            if fractions[0] < fractions[2] and fractions[1] < fractions[3]:
                out[b, slot] = torch.tensor(fractions)
    return out


def build_generation_batch(
    processor: ProcessorMixin,
    examples: Sequence[Example],
    n_latent: int,
    latent_token_id: int,
    *,
    image_size: ImageSize | None = None,
    padding_side: PaddingSide = "left",
) -> dict[str, torch.Tensor]:
    """Prompt + `n_latent` latent slots per example, padded (left by default), for generation and evaluation."""
    texts = [(format_prompt_text(example.question, example.choices), example.image) for example in examples]
    return build_prompt_batch(processor, texts, n_latent, latent_token_id, image_size=image_size,
                              padding_side=padding_side)


def build_prompt_batch(
    processor: ProcessorMixin,
    prompts: Sequence[tuple[str, Image.Image | None]],
    n_latent: int,
    latent_token_id: int,
    *,
    image_size: ImageSize | None = None,
    padding_side: PaddingSide = "left",
) -> dict[str, torch.Tensor]:
    """:func:`build_generation_batch` for prompt texts taken as they are (a chat message's text, which a client may
    have formatted as training does) with their images: chat template, image, then `n_latent` latent slots."""
    encoded = [_encode_prompt(processor, text, image, image_size) for text, image in prompts]
    sequences = [prompt.input_ids + [latent_token_id] * n_latent for prompt in encoded]
    return _batch(sequences, None, encoded, _pad_token_id(processor), padding_side)
