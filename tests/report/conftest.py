"""Fixtures of the report tests: MLflow sqlite stores (a migrated empty database is made once and
copied, since creating one costs seconds), planted runs, and a small grid profile."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.report.planted import plant_study


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite database with every migration applied."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path: Path, mlflow_db_template: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite store for one test, also as MLFLOW_TRACKING_URI; BPFM_HOME in tmp_path."""
    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(mlflow_db_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("BPFM_HOME", str(tmp_path / "home"))
    return uri


@pytest.fixture(scope="session")
def planted_store(tmp_path_factory, mlflow_db_template) -> tuple[str, dict[str, str]]:
    """(tracking URI, trial name -> run id) of a store with the planted study `planted` and an
    experiment `empty` that has no runs."""
    root: Path = tmp_path_factory.mktemp("planted-mlflow")
    shutil.copyfile(mlflow_db_template, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return uri, plant_study(uri, root / "artifacts")


@pytest.fixture(scope="module")
def local_ray():
    """Local Ray for one module (auth off), shut down after it so that other modules can start
    their own. Ray caches its auth mode when imported: reset it, as Ray's own tests do."""
    import ray
    from ray._private.authentication_test_utils import reset_auth_token_state

    from bpfm.orchestration.ray_grid import init_ray

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        env.delenv("RAY_ADDRESS", raising=False)
        reset_auth_token_state()
        init_ray(num_cpus=2, log_to_driver=False)  # a new local instance (RAY_ADDRESS unset)
        try:
            yield
        finally:
            ray.shutdown()
    reset_auth_token_state()


def write_profile(path: Path, *, data: str | dict, storage: Path, **overrides) -> Path:
    """A grid profile with one small cell trained for a couple of optimizer steps; `data` is a
    shard set URI or the profile's whole `data` mapping."""
    profile = {
        "study": "report-test",
        "data": data if isinstance(data, dict) else {"uri": data},
        "storage": str(storage),
        "axes": {"size": ["small"], "freeze": ["unfrozen"], "epochs": [2], "init": ["xavier"],
                 "source": ["mimic"], "protocol": ["paper"], "seed": [42]},
        "train": {"lr": 1e-3, "batch_size": 8, "eval_batch_size": 64, "max_steps_per_epoch": 1,
                  "keep_checkpoints": 1},
        "resources": {"small": {"cpu": 1}},
        "tune": {"max_failures": 0},
        "quantize_options": {"latency_runs": 1},
    }
    profile.update(overrides)
    path.write_text(yaml.safe_dump(profile))
    return path
