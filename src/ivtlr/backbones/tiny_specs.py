"""What a family tells the tiny-model builders (``ivtlr.testing``): its special tokens, chat template, processor and
a small config of its real transformers class. Each family folder declares one :class:`TinySpec` per model type it
supports (``TINY`` in its ``__init__``), so that tests, the demo and the benchmarks build offline models of every
family through the same code."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from typing import Any

from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

#: Wide enough that a random model's attention is far from uniform (patch selection then means something).
INITIALIZER_RANGE = 0.1


@dataclass(frozen=True)
class TinySizes:
    """Sizes of a tiny decoder."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


def qwen_style_text_config(tokenizer: PreTrainedTokenizerFast, sizes: TinySizes, rope_parameters: dict,
                           **extra: Any) -> dict:
    """A tiny Qwen-style decoder config as a dict (the text part of most VLMs): ``sizes``, token ids that agree with
    ``tokenizer`` (``<|endoftext|>`` doubles as BOS, as in Qwen checkpoints), and the family's ``rope_parameters``
    and ``extra`` keys."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": sizes.hidden_size,
        "intermediate_size": sizes.intermediate_size,
        "num_hidden_layers": sizes.num_layers,
        "num_attention_heads": sizes.num_heads,
        "num_key_value_heads": sizes.num_kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "initializer_range": INITIALIZER_RANGE,
        "rope_parameters": rope_parameters,
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **extra,
    }


@dataclass(frozen=True)
class VisionKeys:
    """What a family's vision config calls the tower's sizes (``mlp`` None: the family sets the MLP otherwise, e.g.
    as a ratio of the width)."""

    width: str = "hidden_size"
    depth: str = "num_hidden_layers"
    heads: str = "num_attention_heads"
    mlp: str | None = "intermediate_size"


#: The tiny models' vision towers: two blocks of width 32 with two heads and an MLP of 64.
VISION_SIZES = {"width": 32, "depth": 2, "heads": 2, "mlp": 64}


def vision_tower_config(patch_size: int, keys: VisionKeys = VisionKeys(), **extra: Any) -> dict:
    """A tiny vision tower config as a dict: ``VISION_SIZES`` under the family's ``keys``, ``patch_size`` and
    ``INITIALIZER_RANGE``, then the family's ``extra`` keys (which win over the shared sizes)."""
    sizes = {getattr(keys, role): size for role, size in VISION_SIZES.items() if getattr(keys, role) is not None}
    return {**sizes, "patch_size": patch_size, "initializer_range": INITIALIZER_RANGE, **extra}


@dataclass(frozen=True)
class TinySpec:
    """How to build a tiny random model of one model type.

    ``build_processor(tokenizer, image_size)`` returns the family's processor around the in-memory tokenizer;
    ``build_config(tokenizer, sizes, image_size)`` a config of ``model_class`` whose token ids agree with it.
    """

    model_class: type[PreTrainedModel]
    special_tokens: Sequence[str]  # in id order, before the latent tokens
    token_roles: dict[str, str]  # tokenizer role -> special token (eos_token, pad_token, ...)
    chat_template: str
    default_image_size: int
    build_processor: Callable[[PreTrainedTokenizerFast, int], ProcessorMixin]
    build_config: Callable[[PreTrainedTokenizerFast, TinySizes, int], PretrainedConfig]
    add_bos_token: bool = False
    extra_tokens: Sequence[str] = field(default_factory=tuple)  # ordinary tokens the family's vocabulary needs
