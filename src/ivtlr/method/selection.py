"""Choosing the K image patches of a latent step and the order they are inserted in."""
from __future__ import annotations

import torch

PATCH_ORDERS = ("position", "score", "topk")


def select_patches(scores: torch.Tensor, taken: torch.Tensor, k: int, order: str) -> torch.Tensor:
    """Indices (into the sample's image tokens) of the ``k`` best untaken patches, in insertion order.

    ``scores``: (N,) attention paid to each image token; ``taken``: (N,) bool, patches inserted at earlier steps
    (never candidates again). When fewer than ``k`` patches are left, all the remaining ones are returned.

    Orders: ``position`` — image order (the same on every machine); ``score`` — descending score, ties by
    position; ``topk`` — whatever ``torch.topk(sorted=False)`` returns, as the original inserts them (the order
    depends on the torch build and device; use it to reproduce checkpoints trained by the original).
    """
    if order not in PATCH_ORDERS:
        raise ValueError(f"patch_order must be one of {PATCH_ORDERS}, got {order!r}")
    ranked = scores.float().masked_fill(taken, float("-inf"))
    k = min(k, int((~taken).sum()))
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if order == "topk":
        return torch.topk(ranked, k, sorted=False).indices
    best = torch.sort(ranked, descending=True, stable=True).indices[:k]
    return best if order == "score" else torch.sort(best).values
