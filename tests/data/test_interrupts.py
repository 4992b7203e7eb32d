"""Issue 15 item 3: SIGINT / SIGTERM to a real `bpfm data shard` always abort it: exit 130 /
143, nothing published (the previous set untouched), no staging left, worker processes gone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bpfm.data.shards import MANIFEST, write_shards

COPIES = 6  # the real sample under six subset names: seconds of conversion after the first


@pytest.fixture(scope="module")
def many_inputs(challenge2015_file, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    for i in range(COPIES):
        shutil.copyfile(challenge2015_file, folder / f"Copy{i}_Subset.mat")
    return folder


def _shard_then_signal(inputs: Path, out: Path, signum: int, workers: int, group: bool):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [sys.executable, "-m", "bpfm.cli", "data", "shard", str(inputs), "--out", str(out),
               "--workers", str(workers)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    seen, children = [], []
    for line in proc.stderr:  # signal once the first file is being converted
        seen.append(line)
        if ": converting " in line:
            children = psutil.Process(proc.pid).children(recursive=True)
            if group:  # Ctrl-C in a terminal: the whole process group gets it
                os.killpg(proc.pid, signum)
            else:
                proc.send_signal(signum)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    return proc.returncode, "".join(seen) + rest, children


@pytest.mark.slow
@pytest.mark.parametrize("signum, workers, group", [
    (signal.SIGINT, 1, False), (signal.SIGTERM, 1, False), (signal.SIGINT, 2, False),
    (signal.SIGTERM, 2, False), (signal.SIGINT, 2, True),
])
def test_a_signal_during_data_shard_aborts_and_publishes_nothing(
    many_inputs, challenge2015_file, tmp_path, signum, workers, group
):
    out = tmp_path / "s"
    old = write_shards([challenge2015_file], str(out))  # a published set that must survive
    rc, stderr, children = _shard_then_signal(many_inputs, out, signum, workers, group)
    assert rc == 128 + signum, stderr
    name = signal.Signals(signum).name
    assert f"bpfm: interrupted by {name}: stopped, nothing published" in stderr
    assert "Traceback" not in stderr
    assert json.loads((out / MANIFEST).read_text())["generation"] == old["generation"]
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, old["generation"]])
    if workers > 1:
        assert children, "the conversion ran in worker processes"
    # workers (and multiprocessing's resource tracker) end with the command, not later
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
