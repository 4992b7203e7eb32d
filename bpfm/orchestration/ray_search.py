"""Optuna search over the training recipe of one grid cell, run by Ray Tune: `OptunaSearch` (TPE,
seeded) proposes learning rate, weight decay, head type (paper, linear, mlp), MLP width and depth,
dropout and warm-up; ASHA stops poor trials early. Besides `bpfm.orchestration.ray_grid`, the only
module in bpfm that imports ray.

Resuming: the Optuna study lives in a storage (sqlite file or database URL), and every launch
asks for `trials - finished` new trials of that study, so an interrupted search continues where it
stopped. A trial that was running when the driver died is marked FAIL and not counted. The
sampler's seed is offset by the trials already in the study, so a resumed search does not replay
the first launch's random start-up suggestions.

MLflow: a run per study (`bpfm.kind=search`, `bpfm.search.role=study`) and under it a run per
trial (`bpfm.kind=search`, role `trial`), logged from the driver so that trials ASHA stops are
closed too. The best trial becomes a recipe file (TrainConfig overrides under `train:`) for
`pipelines/grid.py --recipe FILE`."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import yaml
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from bpfm import defaults, tracking
from bpfm.errors import BpfmError
from bpfm.io.storage import join
from bpfm.orchestration import grid
from bpfm.orchestration.ray_grid import (
    _absolute,
    cluster_gpus,
    ensure_pretrained,
    init_ray,
    trial_resources,
)
from bpfm.profiles import Profile

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from ray.tune.experiment import Trial

    from bpfm.training.loop import EpochReport

log = logging.getLogger(__name__)

ROLE = "bpfm.search.role"  # study | trial
STUDY_NAME = "bpfm.search.study"
OPTUNA_TRIAL = "bpfm.optuna_trial"
STOPPED_EARLY = "bpfm.search.stopped_early"
CELL_KEYS = ("size", "freeze", "init", "source", "protocol", "seed", "epochs")


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of the searched recipe fields (log scale for lr and weight decay)."""

    lr: tuple[float, float] = (1e-5, 3e-3)
    weight_decay: tuple[float, float] = (1e-6, 1e-1)
    heads: tuple[str, ...] = ("paper", "linear", "mlp")
    mlp_widths: tuple[int, ...] = (64, 128, 256, 512)
    mlp_depth: tuple[int, int] = (1, 3)
    dropout: tuple[float, float] = (0.0, 0.5)
    max_warmup_epochs: int = 5


@dataclass
class SearchConfig:
    cell: dict[str, Any]  # size, freeze, init, source, protocol, seed, epochs
    trials: int = 20
    study: str = ""  # default: search-<cell>
    storage: str = ""  # Optuna storage URL or sqlite file; default under bpfm.defaults.home()
    experiment: str = ""  # MLflow experiment; default <profile study>-search
    recipe_out: str = ""  # default <home>/search/<study>/recipe.yaml
    seed: int = 42  # the TPE sampler's seed
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent: int = 1
    space: SearchSpace = field(default_factory=SearchSpace)


def storage_url(storage: str) -> str:
    """A database URL for Optuna: URLs pass through, a file path becomes sqlite."""
    if not storage:
        storage = str(defaults.home() / "search" / "optuna.db")
    if "://" in storage:
        return storage
    path = Path(storage).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def shown_url(url: str) -> str:
    """A storage URL fit for logs: credentials masked (sqlite paths pass unchanged, since the URL
    parser would eat a slash of `sqlite:////abs/path`)."""
    return url if url.startswith("sqlite:") else tracking.redact(url)


@dataclass(frozen=True)
class DefineByRun:
    """Optuna's define-by-run space (a class, not a closure: Tune pickles its searcher). The
    cell's axes and the trial number come back as constants, so every Tune config knows its cell
    and its Optuna trial."""

    space: SearchSpace
    cell: dict[str, Any]

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        space = self.space
        trial.suggest_float("lr", *space.lr, log=True)
        trial.suggest_float("weight_decay", *space.weight_decay, log=True)
        head = trial.suggest_categorical("head", list(space.heads))
        if head == "mlp":
            trial.suggest_categorical("mlp_width", list(space.mlp_widths))
            trial.suggest_int("mlp_depth", *space.mlp_depth)
        trial.suggest_float("head_dropout", *space.dropout)
        max_warmup = max(0, min(space.max_warmup_epochs, int(self.cell["epochs"]) - 1))
        trial.suggest_int("warmup_epochs", 0, max_warmup)
        return {**self.cell, "optuna_trial": trial.number}


def recipe_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's parameters as TrainConfig fields (width x depth becomes `head_hidden`)."""
    overrides = {
        "lr": float(params["lr"]),
        "weight_decay": float(params["weight_decay"]),
        "head": params["head"],
        "head_hidden": [],
        "head_dropout": float(params["head_dropout"]),
        "warmup_epochs": int(params["warmup_epochs"]),
    }
    if params["head"] == "mlp":
        overrides["head_hidden"] = [int(params["mlp_width"])] * int(params["mlp_depth"])
    return overrides


@dataclass(frozen=True)
class SearchContext:
    """What every trial shares (passed with `tune.with_parameters`)."""

    data: str
    train: dict[str, Any]  # the profile's recipe
    checkpoint: str | None  # backbone of a pretrained cell


def trial_train_values(config: dict[str, Any], ctx: SearchContext, out: str) -> dict[str, Any]:
    """The TrainConfig fields of one trial: recipe, cell, searched overrides."""
    cell = {k: config[k] for k in CELL_KEYS}
    values = {**ctx.train, **cell, **recipe_overrides(config), "data": ctx.data, "out": out}
    values["report_epochs"] = ()
    if cell["init"] == "pretrained":
        values["checkpoint"] = ctx.checkpoint
    return values


def search_trial(config: dict[str, Any], ctx: SearchContext) -> None:
    """Tune trainable: train the cell with the trial's recipe, reporting val_mae every epoch
    (ASHA's signal) and, at the last epoch, the test metrics as `test_*`."""
    from bpfm.training.config import TrainConfig  # lazy: torch
    from bpfm.training.loop import fit  # lazy: torch

    tracking.configure()
    out = Path(tune.get_context().get_trial_dir()) / "model"
    train = TrainConfig.from_dict(trial_train_values(config, ctx, str(out)))

    def report(epoch_report: EpochReport) -> None:
        metrics = {"epoch": epoch_report.epoch, "val_mae": epoch_report.val_mae,
                   "train_loss": epoch_report.train_loss}
        metrics.update({k: v for k, v in epoch_report.metrics.items()
                        if k.startswith("test_") and isinstance(v, int | float | str)})
        tune.report(metrics)

    try:
        fit(train.validate(), callbacks=[report], resume=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the grid retrains the winner; keep disk small


class TrialRuns(tune.Callback):
    """One MLflow run per trial under the study's run, written by the driver: params when a trial
    starts, per-epoch curves, final metrics and the grade tags when it ends (also when ASHA
    stopped it), FAILED when it errors."""

    def __init__(self, tracking_uri: str, experiment_id: str, study_run: str, study: str,
                 ctx: SearchContext) -> None:
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.study_run, self.study, self.ctx = study_run, study, ctx
        self.runs: dict[str, str] = {}

    def _client(self) -> MlflowClient:
        return tracking.client(self.tracking_uri)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        from bpfm.training.config import TrainConfig  # lazy: torch

        number = trial.config["optuna_trial"]
        values = trial_train_values(trial.config, self.ctx, "")
        params = tracking.safe_params(values, TrainConfig.__dataclass_fields__)
        tags = {tracking.KIND: "search", ROLE: "trial", STUDY_NAME: self.study,
                OPTUNA_TRIAL: str(number), "bpfm.tune_trial_id": trial.trial_id}
        run_id, _ = tracking.child_run(self._client(), self.experiment_id, self.study_run,
                                       key=f"trial-{number}", name=f"trial-{number}",
                                       tags=tags, params=params)
        self.runs[trial.trial_id] = run_id

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict[str, Any], **info: Any) -> None:
        run_id = self.runs.get(trial.trial_id)
        if run_id:
            tracking.log_epoch(self._client(), run_id, int(result["epoch"]), result)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        run_id = self.runs.pop(trial.trial_id, None)
        if run_id is None:
            return
        result = trial.last_result or {}
        client = self._client()
        if result.get("epoch"):
            # ASHA may stop a trial on a result that on_trial_result never saw.
            tracking.log_epoch(client, run_id, int(result["epoch"]), result)
        final = {k.removeprefix("test_"): v for k, v in result.items() if k.startswith("test_")}
        tracking.log_results(client, run_id, final)
        stopped = int(result.get("epoch", 0)) < int(trial.config["epochs"])
        client.set_tag(run_id, STOPPED_EARLY, str(stopped).lower())
        tracking.finish(client, run_id)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        run_id = self.runs.pop(trial.trial_id, None)
        if run_id:
            tracking.finish(self._client(), run_id, "FAILED")


def rdb_storage(url: str) -> optuna.storages.RDBStorage:
    # sqlite: wait for a lock instead of failing while another process writes the study.
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})


def open_study(storage: optuna.storages.BaseStorage, name: str) -> tuple[optuna.Study, int]:
    """The study (created on first use) and how many of its trials finished (COMPLETE or
    PRUNED). Trials left RUNNING by a driver that died are told FAIL, so they do not count: run
    one launch per study at a time."""
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize",
                                load_if_exists=True)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        log.info("study %s: trial %d was interrupted; marked FAIL", name, trial.number)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return study, len(done)


def write_recipe(path: Path, study: optuna.Study, cell: dict[str, Any]) -> dict[str, Any]:
    """The best trial's recipe: TrainConfig overrides under `train:`, with where they came from
    under `search:` (pipelines/grid.py reads only `train:`)."""
    best = study.best_trial
    overrides = recipe_overrides(best.params)
    document = {
        "train": overrides,
        "search": {
            "study": study.study_name,
            "trial": best.number,
            "val_mae": best.value,
            "cell": dict(cell),
            "trials": len(study.trials),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# bpfm search: best of study {study.study_name} (trial {best.number}, "
        f"val_mae {best.value:.3f} mmHg). Use: pipelines/grid.py --recipe {path.name}\n"
    )
    path.write_text(header + yaml.safe_dump(document, sort_keys=False))
    return overrides


def _study_run(client: MlflowClient, experiment_id: str, study: str, params: dict[str, Any]) -> str:
    """The study's MLflow run: created by the first launch, re-opened by the next ones."""
    found = tracking.find_runs(client, experiment_id, {ROLE: "study", STUDY_NAME: study})
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(
        experiment_id,
        run_name=study,
        tags={tracking.KIND: "search", ROLE: "study", STUDY_NAME: study},
    )
    for key, value in tracking.safe_params(params, params).items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def _search_context(profile: Profile, cell: dict[str, Any], gpus: str) -> tuple[SearchContext,
                                                                               float]:
    """Ray up, the cell's data and (for a pretrained cell) its backbone: what trials share."""
    init_ray()
    gpu_count = cluster_gpus(gpus)
    data = grid.ensure_data(profile)
    checkpoint = None
    if cell["init"] == "pretrained":
        checkpoint = ensure_pretrained(profile, [cell["size"]], gpu_count)[cell["size"]]
    return SearchContext(data=data, train=dict(profile.train), checkpoint=checkpoint), gpu_count


def _search_tuner(profile: Profile, config: SearchConfig, study: optuna.Study, study_name: str,
                  storage: optuna.storages.BaseStorage, remaining: int, ctx: SearchContext,
                  gpu_count: float, callback: TrialRuns) -> tune.Tuner:
    """Tune over `remaining` new trials of the study: TPE proposes, ASHA stops early."""
    cell = config.cell
    # Offset by the study's size: a resumed search must not replay the first suggestions.
    sampler = optuna.samplers.TPESampler(seed=config.seed + len(study.trials))
    searcher = OptunaSearch(
        space=DefineByRun(config.space, cell), metric="val_mae", mode="min",
        sampler=sampler, study_name=study_name, storage=storage,
    )
    scheduler = ASHAScheduler(max_t=int(cell["epochs"]), grace_period=config.grace_period,
                              reduction_factor=config.reduction_factor)
    return tune.Tuner(
        tune.with_resources(tune.with_parameters(search_trial, ctx=ctx),
                            trial_resources(profile, gpu_count)),
        tune_config=tune.TuneConfig(
            metric="val_mae", mode="min", num_samples=remaining, scheduler=scheduler,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=config.max_concurrent),
        ),
        run_config=tune.RunConfig(
            name=f"{study_name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=join(_absolute(profile.storage), "search"),
            callbacks=[callback],
            verbose=1,
        ),
    )


def _finish_study(client: MlflowClient, study_run: str, study: optuna.Study, shown: str,
                  config: SearchConfig) -> tuple[Path, dict[str, Any]]:
    """The best trial's recipe file, logged with the best val_mae to the study's run, which
    is closed (FAILED when no trial completed). Returns the recipe path and its overrides."""
    study_name = study.study_name
    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        tracking.finish(client, study_run, "FAILED")
        raise BpfmError(f"{shown}: study {study_name}: no trial completed")
    recipe_path = Path(config.recipe_out or defaults.home() / "search" / study_name / "recipe.yaml")
    overrides = write_recipe(recipe_path, study, config.cell)
    client.log_artifact(study_run, str(recipe_path))
    best = study.best_trial
    tracking.log_results(client, study_run, {"best_val_mae": best.value}, extra=("best_val_mae",))
    client.set_tag(study_run, "bpfm.search.best_trial", str(best.number))
    tracking.finish(client, study_run)
    return recipe_path, overrides


def run_search(profile: Profile, config: SearchConfig, *, gpus: str = "auto") -> dict[str, Any]:
    """The search of one cell of `profile` (data, backbone, recipe and resources come from it)."""
    cell = config.cell
    study_name = config.study or "search-" + grid.Cell(**cell).id
    url = storage_url(config.storage)
    storage = rdb_storage(url)
    study, finished = open_study(storage, study_name)
    remaining = config.trials - finished
    log.info("study %s (%s): %d finished, %d to run", study_name, shown_url(url),
             finished, max(remaining, 0))
    ctx, gpu_count = _search_context(profile, cell, gpus)

    uri = tracking.configure()
    client = tracking.client(uri)
    experiment = config.experiment or f"{profile.study}-search"
    experiment_id = tracking.ensure_experiment(client, experiment)
    study_run = _study_run(client, experiment_id, study_name,
                           {**cell, "profile": profile.name, "storage": shown_url(url),
                            "trials": config.trials, "sampler_seed": config.seed})
    if remaining > 0:
        callback = TrialRuns(uri, experiment_id, study_run, study_name, ctx)
        _search_tuner(profile, config, study, study_name, storage, remaining, ctx, gpu_count,
                      callback).fit()
    study, finished = open_study(storage, study_name)
    recipe_path, overrides = _finish_study(client, study_run, study, shown_url(url), config)
    best = study.best_trial
    return {
        "study": study_name, "storage": shown_url(url), "trials": len(study.trials),
        "finished": finished,
        "complete": sum(t.state == TrialState.COMPLETE for t in study.trials),
        "ran": max(remaining, 0),
        "pruned": sum(t.state == TrialState.PRUNED for t in study.trials),
        "best_trial": best.number, "best_val_mae": best.value, "recipe": str(recipe_path),
        "best": overrides, "study_run_id": study_run,
    }
