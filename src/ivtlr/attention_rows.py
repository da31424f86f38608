"""One attention row per layer, computed alongside the model's own attention.

IVT-LR ranks image patches by the attention that one query (the position before the next latent slot) pays to
every key, averaged over layers and heads. The original asks the model for every attention map of every layer
(eager attention only, O(L^2) memory). Here the model keeps its own attention kernel (sdpa, flash, eager) and a
thin wrapper around that kernel computes softmax(q·Kᵀ) for the single query of interest from the same (RoPE-applied,
cache-extended) query and key tensors the kernel receives.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.modeling_utils import AttentionInterface


class AttentionRowRecorder:
    """Accumulates, for each sample, the layer/head-averaged attention row of one query column."""

    def __init__(self, attention_modules: list[nn.Module]):
        self._modules = {id(m) for m in attention_modules}
        self.n_layers = len(attention_modules)
        self.query_cols: torch.Tensor | None = None  # (B,) column of the query within the current input chunk
        self.key_mask: torch.Tensor | None = None  # (B, Lk) True at real keys of the whole (cached + new) sequence
        self._sum: torch.Tensor | None = None
        self._count = 0

    def arm(self, query_cols: torch.Tensor, key_mask: torch.Tensor) -> None:
        """Prepare for one forward pass."""
        self.query_cols, self.key_mask = query_cols, key_mask.bool()
        self._sum, self._count = None, 0

    def disarm(self) -> None:
        self.query_cols = self.key_mask = None

    @property
    def armed(self) -> bool:
        return self.query_cols is not None

    def observes(self, module: nn.Module) -> bool:
        return self.armed and id(module) in self._modules

    @torch.no_grad()
    def record(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """query (B, H, Lq, d), key (B, Hkv, Lk, d) as handed to the attention kernel."""
        batch = torch.arange(query.shape[0], device=query.device)
        q = query[batch, :, self.query_cols.to(query.device)].float()  # (B, H, d)
        k = key.float()
        groups = q.shape[1] // k.shape[1]
        q = q.view(q.shape[0], k.shape[1], groups, q.shape[-1])  # (B, Hkv, G, d)
        scores = torch.einsum("bhgd,bhkd->bhgk", q, k) * scaling
        mask = self.key_mask.to(scores.device)[:, None, None, :]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        row = probs.mean(dim=(1, 2))  # (B, Lk): mean over all heads
        self._sum = row if self._sum is None else self._sum + row
        self._count += 1

    def rows(self) -> torch.Tensor:
        """The averaged rows of the last pass, (B, Lk), float32."""
        if self._count != self.n_layers:
            raise RuntimeError(f"attention rows were captured for {self._count} of {self.n_layers} layers; "
                               "the model's attention did not go through the attention interface")
        return self._sum / self._count


def _model_eager_attention(module: nn.Module) -> Callable:
    """The eager kernel of the module's own modeling file (transformers defines one per model family)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward")


@contextmanager
def capture_attention_rows(recorder: AttentionRowRecorder, attn_implementation: str) -> Iterator[None]:
    """Route the model's attention kernel through a wrapper that also feeds ``recorder``.

    Modules not observed by the recorder (the vision tower, other models) call the kernel unchanged.
    """
    mapping = AttentionInterface._global_mapping
    had_key = attn_implementation in mapping
    kernel = mapping.get(attn_implementation)

    def kernel_with_rows(module, query, key, value, attention_mask, **kwargs):
        impl = kernel if kernel is not None else _model_eager_attention(module)
        out = impl(module, query, key, value, attention_mask, **kwargs)
        if recorder.observes(module):
            recorder.record(query, key, kwargs.get("scaling") or module.scaling)
        return out

    mapping[attn_implementation] = kernel_with_rows
    try:
        yield
    finally:
        if had_key:
            mapping[attn_implementation] = kernel
        else:
            del mapping[attn_implementation]
