"""A trial's test predictions (its Parquet artifact), joined with the subjects' demographics.

The artifact holds `segment_id, subject, sbp, dbp, sbp_hat, dbp_hat`; age and gender live in the
shards, so they are joined by `segment_id` when the run's `data` URI is reachable from here."""

from __future__ import annotations

import logging
import tempfile

import pandas as pd
import pyarrow.compute as pc
from mlflow.tracking import MlflowClient

from bpfm.data.shards import open_shards
from bpfm.errors import BpfmError

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("segment_id", "subject", "sbp", "dbp", "sbp_hat", "dbp_hat")
DEMOGRAPHICS = ("age", "gender")


def find_predictions_artifact(client: MlflowClient, run_id: str, path: str = "") -> str | None:
    """The run's predictions Parquet artifact (searched two folder levels deep), or None."""
    folders = []
    for item in client.list_artifacts(run_id, path or None):
        name = item.path.rsplit("/", 1)[-1]
        if not item.is_dir and name.endswith(".parquet") and "prediction" in name:
            return item.path
        if item.is_dir and path.count("/") < 1:
            folders.append(item.path)
    for folder in folders:
        found = find_predictions_artifact(client, run_id, folder)
        if found:
            return found
    return None


def load_predictions(client: MlflowClient, run_id: str) -> pd.DataFrame | None:
    """The run's predictions as a frame, or None when it logged none (or an unusable file)."""
    artifact = find_predictions_artifact(client, run_id)
    if artifact is None:
        log.info("run %s: no predictions artifact", run_id)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, artifact, tmp)
        frame = pd.read_parquet(local)
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        log.warning("run %s: %s lacks columns %s; skipped", run_id, artifact, missing)
        return None
    return frame


def read_demographics(data_uri: str, segment_ids: list[str]) -> pd.DataFrame:
    """Age and gender of the given segments from the shard set at `data_uri`."""
    dataset = open_shards(data_uri).dataset()
    table = dataset.to_table(
        columns=["segment_id", *DEMOGRAPHICS],
        filter=pc.field("segment_id").isin(segment_ids),
    )
    return table.to_pandas().drop_duplicates("segment_id")


def attach_demographics(
    predictions: pd.DataFrame, data_uri: str | None
) -> tuple[pd.DataFrame, str]:
    """Predictions with `age` and `gender` columns, and where they came from. Columns that cannot
    be found stay NaN / None, which the subgroup table reports as `unknown`."""
    frame = predictions.copy()
    if all(column in frame.columns for column in DEMOGRAPHICS):
        return frame, "predictions artifact"
    if not data_uri:
        status = "unknown (the run logged no data URI)"
    else:
        try:
            demographics = read_demographics(data_uri, frame["segment_id"].astype(str).tolist())
        except (BpfmError, OSError, ImportError, ValueError) as err:
            status = f"unknown (shards at {data_uri} not readable: {err})"
        else:
            frame = frame.drop(columns=[c for c in DEMOGRAPHICS if c in frame.columns])
            frame = frame.merge(demographics, on="segment_id", how="left")
            return frame, f"shards at {data_uri}"
    for column in DEMOGRAPHICS:
        if column not in frame.columns:
            frame[column] = None
    log.info("demographics: %s", status)
    return frame, status
