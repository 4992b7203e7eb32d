"""MLflow conventions: one experiment per study, a parent run per grid launch, a child run per grid
cell, and per quantization variant a run nested under its cell. Ray-free: the driver and the Ray
workers call the same functions with the same tracking URI.

Everything logged passes through `redact`: a value that holds a secret from the environment (S3
keys, tokens, passwords) or credentials inside a URI is masked before it reaches MLflow."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bpfm import defaults
from bpfm.errors import BpfmError
from bpfm.io.redact import redact
from bpfm.metrics import TARGETS

if TYPE_CHECKING:  # torch is a heavy import the report and search never need
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from torch import nn

    from bpfm.quant.quantized import QuantizedModel

log = logging.getLogger(__name__)

# Tags that identify what a run is; REPORT's search / leaderboard / nightly read the same keys.
KIND = "bpfm.kind"  # grid | train | quant | search | nightly | leaderboard
STUDY = "bpfm.study"
PROFILE = "bpfm.profile"
# the cell id (bpfm.orchestration.grid.Cell.id) of a train run and of its quant runs
CELL = "bpfm.cell"
TRIAL = "bpfm.trial"  # the Tune trial that trained the cell (cells of one trial share a prefix)
VARIANT = "bpfm.variant"  # the quantization variant of a quant run
KEY = "bpfm.key"  # unique per parent run: finds a child again when a trial or a launch resumes
TUNE_PATH = "bpfm.tune_path"  # the Tune experiment a grid run belongs to
GRID_RUN = "bpfm.grid_run"  # the grid launch's parent run, on every run below it
NODE = "bpfm.node"  # the Ray node that trained a cell
GPU_IDS = "bpfm.gpu_ids"  # the GPUs Ray assigned the trial ("" without GPUs)
TRIAL_STARTED = "bpfm.trial_started"  # when the trial's process began and ended its work
TRIAL_ENDED = "bpfm.trial_ended"  # (Unix seconds): when it held its resources
PARENT = "mlflow.parentRunId"

FINAL_METRICS = tuple(
    f"{t}_{m}"
    for t in TARGETS
    for m in ("mae", "me", "sd", "rmse", "r2", "mase", "bhs5", "bhs10", "bhs15")
)
EXTRA_METRICS = (
    "sbp_mae_ci_low",
    "sbp_mae_ci_high",
    "dbp_mae_ci_low",
    "dbp_mae_ci_high",
    "n",
    "n_subjects",
)
EPOCH_METRICS = ("train_loss", "val_mae")
QUANT_METRICS = ("size_mib", "latency_ms_b1", "latency_ms_b64")
GRADE_TAGS = ("sbp_bhs_grade", "dbp_bhs_grade", "aami", "sbp_aami", "dbp_aami")
MODEL_ALIAS = "best"


def safe_params(values: Mapping[str, Any], allowed: Iterable[str]) -> dict[str, str]:
    """Only allow-listed keys, each value redacted: what a run's params may hold."""
    allowed = set(allowed)
    return {k: redact(_param_text(v))[:6000] for k, v in values.items() if k in allowed}


def _param_text(value: Any) -> str:
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, sort_keys=True, default=str)
    return "None" if value is None else str(value)


def _not_the_pickle_warning(record: logging.LogRecord) -> bool:
    return "Pickle or CloudPickle" not in record.getMessage()


def configure() -> str:
    """Tracking URI for this process (env or embedded sqlite), with MLflow telemetry off and no
    download progress bars (dozens of Ray tasks would interleave them in the job's output).
    MLflow's warning on every pickle-format model is dropped: pickle is deliberate here (torch.ao
    INT8 modules cannot be exported as pt2) and mlflow/README.md says so once."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    pytorch_log = logging.getLogger("mlflow.pytorch")
    if _not_the_pickle_warning not in pytorch_log.filters:
        pytorch_log.addFilter(_not_the_pickle_warning)
    return defaults.tracking_uri()


def client(uri: str | None = None) -> MlflowClient:
    """An MlflowClient for `uri` (default: this process's tracking URI), in a configured process
    whose MLflow store is `uri` too (see `use`)."""
    from mlflow import MlflowClient  # lazy: mlflow

    uri = uri or configure()  # also in Ray workers, which get the URI passed in
    configure()
    use(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def use(uri: str) -> None:
    """Make `uri` this process's MLflow tracking and registry store. A client's own URI does not
    reach everything it calls: MLflow 3 resolves a run's logged models (`list_artifacts`,
    `download_artifacts` of `model/`) through the process-wide registry URI, whose default is
    `./mlflow.db` in the working folder (a stray store, and `Logged model ... not found`)."""
    import mlflow  # lazy: mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def _artifact_root(uri: str, name: str) -> str | None:
    """For a sqlite store, artifacts beside the database (MLflow's default is ./mlruns in cwd)."""
    if not uri.startswith("sqlite:///"):
        return None  # a server decides (proxied artifacts, e.g. to S3)
    db = Path(uri.removeprefix("sqlite:///"))
    return (db.parent / "mlartifacts" / name).absolute().as_uri()


def ensure_experiment(mlflow_client: MlflowClient, name: str) -> str:
    """The study's experiment id, created on first use."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = _artifact_root(mlflow_client.tracking_uri, name)
    return mlflow_client.create_experiment(name, artifact_location=location)


def find_runs(
    mlflow_client: MlflowClient, experiment_id: str, tags: Mapping[str, str]
) -> list[Run]:
    filters = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return list(
        mlflow_client.search_runs(
            [experiment_id], filter_string=filters, order_by=["attributes.start_time DESC"]
        )
    )


def start_grid_run(
    mlflow_client: MlflowClient,
    experiment_id: str,
    *,
    name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
    resume: bool,
) -> str:
    """The parent run of a grid launch; a resumed launch continues its earlier parent run."""
    if resume and tags.get(TUNE_PATH):
        same_launch = {KIND: tags[KIND], TUNE_PATH: tags[TUNE_PATH]}
        previous = find_runs(mlflow_client, experiment_id, same_launch)
        if previous:
            run_id = previous[0].info.run_id
            mlflow_client.update_run(run_id, status="RUNNING")
            return run_id
    run = mlflow_client.create_run(
        experiment_id, run_name=name, tags={k: redact(v) for k, v in tags.items()}
    )
    _log(
        mlflow_client,
        run.info.run_id,
        params={k: redact(_param_text(v)) for k, v in params.items()},
    )
    return run.info.run_id


def child_run(
    mlflow_client: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    *,
    key: str,
    name: str,
    tags: Mapping[str, str],
    params: Mapping[str, str],
) -> tuple[str, bool]:
    """The child run for `key` under the parent, created once; returns (run id, finished)."""
    found = find_runs(mlflow_client, experiment_id, {PARENT: parent_run_id, KEY: key})
    if found:
        run = found[0]
        return run.info.run_id, run.info.status == "FINISHED"
    all_tags = {PARENT: parent_run_id, KEY: key, **{k: redact(v) for k, v in tags.items()}}
    run = mlflow_client.create_run(experiment_id, run_name=name, tags=all_tags)
    _log(mlflow_client, run.info.run_id, params=params)
    return run.info.run_id, False


def _log(
    mlflow_client: MlflowClient,
    run_id: str,
    *,
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
    step: int = 0,
) -> None:
    from mlflow.entities import Metric, Param, RunTag  # lazy: mlflow

    now = int(time.time() * 1000)
    mlflow_client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
        params=[Param(k, v) for k, v in (params or {}).items()],
        tags=[RunTag(k, redact(v)) for k, v in (tags or {}).items()],
    )


def log_epoch(
    mlflow_client: MlflowClient, run_id: str, epoch: int, values: Mapping[str, float | None]
) -> None:
    """Per-epoch curves (`train_loss`, `val_mae`), step = epoch."""
    metrics = {k: v for k, v in values.items() if k in EPOCH_METRICS and _is_number(v)}
    if metrics:
        _log(mlflow_client, run_id, metrics=metrics, step=epoch)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def log_results(
    mlflow_client: MlflowClient,
    run_id: str,
    metrics: Mapping[str, Any],
    *,
    extra: Iterable[str] = (),
) -> None:
    """Final test metrics (mmHg, BHS %) and the clinical verdicts as tags."""
    names = (*FINAL_METRICS, *EXTRA_METRICS, *extra)
    numbers = {k: metrics[k] for k in names if _is_number(metrics.get(k))}
    tags = {k: str(metrics[k]) for k in GRADE_TAGS if metrics.get(k) is not None}
    _log(mlflow_client, run_id, metrics=numbers, tags=tags)


def log_model_dir(mlflow_client: MlflowClient, run_id: str, model_dir: str | Path) -> None:
    """Artifacts of a trained cell: `model/` (weights, redacted config, metrics),
    `predictions/predictions.parquet`, `plots/{bland_altman,scatter}.png`."""
    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix="bpfm-art-") as tmp:
        staged = Path(tmp) / "model"
        staged.mkdir()
        for item in model_dir.iterdir():
            if item.is_file() and item.suffix in {".safetensors", ".json", ".pt"}:
                if item.suffix == ".json":
                    (staged / item.name).write_text(redact(item.read_text()))
                else:
                    shutil.copy2(item, staged / item.name)
        mlflow_client.log_artifacts(run_id, str(staged), "model")
        predictions = model_dir / "predictions.parquet"
        if predictions.is_file():
            mlflow_client.log_artifact(run_id, str(predictions), "predictions")
            plots = Path(tmp) / "plots"
            _draw_plots(predictions, plots, title=model_dir.name)
            mlflow_client.log_artifacts(run_id, str(plots), "plots")


def _draw_plots(predictions: Path, folder: Path, title: str) -> None:
    # matplotlib and pandas load only where plots are drawn (trial workers, not the driver)
    import pandas as pd  # lazy: pandas

    from bpfm.report.plots import bland_altman, scatter  # lazy: matplotlib, pandas

    frame = pd.read_parquet(predictions)
    bland_altman(frame, folder / "bland_altman.png", title)
    scatter(frame, folder / "scatter.png", title)


def download_model_dir(mlflow_client: MlflowClient, run_id: str, dst: str | Path) -> Path:
    """A trained cell's model dir back from its run's artifacts (stage 2 runs on any node)."""
    path = mlflow_client.download_artifacts(run_id, "model", str(dst))
    return Path(path)


def finish(mlflow_client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    mlflow_client.set_terminated(run_id, status=status)


def log_torch_model(
    tracking_uri: str, run_id: str, model: nn.Module, name: str, registered_name: str | None = None
) -> str:
    """Log a torch model as an MLflow model of the run and return its model URI. Pickle format:
    MLflow's default pt2 format cannot serialise torch.ao's packed INT8 weights, and one format
    for every model keeps `mlflow.pytorch.load_model` the only way back."""
    import mlflow  # lazy: mlflow
    import torch  # lazy: torch

    mlflow.set_tracking_uri(tracking_uri)
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            serialization_format="pickle",
            pip_requirements=[torch_pin],
            registered_model_name=registered_name,
        )
    return info.model_uri


def log_quantized_model(tracking_uri: str, run_id: str, quantized: QuantizedModel,
                        name: str = "quantized_model") -> str:
    """A quantized model as an MLflow model of its run; a pt2e model is an exported program
    (no pickle), whose `model.pt2` is logged as an artifact instead."""
    from bpfm.quant.fx import ao_warnings_filtered  # lazy: torch

    if quantized.config.backend == "pt2e" and quantized.config.mode != "fp32":
        raise BpfmError("quantize: mlflow: a pt2e model is an exported program; log its "
                        "model.pt2 (save_quantized) as an artifact instead")
    with ao_warnings_filtered():
        return log_torch_model(tracking_uri, run_id, quantized, name)


def register_best(
    mlflow_client: MlflowClient,
    tracking_uri: str,
    run_id: str,
    model: nn.Module,
    name: str,
    alias: str = MODEL_ALIAS,
) -> str:
    """Register a cell's model under `name` and point `alias` at the new version."""
    log_torch_model(tracking_uri, run_id, model, "model", registered_name=name)
    versions = mlflow_client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    version = max(versions, key=lambda v: int(v.version)).version
    mlflow_client.set_registered_model_alias(name, alias, version)
    return f"models:/{name}@{alias}"


def runs_of(
    mlflow_client: MlflowClient, experiment_id: str, parent_run_id: str, kind: str
) -> list[Run]:
    """Children of one grid launch, e.g. its train runs or (through each train run) quant runs."""
    return find_runs(mlflow_client, experiment_id, {PARENT: parent_run_id, KIND: kind})
