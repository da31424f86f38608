"""Counterfactual latent steps: what goes into the latent rows and which patches are inserted, instead of what the
model computes. Off by default; ``ivtlr probe`` uses them to measure whether a checkpoint's latents matter.

Every choice is made per sample, from that sample's own seed and donor rows, so a sample's result never depends on
what it is batched with (the same guarantee the plain chain gives).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ivtlr.method.selection import select_patches

#: What fills each latent slot: the fed-back hidden state (``trained``), zeros, Gaussian noise with the hidden
#: state's norm, a donor's latent rows (another question's, given per sample) or the ``<|latent|>`` token's own
#: embedding.
LATENT_TEXT_CONDITIONS = ("trained", "zeros", "noise", "donor", "token")
#: Which K patches a step inserts: the K most attended (``trained``), K random untaken ones, the K least attended,
#: none, or the trained indices read from a donor image's image-token embeddings (given per sample).
LATENT_VISION_CONDITIONS = ("trained", "random", "least", "none", "donor")


@dataclass(frozen=True)
class LatentIntervention:
    """Options of one counterfactual run of the latent chain.

    Args:
        text: one of :data:`LATENT_TEXT_CONDITIONS`.
        vision: one of :data:`LATENT_VISION_CONDITIONS`.
        num_selected_patches: K for this run (None: the engine's).
        seeds: one seed per sample, for ``noise`` and ``random`` (step ``s`` draws from ``seed * 1009 + s``).
        donor_latents: per sample, (n_latent, D) rows fed into its latent slots under ``text='donor'``.
        donor_image_embeds: per sample, (N, D) image-token embeddings of another image with as many image tokens,
            read at the trained indices under ``vision='donor'``.
    """

    text: str = "trained"
    vision: str = "trained"
    num_selected_patches: int | None = None
    seeds: Sequence[int] | None = None
    donor_latents: Sequence[torch.Tensor] | None = None
    donor_image_embeds: Sequence[torch.Tensor] | None = None
    #: whether :meth:`choose_patches` gets the attention scores with their graph (a policy's log-probability needs
    #: it; choosing indices does not)
    differentiable_scores: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.text not in LATENT_TEXT_CONDITIONS:
            raise ValueError(f"latent text condition must be one of {LATENT_TEXT_CONDITIONS}, got {self.text!r}")
        if self.vision not in LATENT_VISION_CONDITIONS:
            raise ValueError(f"latent vision condition must be one of {LATENT_VISION_CONDITIONS}, "
                             f"got {self.vision!r}")
        if self.num_selected_patches is not None and self.num_selected_patches < 0:
            raise ValueError(f"num_selected_patches must be >= 0, got {self.num_selected_patches}")

    @property
    def is_identity(self) -> bool:
        """True when the run is the plain chain (at the engine's K)."""
        return self.text == "trained" and self.vision == "trained" and self.num_selected_patches is None

    def check_batch(self, batch_size: int) -> None:
        """Per-sample inputs must cover the batch; raised before any pass runs."""
        needs = {"seeds": self.text == "noise" or self.vision == "random",
                 "donor_latents": self.text == "donor", "donor_image_embeds": self.vision == "donor"}
        for name, needed in needs.items():
            value = getattr(self, name)
            if needed and (value is None or len(value) != batch_size):
                got = "none" if value is None else len(value)
                raise ValueError(f"text={self.text!r}, vision={self.vision!r} needs {name} for each of the "
                                 f"{batch_size} samples, got {got}")

    def _generator(self, sample: int, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.seeds[sample]) * 1009 + step)

    def latent_row(self, sample: int, step: int, hidden: torch.Tensor, token_embedding: torch.Tensor,
                   state: torch.Tensor | None = None) -> torch.Tensor:
        """The row fed into latent slot ``step`` (1-based) of ``sample``; ``hidden`` is the trained fill (``state``,
        the fed-back state with its graph, is for policies: :mod:`ivtlr.method.policy`)."""
        if self.text == "trained":
            return hidden
        if self.text == "zeros":
            return torch.zeros_like(hidden)
        if self.text == "token":
            return token_embedding.to(hidden.dtype)
        if self.text == "noise":
            noise = torch.randn(hidden.shape, generator=self._generator(sample, step), dtype=torch.float32)
            noise = noise * (hidden.float().norm() / noise.norm().clamp_min(1e-12)).cpu()
            return noise.to(hidden.device, hidden.dtype)
        rows = self.donor_latents[sample]
        if rows.shape[0] < step:
            raise ValueError(f"sample {sample}: donor has {rows.shape[0]} latent rows, step {step} needs one more")
        return rows[step - 1].to(hidden.device, hidden.dtype)

    def choose_patches(self, sample: int, step: int, scores: torch.Tensor, taken: torch.Tensor, k: int,
                       order: str) -> torch.Tensor:
        """Indices (into the sample's image tokens) of the patches step ``step`` inserts."""
        if self.vision == "none":
            return torch.empty(0, dtype=torch.long, device=scores.device)
        if self.vision == "least":
            return select_patches(-scores.float(), taken, k, order)
        if self.vision == "random":
            # Random scores on the untaken patches: the same ordering rules, no attention involved.
            draw = torch.rand(scores.shape, generator=self._generator(sample, step)).to(scores.device)
            return select_patches(draw, taken, k, order)
        return select_patches(scores, taken, k, order)

    def patch_rows(self, sample: int, chosen: torch.Tensor, own_image_embeds: torch.Tensor) -> torch.Tensor:
        """The embeddings inserted for ``chosen``: the sample's own image rows, or the donor image's."""
        if self.vision != "donor":
            return own_image_embeds[chosen]
        donor = self.donor_image_embeds[sample]
        if donor.shape[0] != own_image_embeds.shape[0]:
            raise ValueError(f"sample {sample}: the donor image has {donor.shape[0]} image tokens, the sample "
                             f"{own_image_embeds.shape[0]}; donors need images of the same size (set image_size)")
        return donor.to(own_image_embeds.device, own_image_embeds.dtype)[chosen]


#: The plain chain.
NO_INTERVENTION = LatentIntervention()
