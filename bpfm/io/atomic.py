"""Publishing a local file atomically: write a temporary name in the same folder, then rename, so
that a reader sees the old file or the new one, never half of one. Every local write of a result
(model dirs, checkpoints, quantized models, state files) goes through `publish_file`;
`bpfm.io.storage.publish_bytes` does the same for URIs (local or S3)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bpfm.io.disk import reporting_full_disk


def publish_file(path: Path, write: Callable[[Path], None], needed: int | None = None) -> None:
    """Write through a temporary name in the same folder, then rename: readers never see half.
    A full disk is one line naming the file (and `needed`, its size, when known)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with reporting_full_disk(path, needed):
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic JSON (NaN stays NaN, which Python's json reads back as a float)."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n"
    publish_file(path, lambda tmp: tmp.write_text(text), len(text.encode()))
