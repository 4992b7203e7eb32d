"""A trial's scratch folder (its checkpoints before Tune copies them) is named after its host and
process, and a new trial removes the folders of this host's trial processes that no longer run:
Ray kills a dead driver's trials without running their cleanup."""

import os
import socket
import subprocess
import sys
import tempfile

from bpfm.orchestration.ray_grid import TRIAL_WORK_PREFIX, trial_work_dir


def test_new_trials_remove_the_scratch_of_dead_trial_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    mine = f"{TRIAL_WORK_PREFIX}{socket.gethostname()}"
    dead = tmp_path / f"{mine}-{finished.stdout.strip()}-abc123"
    (dead / "out" / "epoch-1").mkdir(parents=True)
    (dead / "out" / "epoch-1" / "checkpoint.pt").write_bytes(b"x" * 1024)
    running = tmp_path / f"{mine}-{os.getppid()}-def456"
    other_host = tmp_path / f"{TRIAL_WORK_PREFIX}other-host-{finished.stdout.strip()}-ghi789"
    legacy = tmp_path / f"{TRIAL_WORK_PREFIX}legacy_name"
    for kept in (running, other_host, legacy):
        kept.mkdir()

    work = trial_work_dir()

    assert not dead.exists()
    assert running.is_dir() and other_host.is_dir() and legacy.is_dir()
    assert work.is_dir() and work.parent == tmp_path
    assert work.name.startswith(f"{mine}-{os.getpid()}-")
    assert trial_work_dir() != work  # a second trial in the same process gets its own
