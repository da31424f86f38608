"""The one exception family the command line reports as a user error: one line saying what to fix, exit status 2
(the traceback only with ``-v`` or ``IVTLR_DEBUG=1``). Everything else is a bug and keeps its traceback."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class UserError(Exception):
    """Input the user can fix: a config value, a data file, a checkpoint folder, a command-line option."""


class DataFileError(UserError, ValueError):
    """A data file that cannot be read as a dataset split; the message names the file (and the line, when known)."""


class MissingDataFileError(DataFileError, FileNotFoundError):
    """A data file that does not exist."""


class NoSpaceLeft(UserError, OSError):
    """A write failed because the disk (or quota) is full."""


#: Free space below which a failed write is blamed on a full disk (torch's zip writer reports only a short write).
_LOW_SPACE_BYTES = 64 << 20


def is_out_of_space(error: BaseException, path: str | os.PathLike) -> bool:
    """Whether ``error``, raised while writing under ``path``, comes from a full disk or quota."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(error) or "os error 28" in str(error):
        return True
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free < _LOW_SPACE_BYTES
    except OSError:
        return False
