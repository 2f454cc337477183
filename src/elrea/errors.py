"""User-facing errors.

Every mistake a user can make (bad data, bad config, a missing run file) raises an
`ElreaError` subclass whose message says what is wrong, where, and what would be valid.
The CLI prints these without a traceback and exits with status 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class ElreaError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class ConfigError(ElreaError):
    """An invalid configuration value; the message names the field."""


class DataError(ElreaError):
    """A bad record or data file; the message names the file, line/row and field."""

    def __init__(self, message: str, path: str | None = None, line: int | str | None = None,
                 field: str | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:  # a line number, or a label such as "row 3"
                where += f":{line}" if isinstance(line, int) else f" {line}"
            where += ": "
        if field is not None:
            where += f"field '{field}': "
        super().__init__(where + message)
        self.path, self.line, self.field = path, line, field


class RunDirError(ElreaError):
    """A run directory that is missing files, truncated, or from another backbone."""


class OutOfSpace(RunDirError):
    """The disk filled up while writing a file; nothing incomplete was committed."""

    def __init__(self, path):
        super().__init__(f"{path}: no space left on the device; nothing incomplete was kept. Free some "
                         "space (or write elsewhere) and re-run the same command: it resumes")
        self.path = path


class RunInUse(RunDirError):
    """Another process is writing the run directory."""


class ModelError(ElreaError):
    """A model that cannot be loaded or is not a causal LM."""


def unknown_name(kind: str, name: str, valid) -> ConfigError:
    """The error for a name missing from a registry: lists the valid names."""
    return ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")
