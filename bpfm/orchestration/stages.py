"""The Ray-free work of the grid's stages, called by `bpfm.orchestration.ray_grid` in the driver and
in Ray workers: a trial's MLflow cell runs (stage 1), every quantization variant of a trained model
(stage 2), the best model per source and the summary (stage 3). Stage 0's data is
`bpfm.orchestration.grid.ensure_data`."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bpfm import tracking
from bpfm.errors import BpfmError
from bpfm.orchestration.grid import QUANT_COLUMNS, SUMMARY_COLUMNS, TRAIN_COLUMNS, Cell, TrialPlan
from bpfm.tracking_view import key_metrics

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from bpfm.training.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a launch shares (passed with `tune.with_parameters`)."""

    data: str
    train: dict[str, Any]  # profile recipe + --recipe overrides
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study: str
    profile: str = ""
    pretrained: dict[str, str] = field(default_factory=dict)  # size -> backbone checkpoint URI
    kind: str = "train"  # MLflow bpfm.kind of the cell runs (REPORT's search uses "search")
    checkpoint_every: int = 1


def train_config(config: dict[str, Any], ctx: TrialContext, out: str | Path) -> TrainConfig:
    """The TrainConfig of one trial: the shared recipe, then this trial's axes and overrides."""
    from bpfm.training.config import TrainConfig  # lazy: torch

    values = {**ctx.train, **{k: v for k, v in config.items() if k != "trial"}}
    values.update(data=ctx.data, out=str(out))
    if values.get("init", "xavier") != "xavier" and not values.get("checkpoint"):
        from bpfm.orchestration.backbones import backbone_key

        key = backbone_key(values["init"], values.get("size", "small"), values.get("source", ""),
                           values.get("protocol", ""))
        values["checkpoint"] = ctx.pretrained.get(key)
    values["report_epochs"] = tuple(values.get("report_epochs") or ())
    try:
        return TrainConfig.from_dict(values).validate()
    except TypeError as err:
        raise BpfmError(f"train config: {err}") from None


class CellLogger:
    """MLflow runs of one trial's cells: per-epoch curves, then at each cell's epoch its test
    metrics, model, predictions and plots. A cell already FINISHED (by an earlier attempt of the
    trial or an earlier launch) is left as it is."""

    def __init__(
        self,
        ctx: TrialContext,
        trial: TrialPlan,
        train_values: dict[str, Any],
        trial_id: str,
        node_id: str,
    ):
        self.client = tracking.client(ctx.tracking_uri)
        self.cells = {c.epochs: c for c in trial.cells()}
        self.runs: dict[int, str] = {}
        self.finished: set[int] = set()
        # every axis and recipe field, but not the trial's scratch folder or its report list
        allowed = {*Cell.__dataclass_fields__, *train_values} - {"out", "report_epochs"}
        for epochs, cell in self.cells.items():
            params = tracking.safe_params({**train_values, **cell.axes()}, allowed)
            run_id, done = tracking.child_run(
                self.client, ctx.experiment_id, ctx.parent_run_id, key=cell.id, name=cell.id,
                tags={tracking.KIND: ctx.kind, tracking.CELL: cell.id, tracking.TRIAL: trial.id,
                      tracking.STUDY: ctx.study, tracking.PROFILE: ctx.profile,
                      tracking.GRID_RUN: ctx.parent_run_id, "bpfm.tune_trial_id": trial_id,
                      tracking.NODE: node_id},
                params=params,
            )
            self.runs[epochs] = run_id
            if done:
                self.finished.add(epochs)

    def on_epoch(self, epoch: int, values: dict[str, Any]) -> None:
        for epochs, run_id in self.runs.items():
            if epochs >= epoch and epochs not in self.finished:
                tracking.log_epoch(self.client, run_id, epoch, values)

    def finish_cell(self, epochs: int, model_dir: Path) -> None:
        from bpfm.training.model_dir import read_metrics  # lazy: torch

        if epochs in self.finished or epochs not in self.runs:
            return
        run_id = self.runs[epochs]
        payload = read_metrics(model_dir)
        test = payload.get("test", {})
        keys = key_metrics(test)  # a few numbers that sort and plot in MLflow's UI
        tracking.log_results(self.client, run_id, {**test, **keys}, extra=tuple(keys))
        if payload.get("calibration"):  # cal_<method>_<metric> beside the uncalibrated ones
            log_calibration(self.client, run_id, payload["calibration"], model_dir)
        tracking.log_model_dir(self.client, run_id, model_dir)
        tracking.finish(self.client, run_id)
        self.finished.add(epochs)


def log_calibration(
    client: MlflowClient, run_id: str, result: dict[str, Any], model_dir: Path
) -> None:
    """A cell's calibrated results: metrics `cal_<method>_<metric>` and `calib_k`, tags
    `cal_<method>_{sbp_bhs_grade,dbp_bhs_grade,aami}` (the method list is the `calibration`
    param, K the `calib_windows` param), and the calibrated estimates as artifact
    `calibration/calibrated_estimates.parquet` (the leaderboard's Bland-Altman plot)."""
    from mlflow.entities import RunTag  # lazy: mlflow

    from bpfm.training.calibration import ESTIMATES_FILE, flat_metrics  # lazy: torch

    flat = flat_metrics(result)
    tracking.log_results(client, run_id, flat, extra=[k for k, v in flat.items()
                                                      if not isinstance(v, str)])
    tags = [RunTag(k, v) for k, v in flat.items()
            if isinstance(v, str) and k.endswith(("bhs_grade", "aami"))]
    client.log_batch(run_id, tags=tags)
    estimates = Path(model_dir) / ESTIMATES_FILE
    if estimates.is_file():
        client.log_artifact(run_id, str(estimates), "calibration")


def model_dir_for(out: str | Path, epoch: int) -> Path:
    """The model dir fit wrote for `epoch`: `out/epoch-<N>/` when it was a report epoch, else
    `out/` itself (the final epoch)."""
    prefix = Path(out) / f"epoch-{epoch}"
    return prefix if prefix.is_dir() else Path(out)


def quantize_model(
    *,
    tracking_uri: str,
    experiment_id: str,
    grid_run_id: str,
    study: str,
    cell: str,
    cell_run_id: str,
    variants: dict[str, dict[str, Any]],
    data: str,
    settings: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Stage 2 for one trained model: every variant in a run nested under the cell's run, with
    the full metrics, size, latency and the quantized model. The model is fetched once and its
    fp32 numbers measured once; a finished variant is not redone, a failed one does not stop the
    others (its entry carries the error)."""
    task_began = time.perf_counter()
    client = tracking.client(tracking_uri)
    tags = {tracking.KIND: "quant", tracking.CELL: cell, tracking.STUDY: study,
            tracking.GRID_RUN: grid_run_id}
    results: list[dict[str, Any]] = []
    baseline: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="bpfm-quant-") as tmp:
        model_dir = None
        for variant, options in variants.items():
            entry = {"cell": cell, "variant": variant}
            run_id, done = tracking.child_run(
                client, experiment_id, cell_run_id, key=f"{cell}/{variant}", name=variant,
                tags={**tags, tracking.VARIANT: variant}, params=_quant_params(variant, options),
            )
            if done:
                results.append({**entry, "run_id": run_id, "skipped": True})
                continue
            try:
                began = time.perf_counter()
                model_dir = model_dir or tracking.download_model_dir(client, cell_run_id, tmp)
                fetched = time.perf_counter()
                out = Path(tmp) / variant
                result = _quantize_variant(tracking_uri, client, run_id, model_dir, out, options,
                                           data, {**(settings or {}), "baseline": baseline})
                # where a variant's time goes (the driver logs it): model fetch, then
                # run_quantization (quantize_s of it: FX prepare, calibration, convert; the
                # rest evaluates and times the model), then MLflow logging
                seconds = {"fetch": fetched - began, **result.pop("_seconds", {}),
                           "since_task_start": time.perf_counter() - task_began}
                baseline = baseline or {"fp32": result["fp32"]}
            except Exception as err:  # reported per variant: the others go on
                tracking.finish(client, run_id, "FAILED")
                log.error("quantization %s/%s failed: %s", cell, variant, err)
                results.append({**entry, "run_id": run_id, "error": f"{type(err).__name__}: {err}"})
                continue
            tracking.finish(client, run_id)
            results.append({**entry, "run_id": run_id, "skipped": False, "seconds": seconds})
    return results


def _quant_params(variant: str, options: dict[str, Any]) -> dict[str, str]:
    from bpfm.export import ExportConfig, is_export_variant  # lazy: torch
    from bpfm.quant.quantized import QuantConfig  # lazy: torch

    if is_export_variant(options):  # both runtimes quantize weights per output channel
        fields = {**ExportConfig.from_variant(options).to_dict(), "weights": "per_channel",
                  "backend": options["backend"]}
    else:
        fields = QuantConfig(**options).to_dict()  # every field, defaults included
    return tracking.safe_params({**fields, "variant": variant}, [*fields, "variant"])


def _quantize_variant(tracking_uri: str, client: MlflowClient, run_id: str, model_dir: Path,
                      out: Path, options: dict[str, Any], data: str,
                      settings: dict[str, Any]) -> dict:
    from bpfm.export import is_export_variant  # lazy: torch
    from bpfm.quant.convert import load_quantized  # lazy: torch
    from bpfm.quant.quantized import FX_FILE, QuantConfig  # lazy: torch
    from bpfm.quant.study import run_quantization  # lazy: torch

    if is_export_variant(options):
        return _export_variant(client, run_id, model_dir, out, options, data, settings)
    config = QuantConfig(**options)
    began = time.perf_counter()
    result = run_quantization(model_dir, config, data=data, out=str(out), **settings)
    logged = time.perf_counter()
    extra = (*tracking.QUANT_METRICS, *QUANT_EXTRA_METRICS)
    tracking.log_results(client, run_id, _flat_metrics(result), extra=extra)
    if config.backend == "fx" or config.mode == "fp32":  # pt2e graphs stay plain files
        # the model once, as an MLflow model (mlflow.pytorch.load_model); its report beside it
        tracking.log_quantized_model(tracking_uri, run_id, load_quantized(out))
        for item in sorted(out.iterdir()):
            if item.is_file() and item.name != FX_FILE:
                client.log_artifact(run_id, str(item), "quantized")
    else:
        client.log_artifacts(run_id, str(out), "quantized")
    result["_seconds"] = {"run_quantization": logged - began, "quantize": result["quantize_s"],
                          "mlflow_logging": time.perf_counter() - logged}
    return result


def _export_variant(client: MlflowClient, run_id: str, model_dir: Path, out: Path,
                    options: dict[str, Any], data: str, settings: dict[str, Any]) -> dict:
    """A variant that names a runtime (`backend: executorch|onnxruntime`): `bpfm export`, the
    file and its metrics / parity / export JSON logged as artifacts under `exported/`."""
    from bpfm.export import ExportConfig  # lazy: torch
    from bpfm.export.run import run_export  # lazy: torch

    keep = {k: settings[k] for k in ("threads", "latency_runs", "batch_size") if k in settings}
    result = run_export(model_dir, ExportConfig.from_variant(options), data=data, out=out, **keep)
    extra = (*tracking.QUANT_METRICS, *QUANT_EXTRA_METRICS, *EXPORT_METRICS)
    tracking.log_results(client, run_id, _flat_metrics(result), extra=extra)
    client.log_artifacts(run_id, str(out), "exported")
    return result


EXPORT_METRICS = ("peak_rss_mib_b1", "rss_above_baseline_mib_b1", "macs_per_window",
                  "runtime_reduction_factor", "parity_max_abs_fp32", "parity_mae_diff_int8",
                  "export_s")
QUANT_EXTRA_METRICS = ("reduction_factor", "speedup_b1", "speedup_b64", "delta_sbp_mae",
                       "delta_dbp_mae", "delta_sbp_r2", "delta_dbp_r2")


def _flat_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """run_quantization's numbers at the top level (its test metrics may be nested)."""
    flat = dict(result)
    for key in ("metrics", "test"):
        if isinstance(result.get(key), dict):
            flat.update(result[key])
    return flat


def launch_cells(client: MlflowClient, experiment_id: str, grid_run_id: str) -> list[Run]:
    """The finished train runs of one grid launch (also those an earlier attempt finished)."""
    runs = tracking.runs_of(client, experiment_id, grid_run_id, "train")
    return [r for r in runs if r.info.status == "FINISHED"]


def register_best(
    client: MlflowClient, tracking_uri: str, study: str, cell_runs: list[Run]
) -> dict[str, str]:
    """Per source, the cell with the lowest final validation MAE, registered as
    `<study>-<source>` with the alias `best` (selection never looks at test metrics)."""
    from bpfm.training.model_dir import load_trained  # lazy: torch

    best: dict[str, Any] = {}
    for run in cell_runs:
        source, val = run.data.params.get("source"), run.data.metrics.get("val_mae")
        if source and val is not None and (source not in best or val < best[source][0]):
            best[source] = (val, run)
    registered = {}
    for source, (_, run) in sorted(best.items()):
        name = f"{study}-{source}"
        if _best_version_run(client, name) == run.info.run_id:  # unchanged: no new version
            registered[source] = f"models:/{name}@{tracking.MODEL_ALIAS}"
            continue
        with tempfile.TemporaryDirectory(prefix="bpfm-best-") as tmp:
            model, _, _ = load_trained(tracking.download_model_dir(client, run.info.run_id, tmp))
            with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints each step
                registered[source] = tracking.register_best(
                    client, tracking_uri, run.info.run_id, model, name
                )
            log.info("registered a new version of %s (run %s)", name, run.info.run_id)
    return registered


def _best_version_run(client: MlflowClient, name: str) -> str | None:
    """The run the registered model's `best` alias points at, None when there is none yet."""
    from mlflow.exceptions import MlflowException  # lazy: mlflow

    try:
        return client.get_model_version_by_alias(name, tracking.MODEL_ALIAS).run_id
    except MlflowException:
        return None


def summarize(
    client: MlflowClient, experiment_id: str, grid_run_id: str
) -> dict[str, list[dict[str, Any]]]:
    """Stage 3: one row per trained cell and one per quantized variant, read back from MLflow
    (so a resumed launch lists what earlier attempts finished too)."""
    def row(run: Run, columns: list[str]) -> dict[str, Any]:
        values = {**run.data.params, **run.data.metrics, **run.data.tags}
        out = {c: values.get(c) for c in columns}
        out.update(cell=run.data.tags.get(tracking.CELL), run_id=run.info.run_id)
        return out

    train = sorted(
        (row(r, TRAIN_COLUMNS + SUMMARY_COLUMNS)
         for r in launch_cells(client, experiment_id, grid_run_id)),
        key=lambda r: r["cell"] or "",
    )
    quant_runs = tracking.find_runs(
        client, experiment_id, {tracking.GRID_RUN: grid_run_id, tracking.KIND: "quant"}
    )
    quant = sorted(
        (
            row(r, QUANT_COLUMNS) | {"variant": r.data.tags.get(tracking.VARIANT)}
            for r in quant_runs
            if r.info.status == "FINISHED"
        ),
        key=lambda r: (r["cell"] or "", r["variant"] or ""),
    )
    return {"cells": train, "quantized": quant}
