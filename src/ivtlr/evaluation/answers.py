"""Answer extraction: which option a generated text names, under each rule.

``original`` is the IVT-LR release's rule, ``m3cot`` the official M3CoT scorer's, ``ivtlr_loose`` the research
scripts' lenient reading; every summary reports all three, the run's own rule first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

ExtractionRule = Literal["original", "m3cot", "ivtlr_loose"]
#: Every rule, in the order summaries list them after the configured one.
EXTRACTION_RULES: tuple[ExtractionRule, ...] = ("original", "m3cot", "ivtlr_loose")

# "the answer is B", "The final answer is: (c)", "Answer:\n B." -- the phrase, an optional
# opening bracket, then a letter that is not the start of a word ("Answer: The ..." is no answer).
_ANSWER_AFTER_PHRASE = re.compile(
    r"answer(?:\s+is\s*:?|\s*:)\s*(?P<open>[(\[{]?)\s*(?P<letter>[A-Za-z])(?=(?P<next>[^A-Za-z0-9]|$))",
    re.IGNORECASE,
)
# After these, a lower-case letter is read as an option ("is b." / "is c)"), not the article "a".
_LOWERCASE_LETTER_ENDINGS = frozenset(").]}:,;!?\n")
_PARENTHESISED_LETTER = re.compile(r"\(([A-Za-z])\)")
# The IVT-LR research scripts' rule, see `loose_candidates`.
_LOOSE_ROLE_WORD = re.compile(r"(?<=answer:)\s*(?:\n+\s*)?assistant\b", re.IGNORECASE)
_LOOSE_LETTER = re.compile(r"(?:the\s+answer\s+is|answer:)\s*([a-z])", re.IGNORECASE)
_M3COT_WORD_SEPARATORS = re.compile(r"[\n.,!?]")


def option_letters(n_choices: int) -> list[str]:
    """Letters naming ``n_choices`` options: A, B, C, ..."""
    if not 0 <= n_choices <= 26:
        raise ValueError(f"cannot name {n_choices} options with single letters")
    return [chr(ord("A") + index) for index in range(n_choices)]


def extract_answer(text: str, choices: Sequence[str], rule: ExtractionRule = "original") -> str | None:
    """The option letter a model's output commits to, or None when it names no option.

    ``"original"``: the letter right after the LAST "answer is" / "Answer:" (any case) that names
    an option; the letter may be wrapped as "(B)", "B.", "B)". A lower-case letter counts only when
    bracketed or followed by punctuation/end of line, so "the answer is a cat" is not option A.
    The IVT-LR research code instead counted a question correct when the gold letter followed ANY
    such phrase in the decoded prompt+output (and missed "(B)"); a single prediction is stricter.

    ``"m3cot"``: the official M3CoT scorer's ``judge_answer`` cascade, see :func:`_extract_m3cot`.

    ``"ivtlr_loose"`` names a set of letters rather than one (see :func:`loose_candidates`): use
    :func:`is_correct`, which scores every rule; here it returns the last letter the rule finds.
    """
    letters = option_letters(len(choices))
    if rule == "original":
        return _extract_after_answer_phrase(text, letters)
    if rule == "m3cot":
        return _extract_m3cot(text, choices, letters)
    if rule == "ivtlr_loose":
        found = loose_candidates(text)
        return found[-1] if found else None
    raise ValueError(f"unknown answer-extraction rule {rule!r}; expected one of {EXTRACTION_RULES}")


def loose_candidates(decoded: str) -> list[str]:
    """The IVT-LR research scripts' scoring rule, which the paper's accuracies used: every letter (any case, read as a
    capital) that follows "the answer is" or "Answer:" anywhere in the decoded text, in text order.

    The scripts decode prompt and output together, so the prompt's closing "Answer:" counts too: they first drop the
    chat template's "assistant" role word after it, and the first letter of the output then follows it ("Answer:\n
    Therefore, ..." names T). A question is right when the gold letter is among the candidates, so an output naming
    several letters can be right with any of them.
    """
    cleaned = _LOOSE_ROLE_WORD.sub("", decoded)
    return [match[1].upper() for match in _LOOSE_LETTER.finditer(cleaned)]


def is_correct(question: str, generated_text: str, choices: Sequence[str], answer: str, rule: ExtractionRule) -> bool:
    """Whether ``rule`` scores the output right. ``ivtlr_loose`` reads the prompt and the output together, as the
    research scripts decoded them; the other rules read the output only."""
    return score_answer(question, generated_text, choices, answer, rule)[1]


def score_answer(question: str, generated_text: str, choices: Sequence[str], answer: str, rule: ExtractionRule
           ) -> tuple[str | None, bool]:
    """(the letter the rule reads, whether it is the gold one); under ``ivtlr_loose`` the letter is the gold one when
    any candidate names it, else the last candidate."""
    gold = answer.strip().upper()
    if rule == "ivtlr_loose":
        found = loose_candidates(f"{question}{generated_text}")
        correct = gold in found
        return (gold if correct else (found[-1] if found else None)), correct
    prediction = extract_answer(generated_text, choices, rule)
    return prediction, prediction is not None and prediction == gold


def _extract_after_answer_phrase(text: str, letters: Sequence[str]) -> str | None:
    found = None
    for match in _ANSWER_AFTER_PHRASE.finditer(text):
        letter = match["letter"]
        next_char = match["next"]
        unambiguous = letter.isupper() or match["open"] or not next_char or next_char in _LOWERCASE_LETTER_ENDINGS
        if unambiguous and letter.upper() in letters:
            found = letter.upper()
    return found


def _extract_m3cot(text: str, choices: Sequence[str], letters: Sequence[str]) -> str | None:
    """The official M3CoT scorer's rule, step for step, so our accuracy equals its accuracy.

    1. keep the part after the last "[Answer]" (up to "[Rationale]"/"[Context]");
    2. the last "(x)" in the text, any letter (one outside the options is a wrong answer: None);
    3. else the options whose text occurs in the output (case-insensitive): the one listed LAST
       among the choices, not the one mentioned last in the text;
    4. else a standalone option letter, words split on spaces after turning newlines and ".,!?"
       into spaces: the last in option order, capitals first, then lower case (even the article "a").
    """
    if "[Answer]" in text:
        text = text.split("[Answer]")[-1].split("[Rationale]")[0].split("[Context]")[0]
    parenthesised = _PARENTHESISED_LETTER.findall(text)
    if parenthesised:
        letter = parenthesised[-1].upper()
        return letter if letter in letters else None
    lowered = text.lower()
    named_by_text = [letter for letter, choice in zip(letters, choices) if choice.lower() in lowered]
    if named_by_text:
        return named_by_text[-1]
    words = set(_M3COT_WORD_SEPARATORS.sub(" ", text).split(" "))
    for spelled in (str.upper, str.lower):
        named_by_letter = [letter for letter in letters if spelled(letter) in words]
        if named_by_letter:
            return named_by_letter[-1]
    return None


