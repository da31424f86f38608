"""Small M3CoT- and ScienceQA-schema files with real images, for tests that must read data like the hub's.

The images are real handwritten-digit scans (scikit-learn's bundled UCI digits, 8x8) upsampled to RGB;
each question asks which digit is shown, so the labels are true and a model could learn them. Parquet
files are written by `datasets` with the same features as the hub datasets; JSONL files hold image paths
relative to the file, next to an `images/` folder.

    paths = write_m3cot_files(tmp_path, n_train=8, n_test=4, fmt="jsonl")   # {"train": ..., "test": ...}
    rows = m3cot_rows("train", 3); rows[0]["choices"] = []; write_rows(tmp_path, "train", rows, "m3cot")
"""

from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

Schema = Literal["m3cot", "scienceqa"]
Format = Literal["parquet", "jsonl"]

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
N_CHOICES = 4

FEATURES: dict[str, datasets.Features] = {
    "m3cot": datasets.Features(
        {
            "id": datasets.Value("string"),
            "category": datasets.Value("string"),
            "image_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "choices": datasets.List(datasets.Value("string")),
            "context": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "rationale": datasets.Value("string"),
            "split": datasets.Value("string"),
            "image": datasets.Image(),
            "domain": datasets.Value("string"),
            "topic": datasets.Value("string"),
        }
    ),
    "scienceqa": datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "choices": datasets.List(datasets.Value("string")),
            "answer": datasets.Value("int8"),
            "hint": datasets.Value("string"),
            "task": datasets.Value("string"),
            "grade": datasets.Value("string"),
            "subject": datasets.Value("string"),
            "topic": datasets.Value("string"),
            "category": datasets.Value("string"),
            "skill": datasets.Value("string"),
            "lecture": datasets.Value("string"),
            "solution": datasets.Value("string"),
        }
    ),
}


IMAGE_STRUCT = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    return bunch.images, bunch.target


def digit_label(index: int) -> int:
    return int(_digits()[1][index])


def digit_image(index: int, size: int = 56) -> Image.Image:
    """The `index`-th digit scan as a `size` x `size` RGB image (dark ink on white, as on paper)."""
    scan = _digits()[0][index]
    gray = (255 - scan * (255 / 16)).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.NEAREST).convert("RGB")


def _digit_choices(index: int) -> tuple[list[str], int]:
    """Four digit names holding the true one, at a position that rotates with the row."""
    label = digit_label(index)
    distractors = [DIGIT_NAMES[(label + offset) % 10] for offset in (3, 5, 7)]
    position = index % N_CHOICES
    return distractors[:position] + [DIGIT_NAMES[label]] + distractors[position:], position


def _rationale(index: int) -> str:
    """Two to five sentences, so that rationale splitting meets both short and merged cases."""
    label = digit_label(index)
    sentences = [
        "The image shows one handwritten digit",
        "The ink strokes are dark on a light background",
        f"Their shape is that of the digit {label}",
        "No other digit has this outline",
        f"So the digit is {DIGIT_NAMES[label]}.",
    ]
    count = 2 + index % 4
    return ". ".join(sentences[:count - 1] + sentences[-1:])


def _row_offset(split: str) -> int:
    """Different splits use different scans."""
    return {"train": 0, "validation": 500, "test": 1000}.get(split, 1500)


def m3cot_rows(split: str, n: int, size: int = 56) -> list[dict[str, Any]]:
    """`n` rows in the M3CoT schema; `image` is a PIL image."""
    rows = []
    for row in range(n):
        index = _row_offset(split) + row
        choices, position = _digit_choices(index)
        rows.append(
            {
                "id": f"digits-{split}-{row}",
                "category": "digit-recognition",
                "image_id": f"digit-{index}",
                "question": "Which digit is written in the image?",
                "choices": choices,
                "context": "The image is a scan of a handwritten digit.",
                "answer": "ABCD"[position],
                "rationale": _rationale(index),
                "split": split,
                "image": digit_image(index, size),
                "domain": "science",
                "topic": "handwriting",
            }
        )
    return rows


def scienceqa_rows(split: str, n: int, n_text_only: int = 0, size: int = 56) -> list[dict[str, Any]]:
    """`n` rows with an image, then `n_text_only` without one, in the ScienceQA schema."""
    rows = []
    for row in range(n + n_text_only):
        index = _row_offset(split) + row
        choices, position = _digit_choices(index)
        has_image = row < n
        question_without_image = f"Which word names the digit {digit_label(index)}?"
        rows.append(
            {
                "image": digit_image(index, size) if has_image else None,
                "question": "Which digit is written in the image?" if has_image else question_without_image,
                "choices": choices,
                "answer": position,
                "hint": "" if has_image else "Count from zero.",
                "task": "closed choice",
                "grade": f"grade{1 + index % 3}",
                "subject": "natural science" if index % 2 else "language science",
                "topic": "handwriting",
                "category": "Digit recognition",
                "skill": "Identify digits",
                "lecture": "Digits are written with strokes. Each digit has its own shape." if index % 3 else "",
                "solution": _rationale(index) if index % 5 else "",
            }
        )
    return rows


def _image_cell_for_jsonl(value: Any, image_dir: Path, name: str) -> str | None:
    """A PIL image or raw bytes become a file next to the JSONL; a string is kept as the (maybe bogus) path."""
    if value is None or isinstance(value, str):
        return value
    image_dir.mkdir(parents=True, exist_ok=True)
    path = image_dir / f"{name}.png"
    if isinstance(value, Image.Image):
        value.save(path, format="PNG")
    else:
        path.write_bytes(value)
    return f"{image_dir.name}/{path.name}"


def _image_cell_for_parquet(value: Any) -> Any:
    """Raw bytes are embedded unchecked (how a corrupt image gets in); a string becomes a path-only cell."""
    if isinstance(value, bytes):
        return {"bytes": value, "path": None}
    if isinstance(value, str):
        return {"bytes": None, "path": value}
    return value


def write_rows(directory: str | Path, split: str, rows: list[dict[str, Any]], schema: Schema,
               fmt: Format = "parquet") -> Path:
    """Write `rows` as `<directory>/<split>.<fmt>`; `image` may be a PIL image, raw bytes, a path string or None."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        cells = [{**row, "image": _image_cell_for_parquet(row["image"])} for row in rows]
        features = FEATURES[schema]
        if any(isinstance(row["image"], str) for row in rows):
            # `datasets` refuses to write an Image column naming a missing file; a plain struct column can.
            features = datasets.Features({**features, "image": IMAGE_STRUCT})
        path = directory / f"{split}.parquet"
        datasets.Dataset.from_list(cells, features=features).to_parquet(str(path))
        return path
    if fmt == "jsonl":
        path = directory / f"{split}.jsonl"
        with path.open("w") as file:
            for number, row in enumerate(rows):
                image = _image_cell_for_jsonl(row["image"], directory / "images", f"{split}-{number}")
                file.write(json.dumps({**row, "image": image}) + "\n")
        return path
    raise ValueError(f"unknown format {fmt!r}")


def write_m3cot_files(
    directory: str | Path, n_train: int = 8, n_test: int = 4, fmt: Format = "parquet", size: int = 56
) -> dict[str, Path]:
    """Train and test files in the M3CoT schema; returns {split: path}, ready as `data_files`."""
    return {
        split: write_rows(directory, split, m3cot_rows(split, n, size), "m3cot", fmt)
        for split, n in (("train", n_train), ("test", n_test))
    }


def write_scienceqa_files(
    directory: str | Path,
    n_train: int = 8,
    n_test: int = 4,
    fmt: Format = "parquet",
    n_text_only: int = 0,
    size: int = 56,
) -> dict[str, Path]:
    """Train and test files in the ScienceQA schema (each split adds `n_text_only` rows without an image)."""
    return {
        split: write_rows(directory, split, scienceqa_rows(split, n, n_text_only, size), "scienceqa", fmt)
        for split, n in (("train", n_train), ("test", n_test))
    }


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
