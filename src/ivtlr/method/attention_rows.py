"""One attention row per layer, computed alongside the model's own attention.

IVT-LR ranks image patches by the attention that one query (the position before the next latent slot) pays to
every key, averaged over layers and heads. The original asks the model for every attention map of every layer
(eager attention only, O(L^2) memory). Here the model keeps its own attention kernel (sdpa, flash, eager), called
through a registered attention function (``ivtlr_rows_<kernel>``) that also computes softmax(q·Kᵀ) for the single
query of interest from the same (RoPE-applied, cache-extended) query and key tensors the kernel receives, when an
armed recorder observes the module.
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface


def additive_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one kernels use: 0 where attended, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class AttentionRowRecorder:
    """Accumulates, for each sample, the layer/head-averaged attention row of one query column."""

    def __init__(self, attention_modules: list[nn.Module]):
        self._modules = {id(m) for m in attention_modules}
        self.n_layers = len(attention_modules)
        self.query_cols: torch.Tensor | None = None  # (B,) column of the query within the current input chunk
        self.key_mask: torch.Tensor | None = None  # (B, Lk) True at real keys of the whole (cached + new) sequence
        self._batch: torch.Tensor | None = None  # (B,) sample index, for picking each sample's query column
        self._key_bias: torch.Tensor | None = None  # (B, 1, 1, Lk) 0 at real keys, -inf elsewhere
        self._sum: torch.Tensor | None = None
        self._count = 0
        #: keep the rows in the autograd graph (region supervision trains the attention they measure)
        self.differentiable = False

    def arm(self, query_cols: torch.Tensor, key_mask: torch.Tensor) -> None:
        """Prepare for one forward pass: what every layer's capture shares is built once here."""
        self.query_cols, self.key_mask = query_cols, key_mask.bool()
        self._batch = torch.arange(len(query_cols), device=query_cols.device)
        self._key_bias = additive_bias(self.key_mask, torch.float32)[:, None, None, :]
        self._sum, self._count = None, 0

    def disarm(self) -> None:
        self.query_cols = self.key_mask = self._batch = self._key_bias = None

    @property
    def armed(self) -> bool:
        return self.query_cols is not None

    def observes(self, module: nn.Module) -> bool:
        return self.armed and id(module) in self._modules

    def record(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """query (B, H, Lq, d), key (B, Hkv, Lk, d) as handed to the attention kernel."""
        differentiable = self.differentiable and torch.is_grad_enabled()
        # Under gradient checkpointing the layer is re-run without the recorder in the backward pass: what the row
        # saves for its own backward is kept as it is (identity hooks), outside the checkpoint's recomputation.
        keep = torch.autograd.graph.saved_tensors_hooks(_kept, _kept) if differentiable else contextlib.nullcontext()
        with torch.set_grad_enabled(differentiable), keep:
            q = query[self._batch, :, self.query_cols].float()  # (B, H, d)
            k = key.float()
            groups = q.shape[1] // k.shape[1]
            q = q.view(q.shape[0], k.shape[1], groups, q.shape[-1])  # (B, Hkv, G, d)
            # scaled after the product, as the eager kernels do, so that the ranking matches their attention maps
            scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scaling).add_(self._key_bias)  # (B, Hkv, G, Lk)
            row = scores.softmax(dim=-1).mean(dim=(1, 2))  # (B, Lk): mean over all heads
            self._sum = row if self._sum is None else self._sum + row
        self._count += 1

    def rows(self) -> torch.Tensor:
        """The averaged rows of the last pass, (B, Lk), float32."""
        if self._count != self.n_layers:
            raise RuntimeError(f"attention rows were captured for {self._count} of {self.n_layers} layers; "
                               "the model's attention did not go through the attention interface")
        return self._sum / self._count


def _kept(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


#: Attention functions registered by ivtlr are named ``ivtlr_rows_<kernel>``: the kernel, plus the row capture.
ROW_KERNEL_PREFIX = "ivtlr_rows_"
#: Attribute of an attention module listing the recorders (weakly) that observe it.
_RECORDERS_ATTRIBUTE = "_ivtlr_row_recorders"


def _model_eager_attention(module: nn.Module) -> Callable:
    """The eager kernel of the module's own modeling file (transformers defines one per model family)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward")


def base_kernel_name(implementation: str) -> str:
    """The kernel under a row-capturing implementation name (``ivtlr_rows_sdpa`` -> ``sdpa``)."""
    return implementation.removeprefix(ROW_KERNEL_PREFIX)


def grouped_query_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs) -> tuple[torch.Tensor, None] | None:
    """sdpa over the key/value heads as they are (``enable_gqa``) for a masked call on the CPU; None where it does not
    apply, and transformers' own sdpa function runs instead.

    transformers expands the key/value heads to the query heads (``repeat_kv``) whenever a mask is given, because
    CUDA's masked kernels lack grouped queries. The chain's every pass is masked (cached columns, padding), so the
    expanded copies would be saved for the backward pass of every chunk: about 15 % of a training step's memory at
    the benchmark's default point. The CPU's flash kernel takes a mask and grouped queries together, so on the CPU the
    copies are not needed (same outputs and gradients)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (query.device.type != "cpu" or attention_mask is None or groups <= 1 or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or kwargs.get("output_attentions")):
        return None
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def additive_mask_on_cpu(mask_function: Callable) -> Callable:
    """``mask_function`` (transformers' sdpa mask), with a boolean mask on the CPU turned into the additive one
    (0 where attended, -inf elsewhere) that the CPU kernel would otherwise build from it in every layer, keeping one
    copy per layer for the backward pass; built once here, every layer shares it. Same values as the kernel's own
    conversion."""

    def additive_mask(*args, dtype: torch.dtype = torch.float32, **kwargs):
        mask = mask_function(*args, dtype=dtype, **kwargs)
        if mask is None or mask.dtype != torch.bool or mask.device.type != "cpu":
            return mask
        return additive_bias(mask, dtype)

    return additive_mask


def register_row_kernel(base: str) -> str:
    """Register, once, the attention function ``ivtlr_rows_<base>``: ``base``'s kernel (sdpa, eager, flash, ...) and
    mask, plus the row capture of :class:`AttentionRowRecorder`. Returns its name.

    It goes through transformers' public registries (``AttentionInterface.register``,
    ``AttentionMaskInterface.register``) and is selected per model (:func:`install_row_capture`), so no other model
    and no global kernel changes; a module no armed recorder observes runs the kernel alone."""
    base = base_kernel_name(base)
    name = ROW_KERNEL_PREFIX + base
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    kernel = None if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]

    def kernel_with_rows(module, query, key, value, attention_mask, **kwargs):
        out = grouped_query_sdpa(module, query, key, value, attention_mask, **kwargs) if base == "sdpa" else None
        if out is None:
            out = (kernel or _model_eager_attention(module))(module, query, key, value, attention_mask, **kwargs)
        for reference in getattr(module, _RECORDERS_ATTRIBUTE, ()):
            recorder = reference()
            if recorder is not None and recorder.observes(module):
                recorder.record(query, key, kwargs.get("scaling") or module.scaling)
        return out

    AttentionInterface.register(name, kernel_with_rows)
    mask_function = ALL_MASK_ATTENTION_FUNCTIONS[base]
    AttentionMaskInterface.register(name, additive_mask_on_cpu(mask_function) if base == "sdpa" else mask_function)
    return name


def attach_recorder(recorder: AttentionRowRecorder, modules: list[nn.Module]) -> None:
    """Let ``recorder`` observe ``modules`` (several engines may wrap one model; each records only when armed)."""
    for module in modules:
        references = [r for r in getattr(module, _RECORDERS_ATTRIBUTE, []) if r() is not None]
        if not any(r() is recorder for r in references):
            references.append(weakref.ref(recorder))
        # object.__setattr__: a plain attribute, not a registered submodule or buffer (nothing to save or move).
        object.__setattr__(module, _RECORDERS_ATTRIBUTE, references)
