"""Every command uses the one MLflow store bpfm resolved: MLflow 3 looks a run's logged models up
through the process-wide store (default `./mlflow.db` in the working folder), not the client's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LOG_A_CELL = """
import sys
from pathlib import Path
import torch
from bpfm import tracking
client = tracking.client()
experiment = tracking.ensure_experiment(client, "one-store")
run = client.create_run(experiment).info.run_id
model = Path("cell-model"); model.mkdir()
(model / "model.safetensors").write_bytes(b"0" * 64)
client.log_artifacts(run, str(model), "model")
tracking.register_best(client, client.tracking_uri, run, torch.nn.Linear(2, 2), "one-store-best")
print(run)
"""

READ_THE_CELL = """
import sys
from bpfm import tracking
client = tracking.client()
files = [f.path for f in client.list_artifacts(sys.argv[1], "model")]
assert "model/model.safetensors" in files, files
print(sorted(p.name for p in tracking.download_model_dir(client, sys.argv[1], ".").iterdir()))
"""


def test_a_registered_cell_reads_back_from_the_default_store_and_no_stray_store(tmp_path):
    """The embedded default (sqlite under BPFM_HOME) with a registered model on a cell's run:
    listing and downloading its `model/` (what the leaderboard and stage 2 of a re-run do) works
    in a fresh process, and nothing writes `./mlflow.db` into the working folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(BPFM_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    work = tmp_path / "work"
    work.mkdir()

    def python(code: str, *args: str) -> str:
        done = subprocess.run([sys.executable, "-c", code, *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip().splitlines()[-1]

    run_id = python(LOG_A_CELL)
    assert "model.safetensors" in python(READ_THE_CELL, run_id)
    assert (tmp_path / "home" / "mlflow.db").is_file()
    assert not (work / "mlflow.db").exists() and not (work / "mlruns").exists()
