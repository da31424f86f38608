"""Prediction records, summaries and intervals for the evaluation harness.

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
from typing import Any

from ivtlr.errors import NoSpaceLeft, is_out_of_space
from ivtlr.evaluation.answers import EXTRACTION_RULES, ExtractionRule, is_correct, score_answer

logger = logging.getLogger(__name__)


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
        prediction, correct = score_answer(question, generated_text, choices, answer, rule)
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
