"""The training loss: next-token cross-entropy over labelled tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ivtlr.method.chain import IGNORE_INDEX


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy: the batch mean over labelled tokens, and each sample's own mean."""
    shift_logits = logits[:, :-1]
    if shift_logits.dtype in (torch.float16, torch.bfloat16):
        shift_logits = shift_logits.float()
    shift_labels = labels[:, 1:]
    per_token = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(-1)
    sums = per_token.sum(-1)
    loss = sums.sum() / counts.sum().clamp(min=1)
    return loss, sums / counts.clamp(min=1)
