"""The latent chain on a key/value cache: prompt, then one small pass per latent step, batched.

Every sample of a batch is laid out in the same physical columns pass after pass: each pass appends a right-padded
chunk (the sample's new rows, then padding) to the cache. Padding columns are masked keys and carry explicit
positions that never count, so a sample's numbers do not depend on what it is batched with. A pass's query of
interest (the position just before the next latent slot) is the last real row of the sample's chunk.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from ivtlr.method.attention_rows import AttentionRowRecorder
from ivtlr.backbones import Backbone

IGNORE_INDEX = -100


@dataclass
class Segment:
    """Consecutive rows of one sample's final sequence, added to the chain in one pass."""

    embeds: torch.Tensor  # (l, D)
    positions: torch.Tensor  # (R, l)
    labels: torch.Tensor  # (l,)
    latent_row: int | None = None  # index of the latent row within the segment, if it holds one
    hidden: torch.Tensor | None = None  # (l, D) last-layer hidden states once computed
    column: int | None = None  # physical column of the segment's first row in the pass that computed it
    features: torch.Tensor | None = None  # (l, *F) per-row visual features the decoder adds (deepstack), or None
    visual: torch.Tensor | None = None  # (l,) bool: image-token rows (inserted copies included); None: none
    #: the hidden state the latent row was built from, before any detach (what the step loss decodes), or None
    fed_state: torch.Tensor | None = None
    #: the region loss of the attention row that chose this segment's patches (region supervision), or None
    region_loss: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


@dataclass
class SampleState:
    """One sample's progress through the chain."""

    segments: list[Segment] = field(default_factory=list)
    next_position: int = 0

    def positions(self, n: int, rows: int, device) -> torch.Tensor:
        pos = torch.arange(self.next_position, self.next_position + n, device=device)
        self.next_position += n
        return pos.unsqueeze(0).expand(rows, -1)


class ChainRunner:
    """Runs decoder passes over a batch of :class:`SampleState` and keeps the cache and key mask.

    ``cached=False`` re-runs each sample's whole history at every pass (used under gradient checkpointing,
    which cannot keep a cache in the autograd graph). ``vision_bottleneck``: rows after a sample's prompt do not
    attend to the prompt's image rows (:func:`bottleneck_mask`); the attention rows that rank patches still see them.
    """

    def __init__(self, backbone: Backbone, recorder: AttentionRowRecorder, states: list[SampleState],
                 cached: bool, dtype: torch.dtype, device: torch.device, vision_bottleneck: bool = False):
        self.backbone, self.recorder, self.states = backbone, recorder, states
        self.cached, self.dtype, self.device = cached, dtype, device
        self.vision_bottleneck = vision_bottleneck
        self.cache = DynamicCache(config=backbone.decoder().config) if cached else None
        self.key_mask = torch.zeros(len(states), 0, dtype=torch.long, device=device)

    def run(self, new: list[Segment | None], *, query: bool, grad: bool) -> torch.Tensor | None:
        """Append ``new`` segments (None: the sample sits this pass out) and run one pass.

        Returns the averaged attention rows of each sample's last real row, (B, Lk), when ``query`` is set;
        their columns index the physical layout, whose first columns are the prompt.
        """
        for state, seg in zip(self.states, new):
            if seg is not None:
                state.segments.append(seg)
        parts = [[seg] if seg is not None else [] for seg in new] if self.cached else \
            [state.segments for state in self.states]
        packed = pack_segments(parts, self.backbone.text_config.hidden_size, self.backbone.position_rows,
                               self.dtype, self.device)
        widths, embeds, positions, mask = packed.widths, packed.embeds, packed.positions, packed.mask
        full_mask = torch.cat([self.key_mask, mask], dim=1) if self.cached else mask
        if query:
            cols = torch.tensor([max(w - 1, 0) for w in widths], device=self.device)
            self.recorder.arm(cols, full_mask)
        try:
            # Without padding anywhere the causal pattern is all a mask would say: the model's own mask-free path
            # (no mask to build, and sdpa's causal or unmasked kernels) computes the same numbers.
            decoder_mask = None if bool(full_mask.all()) else full_mask
            if self.vision_bottleneck:
                decoder_mask = bottleneck_mask(full_mask, embeds.shape[1], [st.segments[0] for st in self.states],
                                               self.dtype)
            with torch.set_grad_enabled(grad):
                out = self.backbone.run_decoder(embeds, decoder_mask, positions, self.cache,
                                                row_features=packed.features, visual=packed.visual)
            rows_out = self.recorder.rows() if query else None
        finally:
            self.recorder.disarm()
        offset = self.key_mask.shape[1] if self.cached else 0
        if self.cached:
            self.key_mask = full_mask
        hidden = out.last_hidden_state
        for b, p in enumerate(parts):
            start = 0
            for seg in p:
                seg.hidden, seg.column = hidden[b, start : start + seg.length], offset + start
                start += seg.length
        return rows_out

    def merge(self, other: ChainRunner) -> None:
        """Append ``other``'s samples, with their cached passes, after this chain's (continuous batching: questions
        joining a running batch have their prompt pass on their own, then go on with it). The narrower of the two
        caches is widened on the right with masked columns, so every sample keeps its columns and its numbers."""
        if not (self.cached and other.cached):
            raise RuntimeError("only cached chains merge")
        width = max(self.key_mask.shape[1], other.key_mask.shape[1])
        self.key_mask = torch.cat([_widen(self.key_mask, width, 1), _widen(other.key_mask, width, 1)])
        for mine, theirs in zip(self._cache_layers(), other._cache_layers(), strict=True):
            mine.keys = torch.cat([_widen(mine.keys, width, 2), _widen(theirs.keys, width, 2)])
            mine.values = torch.cat([_widen(mine.values, width, 2), _widen(theirs.values, width, 2)])
        self.states.extend(other.states)

    def retire(self, keep: list[int]) -> None:
        """Keep only the samples ``keep`` (indices into :attr:`states`, in order): the others leave the chain."""
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.states = [self.states[b] for b in keep]
        self.key_mask = self.key_mask[index]
        self.cache.batch_select_indices(index)

    def compact(self, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Move each sample's real cache columns to the left, in order, and drop the columns no sample needs, so the
        cache stays as wide as its longest sample however samples come and go. Each sample's first segment (its
        prompt) stays at column 0, where :meth:`run` callers read attention rows. ``rows`` (B, Lk), attention rows
        of the last pass, are moved the same way and returned. Keys carry their own positions: moving columns changes
        no number a sample computes."""
        real = self.key_mask.bool()
        width = int(real.sum(1).max()) if len(self.states) else 0
        order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices[:, :width]
        self.key_mask = self.key_mask.gather(1, order)
        for layer in self._cache_layers():
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
        for state in self.states:
            column = 0
            for seg in state.segments:
                seg.column = column
                column += seg.length
        return rows.gather(1, order) if rows is not None else None

    def _cache_layers(self) -> list:
        """The cache's per-layer key/value stores (batch first), refusing kinds whose rows cannot be moved."""
        layers = [layer for layer in self.cache.layers if getattr(layer, "keys", None) is not None
                  and layer.keys.numel()]
        if any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            raise RuntimeError("continuous batching needs a plain dynamic key/value cache (no sliding window)")
        return layers

    def fork(self) -> ChainRunner:
        """An independent runner continuing from this one's state (a copy of the cache, the same computed rows), so
        several continuations can share one prompt pass."""
        if not self.cached:
            raise RuntimeError("only a cached chain can be forked")
        twin = ChainRunner.__new__(ChainRunner)
        twin.backbone, twin.recorder, twin.cached, twin.dtype, twin.device = \
            self.backbone, self.recorder, True, self.dtype, self.device
        twin.vision_bottleneck = self.vision_bottleneck
        twin.states = [SampleState(segments=list(st.segments), next_position=st.next_position) for st in self.states]
        twin.cache = copy.deepcopy(self.cache)
        twin.key_mask = self.key_mask.clone()
        return twin

    def last_hidden(self, b: int) -> torch.Tensor:
        """Hidden state of the sample's latest real row (the vector the LM head reads)."""
        return self.states[b].segments[-1].hidden[-1]


def _widen(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` zero-padded on the right of ``dim`` to ``width``."""
    return torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - dim - 1) + (0, width - tensor.shape[dim]))


@dataclass
class PackedChunk:
    """Each sample's new rows side by side, right-padded: what one decoder call takes."""

    widths: list[int]
    embeds: torch.Tensor  # (B, W, D)
    positions: torch.Tensor  # (R, B, W)
    mask: torch.Tensor  # (B, W) 1 at real rows
    features: torch.Tensor | None  # (B, W, *F) per-row visual features, zeros elsewhere; None if no row has any
    visual: torch.Tensor | None  # (B, W) bool image-token rows; None if there are none or no row has features


def bottleneck_mask(key_mask: torch.Tensor, width: int, prompts: list[Segment], dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, width, Lk) additive mask of one pass whose ``width`` query rows are the last columns of ``key_mask``
    (B, Lk; 1 at real keys): causal over the physical columns, padding masked, and no row after a sample's prompt
    (``prompts[b]``, always its first segment, at column 0) attending to the prompt's image rows. Under this "vision
    bottleneck" what a latent step inserts is the only way later rows see the picture."""
    lk = key_mask.shape[1]
    device = key_mask.device
    query_cols = torch.arange(lk - width, lk, device=device)
    key_cols = torch.arange(lk, device=device)
    allowed = key_mask.bool()[:, None, :] & (key_cols[None, None, :] <= query_cols[None, :, None])
    image = torch.zeros(key_mask.shape, dtype=torch.bool, device=device)
    for b, prompt in enumerate(prompts):
        if prompt.visual is not None:
            image[b, : prompt.length] = prompt.visual
    prompt_ends = torch.tensor([prompt.length for prompt in prompts], device=device)
    after_prompt = query_cols[None, :] >= prompt_ends[:, None]  # (B, width)
    allowed &= ~(after_prompt[:, :, None] & image[:, None, :])
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return blocked.unsqueeze(1)


def real_rows_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) long: 1 at each right-padded row's first ``lengths[b]`` columns."""
    return (torch.arange(width, device=lengths.device) < lengths[:, None]).long()


def pack_segments(parts: list[list[Segment]], hidden_size: int, position_rows: int, dtype: torch.dtype,
                  device: torch.device) -> PackedChunk:
    """Concatenate each sample's segments and right-pad them to one chunk. This runs at every pass, so it is a few
    tensor calls per field (``stack`` when every sample brings rows of one width, else ``pad_sequence``), not one copy
    per sample. Per-row visual features and flags are packed only where some row carries features (the decoder reads
    the flags only with them)."""
    widths = [sum(seg.length for seg in p) for p in parts]
    width = max(widths)
    even = all(w == width for w in widths)

    def rows(field: Callable[[Segment], torch.Tensor | None], empty: torch.Tensor) -> list[torch.Tensor]:
        """Each sample's rows of one field, joined (zeros where a segment has none; ``empty`` for a sample without
        segments this pass)."""
        joined = []
        for p in parts:
            pieces = [field(seg) for seg in p]
            pieces = [x if x is not None else empty.new_zeros(seg.length, *empty.shape[1:])
                      for x, seg in zip(pieces, p)]
            joined.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0] if pieces else empty)
        return joined

    def padded(tensors: list[torch.Tensor]) -> torch.Tensor:
        if even:
            return torch.stack(tensors)
        out = pad_sequence(tensors, batch_first=True)
        return out if out.shape[1] == width else torch.nn.functional.pad(out, (0, 0) * (out.dim() - 2) +
                                                                          (0, width - out.shape[1]))

    embeds = padded(rows(lambda seg: seg.embeds, torch.zeros(0, hidden_size, dtype=dtype, device=device)))
    embeds = embeds.to(dtype)
    positions = padded(rows(lambda seg: seg.positions.T,
                            torch.zeros(0, position_rows, dtype=torch.long, device=device))).permute(2, 0, 1)
    mask = real_rows_mask(torch.tensor(widths, device=device), width)
    template = next((seg.features for p in parts for seg in p if seg.features is not None), None)
    features = visual = None
    if template is not None:
        features = padded(rows(lambda seg: seg.features, template.new_zeros(0, *template.shape[1:])))
        visual = padded(rows(lambda seg: seg.visual, torch.zeros(0, dtype=torch.bool, device=device)))
        visual = visual if bool(visual.any()) else None
    return PackedChunk(widths, embeds, positions.contiguous(), mask, features, visual)
