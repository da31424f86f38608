"""The original's algorithm: every latent step re-runs the whole prefix with eager attention maps.

This is the reference path (``IVTLR(..., recompute=True)``) that the cached engine is tested against: no cache,
no attention hook — patch scores come from the full attention maps the model returns, as in the original. Like the
original, the loss is taken over the logits of *every* pass concatenated, with the labels right-aligned to the end
(only the final pass's rows carry labels), so backward runs through every pass: the same value and gradients as
the final pass alone, at the original's cost. It is slow on purpose; never use it for real training.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ivtlr.method.chain import IGNORE_INDEX, SampleState, pack_segments
from ivtlr.method.loss import shifted_cross_entropy

if TYPE_CHECKING:
    from ivtlr.backbones import Backbone
    from ivtlr.method.layout import SegmentBuilder
    from ivtlr.method.outputs import IVTLROutput
    from ivtlr.method.supervision import LatentSupervision


@contextmanager
def eager_attention(backbone: "Backbone") -> Iterator[None]:
    """Temporarily switch the model to eager attention (the only kind that returns attention maps), then restore
    the implementations it had, the text decoder's own included (it may be ivtlr's row-capturing one)."""
    model = backbone.model
    previous, previous_text = model.config._attn_implementation, backbone.attn_implementation
    if previous == previous_text == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        backbone.set_text_attention(previous_text)


def _full_pass(backbone: "Backbone", states: list[SampleState], output_attentions: bool):
    """One decoder call over each sample's whole sequence so far, right-padded."""
    first = states[0].segments[0].embeds
    packed = pack_segments([st.segments for st in states], first.shape[-1], backbone.position_rows, first.dtype,
                           first.device)
    out = backbone.run_decoder(packed.embeds, packed.mask, packed.positions, cache=None,
                               output_attentions=output_attentions, row_features=packed.features,
                               visual=packed.visual)
    return out, packed.widths


def recompute_forward(backbone: "Backbone", builder: "SegmentBuilder", input_ids, attention_mask, labels, vision,
                      supervision: "LatentSupervision | None" = None) -> "IVTLROutput":
    """The original's forward over a batch: ``builder`` lays out the sequences and makes each latent step's segment
    exactly as the cached engine does, but every step re-runs the whole prefix on ``backbone`` (eager attention)."""
    layouts = builder.layouts(input_ids, attention_mask, labels, vision, supervision)
    prompts, next_start = builder.prompt_segments(layouts, vision)
    states = [SampleState(segments=[seg], next_position=int(p)) for seg, p in zip(prompts, next_start)]
    taken = [torch.zeros(len(lay.image_index), dtype=torch.bool, device=lay.ids.device) for lay in layouts]
    selected: list[list[torch.Tensor]] = [[] for _ in layouts]
    n_max = max(lay.n_latent for lay in layouts)
    earlier_passes: list[list[torch.Tensor]] = [[] for _ in layouts]  # each sample's hidden rows of every pass
    with eager_attention(backbone):
        for step in range(1, n_max + 1):
            active = [b for b, lay in enumerate(layouts) if lay.n_latent >= step]
            out, lengths = _full_pass(backbone, [states[b] for b in active], output_attentions=True)
            for i, b in enumerate(active):
                earlier_passes[b].append(out.last_hidden_state[i, : lengths[i]])
                last = lengths[i] - 1
                attention_row = torch.stack([a[i, :, last, : lengths[i]].float() for a in out.attentions])
                scores = attention_row.mean(dim=(0, 1))
                seg = builder.latent_step_segment(layouts[b], states[b], out.last_hidden_state[i, last], scores,
                                                  taken[b], selected[b], step)
                states[b].segments.append(seg)
        out, lengths = _full_pass(backbone, states, output_attentions=False)
    for b, st in enumerate(states):
        start = 0
        for seg in st.segments:
            seg.hidden = out.last_hidden_state[b, start : start + seg.length]
            start += seg.length
    result = builder.assemble(states, selected, labels is not None, layouts if supervision is not None else None)
    if labels is not None:
        result.loss, result.loss_per_sample = _loss_over_all_passes(backbone, earlier_passes, result)
    return result


def _loss_over_all_passes(backbone: "Backbone", earlier_passes: list[list[torch.Tensor]], result: "IVTLROutput"):
    """The original's loss: all passes' logits concatenated, labels right-aligned to the end."""
    sums, counts = [], []
    for b, hidden_per_pass in enumerate(earlier_passes):
        final_rows = int(result.attention_mask[b].sum())
        logits = torch.cat([backbone.logits(h) for h in hidden_per_pass] + [result.logits[b, :final_rows]])
        labels = torch.cat([torch.full((logits.shape[0] - final_rows,), IGNORE_INDEX, device=logits.device),
                            result.labels[b, :final_rows]])
        mean, _ = shifted_cross_entropy(logits.unsqueeze(0), labels.unsqueeze(0))
        count = (labels[1:] != IGNORE_INDEX).sum()
        sums.append(mean * count)
        counts.append(count)
    sums, counts = torch.stack(sums), torch.stack(counts)
    return sums.sum() / counts.sum().clamp(min=1), sums / counts.clamp(min=1)
