"""What produced a predictions file, and one writer at a time.

Resuming an evaluation reuses the answers already in its predictions JSONL, so the file must have been made by the
same weights and settings: otherwise a summary would report one model's answers under another's name. Next to each
predictions file, ``<name>.provenance.json`` records the weights (resolved path and a content digest), the data files
and every setting that changes an answer; a resume into a file made by anything else is refused with the differences
named (``fresh=True`` moves the old file aside and starts again). An exclusive lock on ``<name>.lock`` keeps a
second evaluation from appending the same questions to the same file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from ivtlr.errors import UserError
from ivtlr.files import exclusive_lock, write_text_atomically

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


class ProvenanceMismatch(UserError):
    """A predictions file made by other weights or settings than the evaluation about to resume into it."""


class ResultsBusy(UserError):
    """Another process is writing the same predictions file."""


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_identity(directory: str | os.PathLike) -> dict[str, str]:
    """A checkpoint folder: its resolved path and the digest of its ``ivtlr.json``, whose manifest lists every file
    with its size and SHA-256 (each verified when the checkpoint loads), so the digest names the weights' content."""
    directory = Path(directory).resolve()
    return {"kind": "checkpoint", "path": str(directory), "digest": file_digest(directory / "ivtlr.json")}


def original_identity(state_dict: str | os.PathLike, base: str) -> dict[str, str]:
    """A released original state dict: its resolved path, its SHA-256, and the base model it is loaded onto."""
    state_dict = Path(state_dict).resolve()
    return {"kind": "original", "path": str(state_dict), "digest": file_digest(state_dict), "base": str(base)}


def config_model_identity(model: str) -> dict[str, str]:
    """The config's model as it is (no trained weights)."""
    return {"kind": "config model", "model": model}


def data_identity(data_files: Any) -> Any:
    """Local data files by resolved path, size and modification time (hashing gigabytes of images on every resume
    would cost more than the check is worth); hub ids as they are."""
    if isinstance(data_files, Mapping):
        return {split: data_identity(files) for split, files in data_files.items()}
    if isinstance(data_files, (list, tuple)):
        return [data_identity(file) for file in data_files]
    if data_files is None:
        return None
    path = Path(data_files)
    if not path.is_file():
        return str(data_files)
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def provenance_path(predictions: Path) -> Path:
    return predictions.with_name(predictions.name.removesuffix(".jsonl") + ".provenance.json")


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: recorded -> current`` for every leaf that differs."""
    found = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            found += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return found


def claim_predictions(predictions: Path, provenance: Mapping[str, Any], *, fresh: bool = False) -> None:
    """Make ``predictions`` safe to append to for ``provenance``: a new file records it; an existing one must have
    been made by exactly the same; ``fresh`` moves an existing file (and its record) aside first."""
    record = provenance_path(predictions)
    if fresh and predictions.exists():
        aside = predictions.with_name(f"{predictions.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        predictions.replace(aside)
        logger.warning("--fresh: moved the earlier predictions to %s", aside)
    if predictions.exists():
        if not record.exists():
            raise ProvenanceMismatch(f"{predictions} holds answers but no {record.name} saying what produced them; "
                                     "rerun with --fresh to start it again (the old file is kept aside) or choose "
                                     "another --out")
        recorded = json.loads(record.read_text(encoding="utf-8"))
        changed = differences(recorded, dict(provenance))
        if changed:
            raise ProvenanceMismatch(f"{predictions} was made by other weights or settings ({'; '.join(changed)}); "
                                     "rerun with --fresh to start it again (the old file is kept aside) or choose "
                                     "another --out")
        return
    write_text_atomically(record, json.dumps(dict(provenance), indent=2, sort_keys=True) + "\n")


def exclusive_writer(predictions: Path) -> AbstractContextManager[None]:
    """Hold ``<predictions>.lock`` for the duration; a second writer is refused at once, never interleaved."""
    return exclusive_lock(predictions.with_name(predictions.name + ".lock"), lambda holder: ResultsBusy(
        f"{predictions} is being written by {holder}; wait for it to finish or choose another --out"))
