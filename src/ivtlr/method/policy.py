"""A stochastic latent policy, for reinforcement learning on latent chains.

IVT-LR makes two choices at every latent step, both deterministic in the paper: the state fed back (latent text)
and the K patches inserted (latent vision). Here both become draws with a log-probability:

- latent text: ``z = h + s * eps``, ``eps ~ N(0, I)``, ``s = sigma * rms(h)`` (``rms`` of the state, taken as a
  constant), ``log pi(z) = sum_d log N(z_d; h_d, s)`` — differentiable through ``h``, the pass that produced it;
- latent vision: K patches drawn one after another without replacement from ``softmax(scores / tau)`` over the
  selectable image rows (Gumbel-top-k), ``log pi`` the Plackett-Luce log-probability of the drawn order,
  differentiable through the attention scores.

:class:`LatentPolicy` plugs into the chain where :class:`~ivtlr.method.interventions.LatentIntervention` does. In a
rollout it draws (each sample from its own seed, so a sample's draws never depend on its batch) and records what it
drew; :meth:`LatentPolicy.replay` gives a policy that feeds the recorded draws back and recomputes their
log-probabilities under the current weights (teacher forcing, for the ratio of a policy-gradient loss). ``sigma = 0``
and ``tau = 0`` are the deterministic chain, exactly.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ivtlr.method.sampling import suppressed
from ivtlr.method.selection import select_patches


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """``log N(z; mean, std^2 I)`` summed over the last dimension, in float64 (a sum over the hidden size: float32
    rounding alone would move a ratio of two such log-probabilities by 1e-5)."""
    std = torch.as_tensor(std, dtype=torch.float64, device=mean.device)
    standardized = (z.double() - mean.double()) / std
    return (-0.5 * standardized.pow(2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)


def plackett_luce_log_prob(scores: torch.Tensor, order: torch.Tensor, available: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """Log-probability of drawing the indices ``order``, in that order, one at a time without replacement, each
    draw ``softmax(scores / temperature)`` over the ``available`` items not drawn yet."""
    logits = scores.double() / temperature
    remaining = available.clone()
    total = logits.new_zeros(())
    for index in order.tolist():
        total = total + logits[index] - torch.logsumexp(logits.masked_fill(~remaining, float("-inf")), dim=0)
        remaining[index] = False
    return total


def gumbel_top_k(scores: torch.Tensor, available: torch.Tensor, k: int, temperature: float,
                 generator: torch.Generator) -> torch.Tensor:
    """``k`` available indices drawn as :func:`plackett_luce_log_prob` describes, in draw order: the top-k of
    ``scores / temperature`` plus Gumbel noise (one exact draw of the sequential process)."""
    k = min(k, int(available.sum()))
    uniform = torch.rand(scores.shape, generator=generator, dtype=torch.float32).clamp_(1e-20, 1.0)
    perturbed = scores.detach().float().cpu() / temperature - torch.log(-torch.log(uniform))
    perturbed = perturbed.masked_fill(~available.cpu(), float("-inf"))
    return torch.topk(perturbed, k).indices.to(scores.device)


@dataclass
class LatentDraws:
    """What a rollout drew, per sample and latent step: the fed rows, the noise scale each was drawn with, and the
    patch indices in draw order."""

    rows: list[list[torch.Tensor]]
    orders: list[list[torch.Tensor]]
    stds: list[list[float]] = field(default_factory=list)


@dataclass
class LatentPolicy:
    """The chain's latent choices as draws (see the module docstring). One per batch: ``seeds`` has a seed per sample.

    After the chain ran, :attr:`latent_log_probs` and :attr:`patch_log_probs` hold, per sample, one log-probability
    per latent step (empty where the choice is deterministic), :attr:`patch_entropies` the entropy of each step's
    first patch draw (how far from top-K the patch policy is) and :attr:`draws` what was drawn. A replay scores each
    row with the scale it was drawn with: the scale is a constant of the draw, not a function of the new weights
    (the ratio then measures how far the mean moved, not how the state's RMS changed).
    """

    sigma: float = 0.0
    tau: float = 0.0
    seeds: list[int] | None = None
    recorded: LatentDraws | None = None  # set: replay these draws instead of drawing
    latent_log_probs: list[list[torch.Tensor]] = field(default_factory=list)
    patch_log_probs: list[list[torch.Tensor]] = field(default_factory=list)
    patch_entropies: list[list[float]] = field(default_factory=list)
    draws: LatentDraws = field(default_factory=lambda: LatentDraws([], []))
    _generators: dict[tuple[int, str], torch.Generator] = field(default_factory=dict)

    # The intervention protocol the chain calls (:mod:`ivtlr.method.interventions`).
    text = "trained"
    vision = "trained"
    num_selected_patches = None
    is_identity = False
    differentiable_scores = True  # the chain hands :meth:`choose_patches` the scores with their graph

    def __post_init__(self) -> None:
        if self.sigma < 0 or self.tau < 0:
            raise ValueError(f"sigma and tau must be >= 0, got {self.sigma} and {self.tau}")

    def replay(self) -> LatentPolicy:
        """A policy that feeds back this rollout's draws and recomputes their log-probabilities."""
        return LatentPolicy(self.sigma, self.tau, self.seeds, recorded=self.draws)

    def check_batch(self, batch_size: int) -> None:
        if self.recorded is None and (self.sigma > 0 or self.tau > 0) and \
                (self.seeds is None or len(self.seeds) != batch_size):
            raise ValueError(f"a stochastic latent policy needs one seed per sample ({batch_size}), got "
                             f"{'none' if self.seeds is None else len(self.seeds)}")
        if self.recorded is not None and len(self.recorded.rows) != batch_size:
            raise ValueError(f"the recorded draws cover {len(self.recorded.rows)} samples, the batch has {batch_size}")
        for per_sample in (self.latent_log_probs, self.patch_log_probs, self.patch_entropies, self.draws.rows,
                           self.draws.orders, self.draws.stds):
            per_sample[:] = [[] for _ in range(batch_size)]

    def latent_row(self, sample: int, step: int, hidden: torch.Tensor, token_embedding: torch.Tensor,
                   state: torch.Tensor | None = None) -> torch.Tensor:
        """The row fed into latent slot ``step``: the state itself (``sigma = 0``), a draw around it, or the
        recorded draw; ``state`` is the fed-back state with its graph (``hidden`` may be detached)."""
        mean = state
        if self.sigma == 0 or state is None:  # deterministic, or no latent text (the slot holds its token)
            row = hidden
        else:
            if self.recorded is not None:
                row = self.recorded.rows[sample][step - 1].to(hidden.device, hidden.dtype)
                std = self.recorded.stds[sample][step - 1]
            else:
                std = float(self.sigma * mean.detach().float().pow(2).mean().sqrt().clamp_min(1e-12))
                noise = torch.randn(hidden.shape, generator=self._generator(sample, "text"), dtype=torch.float32)
                row = (hidden.detach().float() + std * noise.to(hidden.device)).to(hidden.dtype)
            self.latent_log_probs[sample].append(gaussian_log_prob(row, mean, std))
            self.draws.stds[sample].append(std)
        self.draws.rows[sample].append(row.detach())
        return row

    def choose_patches(self, sample: int, step: int, scores: torch.Tensor, taken: torch.Tensor, k: int,
                       order: str) -> torch.Tensor:
        """The patches step ``step`` inserts, in the chain's insertion ``order``: the top-k (``tau = 0``), a
        Gumbel-top-k draw, or the recorded draw."""
        if self.tau == 0:
            chosen = select_patches(scores.detach(), taken, k, order)
            self.draws.orders[sample].append(chosen)
            return chosen
        if self.recorded is not None:
            drawn = self.recorded.orders[sample][step - 1].to(scores.device)
        else:
            drawn = gumbel_top_k(scores, ~taken, k, self.tau, self._generator(sample, "vision"))
        self.patch_log_probs[sample].append(plackett_luce_log_prob(scores, drawn, ~taken, self.tau))
        if (~taken).any():
            self.patch_entropies[sample].append(_entropy(scores.detach(), ~taken, self.tau))
        self.draws.orders[sample].append(drawn)
        return _insertion_order(drawn, scores.detach(), order)

    def patch_rows(self, sample: int, chosen: torch.Tensor, own_image_embeds: torch.Tensor) -> torch.Tensor:
        return own_image_embeds[chosen]

    def _generator(self, sample: int, kind: str) -> torch.Generator:
        """Each sample's own stream per choice kind, so a draw depends on neither the batch nor the other kind."""
        key = (sample, kind)
        if key not in self._generators:
            offset = 0 if kind == "text" else 1
            self._generators[key] = torch.Generator().manual_seed(int(self.seeds[sample]) * 2 + offset)
        return self._generators[key]


def _entropy(scores: torch.Tensor, available: torch.Tensor, temperature: float) -> float:
    """Entropy (nats) of ``softmax(scores / temperature)`` over the available items."""
    log_p = (scores.double() / temperature).masked_fill(~available, float("-inf")).log_softmax(0)
    return float(-(log_p.exp() * log_p.masked_fill(~available, 0.0)).sum())


def _insertion_order(drawn: torch.Tensor, scores: torch.Tensor, order: str) -> torch.Tensor:
    """The drawn patches in the chain's insertion order (``position``: image order; ``score``: by score; ``topk``:
    as drawn)."""
    if order == "position":
        return torch.sort(drawn).values
    if order == "score":
        return drawn[torch.sort(scores.float()[drawn], descending=True, stable=True).indices]
    return drawn


@dataclass
class PolicyLogProbs:
    """Per sample, the log-probability of what a rollout chose, by kind: answer tokens, latent rows, patches."""

    tokens: torch.Tensor  # (B,)
    latents: torch.Tensor  # (B,)
    patches: torch.Tensor  # (B,)

    @property
    def total(self) -> torch.Tensor:
        return self.tokens + self.latents + self.patches


@dataclass
class UnitLogProbs:
    """The log-probability of every single choice (a policy-gradient loss takes one ratio per choice): each answer
    token (B, T), each latent step's row (B, S) and patch draw (B, S'), with masks of the real ones (a sample's
    tokens end at its length; a deterministic kind has none)."""

    tokens: torch.Tensor
    token_mask: torch.Tensor
    latents: torch.Tensor
    latent_mask: torch.Tensor
    patches: torch.Tensor
    patch_mask: torch.Tensor

    def sums(self) -> PolicyLogProbs:
        """Each sample's total per kind."""
        return PolicyLogProbs(*(values.masked_fill(~mask, 0.0).sum(-1) for values, mask in (
            (self.tokens, self.token_mask), (self.latents, self.latent_mask), (self.patches, self.patch_mask))))


def rollout_unit_log_probs(policy: LatentPolicy, token_log_probs: torch.Tensor, lengths: torch.Tensor
                           ) -> UnitLogProbs:
    """What a rollout recorded, choice by choice: ``policy`` after ``generate(..., intervention=policy,
    return_log_probs=True)``, that generation's ``token_log_probs`` and ``lengths``."""
    tokens = token_log_probs.double()
    token_mask = torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None].to(tokens.device)
    latents, latent_mask = _padded(policy.latent_log_probs, tokens)
    patches, patch_mask = _padded(policy.patch_log_probs, tokens)
    return UnitLogProbs(tokens.masked_fill(~token_mask, 0.0), token_mask, latents, latent_mask, patches, patch_mask)


def rollout_log_probs(policy: LatentPolicy, token_log_probs: torch.Tensor) -> PolicyLogProbs:
    """The log-probabilities a rollout recorded, summed per sample (see :func:`rollout_unit_log_probs`; generate's
    ``token_log_probs`` are 0 after a sample's end, so every column counts)."""
    width = torch.full(token_log_probs.shape[:1], token_log_probs.shape[1], device=token_log_probs.device)
    return rollout_unit_log_probs(policy, token_log_probs, width).sums()


def replay_unit_log_probs(engine, batch: dict[str, torch.Tensor], sequences: torch.Tensor, lengths: torch.Tensor,
                          policy: LatentPolicy, *, temperature: float = 1.0, suppress_tokens: Sequence[int] = ()
                          ) -> UnitLogProbs:
    """Teacher forcing: ``batch`` (the rollout's prompts with their latent slots, left-padded) with each sample's
    generated tokens appended, through the engine's forward pass with the rollout's latent draws fed back; the
    log-probability of every choice under the current weights, with its graph (for the ratio of a policy-gradient
    loss). Token log-probabilities are those of ``softmax(logits / temperature)`` with ``suppress_tokens`` removed
    (as the rollout's ``generate`` drew them)."""
    replay = policy.replay()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    generated = torch.arange(sequences.shape[1], device=ids.device) < lengths[:, None].to(ids.device)
    full_ids = torch.cat([ids, sequences.to(ids.device)], dim=1)
    full_mask = torch.cat([mask, generated.long()], dim=1)
    labels = torch.cat([torch.full_like(ids, -100), sequences.to(ids.device).masked_fill(~generated, -100)], dim=1)
    vision = {}
    for key, value in batch.items():
        if key in ("input_ids", "attention_mask"):
            continue
        per_token = value.dim() >= 2 and tuple(value.shape[:2]) == tuple(ids.shape)
        vision[key] = torch.cat([value, value.new_zeros(value.shape[0], sequences.shape[1], *value.shape[2:])],
                                dim=1) if per_token else value
    out = engine(full_ids, full_mask, labels, intervention=replay, **vision)
    log_probs = suppressed(out.logits[:, :-1].double() / temperature, suppress_tokens).log_softmax(-1)
    targets = out.labels[:, 1:]
    chosen = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    # Each sample's answer tokens are its labelled positions, in order: the generated order.
    tokens = torch.zeros(sequences.shape, dtype=chosen.dtype, device=chosen.device)
    token_mask = generated.to(chosen.device)
    for b in range(len(ids)):
        tokens[b, :int(lengths[b])] = chosen[b][targets[b] != -100]
    latents, latent_mask = _padded(replay.latent_log_probs, tokens)
    patches, patch_mask = _padded(replay.patch_log_probs, tokens)
    return UnitLogProbs(tokens, token_mask, latents, latent_mask, patches, patch_mask)


def replay_log_probs(engine, batch: dict[str, torch.Tensor], sequences: torch.Tensor, lengths: torch.Tensor,
                     policy: LatentPolicy, *, temperature: float = 1.0) -> PolicyLogProbs:
    """:func:`replay_unit_log_probs` summed per sample."""
    return replay_unit_log_probs(engine, batch, sequences, lengths, policy, temperature=temperature).sums()


def _padded(log_probs: list[list[torch.Tensor]], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample lists of per-step log-probabilities as (B, S) values and mask, S the longest list."""
    width = max((len(steps) for steps in log_probs), default=0)
    values = like.new_zeros(len(log_probs), width, dtype=torch.float64)
    mask = torch.zeros(len(log_probs), width, dtype=torch.bool, device=like.device)
    for b, steps in enumerate(log_probs):
        if steps:
            values[b, :len(steps)] = torch.stack(steps).to(values)
            mask[b, :len(steps)] = True
    return values, mask
