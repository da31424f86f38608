"""Visual CoT's grounded records (question, answer, image, the boxes of the region that answers it) as `Example`s.

Visual CoT (Shao et al., 2024) annotates each question with the region of the picture a model should look at before
answering; its own chain is two turns: first the region's box as text, then the answer. ivtlr keeps that chain: the
one reasoning step is the box written as fractions of the picture, ``[x0, y0, x1, y1]`` with three decimals, and the
step's region is the same box, so step supervision teaches the latent to say where it looks and region supervision
teaches it to look there. Several boxes of one record are merged into the box that holds them all, as Visual CoT
does for its first turn.

Visual CoT's answers are free text, while ivtlr trains and scores multiple choice. A record with a ``choices`` list is
used as it is (its ``answer`` is an option's text or letter); any other record is posed with distractors: the other
answer of a yes/no question, or up to three different answers of other questions of the same subset (``dataset``),
picked and placed by a generator seeded with the record's id, so every load poses the same options.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ivtlr.data.example import OPTION_LETTERS, Box, Example, InvalidExample

#: Columns that name a table as Visual CoT's metadata schema (the rest: width, height, dataset, split, choices).
REQUIRED_COLUMNS = frozenset({"question", "answer", "image", "bboxs"})

YES_NO = ("Yes", "No")
DISTRACTORS = 3


def merged_box(boxes: Any) -> Box:
    """The box that holds every box of ``boxes`` (pixels, [x0, y0, x1, y1] each), negative corners clipped to 0."""
    if isinstance(boxes, str) or not isinstance(boxes, Sequence) or not boxes:
        raise InvalidExample("no region box", repr(boxes)[:60])
    corners = []
    for box in boxes:
        values = list(box) if isinstance(box, Sequence) and not isinstance(box, str) else []
        if len(values) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise InvalidExample("bad region box", f"{box!r} is not [x0, y0, x1, y1]")
        corners.append([float(v) for v in values])
    x0 = max(min(box[0] for box in corners), 0.0)
    y0 = max(min(box[1] for box in corners), 0.0)
    x1, y1 = max(box[2] for box in corners), max(box[3] for box in corners)
    if not (x0 < x1 and y0 < y1):
        raise InvalidExample("bad region box", f"{boxes!r} holds no area")
    return (x0, y0, x1, y1)


def box_step_text(box: Box, width: float, height: float) -> str:
    """The written step: the box as fractions of the picture, the way Visual CoT's first turn writes it."""
    fractions = (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
    return "[" + ", ".join(f"{min(max(value, 0.0), 1.0):.3f}" for value in fractions) + "]"


def _size(row: Mapping[str, Any]) -> tuple[float, float]:
    width, height = row.get("width"), row.get("height")
    if not all(isinstance(v, (int, float)) and v > 0 for v in (width, height)):
        raise InvalidExample("no image size", f"width {width!r}, height {height!r}")
    return float(width), float(height)


def _given_choices(row: Mapping[str, Any], answer: str) -> tuple[list[str], str]:
    """A record's own options and the letter of its answer (named by its text or its letter)."""
    choices = row["choices"]
    if isinstance(choices, str) or not isinstance(choices, Sequence) or len(choices) < 2:
        raise InvalidExample("bad options", f"choices {choices!r:.60} is not a list of at least two options")
    if len(choices) > len(OPTION_LETTERS):
        raise InvalidExample("too many options", f"{len(choices)} options, more than there are letters")
    texts = [str(choice) for choice in choices]
    if answer in texts:
        return texts, OPTION_LETTERS[texts.index(answer)]
    if len(answer) == 1 and answer.upper() in OPTION_LETTERS[: len(texts)]:
        return texts, answer.upper()
    raise InvalidExample("answer outside the options", f"{answer!r} is neither an option nor its letter")


def _posed_choices(answer: str, subset: str, row_id: str, answers_by_subset: Mapping[str, Sequence[str]]
                   ) -> tuple[list[str], str]:
    """Options for a free-text answer: yes/no for a yes/no question, else distractors from the same subset."""
    rng = random.Random(f"visual-cot:{row_id}")
    if answer.lower() in {"yes", "no"}:
        return list(YES_NO), OPTION_LETTERS[[choice.lower() for choice in YES_NO].index(answer.lower())]
    others = [other for other in answers_by_subset.get(subset, ()) if other.lower() != answer.lower()]
    if not others:
        raise InvalidExample("no distractors", f"no other answer in subset {subset!r} to pose options with")
    choices = rng.sample(others, min(DISTRACTORS, len(others)))
    position = rng.randrange(len(choices) + 1)
    choices.insert(position, answer)
    return choices, OPTION_LETTERS[position]


def _answer_pool(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Per subset, its distinct non-yes/no answers in a fixed order (first appearance), the distractor pool."""
    seen: dict[str, dict[str, str]] = defaultdict(dict)
    for row in rows:
        answer = str(row.get("answer") or "").strip()
        if answer and answer.lower() not in {"yes", "no"}:
            seen[str(row.get("dataset") or "")].setdefault(answer.lower(), answer)
    return {subset: list(answers.values()) for subset, answers in seen.items()}


def visual_cot_converter(rows: Iterable[Mapping[str, Any]]
                         ) -> Callable[[Mapping[str, Any], str, int, str], Example]:
    """A row converter for one split: ``rows`` (the whole split) gives the distractor pool of each subset."""
    answers_by_subset = _answer_pool(rows)

    def to_example(row: Mapping[str, Any], split: str, row_index: int, row_id: str) -> Example:
        question = str(row.get("question") or "")
        if not question.strip():
            raise InvalidExample("empty question")
        answer = str(row.get("answer") or "").strip()
        if not answer:
            raise InvalidExample("empty answer")
        width, height = _size(row)
        box = merged_box(row.get("bboxs"))
        subset = str(row.get("dataset") or "")
        if row.get("choices") is not None:
            choices, letter = _given_choices(row, answer)
        else:
            choices, letter = _posed_choices(answer, subset, row_id, answers_by_subset)
        metadata = {"source": "viscot", "split": row.get("split") or split, "dataset": subset,
                    "answer_text": answer, "box_space": (width, height)}
        return Example(image=None, id=row_id, question=question, choices=choices, answer=letter,
                       rationale=box_step_text(box, width, height), metadata=metadata, step_boxes=(box,))

    return to_example


def fit_boxes_to_image(example: Example, image_size: tuple[int, int]) -> Example:
    """Scale the example's boxes from the size its record states to the size of the stored image (they differ when
    the images were resized after annotation); unchanged when they agree or the record states none."""
    space = example.metadata.get("box_space")
    if not space or not example.step_boxes or tuple(space) == tuple(map(float, image_size)):
        return example
    sx, sy = image_size[0] / space[0], image_size[1] / space[1]
    boxes = tuple(None if box is None else (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
                  for box in example.step_boxes)
    return replace(example, step_boxes=boxes)
