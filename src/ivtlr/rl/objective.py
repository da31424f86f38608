"""The GRPO objective: group-normalised advantages and a clipped ratio loss per kind of choice.

Each choice (an answer token, a latent row, a patch draw) has its own ratio ``pi_new / pi_old``, clipped with its
kind's range: a Gaussian row's ratio over a hidden state of thousands of dimensions moves far faster than a token's,
so one range for all would either freeze the tokens or let the latents run. A kind's loss is the mean over its
choices in the rollout batch (every token weighs the same, whatever its answer's length).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` within each group of ``group_size`` consecutive rollouts of one question (only
    ``r - mean`` without ``scale``). A group whose rollouts all earned the same has advantage 0: nothing to learn."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    grouped = rewards.double().view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + eps)
    return centred.view(-1)


@dataclass
class KindLoss:
    """One kind's share of the loss over a set of rollouts: sums, to be divided by the kind's choice count."""

    policy_sum: torch.Tensor  # sum over choices of -min(r A, clip(r) A)
    kl_sum: torch.Tensor  # sum over choices of the k3 estimate of KL(pi_new || pi_ref) (0 without a reference)
    clipped: int  # choices whose ratio the clip held
    count: int  # choices


def kind_loss(new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, clip: float,
              reference: torch.Tensor | None = None, dual_clip: float | None = 3.0, kl_estimator: str = "k3"
              ) -> KindLoss:
    """PPO's clipped surrogate for one kind of choice: ``new``, ``old`` (and ``reference``) are (B, S)
    log-probabilities, ``mask`` marks the real choices, ``advantages`` is (B,).

    With ``dual_clip`` c, a negative advantage's objective is also bounded below by ``c * A`` (dual-clip PPO): a
    ratio that ran far above 1 (a Gaussian row's does after one update) would otherwise give an unbounded loss. The
    log-ratio is clamped to +-20 where neither bound leaves a gradient anyway, so exp never overflows.

    The KL to ``reference`` is estimated per choice from ``d = log pi_ref - log pi_new``: ``k3 = e^d - d - 1``
    (unbiased, what GRPO uses for tokens) or ``k2 = d^2 / 2`` (biased but never explosive: a Gaussian row's ``d`` runs
    to hundreds as soon as its mean moves a few noise scales, which k3 turns into overflow)."""
    log_ratio = (new - old.detach()).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    advantage = advantages[:, None].to(ratio)
    unclipped = ratio * advantage
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantage
    objective = torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        objective = torch.where(advantage < 0, torch.maximum(objective, dual_clip * advantage), objective)
    policy_sum = -objective.masked_fill(~mask, 0.0).sum()
    kl_sum = new.new_zeros(())
    if reference is not None:
        d = reference.detach() - new
        if kl_estimator == "k3":
            d = d.clamp(max=20.0)
            estimate = d.exp() - d - 1
        elif kl_estimator == "k2":
            estimate = 0.5 * d.pow(2)
        else:
            raise ValueError(f"kl_estimator must be 'k3' or 'k2', got {kl_estimator!r}")
        kl_sum = estimate.masked_fill(~mask, 0.0).sum()
    held = (clipped < unclipped) | ((advantage < 0) & (objective > torch.minimum(unclipped, clipped)))
    return KindLoss(policy_sum, kl_sum, int((held & mask).sum()), int(mask.sum()))
