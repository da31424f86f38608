"""Evaluation: batched latent generation over a split, scoring, resumable predictions (``ivtlr eval``).

The names load on first use, so that the evaluation commands check their options before importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ivtlr.evaluation.runner import (GROUP_KEYS, Answer, GenerationSettings, evaluate, evaluation_summary,
                                         generate_answers, group_keys_for, prediction_record)

#: public name -> the module that defines it
_LAZY = dict.fromkeys(["GROUP_KEYS", "Answer", "GenerationSettings", "evaluate", "evaluation_summary",
                       "generate_answers", "group_keys_for", "prediction_record"], "ivtlr.evaluation.runner")

__all__ = ["GROUP_KEYS", "Answer", "GenerationSettings", "evaluate", "evaluation_summary", "generate_answers",
           "group_keys_for", "prediction_record"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
