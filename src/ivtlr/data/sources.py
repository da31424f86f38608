"""Load M3CoT and ScienceQA (hub or local parquet/JSONL), and Visual CoT's metadata files, into validated `Example`s.

Hub data and local files go through the same `datasets.load_dataset` call and the same row conversion, so
the small schema files the tests write exercise exactly the code that reads the real datasets. Bad rows
(no options, an answer that names no option, a missing or corrupt image) are caught here, where the row
is still identifiable, instead of surfacing later as a shape error inside a model or as a wrong label.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from ivtlr.errors import DataFileError, MissingDataFileError
from ivtlr.data.curriculum import split_rationale
from ivtlr.data.example import (OPTION_LETTERS, Box, Example, ExampleSequence, InvalidExample, decode_image,
                                option_letter)
from ivtlr.data.visual_cot import REQUIRED_COLUMNS as VISUAL_COT_COLUMNS
from ivtlr.data.visual_cot import fit_boxes_to_image, visual_cot_converter

logger = logging.getLogger(__name__)

HUB_IDS = {"m3cot": "LightChen2333/M3CoT", "scienceqa": "derek-thomas/ScienceQA"}
LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}

DataFiles = str | Path | list[str | Path] | Mapping[str, str | Path | list[str | Path]]


@dataclass(frozen=True)
class _Part:
    """One loaded table and the folder its relative image paths are resolved against."""

    table: datasets.Dataset
    image_root: Path | None


def _choices(row: Mapping[str, Any]) -> list[str]:
    choices = row.get("choices")
    if isinstance(choices, str):  # iterating it would make every character an option
        raise InvalidExample("options are one string, not a list", repr(choices[:40]))
    if choices is not None and not isinstance(choices, Sequence):
        raise InvalidExample("options are not a list", f"{type(choices).__name__} {choices!r:.40}")
    if not choices:
        raise InvalidExample("no options")
    if len(choices) > len(OPTION_LETTERS):
        raise InvalidExample("too many options", f"{len(choices)} options, more than there are letters")
    return [str(choice) for choice in choices]


def _question(row: Mapping[str, Any]) -> str:
    question = str(row.get("question") or "")
    if not question.strip():
        raise InvalidExample("empty question")
    return question


def _require_answer(valid: bool, detail: str) -> None:
    """Reject an answer naming no option under one reason for both schemas, so their skips are counted together."""
    if not valid:
        raise InvalidExample("answer outside the options", detail)


def _with_context(question: str, context: str, use_context: bool) -> str:
    return f"Context: {context}\n{question}" if use_context and context else question


def _row_id(row: Mapping[str, Any], split: str, row_index: int) -> str:
    return str(row.get("id") or f"{split}-{row_index}")


def _m3cot_example(row: Mapping[str, Any], split: str, row_index: int, use_context: bool) -> Example:
    choices = _choices(row)
    answer = str(row.get("answer") or "").strip().upper()
    _require_answer(len(answer) == 1 and answer in OPTION_LETTERS[: len(choices)],
                    f"{row.get('answer')!r} is not one of the {len(choices)} option letters")
    context = str(row.get("context") or "")
    metadata = {
        "source": "m3cot",
        "split": row.get("split") or split,
        "domain": row.get("domain"),
        "topic": row.get("topic"),
        "category": row.get("category"),
        "image_id": row.get("image_id"),
        "context": context,
    }
    rationale = str(row.get("rationale") or "")
    return Example(
        image=None,
        id=_row_id(row, split, row_index),
        question=_with_context(_question(row), context, use_context),
        choices=choices,
        answer=answer,
        rationale=rationale,
        metadata=metadata,
        step_boxes=step_boxes(row.get(STEP_BOXES_COLUMN), len(split_rationale(rationale))),
    )


#: Optional column of the M3CoT schema: per reasoning step, the box [x0, y0, x1, y1] (pixels) it reads, or null.
STEP_BOXES_COLUMN = "step_boxes"


def step_boxes(cell: Any, n_steps: int) -> tuple[Box | None, ...] | None:
    """The ``step_boxes`` cell of a row as one box (or None) per reasoning step; None for a row without one."""
    if cell is None:
        return None
    if isinstance(cell, str) or not isinstance(cell, Sequence):
        raise InvalidExample("step_boxes is not a list", repr(cell)[:60])
    boxes = list(cell)
    if len(boxes) != n_steps:
        raise InvalidExample("step_boxes does not match the steps",
                             f"{len(boxes)} boxes for the rationale's {n_steps} reasoning steps")
    parsed: list[Box | None] = []
    for box in boxes:
        if box is None:
            parsed.append(None)
            continue
        values = list(box) if isinstance(box, Sequence) and not isinstance(box, str) else []
        if len(values) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) \
                or not (0 <= values[0] < values[2] and 0 <= values[1] < values[3]):
            raise InvalidExample("bad step box", f"{box!r} is not [x0, y0, x1, y1] with 0 <= x0 < x1, 0 <= y0 < y1")
        parsed.append(tuple(float(v) for v in values))
    return tuple(parsed)


def _scienceqa_example(row: Mapping[str, Any], split: str, row_index: int, use_context: bool) -> Example:
    choices = _choices(row)
    answer_index = row.get("answer")
    _require_answer(isinstance(answer_index, int) and 0 <= answer_index < len(choices),
                    f"index {answer_index!r} is not one of the {len(choices)} options")
    explanation = [text for text in (row.get("lecture"), row.get("solution")) if text]
    hint = str(row.get("hint") or "")
    metadata = {
        "source": "scienceqa",
        "split": split,
        "subject": row.get("subject"),
        "grade": row.get("grade"),
        "topic": row.get("topic"),
        "category": row.get("category"),
        "skill": row.get("skill"),
        "task": row.get("task"),
        "hint": hint,
        "context": hint,
    }
    return Example(
        image=None,
        id=_row_id(row, split, row_index),
        question=_with_context(_question(row), hint, use_context),
        choices=choices,
        answer=option_letter(answer_index),
        rationale=" ".join(explanation) if explanation else choices[answer_index],
        metadata=metadata,
    )


RowConverter = Callable[[Mapping[str, Any], str, int, bool], Example]

SCHEMAS: dict[str, RowConverter | None] = {
    "m3cot": _m3cot_example,
    "scienceqa": _scienceqa_example,
    "viscot": None,  # built per split (its options draw on the split's answers): `_row_converter`
}


def _row_converter(schema: str, parts: list[_Part]) -> RowConverter:
    """The row conversion of ``schema``; Visual CoT's needs the whole split first, for its distractor pool."""
    convert = SCHEMAS[schema]
    if convert is not None:
        return convert
    columns = [name for name in ("answer", "dataset") if name in parts[0].table.column_names]
    to_example = visual_cot_converter(row for part in parts for row in part.table.select_columns(columns))
    return lambda row, split, row_index, use_context: to_example(row, split, row_index,
                                                                 _row_id(row, split, row_index))


def detect_schema(column_names: list[str]) -> str:
    """Name the schema of a table from its columns: Visual CoT names region boxes (bboxs), ScienceQA explains with
    lecture/solution, M3CoT with rationale."""
    columns = set(column_names)
    if VISUAL_COT_COLUMNS <= columns:
        return "viscot"
    if {"question", "choices", "answer"} - columns:
        raise DataFileError(f"columns {sorted(columns)} need question, choices and answer")
    if columns & {"lecture", "solution"}:
        return "scienceqa"
    if "rationale" in columns:
        return "m3cot"
    raise DataFileError(f"cannot tell M3CoT from ScienceQA by the columns {sorted(columns)}")


def _split_files(data_files: DataFiles, split: str) -> list[Path]:
    if isinstance(data_files, Mapping):
        if split not in data_files:
            raise DataFileError(f"no data files for split {split!r}; given splits: {sorted(data_files)}")
        data_files = data_files[split]
    files = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    if not files:
        raise DataFileError(f"no data files for split {split!r}")
    return [Path(file) for file in files]


def _load_local(files: list[Path], split: str, cache_dir: str | None) -> list[_Part]:
    """One `load_dataset` call per file, so that each file's relative image paths resolve against its folder."""
    parts = []
    for file in files:
        builder = LOCAL_BUILDERS.get(file.suffix.lower())
        if builder is None:
            raise DataFileError(f"{file}: unsupported file type (use one of {sorted(LOCAL_BUILDERS)})")
        if not file.is_file():
            raise MissingDataFileError(f"data file not found: {file}")
        if file.stat().st_size == 0:
            raise DataFileError(f"{file}: the file is empty (a {split} split needs at least one row)")
        if builder == "json":
            _check_utf8(file)  # pyarrow reads a bad byte inside a string and fails later, naming no file or row
        try:
            table = datasets.load_dataset(builder, data_files={split: [str(file)]}, split=split, cache_dir=cache_dir)
        except Exception as error:  # datasets and pyarrow raise many kinds; each names neither file nor row
            raise DataFileError(f"{file}: cannot be read as {builder}: {type(error).__name__}: {error}") from error
        parts.append(_Part(table, file.resolve().parent))
    return parts


def _check_utf8(file: Path) -> None:
    """Refuse a text data file with a byte that is not UTF-8, naming the line and column."""
    with file.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                raise DataFileError(f"{file}: cannot be read as json: line {number} is not UTF-8 (byte "
                                    f"{line[bad.start]:#04x} at column {bad.start + 1}); save the file as UTF-8"
                                    ) from None


def _open_source(
    source: str, split: str, data_files: DataFiles | None, cache_dir: str | None
) -> tuple[str, list[_Part]]:
    """Resolve `source` to a schema name and the tables holding the split."""
    hub_schemas = {hub_id: name for name, hub_id in HUB_IDS.items()}
    if source in hub_schemas or (source in HUB_IDS and data_files is None):
        hub_id = source if source in hub_schemas else HUB_IDS[source]
        try:
            table = datasets.load_dataset(hub_id, split=split, cache_dir=cache_dir)
        except (ConnectionError, OSError) as error:  # offline, unreachable, or not in the local cache
            raise DataFileError(f"cannot load the dataset {hub_id!r} (split {split!r}) from the Hugging Face hub or "
                                f"its local cache: {error}. Connect, or point dataset.data_files at local parquet / "
                                "JSONL files in its schema") from error
        return hub_schemas[hub_id], [_Part(table, None)]
    if source not in (*SCHEMAS, "auto"):
        raise DataFileError(f"unknown source {source!r}: use one of {sorted(hub_schemas)}, {sorted(SCHEMAS)} or "
                            "'auto'")
    if data_files is None:
        raise DataFileError(f"source {source!r} needs data_files")
    parts = _load_local(_split_files(data_files, split), split, cache_dir)
    columns = parts[0].table.column_names
    if source == "auto":
        return detect_schema(columns), parts
    _check_columns_fit(source, columns)
    return source, parts


def _check_columns_fit(schema: str, columns: list[str]) -> None:
    """Refuse files of the other schema, which would otherwise be skipped row by row as bad answers."""
    try:
        detected = detect_schema(columns)
    except ValueError as error:
        if {"question", "choices", "answer"} - set(columns):
            raise
        logger.debug("schema of %s not recognisable (%s); reading it as %s", columns, error, schema)
        return
    if detected != schema:
        raise DataFileError(f"source {schema!r} given, but the columns {sorted(columns)} are those of {detected!r}")


def _as_undecoded_images(table: datasets.Dataset) -> datasets.Dataset:
    """Keep image cells as {bytes, path} so a corrupt image becomes a counted skip, not a crash in iteration."""
    if isinstance(table.features.get("image"), datasets.Image):
        return table.cast_column("image", datasets.Image(decode=False))
    return table


def _rows(parts: list[_Part]) -> Iterator[tuple[Mapping[str, Any], Path | None]]:
    """Every row of the split, in file order, with the folder its image path is relative to."""
    for part in parts:
        for row in _as_undecoded_images(part.table):
            yield row, part.image_root


def _read_image_bytes(cell: Any, image_root: Path | None) -> bytes | None:
    """Encoded bytes of an image cell: embedded bytes, or a file path (relative to the data file's folder)."""
    if cell is None:
        return None
    if isinstance(cell, Mapping):
        if cell.get("bytes"):
            return cell["bytes"]
        cell = cell.get("path")
        if not cell:
            return None
    path = Path(cell)
    if not path.is_absolute() and image_root is not None:
        path = image_root / path
    if not path.is_file():
        raise InvalidExample("missing image", f"no file {path}")
    return path.read_bytes()


def _decoded_size(encoded: bytes) -> tuple[int, int]:
    try:
        return decode_image(encoded).size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InvalidExample("corrupt image", str(error)) from error


def load_examples(
    source: str,
    split: str,
    *,
    data_files: DataFiles | None = None,
    keep_no_image: bool = False,
    use_context: bool = False,
    limit: int | None = None,
    strict: bool = False,
    cache_dir: str | None = None,
) -> ExampleSequence:
    """Load one split as validated examples.

    `source` is a hub id (`LightChen2333/M3CoT`, `derek-thomas/ScienceQA`), or `"m3cot"` / `"scienceqa"`
    (the hub dataset, or local `data_files` in that schema), `"viscot"` (local files of Visual CoT's metadata
    schema: question, answer, image, bboxs, width, height, dataset; see `visual_cot`), or `"auto"` (local files,
    schema from the columns). Local files are parquet or JSONL whose `image` column holds paths relative to the file.
    Invalid rows are skipped and counted in a warning, or raise `ValueError` when `strict`; rows without
    an image are dropped (and counted) unless `keep_no_image`. `limit` stops after that many kept examples.
    """
    schema, parts = _open_source(source, split, data_files, cache_dir)
    row_to_example = _row_converter(schema, parts)
    records: list[Example] = []
    encoded_images: list[bytes | None] = []
    skipped: Counter[str] = Counter()
    seen_ids: set[str] = set()
    no_image = 0
    for row_index, (row, image_root) in enumerate(_rows(parts)):
        if limit is not None and len(records) >= limit:
            break
        try:
            record = row_to_example(row, split, row_index, use_context)
            if record.id in seen_ids:  # predictions and resuming are keyed by id: a second row would be lost
                raise InvalidExample("duplicate id", record.id)
            seen_ids.add(record.id)
            encoded = _read_image_bytes(row.get("image"), image_root)
            if encoded is not None:
                record = fit_boxes_to_image(record, _decoded_size(encoded))
        except InvalidExample as error:
            row_id = _row_id(row, split, row_index)
            if strict:
                raise ValueError(f"{source} {split} example {row_id!r}: {error}") from error
            logger.debug("skipping %s %s example %r: %s", source, split, row_id, error)
            skipped[error.reason] += 1
            continue
        if encoded is None and not keep_no_image:
            no_image += 1
            continue
        records.append(record)
        encoded_images.append(encoded)
    if skipped:
        logger.warning("%s %s: skipped %d invalid rows: %s", source, split, sum(skipped.values()), dict(skipped))
    if no_image:
        logger.info("%s %s: dropped %d rows without an image (keep_no_image=False)", source, split, no_image)
    logger.info("%s %s: loaded %d examples (%s schema)", source, split, len(records), schema)
    return ExampleSequence(records, encoded_images)
