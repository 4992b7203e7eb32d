"""Publishing a local file atomically: write a temporary name in the same folder, then rename, so
that a reader sees the old file or the new one, never half of one. Every local file a reader may
open while it is written goes through `publish_file` (model dirs, model files, quantized models,
exports); `bpfm.io.storage.publish_bytes` uses it for local URIs (an S3 upload is visible only
once complete). Training checkpoints are folders and are published by renaming the folder
(`bpfm.training.state`)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bpfm.io.disk import reporting_full_disk


def publish_file(path: Path, write: Callable[[Path], None], needed: int | None = None) -> None:
    """Write through a temporary name in the same folder, then rename: readers never see half.
    A full disk is one line naming the file (and `needed`, its size, when known)."""
    # unique per writer; the suffix stays, since some writers go by it (torch.export.save: .pt2)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    with reporting_full_disk(path, needed):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            with open(tmp, "rb") as handle:  # on disk before the rename makes it visible
                os.fsync(handle.fileno())
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
