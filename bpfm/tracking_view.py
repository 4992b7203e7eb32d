"""What makes MLflow's UI show the study at a glance (docs/mlflow-ui.md): the experiment opens on
the runs of a model-training experiment (MLflow 3 opens an untyped one on its GenAI page), every
cell run carries a few numeric key metrics that sort in the runs table and plot in Compare (the
BHS grade and AAMI verdict are tags, which Compare cannot plot), and the grid run holds the
summary as an MLflow table artifact (Table II of the paper, one row per cell)."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
LEADERBOARD_TABLE = "leaderboard.json"
GRADE_SCORE = {"A": 4, "B": 3, "C": 2, "D": 1}  # higher is better, as the grades read
AAMI_SCORE = {"pass": 1, "fail": 0, "not_assessable": -1}  # sorts pass, fail, too few subjects


def mark_experiment(client: MlflowClient, experiment_id: str) -> None:
    """Open the experiment on its training runs, not on MLflow 3's GenAI pages."""
    experiment = client.get_experiment(experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def key_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """`mae_mean` (mean of SBP and DBP MAE, mmHg), `bhs_dbp` / `bhs_sbp` (A=4 ... D=1) and
    `aami_pass` (1 pass, 0 fail, -1 not assessable: fewer than 85 subjects), from a cell's test
    metrics and verdicts."""
    out: dict[str, float] = {}
    sbp, dbp = metrics.get("sbp_mae"), metrics.get("dbp_mae")
    if isinstance(sbp, int | float) and isinstance(dbp, int | float):
        mean = (float(sbp) + float(dbp)) / 2
        if math.isfinite(mean):
            out["mae_mean"] = mean
    for target in ("dbp", "sbp"):
        grade = GRADE_SCORE.get(str(metrics.get(f"{target}_bhs_grade")))
        if grade is not None:
            out[f"bhs_{target}"] = float(grade)
    aami = AAMI_SCORE.get(str(metrics.get("aami")))
    if aami is not None:
        out["aami_pass"] = float(aami)
    return out


def log_leaderboard_table(
    client: MlflowClient, grid_run_id: str, rows: list[dict[str, Any]]
) -> None:
    """The grid's summary (`bpfm.report.summary.table2_row` of every cell) as an MLflow table
    artifact of the grid run: the UI shows it in the run's Artifacts tab, sortable."""
    import pandas as pd  # lazy: pandas

    if not rows:
        return
    frame = pd.DataFrame(rows)
    if not any(f.path == LEADERBOARD_TABLE for f in client.list_artifacts(grid_run_id)):
        client.log_table(grid_run_id, data=frame, artifact_file=LEADERBOARD_TABLE)
        return
    # a resumed launch: log_table would append its rows to the earlier table; the summary is
    # whole (read back from MLflow), so it replaces the file, in log_table's own format
    with tempfile.TemporaryDirectory(prefix="bpfm-table-") as tmp:
        path = Path(tmp) / LEADERBOARD_TABLE
        frame.to_json(path, orient="split", index=False, date_format="iso")
        client.log_artifact(grid_run_id, str(path))
