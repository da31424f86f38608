"""What a rollout earns: a verifiable reward read from its text by the same answer rules evaluation scores with."""
from __future__ import annotations

from dataclasses import dataclass

from ivtlr.config import RLConfig
from ivtlr.data import Example, format_prompt_text
from ivtlr.evaluation.answers import score_answer


@dataclass(frozen=True)
class Reward:
    value: float
    correct: bool  # the rule reads the gold option
    formatted: bool  # the rule reads an option at all


def reward_of(example: Example, text: str, settings: RLConfig) -> Reward:
    """``reward_correct`` for the right option under ``answer_rule``, plus ``reward_format`` for naming any."""
    letter, correct = score_answer(format_prompt_text(example.question, example.choices), text, example.choices,
                                   example.answer, settings.answer_rule)
    formatted = letter is not None
    return Reward(settings.reward_correct * correct + settings.reward_format * formatted, correct, formatted)
