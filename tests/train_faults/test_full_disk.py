"""A full disk while `bpfm train` checkpoints (issue 15, item 2), and the mode of a model dir's
files (item 12), on a real 30 MB tmpfs (or a file-size limit where mounting is not allowed)."""

from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest

from tests.train_faults.conftest import error_line, run_bpfm

pytestmark = pytest.mark.slow


def _train(data: str, out, epochs: int) -> list[str]:
    return ["train", "--data", data, "--size", "small", "--freeze", "unfrozen",
            "--epochs", str(epochs), "--batch-size", "8", "--max-steps-per-epoch", "1",
            "--device", "cpu", "--out", str(out)]


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_full_disk_while_checkpointing_is_one_line_and_the_rerun_cleans_up(
    synthetic_shards, small_disk
):
    out = small_disk.path / "run"
    # unfrozen small: the epoch-1 state (weights + Adam moments) is ~43 MB > 30 MB
    failed = run_bpfm(*_train(synthetic_shards, out, 2),
                      preexec_fn=small_disk.preexec())
    line = error_line(failed)
    state = out / "checkpoints" / "epoch-0001" / "state.pt"
    reason = "no space left on device" if small_disk.kind == "tmpfs" else "file too large"
    assert re.fullmatch(
        rf"bpfm: error: {re.escape(str(state))}: {reason}: writing it needs [\d.]+ MB "
        r"\((\d+) bytes\), [\d.]+ MB free; .*", line
    ), line
    needed = int(re.search(r"\((\d+) bytes\)", line).group(1))
    assert 40e6 < needed < 50e6
    leftovers = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert leftovers == []  # the temporary went with the failure
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()

    # A killed run's half-written checkpoint (named after its host and a dead process) is
    # removed by the next start; those of a running process or another host stay.
    host = socket.gethostname()
    dead, alive = _dead_pid(), os.getpid()
    stale = out / "checkpoints" / f".tmp-epoch-0001-{host}-{dead}"
    legacy = out / "checkpoints" / f".tmp-epoch-0002-{dead}"  # the name before hosts
    running = out / "checkpoints" / f".tmp-epoch-0003-{host}-{alive}"
    elsewhere = out / "checkpoints" / f".tmp-epoch-0004-otherhost-{dead}"
    for folder in (stale, legacy, running, elsewhere):
        folder.mkdir()
    small_disk.resize(100)
    (stale / "state.pt").write_bytes(b"\0" * 60_000_000)
    # needs ~58 MB (state + model): it only fits in 100 MB once the stale 60 MB are gone
    rerun = run_bpfm(*_train(synthetic_shards, out, 1),
                     preexec_fn=small_disk.preexec())
    assert rerun.rc == 0, rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert not stale.exists() and not legacy.exists()
    assert running.is_dir() and elsewhere.is_dir()
    assert (out / "metrics.json").is_file() and (out / "checkpoints" / "epoch-0001").is_dir()

    # item 12: the weights have the mode of every other file of the model dir
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == 0o644, modes
    assert set(modes.values()) == {0o644}, modes
