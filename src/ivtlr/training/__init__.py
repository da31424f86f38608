"""Training: the progressive latent curriculum on Accelerate (``ivtlr train``).

The trainer loads on first use, so that ``ivtlr train`` checks its config before importing torch and Accelerate.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ivtlr.training.trainer import Trainer, TrainResult, train

__all__ = ["TrainResult", "Trainer", "train"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ivtlr.training import trainer

    return getattr(trainer, name)
