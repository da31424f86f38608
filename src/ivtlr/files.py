"""Writing result files so that a reader never sees half of one (a hidden temporary sibling, then a rename), and
one writer at a time (an exclusive lock)."""
from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ivtlr.errors import NoSpaceLeft, is_out_of_space


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


@contextmanager
def exclusive_lock(lock_path: Path, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` for the duration, so that two processes never write the same
    results interleaved; a second holder is refused at once with ``busy(holder)``, ``holder`` naming the process
    that has it. The kernel drops the lock of a process that dies, so a lock file left by a killed run blocks
    nothing."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise busy(handle.read().strip() or "another process") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
