"""What the engine returns: the final sequences of a forward pass, or the answers of a generation."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class IVTLROutput:
    """Result of :meth:`IVTLR.forward`. Sequences are the *final* ones (prompt, V1, L1, …, Vn, Ln, rest),
    right-padded; ``attention_mask`` marks their real rows."""

    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, L, V)
    selected: list[list[torch.Tensor]]  # per sample, per step: indices into the sample's image tokens, insertion order
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor | None  # (B, L), -100 on prompt, inserted patches and latents
    loss_per_sample: torch.Tensor | None  # (B,)
    inputs_embeds: torch.Tensor  # (B, L, D) the final input embeddings
    latent_positions: list[list[int]]  # per sample: where the latent rows sit in the final sequence
    #: step supervision (``step_targets`` given): per supervised latent slot (sample, then slot order) the mean
    #: cross-entropy of decoding its written step from its fed state, and their mean (None: no slot supervised)
    step_losses: torch.Tensor | None = None
    step_loss: torch.Tensor | None = None
    #: region supervision (``step_regions`` given): per latent step with a region, -log of the attention share on it
    region_losses: torch.Tensor | None = None
    region_loss: torch.Tensor | None = None


@dataclass
class GenerationOutput:
    """Result of :meth:`IVTLR.generate` with ``return_dict=True``."""

    sequences: torch.Tensor  # (B, T) new token ids, padded with ``pad_token_id`` after each sample's end
    lengths: torch.Tensor  # (B,) number of generated ids per sample (EOS included)
    selected: list[list[torch.Tensor]]
    latents: list[torch.Tensor] | None = None  # per sample, (n_latent, D): the rows its latent slots received
    #: (B, 2) with ``measure_attention``: mean attention mass (over layers, heads and answer tokens) the answer
    #: tokens pay to the latent rows and to the inserted patch rows.
    answer_attention: torch.Tensor | None = None
    #: (B, T) with ``return_log_probs``: each generated token's log-probability under the distribution it was
    #: drawn from (0 after a sample's end)
    token_log_probs: torch.Tensor | None = None
