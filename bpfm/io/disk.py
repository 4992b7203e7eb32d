"""A full disk as one line: the file, the bytes writing it needed and the bytes free.

ENOSPC (also a quota, EDQUOT, or a file-size limit, EFBIG) reaches bpfm in several disguises:
an OSError from Python's writes, or a RuntimeError from torch's zip writer whose cause or
context is that OSError. `reporting_full_disk` finds it in the chain and says what happened."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from bpfm.errors import BpfmError

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def no_space_cause(err: BaseException | None) -> OSError | None:
    """The out-of-space OSError behind `err` (itself, or in its cause / context chain)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def free_bytes(path: str | Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    return shutil.disk_usage(folder).free


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


@contextlib.contextmanager
def reporting_full_disk(
    path: str | Path, needed: int | Callable[[], int] | None = None
) -> Iterator[None]:
    """Turn running out of space while writing `path` into a one-line BpfmError. `needed`: the
    bytes the file takes (or how to count them, only asked on failure). Remove partial files
    inside the block: the free space is measured after it."""
    try:
        yield
    except Exception as err:
        cause = no_space_cause(err)
        if cause is None:
            raise
        size = needed() if callable(needed) else needed
        free = f"{_mb(free_bytes(path))} free"
        space = f"writing it needs {_mb(size)} ({size} bytes), {free}" if size is not None else free
        reason = (cause.strerror or "no space left on device").lower()
        raise BpfmError(
            f"{path}: {reason}: {space}; free some space (or choose another --out) and run the "
            "same command again"
        ) from None
