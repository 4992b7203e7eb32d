"""Read a study's finished runs from MLflow into flat tables (one row per run).

Conventions (DESIGN section 8, `bpfm.tracking`): a child run per trial (`bpfm.kind=train`) with the
axis params and the test metrics, a run per quantization variant (`bpfm.kind=quant`) nested under
its trial through MLflow's `mlflow.parentRunId` tag."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from bpfm.errors import BpfmError

log = logging.getLogger(__name__)

KIND_TAG = "bpfm.kind"
PARENT_TAG = "mlflow.parentRunId"
AXES = ("source", "protocol", "size", "freeze", "epochs", "init", "seed")
QUANT_PARAMS = ("mode", "observer", "weights", "backend")
STRING_TAGS = ("sbp_bhs_grade", "dbp_bhs_grade", "sbp_aami", "dbp_aami", "aami")
# Runs the tables compare: trained grid cells (search trials stopped early carry no test metrics;
# nightly runs hold only the comparison).
MODEL_KINDS = ("train",)


@dataclass(frozen=True)
class StudyRuns:
    """The finished runs of one or more experiments, as flat frames."""

    train: pd.DataFrame  # one row per trained model: experiment, run_id, axes, metrics, tags
    quant: pd.DataFrame  # one row per quantized variant, with its trial's axes


def _search_finished(client: MlflowClient, experiment_id: str) -> Iterator[Run]:
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string="attributes.status = 'FINISHED'",
            max_results=1000,
            page_token=token,
        )
        yield from page
        token = page.token
        if not token:
            return


def run_row(run: Run, experiment: str) -> dict:
    """A run as one flat row: ids, every param (strings), every metric (floats), bpfm's tags."""
    tags = run.data.tags
    row: dict = {
        "experiment": experiment,
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "kind": tags.get(KIND_TAG, ""),
        "parent_run_id": tags.get(PARENT_TAG),
        "start_time": run.info.start_time,
        "profile": tags.get("bpfm.profile", ""),
    }
    row.update({f"param.{k}": v for k, v in run.data.params.items()})
    row.update(run.data.metrics)
    row.update({k: tags[k] for k in STRING_TAGS if k in tags})
    for axis in AXES + QUANT_PARAMS + ("data", "head"):
        row[axis] = run.data.params.get(axis)
    return row


def _latest_per_cell(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """A cell trained again (a later launch, a nightly run, another recipe) is represented by its
    latest finished run."""
    if frame.empty:
        return frame
    keys = [k for k in keys if k in frame.columns]
    ordered = frame.sort_values("start_time")
    return ordered.drop_duplicates(subset=keys, keep="last").reset_index(drop=True)


def load_study(
    client: MlflowClient, experiments: Sequence[str], *, kinds: Sequence[str] = MODEL_KINDS
) -> StudyRuns:
    """Finished model and quantization runs of the named experiments.

    An unknown experiment, or one without a finished model run, is the user's mistake: one line
    naming the experiment and the tracking URI."""
    if not experiments:
        raise BpfmError("leaderboard: --experiment: name at least one MLflow experiment")
    rows: list[dict] = []
    for name in experiments:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise BpfmError(
                f"{client.tracking_uri}: experiment {name!r}: no such MLflow experiment"
            )
        found = [run_row(run, name) for run in _search_finished(client, experiment.experiment_id)]
        if not any(row["kind"] in kinds for row in found):
            raise BpfmError(
                f"{client.tracking_uri}: experiment {name!r}: no finished runs with "
                f"bpfm.kind in {'/'.join(kinds)}"
            )
        log.info("experiment %s: %d finished runs", name, len(found))
        rows.extend(found)
    frame = pd.DataFrame(rows)
    train = frame[frame["kind"].isin(kinds)].copy()
    train = _latest_per_cell(train, ["experiment", *AXES])
    quant = frame[frame["kind"] == "quant"].copy()
    quant = _attach_trial_axes(quant, train)
    quant = _latest_per_cell(quant, ["experiment", "parent_run_id", *QUANT_PARAMS])
    return StudyRuns(train=train.reset_index(drop=True), quant=quant.reset_index(drop=True))


def _attach_trial_axes(quant: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """Each quantization run inherits the axes of the trial it is nested under; a quant run whose
    trial is not a finished model run cannot be placed in the tables and is dropped."""
    if quant.empty:
        return quant
    axes = train[["run_id", *AXES]].rename(columns={"run_id": "parent_run_id"})
    own = quant.drop(columns=[a for a in AXES if a in quant.columns])
    return own.merge(axes, on="parent_run_id", how="inner")
