"""Helpers for the fault tests of training, profiles and launches: a real `bpfm` process, its
one error line, and a small real file system to fill."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Finished:
    rc: int
    stdout: str
    stderr: str
    seconds: float


def run_bpfm(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
             preexec_fn=None) -> Finished:
    """`python -m bpfm.cli ARGS` as its own process, with this checkout on the path."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bpfm.cli", *args], capture_output=True, text=True,
        env=environment, timeout=timeout, cwd=REPO_ROOT, preexec_fn=preexec_fn,
    )
    return Finished(done.returncode, done.stdout, done.stderr, time.monotonic() - start)


def error_line(result: Finished) -> str:
    """The one `bpfm: error:` line of a failed run (exit 2, no traceback, nothing else)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("bpfm: error:")]
    assert result.rc == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "\n" not in lines[0]
    return lines[0]


@dataclass
class SmallDisk:
    """A small file system at `path`: a real tmpfs where this process may mount one (root),
    else the same limit as a file-size rlimit on the bpfm process (EFBIG instead of ENOSPC)."""

    path: Path
    kind: str  # "tmpfs" | "rlimit"
    size_mb: int

    def resize(self, size_mb: int) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["mount", "-o", f"remount,size={size_mb}m", str(self.path)],
                           check=True)
        self.size_mb = size_mb

    def preexec(self):
        limit = self.size_mb * 2**20 if self.kind == "rlimit" else None

        def setup() -> None:
            os.umask(0o022)
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        return setup


@pytest.fixture
def small_disk(tmp_path: Path):
    path = tmp_path / "disk"
    path.mkdir()
    mount = shutil.which("mount")
    mounted = mount is not None and subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(path)], capture_output=True
    ).returncode == 0
    try:
        yield SmallDisk(path, "tmpfs" if mounted else "rlimit", 30)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)
