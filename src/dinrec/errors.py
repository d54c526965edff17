"""The exception types dinrec raises for problems a user can act on.

The CLI catches :class:`DinrecError` and prints its message (no stack trace);
anything else is a bug and is allowed to propagate.
"""

from __future__ import annotations


class DinrecError(Exception):
    """Base class of every error dinrec raises for bad input or bad state."""


class ShapeError(DinrecError, ValueError):
    """A tensor argument has the wrong rank, size or dtype."""


class DataFormatError(DinrecError, ValueError):
    """A malformed record in an input file, located as ``file:line: field: what``."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = message if field is None else f"{field}: {message}"
        super().__init__(f"{where}: {what}")


class RunFolderError(DinrecError):
    """A run folder is missing, incomplete, or does not match what was asked for."""
