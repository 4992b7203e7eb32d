"""bpfm.tracking on a real sqlite MLflow store (no Ray): naming, nesting, redaction, plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bpfm import tracking


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def store(store_root, request):
    """One sqlite store per module (creating one runs every migration: seconds), an experiment
    per test."""
    client = tracking.client(f"sqlite:///{store_root / 'mlflow.db'}")
    return client, tracking.ensure_experiment(client, request.node.name)


def test_redact_masks_secrets_from_the_environment_and_uri_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-abcdef-123")
    assert tracking.redact("key=s3cr3t-value-xyz;t=tok-abcdef-123") == "key=***;t=***"
    assert tracking.redact("s3://user:pw@bucket/x?secret_key=abc&region=eu") == (
        "s3://***@bucket/x?secret_key=***&region=eu"
    )
    assert tracking.redact("s3://bucket/shards") == "s3://bucket/shards"


def test_safe_params_keeps_only_allowed_keys_redacted(monkeypatch):
    monkeypatch.setenv("MY_PASSWORD", "hunter2-hunter2")
    params = tracking.safe_params(
        {"lr": 0.001, "data": "s3://a:hunter2-hunter2@b/c", "head_hidden": (64, 32), "other": 1},
        ["lr", "data", "head_hidden"],
    )
    assert params == {"lr": "0.001", "data": "s3://***@b/c", "head_hidden": "[64, 32]"}


def test_sqlite_store_keeps_artifacts_beside_the_database(store, store_root, request):
    client, experiment_id = store
    location = client.get_experiment(experiment_id).artifact_location
    assert location == (store_root / "mlartifacts" / request.node.name).as_uri()
    assert tracking.ensure_experiment(client, request.node.name) == experiment_id


def test_child_runs_are_found_again_by_key_and_nest_under_their_parent(store):
    client, experiment_id = store
    parent = tracking.start_grid_run(
        client, experiment_id, name="grid", resume=False,
        tags={tracking.KIND: "grid", tracking.TUNE_PATH: "/x/study"}, params={"profile": "demo"},
    )
    tags = {tracking.KIND: "train", tracking.CELL: "c1"}
    run_id, done = tracking.child_run(client, experiment_id, parent, key="c1", name="c1",
                                      tags=tags, params={"size": "small"})
    assert not done
    tracking.log_epoch(client, run_id, 1, {"train_loss": 0.5, "val_mae": 9.0, "lr": 1.0})
    tracking.log_results(client, run_id, {"sbp_mae": 4.0, "dbp_mae": 2.0, "aami": "pass",
                                          "sbp_bhs_grade": "A", "n": 10})
    tracking.finish(client, run_id)
    again, done = tracking.child_run(client, experiment_id, parent, key="c1", name="c1",
                                     tags=tags, params={"size": "small"})
    assert (again, done) == (run_id, True)
    run = client.get_run(run_id)
    assert run.data.tags[tracking.PARENT] == parent
    assert run.data.metrics["sbp_mae"] == 4.0 and "lr" not in run.data.metrics
    assert run.data.tags["aami"] == "pass" and run.data.tags["sbp_bhs_grade"] == "A"
    assert [m.step for m in client.get_metric_history(run_id, "val_mae")] == [1]
    assert tracking.runs_of(client, experiment_id, parent, "train")[0].info.run_id == run_id
    resumed = tracking.start_grid_run(
        client, experiment_id, name="grid", resume=True,
        tags={tracking.KIND: "grid", tracking.TUNE_PATH: "/x/study"}, params={},
    )
    assert resumed == parent


def test_model_dir_artifacts_hold_model_predictions_and_plots(store, tmp_path, monkeypatch):
    client, experiment_id = store
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key-1")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights")
    (model_dir / "config.json").write_text('{"data": "s3://b/x", "k": "very-secret-key-1"}')
    rng = np.random.default_rng(0)
    sbp, dbp = rng.normal(120, 10, 50), rng.normal(70, 8, 50)
    pq.write_table(pa.table({"segment_id": [str(i) for i in range(50)], "subject": ["s"] * 50,
                             "sbp": sbp, "dbp": dbp, "sbp_hat": sbp + rng.normal(0, 5, 50),
                             "dbp_hat": dbp + 1.0}), model_dir / "predictions.parquet")
    run_id = client.create_run(experiment_id).info.run_id
    tracking.log_model_dir(client, run_id, model_dir)
    listed = {a.path for folder in ("model", "predictions", "plots")
              for a in client.list_artifacts(run_id, folder)}
    assert listed == {"model/model.safetensors", "model/config.json",
                      "predictions/predictions.parquet", "plots/bland_altman.png",
                      "plots/scatter.png"}
    local = Path(client.download_artifacts(run_id, "model/config.json", str(tmp_path / "dl")))
    assert "very-secret-key-1" not in local.read_text()
    png = Path(client.download_artifacts(run_id, "plots/scatter.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:4] == b"\x89PNG"
