"""An MLflow store filled, through the real client, with runs laid out as bpfm.tracking logs them:
a grid parent, trial runs with axis params, metrics, grade/AAMI tags and a predictions Parquet
artifact, and quantization runs nested under a trial. Predictions carry planted errors, so each
trial's BHS grade and AAMI verdict is known in advance."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from bpfm.metrics import compute_metrics, numeric_metrics

# |error| pattern (mmHg), repeated; signs alternate so that the mean error stays ~0.
ERRORS_GRADE_A = [2.0]  # all within 5: grade A, SD 2: AAMI pass
ERRORS_GRADE_B = [4.0] * 11 + [9.0] * 5 + [14.0] * 2 + [20.0] * 2  # 55/80/90 %: grade B, SD > 8
ERRORS_GRADE_D = [12.0]  # none within 10: grade D, SD 12: AAMI fail


@dataclass(frozen=True)
class PlantedTrial:
    source: str
    protocol: str
    size: str
    freeze: str
    init: str
    epochs: int
    sbp_errors: list[float]
    dbp_errors: list[float]
    subjects: int = 90
    segments_per_subject: int = 2
    seed: int = 42
    log_tags: bool = True  # False: the leaderboard must recompute grades from the metrics
    demographics: bool = False


def planted_predictions(trial: PlantedTrial) -> pd.DataFrame:
    n = trial.subjects * trial.segments_per_subject
    rng = np.random.default_rng(trial.seed)
    subjects = [f"s{i // trial.segments_per_subject:04d}" for i in range(n)]
    sbp = rng.uniform(80.0, 170.0, n)
    dbp = rng.uniform(50.0, 95.0, n)
    signs = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    sbp_err = np.resize(np.asarray(trial.sbp_errors), n) * signs
    dbp_err = np.resize(np.asarray(trial.dbp_errors), n) * signs
    frame = pd.DataFrame(
        {
            "segment_id": [f"train/{s}/{i}" for i, s in enumerate(subjects)],
            "subject": subjects,
            "sbp": sbp,
            "dbp": dbp,
            "sbp_hat": sbp - sbp_err,
            "dbp_hat": dbp - dbp_err,
        }
    )
    if trial.demographics:
        frame["age"] = np.where(np.arange(n) % 3 == 0, 35.0, 70.0)
        frame["gender"] = np.where(np.arange(n) % 2 == 0, "F", "M")
    return frame


def log_trial(
    client: MlflowClient, experiment_id: str, parent: str, trial: PlantedTrial,
    start_time: int | None = None,
) -> str:
    predictions = planted_predictions(trial)
    metrics = compute_metrics(
        predictions[["sbp", "dbp"]].to_numpy(),
        predictions[["sbp_hat", "dbp_hat"]].to_numpy(),
        predictions["subject"].tolist(),
    )
    tags = {"bpfm.kind": "train", "mlflow.parentRunId": parent}
    if trial.log_tags:
        tags.update({k: str(metrics[k]) for k in ("sbp_bhs_grade", "dbp_bhs_grade", "aami")})
    run = client.create_run(experiment_id, tags=tags, start_time=start_time)
    run_id = run.info.run_id
    params = {
        "source": trial.source, "protocol": trial.protocol, "size": trial.size,
        "freeze": trial.freeze, "init": trial.init, "epochs": trial.epochs, "seed": trial.seed,
        "data": "/nonexistent/shards", "lr": 1e-4, "head": "paper",
    }
    history = [Metric("val_mae", 10.0 - epoch, 0, epoch) for epoch in range(3)]
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, 0, 0) for k, v in numeric_metrics(metrics).items()] + history,
        params=[Param(k, str(v)) for k, v in params.items()],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.parquet"
        predictions.to_parquet(path)
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id


def log_quant(
    client: MlflowClient, experiment_id: str, trial_run: str, params: dict, metrics: dict
) -> str:
    run = client.create_run(
        experiment_id, tags={"bpfm.kind": "quant", "mlflow.parentRunId": trial_run}
    )
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


TRIALS = {
    "ft_unfrozen": PlantedTrial(
        "mimic", "paper", "small", "unfrozen", "pretrained", 100, ERRORS_GRADE_A, [1.0],
        demographics=True,
    ),
    "ft_frozen": PlantedTrial(
        "mimic", "paper", "small", "frozen", "pretrained", 100, ERRORS_GRADE_D, [3.0]
    ),
    "tfs_unfrozen": PlantedTrial(
        "mimic", "paper", "small", "unfrozen", "xavier", 100, ERRORS_GRADE_B, ERRORS_GRADE_B,
        log_tags=False,
    ),
    "vital_calbased": PlantedTrial(
        "vitaldb", "calbased", "small", "unfrozen", "pretrained", 100, [3.0], [2.0], subjects=20
    ),
    "vital_calfree": PlantedTrial(
        "vitaldb", "calfree", "small", "unfrozen", "pretrained", 100, [6.0], [4.0], subjects=20
    ),
}

QUANT = [
    ({"mode": "fp32", "observer": "none", "weights": "none", "backend": "none"},
     {"dbp_r2": 0.90, "sbp_r2": 0.93, "size_mib": 13.73, "latency_ms_b1": 5.0}),
    ({"mode": "dynamic", "observer": "none", "weights": "per_channel", "backend": "fx"},
     {"dbp_r2": 0.899, "sbp_r2": 0.929, "size_mib": 3.85, "latency_ms_b1": 3.0}),
    ({"mode": "static", "observer": "histogram", "weights": "per_channel", "backend": "fx"},
     {"dbp_r2": 0.895, "sbp_r2": 0.925, "size_mib": 3.83, "latency_ms_b1": 2.5}),
]


def plant_study(tracking_uri: str, artifacts: Path, experiment: str = "planted") -> dict[str, str]:
    """Fill the store; returns trial name -> run id."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(experiment, artifact_location=artifacts.as_uri())
    parent = client.create_run(experiment_id, tags={"bpfm.kind": "grid"}).info.run_id
    # An older launch trained the first cell badly; the later run must stand for the cell.
    older = dataclasses.replace(TRIALS["ft_unfrozen"], sbp_errors=ERRORS_GRADE_D)
    log_trial(client, experiment_id, parent, older, start_time=int(time.time() * 1000) - 86_400_000)
    run_ids = {name: log_trial(client, experiment_id, parent, t) for name, t in TRIALS.items()}
    for params, metrics in QUANT:
        log_quant(client, experiment_id, run_ids["ft_unfrozen"], params, metrics)
    client.set_terminated(parent)
    client.create_experiment("empty", artifact_location=(artifacts / "empty").as_uri())
    return run_ids
