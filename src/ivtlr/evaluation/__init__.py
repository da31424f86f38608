"""Evaluation: batched latent generation over a split, scoring, resumable predictions (``ivtlr eval``).

The names load on first use, so that the evaluation commands check their options before importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..modes import NO_LATENT_MODES
    from .loading import (DEFAULT_N_LATENT, LoadedModel, default_device, load_checkpoint_model, load_config_model,
                          load_original_model)
    from .runner import (GROUP_KEYS, Answer, GenerationSettings, evaluate, evaluation_summary, generate_answers,
                         group_keys_for, prediction_record)

#: public name -> the module that defines it
_LAZY = {
    "NO_LATENT_MODES": "..modes",
    **dict.fromkeys(["DEFAULT_N_LATENT", "LoadedModel", "default_device", "load_checkpoint_model",
                     "load_config_model", "load_original_model"], ".loading"),
    **dict.fromkeys(["GROUP_KEYS", "Answer", "GenerationSettings", "evaluate", "evaluation_summary",
                     "generate_answers", "group_keys_for", "prediction_record"], ".runner"),
}

__all__ = [
    "DEFAULT_N_LATENT",
    "GROUP_KEYS",
    "NO_LATENT_MODES",
    "Answer",
    "GenerationSettings",
    "LoadedModel",
    "default_device",
    "evaluate",
    "evaluation_summary",
    "generate_answers",
    "group_keys_for",
    "load_checkpoint_model",
    "load_config_model",
    "load_original_model",
    "prediction_record",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
