"""Writing result files so that a reader never sees half of one: a hidden temporary sibling, then a rename."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import NoSpaceLeft, is_out_of_space


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` in one step (an interrupted write leaves the old file, never a torn one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if is_out_of_space(error, path):
            raise NoSpaceLeft(f"no space left on the device of {path}: free space and rerun the same command "
                              f"({'the earlier ' + path.name + ' is kept' if path.exists() else 'nothing was written'})"
                              ) from error
        raise
    temporary.replace(path)
