"""The bridge to Ray (with `ray_search`, the only modules of bpfm that import ray): the grid-cell
trainable, its resources, the Tuner (created or restored), and Ray tasks for pretraining and
quantization.

The trainable is a plain function of `config` (Ray Tune's examples): it builds a TrainConfig, calls
`bpfm.training.loop.fit` with a callback that reports every epoch with a checkpoint, and resumes
from `ray.tune.get_checkpoint()`. It logs its cells to MLflow itself (the driver made the experiment
and the grid's parent run), so MLflow holds every model even when the driver dies."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune

from bpfm import tracking, tracking_view
from bpfm.data.shards import open_shards
from bpfm.errors import BpfmError
from bpfm.io.scratch import process_runs
from bpfm.io.storage import exists, is_local, join
from bpfm.orchestration import grid, launch, preflight, progress, ray_logs, stages
from bpfm.orchestration.backbones import backbone_jobs
from bpfm.orchestration.grid import GridPlan, trial_from_config
from bpfm.orchestration.job_paths import check_job_paths, launch_paths
from bpfm.orchestration.stages import (
    CellLogger,
    TrialContext,
    model_dir_for,
    quantize_model,
    train_config,
)
from bpfm.profiles import Profile
from bpfm.report.summary import table2_row

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from ray.tune import ResultGrid
    from ray.tune.experiment import Trial

    from bpfm.training.config import TrainConfig
    from bpfm.training.loop import EpochReport

log = logging.getLogger(__name__)

TRIAL_WORK_PREFIX = "bpfm-trial-"


def trial_work_dir() -> Path:
    """A fresh scratch folder for one trial, named after its host and process. Folders of this
    host's trial processes that no longer run are removed first: a trial killed with its driver
    (Ray kills its actors) never runs its cleanup and would leave its checkpoints in the node's
    temp folder. The host name keeps containers that share a temp folder but not their process
    IDs away from each other's folders."""
    owner = f"{TRIAL_WORK_PREFIX}{socket.gethostname()}"
    for folder in Path(tempfile.gettempdir()).glob(f"{owner}-*-*"):
        host, pid, _ = folder.name.rsplit("-", 2)  # mkdtemp's random suffix has no "-"
        if host == owner and pid.isdigit() and not process_runs(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{owner}-{os.getpid()}-"))


def train_cell(config: dict[str, Any], ctx: TrialContext) -> None:
    """Tune trainable: one trial = one configuration trained to its largest epoch count,
    reporting (and logging) each of its cells on the way."""
    tracking.configure()
    started = time.time()
    trial = trial_from_config(config)
    trial_id = tune.get_context().get_trial_id() or trial.id
    work = trial_work_dir()
    cells = None
    try:
        train = train_config(config, ctx, work / "out")
        node = ray.get_runtime_context().get_node_id()
        cells = CellLogger(ctx, trial, train.to_dict(), trial_id, node)
        gpu_ids = ",".join(str(g) for g in ray.get_gpu_ids())
        for run_id in cells.runs.values():  # where and when the trial held its resources
            cells.client.set_tag(run_id, tracking.GPU_IDS, gpu_ids)
            cells.client.set_tag(run_id, tracking.TRIAL_STARTED, f"{started:.3f}")
        if cells.finished == set(cells.cells):  # a resumed launch: this trial's work is done
            log.info("trial %s: every cell already finished in MLflow", trial_id)
            return
        _fit_from_checkpoint(train, _epoch_reporter(cells, train, ctx), trial_id)
        for epochs in cells.cells:  # cells whose report an earlier attempt lost
            model_dir = model_dir_for(train.out, epochs)
            if (model_dir / "metrics.json").is_file():
                cells.finish_cell(epochs, model_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for run_id in cells.runs.values() if cells is not None else ():
            cells.client.set_tag(run_id, tracking.TRIAL_ENDED, f"{time.time():.3f}")


def _epoch_reporter(cells: CellLogger, train: TrainConfig,
                    ctx: TrialContext) -> Callable[[EpochReport], None]:
    """`fit`'s callback: logs the epoch to the trial's cells, finishes a cell at its epoch
    count, and reports to Tune, with a checkpoint every `checkpoint_every` epochs and at the
    last (what a restarted trial resumes from)."""
    def report(epoch_report: EpochReport) -> None:
        epoch = epoch_report.epoch
        values = {"epoch": epoch, "train_loss": epoch_report.train_loss,
                  "val_mae": epoch_report.val_mae}
        cells.on_epoch(epoch, values)
        if epoch in cells.cells and epoch_report.model_dir is not None:
            cells.finish_cell(epoch, model_dir_for(train.out, epoch))
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
            checkpoint.set_metadata({"epoch": epoch})
            tune.report(metrics, checkpoint=checkpoint)
        else:
            tune.report(metrics)

    return report


def _fit_from_checkpoint(train: TrainConfig, report: Callable[[EpochReport], None],
                         trial_id: str) -> None:
    """Train, resuming from the trial's Tune checkpoint when it has one short of the end."""
    from bpfm.training.loop import fit  # lazy: torch

    checkpoint = tune.get_checkpoint()
    saved_epoch = checkpoint.get_metadata().get("epoch") if checkpoint else None
    if checkpoint is None or saved_epoch == train.epochs:
        # a final state whose cells were not all logged holds no model dirs: train again
        fit(train, callbacks=[report], resume=False)
    else:
        with checkpoint.as_directory() as resume_dir:
            log.info("trial %s resumes from %s", trial_id, resume_dir)
            fit(train, callbacks=[report], resume_from=resume_dir)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, int | float | str) and not isinstance(value, bool)


class TrialProgress(tune.Callback):
    """Advances the grid's progress bar (`bpfm.orchestration.progress.current`) as trials end. It
    holds no state: Tune pickles its run config, callbacks included, with the experiment."""

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        progress.advance()

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        progress.advance()


def cluster_gpus(policy: str = "auto") -> float:
    """GPUs to plan with: `auto` = what the cluster has now, `always` assumes GPUs will come
    (an autoscaling GPU group at zero nodes), `never` runs everything on CPUs."""
    if policy == "never":
        return 0.0
    if policy == "always":
        return 1.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def trial_resources(
    profile: Profile, gpus: float
) -> Callable[[dict[str, Any]], tune.PlacementGroupFactory]:
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


def _trial_name(trial: Trial) -> str:
    return trial_from_config(trial.config).id


def _trial_dirname(trial: Trial) -> str:
    return f"trial_{trial.trial_id}"


def make_tuner(
    trainable: Callable[..., Any],
    *,
    param_space: dict[str, Any] | None,
    storage: str,
    name: str,
    resources: Callable[[dict[str, Any]], tune.PlacementGroupFactory] | dict[str, float],
    max_failures: int,
    max_concurrent: int = 0,
    tune_config: dict[str, Any] | None = None,
    callbacks: list[tune.Callback] | None = None,
    verbose: int = 1,
) -> tune.Tuner:
    """A Tuner for `storage/name`: restored when that experiment exists (finished trials are not
    run again, errored ones resume from their last checkpoint), else created. Run it inside
    `credentials_kept_from_trials()` (the AWS variables of the driver would reach Ray's logs)."""
    storage = _absolute(storage)
    trainable = tune.with_resources(trainable, resources)
    path = join(storage, name)
    if tune.Tuner.can_restore(path):
        log.info("resuming Tune experiment %s", path)
        # the restored run keeps its first launch's run config (callbacks, verbosity)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        verbose=verbose,
        callbacks=callbacks,
    )
    config = tune.TuneConfig(
        metric="val_mae", mode="min", max_concurrent_trials=max_concurrent or None,
        reuse_actors=True,  # a new actor per trial costs seconds of process start and imports
        trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname,
        **(tune_config or {}),
    )
    return tune.Tuner(trainable, param_space=param_space, tune_config=config, run_config=run_config)


# Ray Tune copies these from the driver's environment into every trial's runtime_env, which Ray
# logs in plain text (runtime_env_agent.log) and keeps in its GCS.
TUNE_PROPAGATED_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                           "AWS_SECURITY_TOKEN")
_CREDENTIAL_FILE_KEYS = {"AWS_ACCESS_KEY_ID": "aws_access_key_id",
                         "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
                         "AWS_SESSION_TOKEN": "aws_session_token"}


@contextlib.contextmanager
def _private_file(text: str) -> Iterator[str]:
    """A path to `text` readable by this user only. On Linux an anonymous in-memory file
    (memfd): it dies with the process, so a killed driver leaves no credentials behind in /tmp
    (a temporary directory's cleanup never runs on SIGKILL)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("bpfm-aws-credentials")
        try:
            os.write(fd, text.encode())
            yield f"/proc/{os.getpid()}/fd/{fd}"  # reopens from the start, for any reader
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="bpfm-aws-") as folder:
        path = Path(folder) / "credentials"
        path.touch(mode=0o600)
        path.write_text(text)
        yield str(path)


@contextlib.contextmanager
def credentials_kept_from_trials() -> Iterator[None]:
    """Move the driver's AWS credentials from its environment into a private credentials file
    (AWS_SHARED_CREDENTIALS_FILE, which boto3 and pyarrow read) while Tune runs, so that Tune
    cannot copy them into runtime_envs. Trials get theirs from their node: the environment
    `ray start` (or a local `ray.init`, so enter this after `init_ray`) ran in, the pod's
    secret, or the instance role."""
    found = {k: os.environ[k] for k in TUNE_PROPAGATED_SECRETS if k in os.environ}
    if "AWS_SECRET_ACCESS_KEY" not in found:
        yield
        return
    saved_file = os.environ.get("AWS_SHARED_CREDENTIALS_FILE")
    lines = [f"[{os.environ.get('AWS_PROFILE', 'default')}]"]
    lines += [f"{_CREDENTIAL_FILE_KEYS[k]} = {v}" for k, v in found.items()
              if k in _CREDENTIAL_FILE_KEYS]
    with _private_file("\n".join(lines) + "\n") as path:
        for key in found:
            del os.environ[key]
        os.environ["AWS_SHARED_CREDENTIALS_FILE"] = path
        try:
            yield
        finally:
            os.environ.update(found)
            if saved_file is None:
                os.environ.pop("AWS_SHARED_CREDENTIALS_FILE", None)
            else:
                os.environ["AWS_SHARED_CREDENTIALS_FILE"] = saved_file


def init_ray(**kwargs: Any) -> None:
    """Join the cluster named by RAY_ADDRESS (a `ray job submit` sets it), else start a new local
    Ray. A bare `ray.init()` would join whatever cluster `ray start` last left on this host, even
    a dead one, and hang."""
    ray_logs.install()
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=kwargs.get("log_to_driver", True),
                 logging_level=kwargs.get("logging_level", logging.INFO))
    else:
        kwargs.setdefault("address", "local")
        ray.init(include_dashboard=False, **kwargs)


@ray.remote
def _pretrain_task(spec: dict[str, Any]) -> str:
    from bpfm.training.pretrain import PretrainConfig, pretrain  # lazy: torch

    return pretrain(PretrainConfig(**spec)).out


def ensure_pretrained(profile: Profile, sizes: list[str], gpus: float) -> dict[str, str]:
    """Stage 0: a backbone checkpoint per size for the `pretrained` cells; a missing one is
    pretrained now (a Ray task with the size's resources, steps from the profile)."""
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
                "steps": profile.pretrain.steps}
        task = _pretrain_task.options(num_cpus=wanted["cpu"], num_gpus=wanted.get("gpu", 0))
        pending.append(task.remote(spec))
    ray.get(pending)
    return checkpoints


def ensure_backbones(
    profile: Profile, cells: list[grid.Cell], data: str, gpus: float, split_seed: int = 42
) -> dict[str, str]:
    """Stage 0: every named backbone of the `init` axis (bpfm.orchestration.backbones), keyed as
    `backbone_key`; missing ones are pretrained as Ray tasks, EEG ones before those that
    continue them."""
    jobs = backbone_jobs(profile.pretrain, cells, data, split_seed) if profile.pretrain else []
    if not jobs:
        if any(c.init != "xavier" for c in cells):
            raise BpfmError(f"{profile.path}: pretrain: the grid has pretrained cells but no "
                            "pretrain.checkpoint")
        return {}
    for wave in ([j for j in jobs if not j.after], [j for j in jobs if j.after]):
        pending = []
        for job in wave:
            if exists(job.spec["out"]):
                continue
            log.info("stage 0: pretraining %s -> %s (%d steps)", job.key, job.spec["out"],
                     job.spec["steps"])
            wanted = profile.resources_for(job.spec["size"]).on_cluster(gpus)
            task = _pretrain_task.options(num_cpus=wanted["cpu"], num_gpus=wanted.get("gpu", 0))
            pending.append(task.remote(job.spec))
        ray.get(pending)
    return {job.key: job.spec["out"] for job in jobs}


@ray.remote
def _quantize_task(job: dict[str, Any]) -> list[dict[str, Any]]:
    return quantize_model(**job)


def run_quantization_tasks(jobs: list[dict[str, Any]], cpus: float = 1.0) -> list[dict[str, Any]]:
    """Stage 2: one Ray task per trained model, running its variants; failures are reported,
    not raised, so one broken model or variant does not hide the others."""
    return _gather([(job, _quantize_task.options(num_cpus=cpus).remote(job)) for job in jobs])


def train_while_quantizing(
    fit: Callable[[], Any],
    finished_cells: Callable[[], list],
    make_job: Callable[[Any], dict[str, Any]],
    cpus: float = 1.0,
    poll_s: float = 5.0,
) -> tuple[Any, list[dict[str, Any]]]:
    """Stage 1 with stage 2 alongside: `fit` (Tune's driver loop) runs in this thread while a
    second one polls MLflow for cells whose model is logged (`finished_cells`) and starts each
    one's quantization task at once, on CPUs the trials do not hold (a task waits for free
    ones). Tune's loop stays in the calling (main) thread because only there does Tune catch
    SIGINT and stop gracefully, saving its state to resume from; a poll after it ended submits
    the cells it finished last. Returns fit's result and every quantization result."""
    submitted: dict[str, tuple[dict[str, Any], Any]] = {}
    lock = threading.Lock()
    done = threading.Event()

    def submit_finished() -> None:
        for run_info in finished_cells():
            job = make_job(run_info)
            with lock:
                if job["cell"] in submitted:
                    continue
                log.info("stage 2: %s is trained, quantizing it", job["cell"])
                submitted[job["cell"]] = (job, _quantize_task.options(num_cpus=cpus).remote(job))

    def poll() -> None:
        while not done.wait(poll_s):
            try:
                submit_finished()
            except Exception as err:  # a tracking server's hiccup; the last poll must succeed
                log.warning("stage 2: could not list trained cells (%s); retrying", err)

    poller = threading.Thread(target=poll, name="bpfm-stage-2-poll", daemon=True)
    poller.start()
    try:
        result = fit()
    finally:
        done.set()
    poller.join()
    submit_finished()
    progress.start("stage 2: quantizing models", len(submitted))
    return result, _gather(list(submitted.values()))


def _gather(pending: list[tuple[dict[str, Any], Any]]) -> list[dict[str, Any]]:
    results = []
    for job, ref in pending:
        try:
            done = ray.get(ref)
            results.extend(done)
            progress.advance()
            for entry in done:
                if entry.get("seconds"):
                    log.info("stage 2: %s/%s took %s", entry["cell"], entry["variant"],
                             ", ".join(f"{k} {v:.2f} s" for k, v in entry["seconds"].items()))
        except Exception as err:  # a task's error arrives wrapped; keep its message
            message = _last_line(err)
            log.error("quantization of %s failed: %s", job["cell"], message)
            results.extend({"cell": job["cell"], "variant": v, "error": message}
                           for v in job["variants"])
    return results


def run_grid(
    profile: Profile,
    *,
    recipe: dict[str, Any] | None = None,
    name: str | None = None,
    gpus: str = "auto",
    quant_cpus: float = 1.0,
    verbose: bool = True,
) -> dict[str, Any]:
    """The study as one job. Stage 0: data and backbones; stage 1: Tune over the grid (resumed
    when `storage/name` exists); stage 2: every trained model through every quantization variant;
    stage 3: the summary, read back from MLflow."""
    grid.check_trials(profile, recipe or {})  # bad settings and unreachable servers fail here,
    preflight.check_launch(profile)  # in seconds, not after Ray and stage 0 ran
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}
    init_ray(**quiet)
    check_job_paths(launch_paths(profile, tracking.configure()),
                    on_cluster=bool(os.environ.get("RAY_ADDRESS")),
                    nodes=sum(1 for node in ray.nodes() if node["Alive"]))
    with credentials_kept_from_trials():
        try:
            return _run_stages(profile, recipe or {}, name, gpus, quant_cpus, verbose)
        finally:
            progress.finish()


def _stage_0(profile: Profile, plan: GridPlan, train: dict[str, Any],
             gpu_count: float) -> tuple[str, dict[str, str]]:
    """Stage 0: the shard set (its generation pinned in `train`: every trial reads this one) and
    the backbones of the pretrained cells."""
    progress.start("stage 0: data, backbones", 1)
    data = grid.ensure_data(profile)
    train["data_generation"] = open_shards(data).generation
    pretrained = ensure_backbones(profile, plan.cells, data, gpu_count,
                                  int(train.get("split_seed", 42)))
    return data, pretrained


def _start_grid_run(client: MlflowClient, experiment_id: str, profile: Profile, plan: GridPlan,
                    path: str, resuming: bool, data: str, train: dict[str, Any],
                    recipe: dict[str, Any]) -> str:
    """The grid's parent run in MLflow (re-opened when the Tune experiment resumes)."""
    return tracking.start_grid_run(
        client, experiment_id, name=f"grid-{profile.name}", resume=resuming,
        tags={tracking.KIND: "grid", tracking.STUDY: profile.study,
              tracking.PROFILE: profile.name, tracking.TUNE_PATH: path},
        params={"profile": profile.name, "data": data, "storage": path,
                "data_generation": train["data_generation"],
                "n_cells": len(plan.cells), "n_trials": len(plan.trials),
                "epoch_prefix_sharing": plan.share_prefix, "recipe": recipe,
                "quantize_variants": list(profile.quantize)},
    )


def _grid_tuner(profile: Profile, plan: GridPlan, ctx: TrialContext, name: str,
                gpu_count: float, verbose: bool) -> tune.Tuner:
    return make_tuner(
        tune.with_parameters(train_cell, ctx=ctx),
        param_space=search_space(profile.axes, plan.share_prefix),
        storage=_absolute(profile.storage), name=name,
        resources=trial_resources(profile, gpu_count),
        max_failures=profile.tune.max_failures,
        max_concurrent=profile.tune.max_concurrent_trials,
        callbacks=[TrialProgress()], verbose=1 if verbose else 0,
    )


def _stages_1_and_2(tuner: tune.Tuner, client: MlflowClient, ctx: TrialContext,
                    profile: Profile, quant_cpus: float) -> tuple[ResultGrid, list[dict[str, Any]]]:
    """Stage 1 (Tune over the grid) with stage 2 alongside: each trained model is quantized as
    soon as it is logged. Returns Tune's results and every quantization result."""

    def job(run: Run) -> dict[str, Any]:
        return {"tracking_uri": ctx.tracking_uri, "experiment_id": ctx.experiment_id,
                "grid_run_id": ctx.parent_run_id, "study": profile.study,
                "cell": run.data.tags[tracking.CELL], "cell_run_id": run.info.run_id,
                "variants": profile.quantize, "data": ctx.data,
                "settings": profile.quantize_options}

    log.info("stage 2: %d variants per trained model, each model as soon as it is logged",
             len(profile.quantize))
    if not profile.quantize:
        return tuner.fit(), []
    return train_while_quantizing(
        tuner.fit, lambda: stages.launch_cells(client, ctx.experiment_id, ctx.parent_run_id),
        job, cpus=quant_cpus,
    )


def _launch_errors(results: ResultGrid, quantized: list[dict[str, Any]], cells: list[Run],
                   planned: int, profile: Profile, grid_run: str, path: str) -> list[str]:
    """Every trial's and quantization's error, one line each; a launch that trained nothing,
    or fewer cells than `planned` (interrupted), is an error too (never an empty success)."""
    errors = [_last_line(r.error) for r in results if r.error is not None]
    errors += [f"{q['cell']}/{q['variant']}: {q['error']}" for q in quantized if "error" in q]
    if not cells and not errors:
        errors.append(f"stage 1: no finished train run in MLflow experiment {profile.study} "
                      f"(grid run {grid_run}) for Tune experiment {path}")
    elif len(cells) < planned and not errors:  # Tune stopped on SIGINT (Ctrl-C), its state
        # saved; its ResultGrid shows the stopped trials as terminated
        errors.append(f"stage 1: interrupted with {len(cells)} of {planned} cells trained; "
                      "run the same command again to resume")
    return errors


def _run_stages(profile: Profile, recipe: dict[str, Any], name: str | None, gpus: str,
                quant_cpus: float, verbose: bool = True) -> dict[str, Any]:
    train = {**profile.train, "cache": profile.data.cache, **recipe}
    plan = grid.plan_grid(profile, train)
    gpu_count = cluster_gpus(gpus)
    data, pretrained = _stage_0(profile, plan, train, gpu_count)

    uri = tracking.configure()
    identity = launch.identity(train, launch.data_generation(data), uri)
    name = launch.experiment_name(_absolute(profile.storage), name or profile.study, identity,
                                  explicit=name is not None)
    client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(client, profile.study)
    tracking_view.mark_experiment(client, experiment_id)
    path = join(_absolute(profile.storage), name)
    resuming = tune.Tuner.can_restore(path)
    grid_run = _start_grid_run(client, experiment_id, profile, plan, path, resuming, data, train,
                               recipe)
    log.info("stage 1: %d cells in %d trials -> %s (MLflow %s, run %s)", len(plan.cells),
             len(plan.trials), path, tracking.redact(uri), grid_run)
    ctx = TrialContext(
        data=data, train=train, tracking_uri=uri, experiment_id=experiment_id,
        parent_run_id=grid_run, study=profile.study, profile=profile.name, pretrained=pretrained,
        checkpoint_every=profile.tune.checkpoint_every,
    )
    tuner = _grid_tuner(profile, plan, ctx, name, gpu_count, verbose)
    progress.start("stage 1: training trials", len(plan.trials))
    launch.record(_absolute(profile.storage), name, identity)
    results, quantized = _stages_1_and_2(tuner, client, ctx, profile, quant_cpus)
    cells = stages.launch_cells(client, experiment_id, grid_run)
    errors = _launch_errors(results, quantized, cells, len(plan.cells), profile, grid_run,
                            path)

    progress.start("stage 3: registering, summary", 1)
    registered = stages.register_best(client, uri, profile.study, cells)
    summary = stages.summarize(client, experiment_id, grid_run)
    tracking_view.log_leaderboard_table(client, grid_run, [table2_row(c) for c in summary["cells"]])
    tracking.finish(client, grid_run, "FAILED" if errors else "FINISHED")
    return {
        "profile": profile.name, "study": profile.study, "experiment_id": experiment_id,
        "grid_run_id": grid_run, "tune_path": path, "tracking_uri": tracking.redact(uri),
        "resumed": resuming, "n_cells": len(plan.cells), "n_trials": len(plan.trials),
        "registered": registered, "errors": errors, **summary,
    }


def _last_line(error: BaseException) -> str:
    """The line that says what went wrong (a Ray task error carries the remote traceback)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _absolute(storage: str) -> str:
    if is_local(storage):
        return str(Path(storage.removeprefix("file://")).expanduser().absolute())
    return storage
