"""Scoring for the evaluation harness: answer extraction, prediction records, accuracy summaries.

Predictions are stored as JSONL with the fields the official M3CoT scorer reads
(``id, choices, answer, domain, topic, messages=[question, generated_text]``), so its
``evaluate.py --setting custom --metric_path FILE`` can re-score our runs independently.
The file is appended to and fsynced batch by batch so an interrupted evaluation resumes
where it stopped (:func:`load_done_ids`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .errors import NoSpaceLeft, is_out_of_space

logger = logging.getLogger(__name__)

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
    return _score(question, generated_text, choices, answer, rule)[1]


def _score(question: str, generated_text: str, choices: Sequence[str], answer: str, rule: ExtractionRule
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


@dataclass
class PredictionRecord:
    """One evaluated question, serialised flat so the official M3CoT scorer reads it.

    ``groups`` holds extra grouping metadata (ScienceQA subject, grade, context type); it is
    written as top-level keys and read back from every key that is not a field.
    """

    id: str
    choices: list[str]
    answer: str
    messages: list[str]  # [question, generated_text]
    prediction: str | None
    correct: bool
    n_generated_tokens: int
    seconds: float
    domain: str = ""
    topic: str = ""
    #: Per latent step, the image-token indices (row-major over the token grid) that step inserted: what a reader
    #: needs to check where the latent vision looked, without re-running the model.
    selected: list[list[int]] = field(default_factory=list)
    groups: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_generation(
        cls,
        *,
        id: str,
        choices: Sequence[str],
        answer: str,
        question: str,
        generated_text: str,
        n_generated_tokens: int,
        seconds: float,
        rule: ExtractionRule = "original",
        domain: str = "",
        topic: str = "",
        selected: Sequence[Sequence[int]] = (),
        groups: Mapping[str, str] | None = None,
    ) -> PredictionRecord:
        """Score one generated output; ``answer`` is the gold option letter."""
        prediction, correct = _score(question, generated_text, choices, answer, rule)
        return cls(
            id=str(id),
            choices=list(choices),
            answer=answer,
            messages=[question, generated_text],
            prediction=prediction,
            correct=correct,
            n_generated_tokens=n_generated_tokens,
            seconds=seconds,
            domain=domain,
            topic=topic,
            selected=[[int(index) for index in step] for step in selected],
            groups=dict(groups or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        flat = asdict(self)
        groups = flat.pop("groups")
        clashes = groups.keys() & flat.keys()
        if clashes:
            raise ValueError(f"group keys {sorted(clashes)} clash with record fields")
        return {**flat, **groups}

    @classmethod
    def from_dict(cls, flat: Mapping[str, Any]) -> PredictionRecord:
        field_names = {f.name for f in fields(cls)} - {"groups"}
        known = {key: value for key, value in flat.items() if key in field_names}
        known["id"] = str(known["id"])
        groups = {key: value for key, value in flat.items() if key not in field_names}
        return cls(**known, groups=groups)

    def group_value(self, key: str) -> str:
        """The record's value for a grouping key: ``domain``/``topic`` or one of ``groups``."""
        if key in ("domain", "topic"):
            return getattr(self, key)
        return str(self.groups[key])


def scienceqa_context_type(example_metadata: Mapping[str, Any]) -> str:
    """ScienceQA context as one partition: "image" if it has an image, else "text" if a hint, else "none".

    The ScienceQA paper's TXT/IMG columns overlap (a question with both counts in each);
    here a question with both is "image" so that group counts add up to the total.
    """
    if _has_image(example_metadata.get("image")):
        return "image"
    if (example_metadata.get("hint") or "").strip():
        return "text"
    return "none"


def _has_image(image: Any) -> bool:
    # Undecoded `datasets` images are {"bytes": ..., "path": ...} dicts, both None when absent.
    if isinstance(image, Mapping):
        return any(value is not None for value in image.values())
    return image is not None


def append_jsonl(path: str | os.PathLike[str], records: Iterable[PredictionRecord | Mapping[str, Any]]) -> None:
    """Append records as JSON lines and fsync, so a crash loses at most the batch being written.

    A truncated last line left by an earlier crash is cut off first (or completed, if it is whole
    JSON missing only its newline), so new lines never get glued onto a broken one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        _repair_unterminated_last_line(path)
    lines = [
        json.dumps(record.to_dict() if isinstance(record, PredictionRecord) else dict(record), ensure_ascii=False)
        for record in records
    ]
    try:
        with path.open("a", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
            out.flush()
            os.fsync(out.fileno())
    except OSError as error:
        if not is_out_of_space(error, path):
            raise
        # The torn tail is cut off by the next append; the answered lines before it are kept.
        raise NoSpaceLeft(f"no space left on the device of {path} while writing answers: free space and rerun the "
                          "same command; it resumes after the last complete line") from error


def _repair_unterminated_last_line(path: Path) -> None:
    with path.open("rb+") as file:
        content = file.read()
        if not content or content.endswith(b"\n"):
            return
        line_start = content.rfind(b"\n") + 1
        tail = content[line_start:]
        if _parses_as_json(tail):
            file.write(b"\n")
        else:
            logger.warning("%s: dropping truncated last line (%d bytes) before appending", path, len(tail))
            file.truncate(line_start)


def _parses_as_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a JSONL file; a truncated last line (interrupted write) is skipped with a warning."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                logger.warning("%s: skipping truncated last line %d", path, number)
                continue
            raise ValueError(f"{path}: line {number} is not valid JSON") from error
    return records


def read_predictions(path: str | os.PathLike[str]) -> list[PredictionRecord]:
    return [PredictionRecord.from_dict(flat) for flat in read_jsonl(path)]


def load_done_ids(path: str | os.PathLike[str]) -> set[str]:
    """Ids already evaluated in a predictions file (empty if it does not exist yet), for resuming."""
    if not Path(path).exists():
        return set()
    return {str(flat["id"]) for flat in read_jsonl(path)}


def accuracy_by_rule(records: Sequence[PredictionRecord], first: ExtractionRule = "original") -> dict[str, float]:
    """Overall accuracy of the records re-scored under every rule, ``first`` (the configured one) first: the strict
    rule, the official M3CoT scorer's and the research scripts' loose one can differ by tens of points."""
    order = (first, *(rule for rule in EXTRACTION_RULES if rule != first))
    return {rule: (sum(is_correct(r.messages[0], r.messages[-1], r.choices, r.answer, rule) for r in records)
                   / len(records) if records else 0.0) for rule in order}


def summarize(records: Sequence[PredictionRecord], group_keys: Sequence[str] = ()) -> dict[str, Any]:
    """Accuracy and cost overall and per value of each grouping key.

    Returns ``{"overall": stats, "groups": {key: {value: stats}}}`` where each ``stats`` has
    ``count, correct, unanswered, accuracy`` (a fraction), ``avg_generated_tokens`` (the paper's
    "AR steps"), ``seconds_per_question`` and ``questions_per_second`` (from summed per-question seconds).
    """
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for key in group_keys:
        by_value: dict[str, list[PredictionRecord]] = {}
        for record in records:
            by_value.setdefault(record.group_value(key), []).append(record)
        groups[key] = {value: _stats(by_value[value]) for value in sorted(by_value, key=_natural_order)}
    return {"overall": _stats(records), "groups": groups}


def _stats(records: Sequence[PredictionRecord]) -> dict[str, Any]:
    count = len(records)
    correct = sum(record.correct for record in records)
    total_seconds = sum(record.seconds for record in records)
    return {
        "count": count,
        "correct": correct,
        "unanswered": sum(record.prediction is None for record in records),
        "accuracy": correct / count if count else 0.0,
        "avg_generated_tokens": sum(record.n_generated_tokens for record in records) / count if count else 0.0,
        "seconds_per_question": total_seconds / count if count else 0.0,
        "questions_per_second": count / total_seconds if total_seconds > 0 else 0.0,
    }


def _natural_order(value: str) -> list[tuple[int, int | str]]:
    """Sort key putting "grade2" before "grade10"."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", value)]


def format_summary_table(summary: Mapping[str, Any]) -> str:
    """A markdown table of :func:`summarize`'s output: one row overall, then one per group value."""
    header = "| group | value | n | accuracy (%) | unanswered | avg gen. tokens | s/question | questions/s |"
    rows = [header, "|---|---|---:|---:|---:|---:|---:|---:|", _table_row("overall", "all", summary["overall"])]
    for key, by_value in summary["groups"].items():
        rows.extend(_table_row(key, value, stats) for value, stats in by_value.items())
    return "\n".join(rows)


def _table_row(group: str, value: str, stats: Mapping[str, Any]) -> str:
    return (
        f"| {group} | {value} | {stats['count']} | {100 * stats['accuracy']:.2f} | {stats['unanswered']} "
        f"| {stats['avg_generated_tokens']:.1f} | {stats['seconds_per_question']:.3f} "
        f"| {stats['questions_per_second']:.2f} |"
    )


#: z of a two-sided 95 % normal interval.
Z_95 = 1.959963984540054


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion: it stays inside [0, 1] and is honest at 0 or n successes."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # Rounding leaves centre - half a hair above 0 at no successes (and centre + half below 1 at all): the interval
    # must hold its own point, or error bars drawn from it come out negative.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))
