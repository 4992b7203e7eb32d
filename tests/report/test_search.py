"""The Optuna search on local Ray: an interrupted study resumes from its storage, every trial is an
MLflow run, and the best trial becomes a recipe the grid accepts."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from bpfm.orchestration.ray_search import (
    DefineByRun,
    SearchConfig,
    SearchSpace,
    open_study,
    rdb_storage,
    recipe_overrides,
    run_search,
)
from bpfm.profiles import load_profile, load_recipe
from bpfm.training.config import TrainConfig
from tests.report.conftest import write_profile

CELL = {"size": "small", "freeze": "unfrozen", "init": "xavier", "source": "mimic",
        "protocol": "paper", "seed": 42, "epochs": 2}


def test_mlp_width_and_depth_become_hidden_sizes():
    params = {"lr": 1e-3, "weight_decay": 1e-4, "head": "mlp", "mlp_width": 128,
              "mlp_depth": 3, "head_dropout": 0.1, "warmup_epochs": 1}
    overrides = recipe_overrides(params)
    assert overrides["head_hidden"] == [128, 128, 128]
    TrainConfig.from_dict({**overrides, "data": "x"}).validate()
    linear = recipe_overrides({**params, "head": "linear"})
    assert linear["head"] == "linear" and linear["head_hidden"] == []


def test_the_space_stays_inside_its_bounds_and_returns_the_cell():
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    space = DefineByRun(SearchSpace(), CELL)
    for _ in range(12):
        trial = study.ask()
        config = space(trial)
        study.tell(trial, 1.0)
        assert 1e-5 <= trial.params["lr"] <= 3e-3
        assert trial.params["warmup_epochs"] <= CELL["epochs"] - 1
        assert config["optuna_trial"] == trial.number and config["size"] == "small"
    assert {t.params["head"] for t in study.trials} <= {"paper", "linear", "mlp"}


@pytest.mark.slow
def test_an_interrupted_search_resumes_from_its_storage(
    tmp_path, tracking_uri, synthetic_shards, local_ray
):
    path = write_profile(tmp_path / "search.yaml", data=synthetic_shards, storage=tmp_path / "ray")
    profile = load_profile(str(path))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    recipe = tmp_path / "recipe.yaml"
    config = SearchConfig(cell=CELL, trials=2, study="s", storage=storage, recipe_out=str(recipe),
                          max_concurrent=2)
    first = run_search(profile, config)
    assert (first["ran"], first["finished"]) == (2, 2)

    # The driver dies in the middle of the third trial: the storage holds a RUNNING trial.
    study, finished = open_study(rdb_storage(storage), "s")
    assert finished == 2
    study.ask()

    config.trials = 4
    second = run_search(profile, config)
    assert second["ran"] == 2 and second["finished"] == 4
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states.count(TrialState.FAIL) == 1  # the interrupted one, not counted
    assert len(states) - states.count(TrialState.FAIL) == 4

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("report-test-search")
    runs = client.search_runs([experiment.experiment_id], "tags.`bpfm.kind` = 'search'")
    trials = [r for r in runs if r.data.tags["bpfm.search.role"] == "trial"]
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials)
    assert all(r.data.params["lr"] and r.data.params["size"] == "small" for r in trials)
    assert all(r.data.metrics.get("val_mae") is not None for r in trials)
    (study_run,) = [r for r in runs if r.data.tags["bpfm.search.role"] == "study"]
    assert "recipe.yaml" in {a.path for a in client.list_artifacts(study_run.info.run_id)}

    overrides = load_recipe(recipe)
    assert overrides == second["best"]
    assert set(overrides) <= set(TrainConfig.__dataclass_fields__)
    TrainConfig.from_dict({**profile.train, **overrides, "data": "x"}).validate()


def test_recipe_file_has_the_format_the_grid_reads(tmp_path, capsys):
    from bpfm.cli import main
    from bpfm.orchestration.ray_search import write_recipe

    study = optuna.create_study()
    study.enqueue_trial({"lr": 2e-4, "weight_decay": 1e-3, "head": "mlp", "mlp_width": 64,
                         "mlp_depth": 2, "head_dropout": 0.2, "warmup_epochs": 1})
    trial = study.ask()
    DefineByRun(SearchSpace(), CELL)(trial)
    study.tell(trial, 7.5)
    path = Path(tmp_path) / "r.yaml"
    write_recipe(path, study, CELL)
    assert load_recipe(path) == {"lr": 2e-4, "weight_decay": 1e-3, "head": "mlp",
                                 "head_hidden": [64, 64], "head_dropout": 0.2,
                                 "warmup_epochs": 1}
    assert main(["grid", "--profile", "tiny", "--recipe", str(path), "--dry-run"]) == 0
    assert "cells" in capsys.readouterr().out


def test_a_bad_cell_is_a_one_line_error(capsys):
    from bpfm.cli import main

    assert main(["search", "--profile", "tiny", "--source", "nowhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--source" in err[0] and "nowhere" in err[0]
