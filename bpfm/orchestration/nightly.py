"""The nightly regression run: the `nightly` profile through the grid (fixed seeds and data), every
tracked metric of its trained and quantized models compared with a committed baseline
(`bpfm.regression`), a regression report (md + JSON), and a `bpfm.kind=nightly` MLflow run.

Each night is a fresh launch (its own Tune experiment name and grid run). On one machine its data,
backbone and Tune state live in a fresh folder under `--out`, so a change in synthesis, sharding or
pretraining shows up too; on a cluster (RAY_ADDRESS set) or with `--reuse` the profile's locations
stay (S3 URIs every node can read)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bpfm import defaults, tracking
from bpfm.errors import BpfmError
from bpfm.profiles import Profile, load_profile
from bpfm.regression import (
    baseline_document,
    compare,
    load_baseline,
    parse_tolerances,
    render_markdown,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASELINE = REPO_ROOT / "pipelines" / "baselines" / "nightly.json"
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours remote tracebacks
REPORT_FILES = ("regression.md", "regression.json", "current.json")


@dataclass
class NightlyConfig:
    profile: str = "nightly"
    baseline: Path = DEFAULT_BASELINE
    update_baseline: bool = False
    out: Path | None = None  # default <home>/nightly/<timestamp>
    reuse: bool = False  # keep the profile's data / backbone / storage locations
    grid_run: str | None = None  # compare this earlier launch instead of running the grid
    gpus: str = "auto"
    keep_work: bool = False  # keep --out/work (shards, backbones, Tune state: hundreds of MB)


def _value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _entry(run: Run) -> dict[str, Any]:
    values = {k: _value(v) for k, v in run.data.metrics.items()}
    values.update({k: run.data.tags[k] for k in tracking.GRADE_TAGS if k in run.data.tags})
    return values


def collect_entries(
    client: MlflowClient, experiment_id: str, grid_run_id: str
) -> dict[str, dict[str, Any]]:
    """Every finished train and quant run of one grid launch, keyed `train/<cell>` and
    `quant/<cell>/<variant>`: its final metrics (last values of per-epoch curves) and verdicts."""
    entries: dict[str, dict[str, Any]] = {}
    for run in tracking.runs_of(client, experiment_id, grid_run_id, "train"):
        if run.info.status == "FINISHED":
            entries[f"train/{run.data.tags[tracking.CELL]}"] = _entry(run)
    quant = tracking.find_runs(
        client, experiment_id, {tracking.GRID_RUN: grid_run_id, tracking.KIND: "quant"}
    )
    for run in quant:
        if run.info.status == "FINISHED":
            key = f"quant/{run.data.tags[tracking.CELL]}/{run.data.tags[tracking.VARIANT]}"
            entries[key] = _entry(run)
    return entries


def fresh_locations(profile: Profile, work: Path) -> Profile:
    """The profile with its data, backbones and Tune storage under `work` (made anew)."""
    data = dataclasses.replace(profile.data, uri=str(work / "shards"))
    pretrain = profile.pretrain
    if pretrain is not None:
        checkpoint = str(work / "backbones" / Path(pretrain.checkpoint).name)
        pretrain = dataclasses.replace(pretrain, checkpoint=checkpoint)
    return dataclasses.replace(profile, data=data, pretrain=pretrain, storage=str(work / "ray"))


def remove_work(work: Path) -> None:
    """After the run, the Tune state and backbones go (hundreds of MB of checkpoints; MLflow holds
    the models and metrics). The shards stay: the runs' `data` param names them, and the
    leaderboard reads the test subjects' demographics from there (a few MB)."""
    for folder in ("ray", "backbones"):
        shutil.rmtree(work / folder, ignore_errors=True)


def _run_grid(profile: Profile, config: NightlyConfig, stamp: str) -> dict[str, Any]:
    from bpfm.orchestration.ray_grid import run_grid  # lazy: ray

    result = run_grid(profile, name=f"nightly-{stamp}", gpus=config.gpus)
    return {"grid_run_id": result["grid_run_id"], "experiment_id": result["experiment_id"],
            "errors": result["errors"]}


def _write_baseline(path: Path, entries: dict[str, Any], profile: str, stamp: str) -> None:
    previous = load_baseline(path) if path.is_file() else None
    document = baseline_document(entries, profile=profile, created=stamp, previous=previous)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    log.info("baseline %s rewritten: %d entries", path, len(entries))


def _log_nightly_run(client: MlflowClient, experiment_id: str, grid_run_id: str, out: Path,
                     summary: dict[str, Any]) -> str:
    run = client.create_run(
        experiment_id, run_name="nightly",
        tags={tracking.KIND: "nightly", tracking.GRID_RUN: grid_run_id,
              "bpfm.nightly.status": summary["status"]},
    )
    run_id = run.info.run_id
    client.log_param(run_id, "baseline", tracking.redact(summary["baseline"]))
    for key in ("regressions", "improvements", "entries"):
        client.log_metric(run_id, key, float(summary[key]))
    for name in REPORT_FILES:
        if (out / name).is_file():
            client.log_artifact(run_id, str(out / name))
    tracking.finish(client, run_id)
    return run_id


def _earlier_grid(client: MlflowClient, grid_run: str) -> dict[str, Any]:
    """An earlier launch's grid run (`--grid-run`), to compare instead of running the grid."""
    from mlflow.exceptions import MlflowException  # lazy: mlflow

    try:
        run = client.get_run(grid_run)
    except MlflowException:
        raise BpfmError(f"--grid-run: {grid_run}: no such MLflow run") from None
    return {"grid_run_id": grid_run, "experiment_id": run.info.experiment_id, "errors": []}


def _launch_grid(profile: Profile, config: NightlyConfig, out: Path, stamp: str) -> dict[str, Any]:
    """Tonight's grid; on one machine in fresh locations under `out/work` (removed afterwards
    unless `keep_work`)."""
    fresh = not (config.reuse or os.environ.get("RAY_ADDRESS"))
    if fresh:
        profile = fresh_locations(profile, out / "work")
    try:
        return _run_grid(profile, config, stamp)
    finally:
        if fresh and not config.keep_work:
            remove_work(out / "work")


def _update_baseline(config: NightlyConfig, entries: dict[str, dict[str, Any]],
                     errors: list[str], grid_run_id: str, profile: str, stamp: str,
                     out: Path) -> None:
    if errors:
        raise BpfmError(
            f"grid run {grid_run_id}: {len(errors)} errors; the baseline "
            f"was not rewritten (first: {errors[0]})"
        )
    _write_baseline(config.baseline, entries, profile, stamp)
    (out / "current.json").write_text(json.dumps(entries, indent=1, sort_keys=True))


def _write_regression_report(baseline: dict[str, Any], entries: dict[str, dict[str, Any]],
                             errors: list[str], grid_run_id: str, config: NightlyConfig,
                             out: Path) -> dict[str, Any]:
    """Compare with the baseline, write regression.md and .json; the summary's verdict keys."""
    tolerances = parse_tolerances(baseline.get("tolerances") or {}, str(config.baseline))
    comparison = compare(baseline["entries"], entries, tolerances)
    report = render_markdown(comparison)
    if errors:
        report += "\n## Grid errors\n\n" + "\n".join(f"- {e}" for e in errors) + "\n"
    (out / "regression.md").write_text(report)
    document = {**comparison.to_dict(), "errors": errors, "grid_run_id": grid_run_id}
    (out / "regression.json").write_text(json.dumps(document, indent=1, default=str))
    return {
        "status": "pass" if comparison.passed and not errors else "fail",
        "regressions": len(comparison.regressions),
        "improvements": len(comparison.improvements),
        "report": str(out / "regression.md"),
    }


def run_nightly(config: NightlyConfig) -> dict[str, Any]:
    """Run (or pick up) the nightly grid, compare it with the baseline, write and log the report.
    `status` is pass, fail (a regression or a grid error) or baseline-updated."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = Path(config.out or defaults.home() / "nightly" / stamp)
    out.mkdir(parents=True, exist_ok=True)
    profile = load_profile(config.profile)
    if not config.update_baseline:
        baseline = load_baseline(config.baseline)  # fail before hours of training, not after
    client = tracking.client()
    if config.grid_run:
        grid = _earlier_grid(client, config.grid_run)
    else:
        grid = _launch_grid(profile, config, out, stamp)
    grid_run_id = grid["grid_run_id"]
    entries = collect_entries(client, grid["experiment_id"], grid_run_id)
    if not entries:
        raise BpfmError(f"grid run {grid_run_id}: no finished train runs to compare")
    errors = [ANSI.sub("", error) for error in grid["errors"]]
    summary: dict[str, Any] = {
        "profile": profile.name, "grid_run_id": grid_run_id, "entries": len(entries),
        "baseline": str(config.baseline), "errors": errors, "out": str(out),
        "regressions": 0, "improvements": 0,
    }
    if config.update_baseline:
        _update_baseline(config, entries, errors, grid_run_id, profile.name, stamp, out)
        summary["status"] = "baseline-updated"
    else:
        summary.update(_write_regression_report(baseline, entries, errors, grid_run_id, config,
                                                out))
    summary["nightly_run_id"] = _log_nightly_run(
        client, grid["experiment_id"], grid_run_id, out, summary
    )
    return summary
