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


class OutputLocationError(UserError, OSError):
    """An output folder that cannot be created or written: a file in the way, or no write permission."""


class UnsupportedModelSetting(UserError, ValueError):
    """A model name or setting the chosen family cannot run (an unknown tiny family, an image size it cannot tile)."""


def check_output_dir(path: str | os.PathLike, option: str) -> None:
    """Refuse an output folder that could not be created or written, before a command spends minutes loading a model
    only to fail at its first write; ``option`` names the setting to fix (``save_path``, ``--out``)."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputLocationError(f"{option} {path} cannot be a folder: {existing} is a file; choose another location")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputLocationError(f"{option} {path} is not writable ({existing} does not allow writing); choose "
                                  "another location")


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
