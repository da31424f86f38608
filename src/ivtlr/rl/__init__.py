"""Reinforcement learning on latent chains (``ivtlr rl``): GRPO over the stochastic latent policy.

The loop loads on first use, so that ``ivtlr rl`` checks its config before importing torch and Accelerate.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ivtlr.rl.loop import GRPOTrainer, RLResult, train_rl

__all__ = ["GRPOTrainer", "RLResult", "train_rl"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ivtlr.rl import loop

    return getattr(loop, name)
