"""Errors a user can cause: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations

from pathlib import Path

from bpfm.io.redact import redact


class BpfmError(Exception):
    """Bad input or configuration: the message alone tells the user what to fix.

    The message is redacted when the error is made (a URI's credentials, secrets from the
    environment), so it is safe wherever it ends up: the CLI's line, Ray's error files, logs."""

    def __init__(self, *args: object):
        super().__init__(*(redact(arg) if isinstance(arg, str) else arg for arg in args))


class DataError(BpfmError):
    """A problem with one field of one input file."""

    def __init__(self, file: str | Path, field: str, problem: str):
        self.file = str(file)
        self.field = field
        self.problem = problem
        super().__init__(f"{self.file}: {field}: {problem}")

    def __reduce__(self):
        # Rebuild from the three parts so the error survives process pools and Ray tasks.
        return (DataError, (self.file, self.field, self.problem))
