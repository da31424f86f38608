"""Rollouts: G answers per question from the batched cached engine, each latent row, patch draw and token a draw of
the stochastic latent policy, recorded with its log-probability and its reward.

Every draw is seeded by (run seed, rollout batch, question position, rollout index) for the latent choices and by
(run seed, rollout batch, the pass's first question position) for the tokens, never by a global generator: a resumed
run draws exactly what the uninterrupted one drew, and one process answering 2Q questions in passes of Q draws what
two processes answering Q each draw.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ivtlr.config import RLConfig
from ivtlr.data import Example, build_generation_batch
from ivtlr.loading import place_batch
from ivtlr.method.engine import IVTLR
from ivtlr.method.policy import LatentPolicy, UnitLogProbs, rollout_unit_log_probs
from ivtlr.rl.rewards import Reward, reward_of


def draw_seed(*parts: int) -> int:
    """A 31-bit seed from integers (numpy's SeedSequence: distinct tuples give unrelated streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


@dataclass
class Rollouts:
    """One forward's worth: ``examples`` holds each question ``group_size`` times in a row."""

    examples: list[Example]
    batch: dict[str, torch.Tensor]  # the prompts with their latent slots, as generation had them
    sequences: torch.Tensor  # (N, T) generated ids
    lengths: torch.Tensor  # (N,)
    policy: LatentPolicy  # with the draws
    old: UnitLogProbs  # the rollout's log-probability of each choice
    texts: list[str]
    rewards: list[Reward]
    suppressed: list[int]  # token ids the answers could not contain (special tokens other than EOS)

    @property
    def reward_values(self) -> torch.Tensor:
        return torch.tensor([r.value for r in self.rewards], dtype=torch.float64)


def roll_out(engine: IVTLR, processor, tokenizer, questions: Sequence[Example], positions: Sequence[int], *,
             settings: RLConfig, n_latent: int, image_size: int | None, seed: int, rollout_step: int,
             token_seed: int) -> Rollouts:
    """``settings.group_size`` rollouts of each question (``positions``: the questions' places in the run's question
    stream, which seed their draws)."""
    group = settings.group_size
    examples = [question for question in questions for _ in range(group)]
    seeds = [draw_seed(seed, rollout_step, position, g) for position in positions for g in range(group)]
    batch = place_batch(build_generation_batch(processor, examples, n_latent, engine.latent_token_id,
                                               image_size=image_size), engine)
    policy = LatentPolicy(sigma=settings.sigma, tau=settings.tau, seeds=seeds)
    suppressed = suppressed_tokens(engine, tokenizer)
    out = engine.generate(**batch, max_new_tokens=settings.max_new_tokens, return_dict=True, intervention=policy,
                          do_sample=True, temperature=settings.temperature, return_log_probs=True,
                          suppress_tokens=suppressed,
                          generator=torch.Generator(device=batch["input_ids"].device).manual_seed(token_seed))
    texts = [tokenizer.decode(row[:length], skip_special_tokens=True)
             for row, length in zip(out.sequences.tolist(), out.lengths.tolist())]
    rewards = [reward_of(example, text, settings) for example, text in zip(examples, texts)]
    return Rollouts(examples, batch, out.sequences, out.lengths, policy,
                    rollout_unit_log_probs(policy, out.token_log_probs, out.lengths), texts, rewards, suppressed)


def suppressed_tokens(engine: IVTLR, tokenizer) -> list[int]:
    """Every special token but EOS: an answer that wrote a latent slot or an image placeholder would be read back as
    one by the replay (and no answer needs a chat-template marker)."""
    special = set(tokenizer.all_special_ids)
    special |= {t for t in (engine.latent_token_id, engine.start_latent_id, engine.end_latent_id) if t is not None}
    return sorted(special - set(engine.eos_token_ids))
