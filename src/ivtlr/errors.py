"""The one exception family the command line reports as a user error: one line saying what to fix, exit status 2
(the traceback only with ``-v`` or ``IVTLR_DEBUG=1``). Everything else is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """Input the user can fix: a config value, a data file, a checkpoint folder, a command-line option."""


class DataFileError(UserError, ValueError):
    """A data file that cannot be read as a dataset split; the message names the file (and the line, when known)."""


class MissingDataFileError(DataFileError, FileNotFoundError):
    """A data file that does not exist."""
