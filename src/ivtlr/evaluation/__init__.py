"""Evaluation: batched latent generation over a split, scoring, resumable predictions (``ivtlr eval``)."""

from ..modes import NO_LATENT_MODES
from .loading import (DEFAULT_N_LATENT, LoadedModel, default_device, load_checkpoint_model,
                      load_config_model, load_original_model)
from .runner import (GROUP_KEYS, Answer, GenerationSettings, evaluate, evaluation_summary, generate_answers,
                     group_keys_for, prediction_record)

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
