"""Picking the next token from logits: greedy, or sampled through transformers' own logits warpers."""
from __future__ import annotations

from collections.abc import Sequence

import torch


class TokenPicker:
    """Greedy argmax, or sampling with temperature / top-k / top-p (transformers' own logits warpers); ``suppress``
    ids are never picked (their probability is 0, also in :meth:`log_prob`)."""

    def __init__(self, do_sample: bool, temperature: float, top_p: float, top_k: int,
                 generator: torch.Generator | None, suppress: Sequence[int] = ()):
        from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                            TopKLogitsWarper, TopPLogitsWarper)

        self.do_sample, self.generator = do_sample, generator
        self.suppress = sorted(set(suppress))
        self.warpers = LogitsProcessorList()
        if do_sample:
            if temperature <= 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
            if temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                self.warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = self._suppressed(logits)
        if not self.do_sample:
            return logits.argmax(-1)
        probs = self.warpers(None, logits).softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def log_prob(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) log-probability of ``tokens`` under the distribution :meth:`__call__` draws from (greedy picking:
        the plain softmax)."""
        logits = self._suppressed(logits)
        warped = self.warpers(None, logits) if self.do_sample else logits
        return warped.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def _suppressed(self, logits: torch.Tensor) -> torch.Tensor:
        return suppressed(logits, self.suppress)


def suppressed(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """``logits`` with the ``token_ids`` made impossible (-inf): what a picker with ``suppress`` draws from."""
    if not token_ids:
        return logits
    return logits.index_fill(-1, torch.tensor(sorted(set(token_ids)), device=logits.device), float("-inf"))
