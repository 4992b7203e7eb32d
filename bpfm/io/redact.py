"""The one redaction of everything bpfm prints, logs or records: error lines (`BpfmError`
redacts its own message), log records of bpfm's loggers in every process (`redact_bpfm_logs`,
installed when bpfm is imported: Ray trials and worker pools set up logging their own way), the
CLI's log lines and results, MLflow params, tags and artifacts.

Masked: values of environment variables whose names look secret (S3 keys, tokens, passwords),
credentials written inside a URI (`s3://KEY:SECRET@bucket/...`, `http://user:pass@host`: the
whole user-info part, since an S3 access key id is half a credential), and secret-looking query
parameters (`?token=...`)."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***"

_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|SESSION|API_KEY", re.I)
_SECRET_QUERY = re.compile(r"(?i)([?&](?:[\w.-]*(?:secret|token|password|key)[\w.-]*)=)[^&\s]*")
# `user:password@` (the password may hold '/', as AWS secret keys do) or `user@`; a '/' before
# any ':' ends the authority, so an '@' in a path (`s3://bucket/a@b`) is left alone.
_URI_USERINFO = re.compile(r"([a-zA-Z][\w+.-]*://)(?:[^/@\s:]*:[^@\s]*?|[^/@\s:]+)@")


def _secret_values() -> list[str]:
    values = [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 6]
    return sorted(set(values), key=len, reverse=True)


def redact(value: Any) -> str:
    """`value` as a string that is safe to print, log or record."""
    text = str(value)
    for secret in _secret_values():
        text = text.replace(secret, MASK)
    text = _URI_USERINFO.sub(rf"\1{MASK}@", text)
    return _SECRET_QUERY.sub(rf"\1{MASK}", text)


class RedactingFormatter(logging.Formatter):
    """A log formatter whose every line (message, arguments and traceback) is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def redact_bpfm_logs() -> None:
    """Redact the message of every log record of a `bpfm.*` logger as it is made, whatever
    handlers and formats the process uses. Installed once per process."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "bpfm_redacts", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.name == "bpfm" or record.name.startswith("bpfm."):
            record.msg, record.args = redact(record.getMessage()), ()
        return record

    factory.bpfm_redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
