"""The bridge to Ray (the only module in bpfm that imports ray): the grid-cell trainable, its
resources, the Tuner (created or restored), and Ray tasks for pretraining and quantization.

The trainable is a plain function of `config` (Ray Tune's examples): it builds a TrainConfig,
calls `bpfm.train.fit` with a callback that reports every epoch with a checkpoint, and resumes
from `ray.tune.get_checkpoint()`. It logs its cells to MLflow itself (the driver made the
experiment and the grid's parent run), so MLflow holds every model even when the driver dies."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from bpfm import tracking
from bpfm.errors import BpfmError
from bpfm.grid import Cell, TrialPlan, trial_from_config
from bpfm.profiles import Profile

log = logging.getLogger(__name__)

# Test hook: the trainable raises once, right after this epoch's report, per trial (a marker file
# under BPFM_FAULT_MARKER_DIR records that the fault fired), to prove retries from checkpoints.
FAULT_ENV = "BPFM_FAULT_AFTER_EPOCH"
FAULT_MARKER_ENV = "BPFM_FAULT_MARKER_DIR"


class InjectedFault(RuntimeError):
    pass


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
    fault_after_epoch: int | None = None
    fault_marker_dir: str | None = None


def train_config(config: dict[str, Any], ctx: TrialContext, out: str | Path):
    """The TrainConfig of one trial: the shared recipe, then this trial's axes and overrides."""
    from bpfm.train import TrainConfig

    values = {**ctx.train, **{k: v for k, v in config.items() if k != "trial"}}
    values.update(data=ctx.data, out=str(out))
    if values.get("init") == "pretrained" and not values.get("checkpoint"):
        values["checkpoint"] = ctx.pretrained.get(values.get("size", "small"))
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
        config: dict[str, Any],
        train_values: dict[str, Any],
        trial_id: str,
    ):
        self.client = tracking.client(ctx.tracking_uri)
        self.cells = {c.epochs: c for c in trial.cells()}
        self.runs: dict[int, str] = {}
        self.finished: set[int] = set()
        allowed = {*Cell.__dataclass_fields__, *train_values}
        for epochs, cell in self.cells.items():
            params = tracking.safe_params({**train_values, **cell.axes()}, allowed)
            run_id, done = tracking.child_run(
                self.client, ctx.experiment_id, ctx.parent_run_id, key=cell.id, name=cell.id,
                tags={tracking.KIND: ctx.kind, tracking.CELL: cell.id, tracking.TRIAL: trial.id,
                      tracking.STUDY: ctx.study, tracking.PROFILE: ctx.profile,
                      tracking.GRID_RUN: ctx.parent_run_id, "bpfm.tune_trial_id": trial_id,
                      tracking.NODE: ray.get_runtime_context().get_node_id()},
                params=params,
            )  # fmt: skip
            self.runs[epochs] = run_id
            if done:
                self.finished.add(epochs)

    def on_epoch(self, epoch: int, values: dict[str, Any]) -> None:
        for epochs, run_id in self.runs.items():
            if epochs >= epoch and epochs not in self.finished:
                tracking.log_epoch(self.client, run_id, epoch, values)

    def finish_cell(self, epochs: int, model_dir: Path) -> None:
        from bpfm.evaluate import read_metrics

        if epochs in self.finished or epochs not in self.runs:
            return
        run_id = self.runs[epochs]
        tracking.log_results(self.client, run_id, read_metrics(model_dir).get("test", {}))
        tracking.log_model_dir(self.client, run_id, model_dir)
        tracking.finish(self.client, run_id)
        self.finished.add(epochs)


def _fault_marker(ctx: TrialContext, trial_id: str) -> Path | None:
    if ctx.fault_after_epoch is None or not ctx.fault_marker_dir:
        return None
    return Path(ctx.fault_marker_dir) / f"{trial_id}.fired"


def train_cell(config: dict[str, Any], ctx: TrialContext) -> None:
    """Tune trainable: one trial = one configuration trained to its largest epoch count,
    reporting (and logging) each of its cells on the way."""
    tracking.configure()
    trial = trial_from_config(config)
    trial_id = tune.get_context().get_trial_id() or trial.id
    work = Path(tempfile.mkdtemp(prefix="bpfm-trial-"))
    try:
        train = train_config(config, ctx, work / "out")
        cells = CellLogger(ctx, trial, config, train.to_dict(), trial_id)
        marker = _fault_marker(ctx, trial_id)

        def report(epoch_report) -> None:
            epoch = epoch_report.epoch
            values = {"epoch": epoch, "train_loss": epoch_report.train_loss,
                      "val_mae": epoch_report.val_mae}  # fmt: skip
            cells.on_epoch(epoch, values)
            if epoch in cells.cells and epoch_report.model_dir is not None:
                cells.finish_cell(epoch, _model_dir(train.out, epoch))
            metrics = {
                **values,
                **{
                    k: v
                    for k, v in epoch_report.metrics.items()
                    if k.startswith("test_") and _is_scalar(v)
                },
            }
            if epoch % ctx.checkpoint_every == 0 or epoch == train.epochs:
                checkpoint = tune.Checkpoint.from_directory(str(epoch_report.checkpoint_dir))
                tune.report(metrics, checkpoint=checkpoint)
            else:
                tune.report(metrics)
            if marker is not None and epoch == ctx.fault_after_epoch and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
                raise InjectedFault(f"injected fault after epoch {epoch} ({trial_id})")

        from bpfm.train import fit

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            fit(train, callbacks=[report], resume=False)
        else:
            with checkpoint.as_directory() as resume_dir:
                log.info("trial %s resumes from %s", trial_id, resume_dir)
                fit(train, callbacks=[report], resume_from=resume_dir)
        for epochs in cells.cells:  # cells whose report an earlier attempt lost
            model_dir = _model_dir(train.out, epochs)
            if (model_dir / "metrics.json").is_file():
                cells.finish_cell(epochs, model_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _model_dir(out: str | Path, epoch: int) -> Path:
    """The model dir fit wrote for `epoch`: `out/epoch-<N>/` when it was a report epoch, else
    `out/` itself (the final epoch)."""
    prefix = Path(out) / f"epoch-{epoch}"
    return prefix if prefix.is_dir() else Path(out)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, int | float | str) and not isinstance(value, bool)


def cluster_gpus(policy: str = "auto") -> float:
    """GPUs to plan with: `auto` = what the cluster has now, `always` assumes GPUs will come
    (an autoscaling GPU group at zero nodes), `never` runs everything on CPUs."""
    if policy == "never":
        return 0.0
    if policy == "always":
        return 1.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def trial_resources(profile: Profile, gpus: float):
    """Resources per trial from its size; GPU requests dropped on a cluster without GPUs."""

    def for_config(config: dict[str, Any]) -> tune.PlacementGroupFactory:
        wanted = profile.resources_for(config["size"]).on_cluster(gpus)
        bundle = {"CPU": wanted["cpu"], **({"GPU": wanted["gpu"]} if "gpu" in wanted else {})}
        return tune.PlacementGroupFactory([bundle])

    return for_config


def search_space(axes: dict[str, tuple], share_prefix: bool) -> dict[str, Any]:
    """Tune's param space: a grid over every axis with more than one value; with epoch-prefix
    sharing, one trial per configuration trains to the largest epoch count and reports each."""
    space: dict[str, Any] = {}
    for axis in ("size", "freeze", "init", "source", "protocol", "seed"):
        values = list(axes[axis])
        space[axis] = tune.grid_search(values) if len(values) > 1 else values[0]
    epochs = sorted(axes["epochs"])
    if share_prefix:
        space.update(epochs=epochs[-1], report_epochs=epochs)
    else:
        space.update(
            epochs=tune.grid_search(epochs) if len(epochs) > 1 else epochs[0], report_epochs=[]
        )
    return space


def _trial_name(trial) -> str:
    return trial_from_config(trial.config).id


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def make_tuner(
    trainable,
    *,
    param_space: dict[str, Any] | None,
    storage: str,
    name: str,
    resources,
    max_failures: int,
    max_concurrent: int = 0,
    tune_config: dict[str, Any] | None = None,
) -> tune.Tuner:
    """A Tuner for `storage/name`: restored when that experiment exists (finished trials are not
    run again, errored ones resume from their last checkpoint), else created."""
    from bpfm.storage import join

    storage = _absolute(storage)
    trainable = tune.with_resources(trainable, resources)
    path = join(storage, name)
    if tune.Tuner.can_restore(path):
        log.info("resuming Tune experiment %s", path)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        verbose=1,
    )
    config = tune.TuneConfig(
        metric="val_mae", mode="min", max_concurrent_trials=max_concurrent or None,
        reuse_actors=True,  # a new actor per trial costs seconds of process start and imports
        trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname,
        **(tune_config or {}),
    )  # fmt: skip
    return tune.Tuner(trainable, param_space=param_space, tune_config=config, run_config=run_config)


def init_ray(**kwargs: Any) -> None:
    """Join the cluster named by RAY_ADDRESS (a `ray job submit` sets it), else start local Ray."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, **kwargs)


@ray.remote
def _pretrain_task(spec: dict[str, Any]) -> str:
    from bpfm.pretrain import PretrainConfig, pretrain

    return pretrain(PretrainConfig(**spec)).out


def ensure_pretrained(profile: Profile, sizes: list[str], gpus: float) -> dict[str, str]:
    """Stage 0: a backbone checkpoint per size for the `pretrained` cells; a missing one is
    pretrained now (a Ray task with the size's resources, steps from the profile)."""
    from bpfm.storage import exists

    if profile.pretrain is None:
        raise BpfmError(
            f"{profile.path}: pretrain: the grid has pretrained cells but no pretrain.checkpoint"
        )
    checkpoints, pending = {}, []
    for size in sizes:
        uri = profile.pretrain.checkpoint_for(size)
        checkpoints[size] = uri
        if exists(uri):
            continue
        log.info("stage 0: pretraining %s -> %s (%d steps)", size, uri, profile.pretrain.steps)
        wanted = profile.resources_for(size).on_cluster(gpus)
        spec = {**profile.pretrain.options, "out": uri, "size": size,
                "steps": profile.pretrain.steps}  # fmt: skip
        task = _pretrain_task.options(num_cpus=wanted["cpu"], num_gpus=wanted.get("gpu", 0))
        pending.append(task.remote(spec))
    ray.get(pending)
    return checkpoints


@ray.remote
def _quantize_task(job: dict[str, Any]) -> list[dict[str, Any]]:
    from bpfm.grid import quantize_model

    return quantize_model(**job)


def run_quantization_tasks(jobs: list[dict[str, Any]], cpus: float = 1.0) -> list[dict[str, Any]]:
    """Stage 2: one Ray task per trained model, running its variants; failures are reported,
    not raised, so one broken model or variant does not hide the others."""
    refs = [_quantize_task.options(num_cpus=cpus).remote(job) for job in jobs]
    results = []
    for job, ref in zip(jobs, refs, strict=True):
        try:
            results.extend(ray.get(ref))
        except Exception as err:  # a task's error arrives wrapped; keep its message
            message = _last_line(err)
            log.error("quantization of %s failed: %s", job["cell"], message)
            results.extend({"cell": job["cell"], "variant": v, "error": message}
                           for v in job["variants"])  # fmt: skip
    return results


def run_grid(
    profile: Profile,
    *,
    recipe: dict[str, Any] | None = None,
    name: str | None = None,
    gpus: str = "auto",
    quant_cpus: float = 1.0,
) -> dict[str, Any]:
    """The study as one job. Stage 0: data and backbones; stage 1: Tune over the grid (resumed
    when `storage/name` exists); stage 2: every trained model through every quantization variant;
    stage 3: the summary, read back from MLflow."""
    from bpfm import grid
    from bpfm.storage import join

    train = {**profile.train, **(recipe or {})}
    plan = grid.plan_grid(profile, train)
    init_ray()
    gpu_count = cluster_gpus(gpus)
    data = grid.ensure_data(profile)
    sizes = sorted({c.size for c in plan.cells if c.init == "pretrained"})
    pretrained = ensure_pretrained(profile, sizes, gpu_count) if sizes else {}

    uri = tracking.configure()
    client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(client, profile.study)
    name = name or profile.study
    path = join(_absolute(profile.storage), name)
    resuming = tune.Tuner.can_restore(path)
    grid_run = tracking.start_grid_run(
        client, experiment_id, name=f"grid-{profile.name}", resume=resuming,
        tags={tracking.KIND: "grid", tracking.STUDY: profile.study,
              tracking.PROFILE: profile.name, tracking.TUNE_PATH: path},
        params={"profile": profile.name, "data": data, "storage": path,
                "n_cells": len(plan.cells), "n_trials": len(plan.trials),
                "epoch_prefix_sharing": plan.share_prefix, "recipe": recipe or {},
                "quantize_variants": list(profile.quantize)},
    )  # fmt: skip
    log.info(
        "stage 1: %d cells in %d trials -> %s (MLflow %s, run %s)",
        len(plan.cells),
        len(plan.trials),
        path,
        tracking.redact(uri),
        grid_run,
    )
    fault = os.environ.get(FAULT_ENV)
    ctx = TrialContext(
        data=data, train=train, tracking_uri=uri, experiment_id=experiment_id,
        parent_run_id=grid_run, study=profile.study, profile=profile.name, pretrained=pretrained,
        checkpoint_every=profile.tune.checkpoint_every,
        fault_after_epoch=int(fault) if fault else None,
        fault_marker_dir=os.environ.get(FAULT_MARKER_ENV),
    )  # fmt: skip
    tuner = make_tuner(
        tune.with_parameters(train_cell, ctx=ctx),
        param_space=search_space(profile.axes, plan.share_prefix),
        storage=_absolute(profile.storage), name=name,
        resources=trial_resources(profile, gpu_count),
        max_failures=profile.tune.max_failures,
        max_concurrent=profile.tune.max_concurrent_trials,
    )  # fmt: skip
    results = tuner.fit()
    errors = [_last_line(r.error) for r in results if r.error is not None]

    cells = grid.launch_cells(client, experiment_id, grid_run)
    jobs = [
        {"tracking_uri": uri, "experiment_id": experiment_id, "grid_run_id": grid_run,
         "study": profile.study, "cell": run.data.tags[tracking.CELL],
         "cell_run_id": run.info.run_id, "variants": profile.quantize, "data": data,
         "settings": profile.quantize_options}
        for run in cells
    ]  # fmt: skip
    log.info("stage 2: %d trained models x %d variants", len(cells), len(profile.quantize))
    quantized = run_quantization_tasks(jobs, cpus=quant_cpus) if profile.quantize else []
    errors += [f"{q['cell']}/{q['variant']}: {q['error']}" for q in quantized if "error" in q]

    registered = grid.register_best(client, uri, profile.study, cells)
    summary = grid.summarize(client, experiment_id, grid_run)
    tracking.finish(client, grid_run, "FAILED" if errors else "FINISHED")
    return {
        "profile": profile.name, "study": profile.study, "experiment_id": experiment_id,
        "grid_run_id": grid_run, "tune_path": path, "tracking_uri": tracking.redact(uri),
        "resumed": resuming, "n_cells": len(plan.cells), "n_trials": len(plan.trials),
        "registered": registered, "errors": errors, **summary,
    }  # fmt: skip


def _last_line(error: BaseException) -> str:
    """The line that says what went wrong (a Ray task error carries the remote traceback)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _absolute(storage: str) -> str:
    from bpfm.storage import is_local

    if is_local(storage):
        return str(Path(storage.removeprefix("file://")).expanduser().absolute())
    return storage
