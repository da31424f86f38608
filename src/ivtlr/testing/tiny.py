"""Tiny random models of every supported family, built offline in well under a second.

Tests, the demo and the benchmarks need real transformers classes (so that the code paths are the ones a
released checkpoint takes) without hub access. Everything here is built from config classes: a byte-level
BPE tokenizer trained in memory, the family's stock processor (or an image-only variant where the stock one
needs torchvision) and a randomly initialised model whose config token ids agree with that tokenizer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from ivtlr.backbones import SUPPORTED_MODEL_TYPES, check_tiny_family, tiny_spec
from ivtlr.backbones.tiny_specs import TinySizes

logger = logging.getLogger(__name__)

#: Every model type ivtlr supports has a tiny builder (its family folder's ``TINY``).
FAMILIES = SUPPORTED_MODEL_TYPES
LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")

# Enough English in the prompt/answer format of the data pipeline for the BPE merges to form whole words.
_BUILTIN_CORPUS = (
    "[Question]:Which animal is shown in the picture?\n[Options]:\n(A).a cat\n(B).a dog\n(C).a bird\nAnswer:\n",
    "[Question]:What is the color of the large square?\n[Options]:\n(A).red\n(B).green\n(C).blue\n(D).yellow\n"
    "Answer:\n",
    "[Question]:How many digits are written in the image?\n[Options]:\n(A).one\n(B).two\n(C).three\n(D).four\n"
    "Answer:\n",
    "The picture shows a handwritten digit. The digit has a closed loop at the top. Therefore, the answer is A",
    "Look at the image. The square on the left is larger than the square on the right. "
    "Therefore, the answer is B",
    "A magnet attracts objects made of iron. The nail is made of iron, so the magnet attracts the nail. "
    "Therefore, the answer is C",
    "Plants need sunlight, water and air to grow. The plant in the dark room did not grow. "
    "Therefore, the answer is D",
    "Which of these states is the farthest north? Look at the map and find the state at the top.",
    "The question asks about the weather. Weather is what the air is like at a certain place and time.",
    "Solid, liquid and gas are states of matter. Ice is a solid, water is a liquid and steam is a gas.",
    "An animal that eats only plants is a herbivore. The rabbit eats grass, so it is a herbivore.",
    "The force of gravity pulls objects toward the center of the earth. The ball falls to the ground.",
    "Count the objects in each row. The first row has three circles and the second row has five circles.",
    "Read the options carefully and choose the one that best answers the question about the image.",
    "The lecture explains that a sentence starts with a capital letter and ends with a period.",
    "Compare the two numbers. Seven is greater than four, and four is greater than two.",
    "The image shows a simple scene: a small house, a tall tree, and the sun in the sky.",
    "Step one: find the key words. Step two: match them with the picture. Step three: pick the option.",
    "What is the answer? The answer is the option that matches what we see in the picture.",
    "This is a test of reasoning. Think about each step before you give the final answer.",
)

@dataclass
class TinyBundle:
    """A tiny model with the tokenizer and processor it was built to agree with."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    processor: ProcessorMixin
    latent_token_id: int
    start_latent_id: int
    end_latent_id: int
    family: str

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id


def _check_family(family: str) -> None:
    check_tiny_family(f"tiny:{family}")


def build_tokenizer(
    family: str, corpus: Iterable[str] | None = None, vocab_size: int = 300, whole_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE in memory, with the family's special tokens, the latent tokens and a chat template.

    Byte-level pre-tokenization makes every string encodable and decodable back exactly, so generated ids
    always decode to readable text. The family's ``extra_tokens`` (e.g. one per VQ code) are added too.
    ``whole_tokens`` are strings that become one (ordinary, decodable) token each wherever they occur, e.g. a
    prompt's fixed option lines: shorter sequences for a tiny model trained on a CPU.
    """
    _check_family(family)
    spec = tiny_spec(family)
    special_tokens = tuple(spec.special_tokens) + LATENT_TOKENS
    roles = spec.token_roles
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*_BUILTIN_CORPUS, *(corpus or ())], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **roles,
        extra_special_tokens=[token for token in special_tokens if token not in roles.values()],
        add_bos_token=spec.add_bos_token,
        clean_up_tokenization_spaces=False,  # keep " ." and double spaces exactly as generated
        chat_template=spec.chat_template,
    )
    if spec.extra_tokens:
        tokenizer.add_tokens(list(spec.extra_tokens))
    if whole_tokens:
        tokenizer.add_tokens([AddedToken(text, normalized=False) for text in whole_tokens])
    return tokenizer


def build_processor(family: str, tokenizer: PreTrainedTokenizerFast, image_size: int | None = None) -> ProcessorMixin:
    """The family's processor around `tokenizer`, sized so that one image gives only a few image tokens."""
    _check_family(family)
    spec = tiny_spec(family)
    return spec.build_processor(tokenizer, image_size or spec.default_image_size)


def build_tiny(
    family: str,
    *,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    image_size: int | None = None,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 300,
    dtype: torch.dtype = torch.float32,
    whole_tokens: Sequence[str] = (),
) -> TinyBundle:
    """Build a random tiny model of `family` with a tokenizer and processor that agree with its config.

    The weights depend only on `seed` and the sizes (the caller's global RNG is left untouched); they are
    drawn in float32 and then cast, so a bfloat16 bundle is the float32 one rounded.
    """
    _check_family(family)
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"need num_kv_heads | num_heads | hidden_size, got {num_kv_heads}, {num_heads}, {hidden_size}")
    spec = tiny_spec(family)
    image_size = image_size or spec.default_image_size
    tokenizer = build_tokenizer(family, corpus=corpus, vocab_size=vocab_size, whole_tokens=whole_tokens)
    processor = spec.build_processor(tokenizer, image_size)
    config = spec.build_config(tokenizer, TinySizes(hidden_size, num_layers, num_heads, num_kv_heads,
                                                    intermediate_size), image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.model_class._from_config(config, attn_implementation=attn_implementation)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(dtype).eval()
    start_latent_id, end_latent_id, latent_token_id = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
    logger.debug("built tiny %s: %d parameters", family, sum(p.numel() for p in model.parameters()))
    return TinyBundle(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        latent_token_id=latent_token_id,
        start_latent_id=start_latent_id,
        end_latent_id=end_latent_id,
        family=family,
    )


@functools.lru_cache(maxsize=1)
def _digit_scans() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images / 16.0  # (1797, 8, 8) in [0, 1]


def make_test_image(size: tuple[int, int] = (112, 112), seed: int = 0) -> Image.Image:
    """An RGB picture tiled from real handwritten-digit scans, so tests see structured content, not noise.

    Each tile is one 8x8 scan upsampled to 32x32 and coloured with its own foreground/background pair.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    scans = _digit_scans()
    tile = 32
    rows, cols = -(-height // tile), -(-width // tile)
    canvas = np.empty((rows * tile, cols * tile, 3), dtype=np.float64)
    for row in range(rows):
        for col in range(cols):
            scan = Image.fromarray(scans[rng.integers(len(scans))].astype(np.float32))
            ink = np.asarray(scan.resize((tile, tile), Image.Resampling.BILINEAR))[..., None]
            foreground, background = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.35, 3)
            canvas[row * tile : (row + 1) * tile, col * tile : (col + 1) * tile] = (
                background + (foreground - background) * ink
            )
    pixels = np.clip(canvas[:height, :width] * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels)


def load_tiny_components(family: str, *, attn_implementation: str = "sdpa", seed: int = 0,
                         image_size: int | None = None, dtype: torch.dtype = torch.float32, **options):
    """The ``tiny:`` model source: (model, tokenizer, processor) of a tiny ``family`` model (``tiny_options`` of
    the config pass through as ``options``)."""
    bundle = build_tiny(family, attn_implementation=attn_implementation, seed=seed, image_size=image_size,
                        dtype=dtype, **options)
    return bundle.model, bundle.tokenizer, bundle.processor
