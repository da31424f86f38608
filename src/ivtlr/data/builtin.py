"""The built-in ``digits`` dataset source: puzzles composed from the handwritten digit scans that ship with
scikit-learn, written once as M3CoT-schema parquet files under the cache folder, then read like any local files."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ivtlr.config import DataFiles, DatasetConfig
from ivtlr.data.digits import SPLITS, write_digit_reasoning

DIGITS_SOURCE = "digits"
CACHE_ENV = "IVTLR_CACHE"


def cache_dir() -> Path:
    """Where generated data is kept: ``$IVTLR_CACHE``, else ``~/.cache/ivtlr``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ivtlr")


def digit_data_files(cache_root: Path | None = None) -> dict[str, str]:
    """The built-in digit-puzzle splits as M3CoT-schema parquet files, written on first use."""
    directory = (cache_root or cache_dir()) / DIGITS_SOURCE
    files = {split: directory / f"{split}.parquet" for split in SPLITS}
    if not all(path.is_file() for path in files.values()):
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_digit_reasoning(tmp)
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    return {split: str(path) for split, path in files.items()}


def resolve_source(dataset: DatasetConfig) -> tuple[str, DataFiles | None]:
    """(source, data_files) for ``load_examples``: ``digits`` becomes its cached M3CoT-schema files."""
    if dataset.source == DIGITS_SOURCE:
        return "m3cot", digit_data_files()
    return dataset.source, dataset.data_files
