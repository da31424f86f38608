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
from transformers import (
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    ChameleonImageProcessorPil,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from .processors import ChameleonChatProcessor, ImageOnlyQwen2VLProcessor

logger = logging.getLogger(__name__)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "chameleon")
LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")

# Order fixes the ids (0, 1, 2, ...), matching the layout of the original-code fixtures.
_QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_CHAMELEON_SPECIAL_TOKENS = (
    "<s>",
    "<pad>",
    "</s>",
    "<reserved08706>",
    "<image>",
    "<racm3:break>",
    "<eoss>",
)
# Special tokens with a named role; the rest become `extra_special_tokens`.
_QWEN_TOKEN_ROLES = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
_CHAMELEON_TOKEN_ROLES = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "sep_token": "<reserved08706>"}

_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Chameleon has no role markers: ChameleonProcessor itself appends the sep token that opens the answer,
# so the template only lays out text and the `<image>` placeholder in order.
_CHAMELEON_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if not loop.last %}\n{% endif %}"
    "{% endfor %}"
)

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

_QWEN_PATCH_SIZE = 14
_QWEN_MERGE_SIZE = 2
_QWEN_DEFAULT_IMAGE_SIZE = 112  # 8x8 patches of 14 -> 4x4 = 16 merged visual tokens
_CHAMELEON_DEFAULT_IMAGE_SIZE = 32
_CHAMELEON_CHANNEL_MULTIPLIER = (1, 1, 1)  # two downsamplings: 32x32 pixels -> 8x8 = 64 image tokens
_CHAMELEON_DOWNSAMPLING = 2 ** (len(_CHAMELEON_CHANNEL_MULTIPLIER) - 1)
_CHAMELEON_NUM_CODES = 64
_INITIALIZER_RANGE = 0.1  # wide enough that a random model's attention is far from uniform


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


def code_token_name(code: int) -> str:
    """Chameleon's vocabulary name of VQ code `code`: 'IMGIMG' + its decimal digits as letters A-J + 'Z'."""
    return "IMGIMG" + "".join(chr(ord("A") + int(digit)) for digit in str(code)) + "Z"


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def build_tokenizer(
    family: str, corpus: Iterable[str] | None = None, vocab_size: int = 300, whole_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE in memory, with the family's special tokens, the latent tokens and a chat template.

    Byte-level pre-tokenization makes every string encodable and decodable back exactly, so generated ids
    always decode to readable text. Chameleon's tokenizer also gets one added token per VQ code.
    ``whole_tokens`` are strings that become one (ordinary, decodable) token each wherever they occur, e.g. a
    prompt's fixed option lines: shorter sequences for a tiny model trained on a CPU.
    """
    _check_family(family)
    is_chameleon = family == "chameleon"
    special_tokens = (_CHAMELEON_SPECIAL_TOKENS if is_chameleon else _QWEN_SPECIAL_TOKENS) + LATENT_TOKENS
    roles = _CHAMELEON_TOKEN_ROLES if is_chameleon else _QWEN_TOKEN_ROLES
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
        add_bos_token=is_chameleon,  # Chameleon prompts start with <s>; Qwen prompts have no BOS
        clean_up_tokenization_spaces=False,  # keep " ." and double spaces exactly as generated
        chat_template=_CHAMELEON_CHAT_TEMPLATE if is_chameleon else _QWEN_CHAT_TEMPLATE,
    )
    if is_chameleon:
        tokenizer.add_tokens([code_token_name(code) for code in range(_CHAMELEON_NUM_CODES)])
    if whole_tokens:
        tokenizer.add_tokens([AddedToken(text, normalized=False) for text in whole_tokens])
    return tokenizer


def _default_image_size(family: str) -> int:
    return _CHAMELEON_DEFAULT_IMAGE_SIZE if family == "chameleon" else _QWEN_DEFAULT_IMAGE_SIZE


def build_processor(family: str, tokenizer: PreTrainedTokenizerFast, image_size: int | None = None) -> ProcessorMixin:
    """The family's processor around `tokenizer`, sized so that one image gives only a few image tokens.

    Qwen: every image is resized to about `image_size`**2 pixels (default 112 -> 16 merged tokens).
    Chameleon: images are resized and centre-cropped to `image_size` (default 32 -> 64 VQ tokens).
    """
    _check_family(family)
    image_size = image_size or _default_image_size(family)
    if family == "chameleon":
        if image_size % _CHAMELEON_DOWNSAMPLING:
            raise ValueError(f"Chameleon image_size must be a multiple of {_CHAMELEON_DOWNSAMPLING}, got {image_size}")
        image_processor = ChameleonImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        return ChameleonChatProcessor(
            image_processor,
            tokenizer,
            image_seq_length=(image_size // _CHAMELEON_DOWNSAMPLING) ** 2,
            chat_template=_CHAMELEON_CHAT_TEMPLATE,
        )
    factor = _QWEN_PATCH_SIZE * _QWEN_MERGE_SIZE
    if image_size % factor:
        raise ValueError(f"Qwen image_size must be a multiple of {factor}, got {image_size}")
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=image_size * image_size,
        max_pixels=image_size * image_size,
        patch_size=_QWEN_PATCH_SIZE,
        merge_size=_QWEN_MERGE_SIZE,
    )
    return ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=_QWEN_CHAT_TEMPLATE)


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (time, height, width) in Qwen2-VL's 1 : 1.5 : 1.5 ratio."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


@dataclass(frozen=True)
class _Sizes:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


def _qwen_text_config(tokenizer: PreTrainedTokenizerFast, sizes: _Sizes) -> dict:
    head_dim = sizes.hidden_size // sizes.num_heads
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": sizes.hidden_size,
        "intermediate_size": sizes.intermediate_size,
        "num_hidden_layers": sizes.num_layers,
        "num_attention_heads": sizes.num_heads,
        "num_key_value_heads": sizes.num_kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "initializer_range": _INITIALIZER_RANGE,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(head_dim)},
        "bos_token_id": tokenizer.pad_token_id,  # as in Qwen checkpoints: <|endoftext|> doubles as BOS
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _qwen_config(family: str, tokenizer: PreTrainedTokenizerFast, sizes: _Sizes) -> Qwen2VLConfig | Qwen2_5_VLConfig:
    vision_common = {
        "depth": 2,
        "num_heads": 2,
        "patch_size": _QWEN_PATCH_SIZE,
        "spatial_merge_size": _QWEN_MERGE_SIZE,
        "temporal_patch_size": 2,
        "initializer_range": _INITIALIZER_RANGE,
    }
    if family == "qwen2_vl":
        config_class = Qwen2VLConfig
        vision = {**vision_common, "embed_dim": 32, "mlp_ratio": 2, "hidden_size": sizes.hidden_size}
    else:
        config_class = Qwen2_5_VLConfig
        # 56-pixel windows make the default 112x112 image use both windowed (block 0) and full (block 1) attention.
        vision = {
            **vision_common,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": sizes.hidden_size,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
    token_id = tokenizer.convert_tokens_to_ids
    return config_class(
        text_config=_qwen_text_config(tokenizer, sizes),
        vision_config=vision,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def _chameleon_config(tokenizer: PreTrainedTokenizerFast, sizes: _Sizes, image_size: int) -> ChameleonConfig:
    return ChameleonConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_layers,
        num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_kv_heads,
        max_position_embeddings=4096,
        initializer_range=_INITIALIZER_RANGE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # The whole vocabulary, as in released checkpoints: the model reads `<image>` and the IMGIMG code names.
        vocabulary_map=tokenizer.get_vocab(),
        vq_config={
            "resolution": image_size,
            "base_channels": 32,
            "channel_multiplier": list(_CHAMELEON_CHANNEL_MULTIPLIER),
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "latent_channels": 16,
            "embed_dim": 8,
            "num_embeddings": _CHAMELEON_NUM_CODES,
            "initializer_range": _INITIALIZER_RANGE,
        },
    )


_MODEL_CLASSES = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "chameleon": ChameleonForConditionalGeneration,
}


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
    image_size = image_size or _default_image_size(family)
    tokenizer = build_tokenizer(family, corpus=corpus, vocab_size=vocab_size, whole_tokens=whole_tokens)
    processor = build_processor(family, tokenizer, image_size=image_size)
    sizes = _Sizes(hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size)
    if family == "chameleon":
        config = _chameleon_config(tokenizer, sizes, image_size)
    else:
        config = _qwen_config(family, tokenizer, sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[family]._from_config(config, attn_implementation=attn_implementation)
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
