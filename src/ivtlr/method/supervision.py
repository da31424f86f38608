"""Step and region supervision of latent steps, and latents read back as text.

The paper's objective trains only the tokens written after the latent chain: with ``latent_grad="detach"`` no loss
reaches the state a latent step feeds back, and the top-K patch choice gets no gradient at all, so nothing asks a
latent step to carry the step it replaced. Two optional losses do (both off by default; the paper's objective stays
the default):

- **step loss** (after SIM-CoT's step-level supervision): the state fed into the latent slot that replaced written
  step *t* must decode step *t*'s text through the same language model, from that state alone (teacher-forced
  cross-entropy over the step's tokens). Its gradient reaches the pass that produced the state in either gradient
  mode; it costs one extra batched decoder pass over short sequences, and nothing at inference.
- **region loss**: where the data names the image region step *t* reads, ``-log`` of the share of the
  selectable image rows' attention mass that falls on the region, on the same layer- and head-averaged attention
  row the top-K choice ranks (kept differentiable).

:func:`decode_latent_states` reads a latent state back as text the same way the step loss trains it to be read.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from ivtlr.backbones import Backbone, RegionView, box_token_mask
from ivtlr.method.chain import IGNORE_INDEX, real_rows_mask


@dataclass
class LatentSupervision:
    """What a training batch says each latent slot should carry, as the collator writes it.

    ``step_targets`` (B, S, T): the token ids of the written step slot *s* replaced, ``-100`` after them (and in every
    column of a slot without a step). ``step_regions`` (B, S, 4): the region that step reads, as (x0, y0, x1, y1)
    fractions of the picture, NaN for a slot without one. Either may be None."""

    step_targets: torch.Tensor | None = None
    step_regions: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self.step_targets is not None or self.step_regions is not None

    def step_targets_of(self, sample: int, n_latent: int) -> list[torch.Tensor | None] | None:
        """Per latent slot of ``sample``, its step's token ids, or None."""
        if self.step_targets is None:
            return None
        rows = self.step_targets[sample]
        targets: list[torch.Tensor | None] = []
        for slot in range(n_latent):
            tokens = rows[slot][rows[slot] != IGNORE_INDEX] if slot < rows.shape[0] else rows[:0, 0]
            targets.append(tokens if len(tokens) else None)
        return targets

    def region_masks_of(self, sample: int, n_latent: int, n_tokens: int,
                        views: Callable[[], list[RegionView]]) -> list[torch.Tensor | None] | None:
        """Per latent slot of ``sample``, (n_tokens,) bool: the image tokens its step's region covers, or None."""
        if self.step_regions is None:
            return None
        boxes = self.step_regions[sample]
        masks: list[torch.Tensor | None] = []
        layout = None
        for slot in range(n_latent):
            box = boxes[slot] if slot < boxes.shape[0] else None
            if box is None or bool(torch.isnan(box).any()) or not n_tokens:
                masks.append(None)
                continue
            layout = layout if layout is not None else views()
            masks.append(box_token_mask(layout, tuple(box.tolist()), n_tokens).to(boxes.device))
        return masks


def region_loss_term(scores: torch.Tensor, selectable: torch.Tensor, region: torch.Tensor) -> torch.Tensor | None:
    """``-log(mass on region / mass on selectable rows)`` of one latent step's attention ``scores`` over the sample's
    image tokens (N,); ``selectable`` and ``region`` are (N,) bool. None when no selectable row is in the region
    (every one of them was chosen at an earlier step): nothing is left there to attend to."""
    inside = region & selectable
    if not bool(inside.any()):
        return None
    tiny = torch.finfo(scores.dtype).tiny
    return scores[selectable].sum().clamp_min(tiny).log() - scores[inside].sum().clamp_min(tiny).log()


def step_decode_losses(backbone: Backbone, states: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Per supervised latent slot, the mean cross-entropy of decoding its step's tokens ``targets[i]`` (T_i,) from its
    fed state ``states[i]`` (D,) alone: one decoder call over ``[state, step tokens but the last]``, right-padded,
    positions from 0, no image and no prompt. Returns (len(states),)."""
    if not states:
        return torch.zeros(0)
    dtype = states[0].dtype
    embed = backbone.input_embeddings()
    # Each row: the state, then every step token but the last; right-padded like the chain's own chunks.
    rows = [torch.cat([state.unsqueeze(0).to(dtype), embed(tokens[:-1].unsqueeze(0))[0].to(dtype)])
            for state, tokens in zip(states, targets)]
    embeds = pad_sequence(rows, batch_first=True)
    mask = real_rows_mask(torch.tensor([len(t) for t in targets], device=embeds.device), embeds.shape[1])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    positions = positions.unsqueeze(0).expand(backbone.position_rows, -1, -1)
    decoder_mask = None if bool(mask.all()) else mask
    hidden = backbone.run_decoder(embeds, decoder_mask, positions, cache=None).last_hidden_state
    logits = backbone.logits(hidden).float()
    labels = pad_sequence(list(targets), batch_first=True, padding_value=IGNORE_INDEX)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                reduction="none").view(labels.shape)
    counts = (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
    return per_token.sum(-1) / counts


@torch.no_grad()
def decode_latent_states(backbone: Backbone, states: torch.Tensor, max_new_tokens: int = 12) -> torch.Tensor:
    """Greedy text each latent state (n, D) decodes to on its own, as the step loss trains it to be read: the state
    as the only input row, then each chosen token fed back, on a cache. Returns (n, max_new_tokens) ids; callers cut
    them at the first end of a step (a newline or EOS)."""
    n = states.shape[0]
    device = states.device
    out = torch.zeros(n, max_new_tokens, dtype=torch.long, device=device)
    if n == 0 or max_new_tokens == 0:
        return out
    cache = DynamicCache(config=backbone.decoder().config)
    embed = backbone.input_embeddings()
    inputs = states.unsqueeze(1)
    for step in range(max_new_tokens):
        positions = torch.full((backbone.position_rows, n, 1), step, dtype=torch.long, device=device)
        hidden = backbone.run_decoder(inputs, None, positions, cache).last_hidden_state
        tokens = backbone.logits(hidden[:, -1]).argmax(-1)
        out[:, step] = tokens
        inputs = embed(tokens.unsqueeze(1)).to(states.dtype)
    return out
