"""Where each sample's prompt, latent slots and rest sit, and the rows every latent step adds: the part of the
algorithm the cached chain (``ivtlr.method.engine``) and the original's recompute reference
(``ivtlr.method.recompute``) share.

A :class:`SegmentBuilder` holds the options that decide the rows (K, insertion order, latent text, gradient through
fed-back states); both paths build the same segments from it and differ only in how they run the decoder over them.
Rows may carry per-row visual features that the decoder adds inside its first layers (Qwen3-VL's deepstack): an
inserted patch copy carries its source token's features, as the original token did.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
from torch.nn.utils.rnn import pad_sequence

from ivtlr.backbones import Backbone
from ivtlr.method.chain import IGNORE_INDEX, SampleState, Segment, real_rows_mask
from ivtlr.method.interventions import NO_INTERVENTION, LatentIntervention
from ivtlr.method.loss import shifted_cross_entropy
from ivtlr.method.outputs import IVTLROutput
from ivtlr.method.supervision import LatentSupervision, region_loss_term, step_decode_losses

logger = logging.getLogger(__name__)


@dataclass
class Layout:
    """Where a sample's prompt, latents and rest are, in its real (unpadded) tokens."""

    ids: torch.Tensor
    labels: torch.Tensor
    embeds: torch.Tensor
    image_index: torch.Tensor  # prompt positions of the image tokens, in image-token order
    prompt_len: int
    n_latent: int
    features: torch.Tensor | None = None  # (S, *F) per-row visual features the decoder adds (deepstack), or None
    #: per latent slot, the token ids of the written step it replaced (step supervision), None where it has none
    step_targets: list[torch.Tensor | None] | None = None
    #: per latent slot, (N,) bool over the image tokens: the region its step reads (region supervision), or None
    region_masks: list[torch.Tensor | None] | None = None

    @cached_property
    def image_embeds(self) -> torch.Tensor:
        """(N, D) the image-token rows, in image-token order: what every latent step inserts its patches from."""
        return self.embeds[self.image_index]

    @cached_property
    def visual_flags(self) -> torch.Tensor:
        """(S,) bool: which rows are image tokens."""
        flags = torch.zeros(len(self.ids), dtype=torch.bool, device=self.ids.device)
        flags[self.image_index] = True
        return flags

    def visual_rows(self, rows: slice) -> torch.Tensor:
        """(l,) bool: which of ``rows`` are image tokens."""
        return self.visual_flags[rows]


class SegmentBuilder:
    """Builds the layouts and segments of a batch for one engine's options."""

    def __init__(self, backbone: Backbone, *, latent_token_id: int, num_selected_patches: int, patch_order: str,
                 latent_text: bool, latent_grad: str, positions: str, pad_token_id: int):
        self.backbone, self.latent_token_id = backbone, latent_token_id
        self.num_selected_patches, self.patch_order = num_selected_patches, patch_order
        self.latent_text, self.latent_grad, self.positions = latent_text, latent_grad, positions
        self.pad_token_id = pad_token_id

    def layouts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                vision: Mapping[str, torch.Tensor], supervision: LatentSupervision | None = None) -> list[Layout]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embedded = self.backbone.embed(input_ids, vision)
        layouts = []
        for b in range(input_ids.shape[0]):
            real = _real_rows(attention_mask[b])
            ids = input_ids[b, real]
            lab = labels[b, real] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            latent_at = (ids == self.latent_token_id).nonzero().flatten().tolist()
            if latent_at and latent_at != list(range(latent_at[0], latent_at[0] + len(latent_at))):
                raise ValueError(f"sample {b}: the <|latent|> tokens must be consecutive, found them at {latent_at}")
            prompt_len = latent_at[0] if latent_at else len(ids)
            image_at = embedded.image_mask[b, real].nonzero().flatten()
            if len(image_at) and int(image_at[-1]) >= prompt_len:
                raise ValueError(f"sample {b}: image tokens must come before the first <|latent|> token")
            if latent_at and not len(image_at) and self.num_selected_patches:
                logger.debug("sample %d has latent steps but no image: latent vision is empty", b)
            features = embedded.row_features[b, real] if embedded.row_features is not None else None
            layout = Layout(ids=ids, labels=lab, embeds=embedded.embeds[b, real], image_index=image_at,
                            prompt_len=prompt_len, n_latent=len(latent_at), features=features)
            if supervision is not None:
                layout.step_targets = supervision.step_targets_of(b, layout.n_latent)
                layout.region_masks = supervision.region_masks_of(b, layout.n_latent, len(image_at),
                                                                  lambda sample=b: self.backbone.region_views(vision,
                                                                                                              sample))
            layouts.append(layout)
        return layouts

    def prompt_segments(self, layouts: list[Layout], vision: Mapping[str, torch.Tensor]
                        ) -> tuple[list[Segment], list[int]]:
        """Right-padded prompts -> one segment each, with the backbone's prompt positions; and each sample's next
        free position."""
        device = layouts[0].ids.device
        lengths = [lay.prompt_len if lay.n_latent else len(lay.ids) for lay in layouts]
        width = max(lengths)
        ids = torch.full((len(layouts), width), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for b, (lay, n) in enumerate(zip(layouts, lengths)):
            ids[b, :n], mask[b, :n] = lay.ids[:n], 1
        positions, next_start = self.backbone.prompt_positions(ids, mask, vision, self.positions)
        segments = [Segment(lay.embeds[:n], positions[:, b, :n], lay.labels[:n],
                            features=_rows(lay.features, slice(0, n)), visual=lay.visual_rows(slice(0, n)))
                    for b, (lay, n) in enumerate(zip(layouts, lengths))]
        return segments, next_start.tolist()

    def latent_step_segment(self, lay: Layout, state: SampleState, fill: torch.Tensor, rows: torch.Tensor,
                            taken: torch.Tensor, selected: list[torch.Tensor], step: int,
                            intervention: LatentIntervention = NO_INTERVENTION, sample: int = 0) -> Segment:
        """Rows [V_step, L_step] (plus the rest of the sample after its last latent). ``rows``: the attention row
        of the position before the slot over the sample's keys (its first columns are the prompt)."""
        device = lay.ids.device
        scores = rows[lay.image_index] if len(lay.image_index) else rows[:0]
        region = lay.region_masks[step - 1] if lay.region_masks is not None else None
        region_loss = region_loss_term(scores, ~taken, region) if region is not None else None
        k = self.num_selected_patches if intervention.num_selected_patches is None \
            else intervention.num_selected_patches
        ranked = scores if intervention.differentiable_scores else scores.detach()
        chosen = intervention.choose_patches(sample, step, ranked, taken, k, self.patch_order)
        taken[chosen] = True
        selected.append(chosen)
        latent_slot = lay.prompt_len + step - 1
        fed_state = fill if self.latent_text else None
        if not self.latent_text:
            fill = lay.embeds[latent_slot]
        elif self.latent_grad == "detach":
            fill = fill.detach()
        fill = intervention.latent_row(sample, step, fill, lay.embeds[latent_slot], state=fed_state)
        if lay.features is not None and intervention.vision == "donor":
            raise ValueError("a donor image's rows would lack their own per-row visual features: the donor-image "
                             "condition is not available for this family")
        parts = [intervention.patch_rows(sample, chosen, lay.image_embeds),
                 fill.unsqueeze(0).to(lay.embeds.dtype)]
        labels = [torch.full((len(chosen),), IGNORE_INDEX, device=device), lay.labels[latent_slot:latent_slot + 1]]
        visual = [torch.ones(len(chosen), dtype=torch.bool, device=device),
                  torch.zeros(1, dtype=torch.bool, device=device)]
        features = None
        if lay.features is not None:
            features = [lay.features[lay.image_index[chosen]], lay.features.new_zeros(1, *lay.features.shape[1:])]
        if step == lay.n_latent:
            rest = slice(lay.prompt_len + lay.n_latent, len(lay.ids))
            parts.append(lay.embeds[rest])
            labels.append(lay.labels[rest])
            visual.append(lay.visual_rows(rest))
            if features is not None:
                features.append(lay.features[rest])
        embeds = torch.cat(parts)
        return Segment(embeds, state.positions(embeds.shape[0], self.backbone.position_rows, device),
                       torch.cat(labels), latent_row=len(chosen),
                       features=torch.cat(features) if features is not None else None, visual=torch.cat(visual),
                       fed_state=fed_state, region_loss=region_loss)

    def assemble(self, states: list[SampleState], selected, with_labels: bool,
                 layouts: list[Layout] | None = None) -> IVTLROutput:
        """The final sequences, right-padded, with their logits (and loss; and the supervision losses where the
        ``layouts`` carry step targets or regions)."""
        hidden = [torch.cat([seg.hidden for seg in st.segments]) for st in states]
        embeds = [torch.cat([seg.embeds for seg in st.segments]) for st in states]
        labels = [torch.cat([seg.labels for seg in st.segments]) for st in states]
        lengths = torch.tensor([h.shape[0] for h in hidden], device=hidden[0].device)
        pad_h, pad_e = pad_sequence(hidden, batch_first=True), pad_sequence(embeds, batch_first=True)
        pad_l = pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
        mask = real_rows_mask(lengths, pad_h.shape[1])
        logits = self.backbone.logits(pad_h)
        loss = loss_per_sample = None
        if with_labels:
            loss, loss_per_sample = shifted_cross_entropy(logits, pad_l)
        output = IVTLROutput(loss=loss, logits=logits, selected=selected, attention_mask=mask,
                             labels=pad_l if with_labels else None, loss_per_sample=loss_per_sample,
                             inputs_embeds=pad_e, latent_positions=[latent_rows(st) for st in states])
        if layouts is not None:
            self._supervision_losses(output, states, layouts)
        return output

    def _supervision_losses(self, output: IVTLROutput, states: list[SampleState], layouts: list[Layout]) -> None:
        """Fill in the step and region losses (per supervised latent slot, in sample then slot order, and their
        means) from the segments the chain built."""
        fed, targets, regions = [], [], []
        for state, lay in zip(states, layouts):
            latent_segments = [seg for seg in state.segments if seg.latent_row is not None]
            for slot, seg in enumerate(latent_segments):
                target = lay.step_targets[slot] if lay.step_targets is not None else None
                if target is not None and seg.fed_state is not None:
                    fed.append(seg.fed_state)
                    targets.append(target)
                if seg.region_loss is not None:
                    regions.append(seg.region_loss)
        if any(lay.step_targets is not None for lay in layouts):
            output.step_losses = step_decode_losses(self.backbone, fed, targets)
            output.step_loss = output.step_losses.mean() if fed else None
        if any(lay.region_masks is not None for lay in layouts):
            output.region_losses = torch.stack(regions) if regions else torch.zeros(0)
            output.region_loss = output.region_losses.mean() if regions else None


def _real_rows(mask: torch.Tensor) -> slice | torch.Tensor:
    """The sample's real positions: a slice when they are one run (left or right padding: a view, no copy and no
    gather in the backward pass), else the boolean mask."""
    real = mask.bool()
    count = int(real.sum())
    start = int(real.to(torch.int8).argmax()) if count else 0
    return slice(start, start + count) if bool(real[start:start + count].all()) else real


def _rows(features: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return features[rows] if features is not None else None


def fed_latents(state: SampleState) -> torch.Tensor:
    """(n_latent, D): the rows the sample's latent slots received."""
    rows = [seg.embeds[seg.latent_row] for seg in state.segments if seg.latent_row is not None]
    dim = state.segments[0].embeds.shape[-1]
    return torch.stack(rows) if rows else state.segments[0].embeds.new_zeros(0, dim)


def latent_rows(state: SampleState) -> list[int]:
    """Final-sequence index of each latent row."""
    rows, start = [], 0
    for seg in state.segments:
        if seg.latent_row is not None:
            rows.append(start + seg.latent_row)
        start += seg.length
    return rows
