"""The grid on local Ray with the real services: SeaweedFS S3 as Tune storage and MLflow artifact
store, a real MLflow server. One Ray instance for the module."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from bpfm import tracking
from bpfm.io.scratch import process_runs
from bpfm.profiles import load_profile
from tests.orchestration.conftest import (
    BASE_PROFILE,
    local_ray,
    result_lines,
    trial_states,
    write_profile,
)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def grid_env(s3_server, mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    env = {**s3_server.env(), "MLFLOW_TRACKING_URI": mlflow_server.uri,
           "BPFM_HOME": str(root / "home")}
    with local_ray(env) as address:
        yield SimpleNamespace(root=root, s3=s3_server, mlflow=mlflow_server, address=address,
                              client=tracking.client(mlflow_server.uri))


@pytest.fixture(scope="module")
def first_grid(grid_env, synthetic_shards):
    """2 trials (frozen / unfrozen), each reporting at epochs 1 and 2 = 4 cells, on S3."""
    from bpfm.orchestration.ray_grid import run_grid

    path = write_profile(
        grid_env.root, "first", study="orch-first", data={"uri": synthetic_shards},
        storage=f"s3://{grid_env.s3.bucket}/tune", tune={"max_failures": 1},
        quantize={"dynamic": {"mode": "dynamic", "weights": "per_channel"}},
    )
    return run_grid(load_profile(str(path)))


def test_grid_trains_every_cell_once_and_tracks_it(first_grid, grid_env, synthetic_shards):
    from bpfm.data.shards import open_shards

    assert first_grid["errors"] == []
    generation = open_shards(synthetic_shards).generation  # every trial pinned this one
    grid_params = grid_env.client.get_run(first_grid["grid_run_id"]).data.params
    assert grid_params["data_generation"] == generation
    assert (first_grid["n_cells"], first_grid["n_trials"]) == (4, 2)
    client = grid_env.client
    experiment_id = first_grid["experiment_id"]
    train = tracking.runs_of(client, experiment_id, first_grid["grid_run_id"], "train")
    assert sorted(r.data.tags[tracking.CELL] for r in train) == sorted(
        f"small-{f}-e{e}-xavier-mimic-paper-s42" for f in ("frozen", "unfrozen") for e in (1, 2)
    )
    for run in train:
        params = run.data.params
        assert run.info.status == "FINISHED"
        assert run.data.tags[tracking.CELL] == (
            f"{params['size']}-{params['freeze']}-e{params['epochs']}-{params['init']}-"
            f"{params['source']}-{params['protocol']}-s{params['seed']}"
        )
        assert params["lr"] == "0.001" and params["max_steps_per_epoch"] == "1"
        assert params["data_generation"] == generation
        assert {"sbp_mae", "dbp_r2", "sbp_bhs5", "val_mae", "train_loss"} <= set(run.data.metrics)
        assert run.data.tags["aami"] in {"pass", "fail", "not_assessable"}
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_mae")]
        assert steps == list(range(1, int(params["epochs"]) + 1))
    # the two cells of one trial share it: the 1-epoch model is the 2-epoch run at epoch 1
    trials = {r.data.tags[tracking.TRIAL] for r in train}
    assert len(trials) == 2


def test_every_trained_model_is_quantized_in_a_nested_run(first_grid, grid_env):
    client = grid_env.client
    train = {r.info.run_id: r for r in tracking.runs_of(
        client, first_grid["experiment_id"], first_grid["grid_run_id"], "train")}
    quant = tracking.find_runs(client, first_grid["experiment_id"],
                               {tracking.GRID_RUN: first_grid["grid_run_id"],
                                tracking.KIND: "quant"})
    assert len(quant) == 4 and len(first_grid["quantized"]) == 4
    for run in quant:
        assert run.data.tags[tracking.PARENT] in train
        assert run.data.params["mode"] == "dynamic"
        assert {"size_mib", "latency_ms_b1", "latency_ms_b64", "sbp_mae"} <= set(run.data.metrics)


def test_artifacts_and_tune_state_land_in_s3(first_grid, grid_env):
    s3 = grid_env.s3.client()
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=grid_env.s3.bucket) for o in page.get("Contents", [])]
    names = {key.rsplit("/", 1)[-1] for key in keys if key.startswith("mlflow/")}
    assert {"model.safetensors", "predictions.parquet", "bland_altman.png", "scatter.png"} <= names
    assert any(k.startswith("mlflow/") and "/quantized/" in k for k in keys)
    tune_keys = [k for k in keys if k.startswith("tune/orch-first/")]
    assert any("experiment_state" in k for k in tune_keys)
    assert any("/checkpoint_" in k for k in tune_keys)
    version = grid_env.client.get_model_version_by_alias("orch-first-mimic", "best")
    assert first_grid["registered"]["mimic"] == "models:/orch-first-mimic@best"
    assert version.run_id in {c["run_id"] for c in first_grid["cells"]}


def test_leaderboard_reads_the_server_it_is_given_with_no_stray_store(first_grid, grid_env,
                                                                    tmp_path):
    """`bpfm leaderboard --tracking-uri` alone (no MLFLOW_TRACKING_URI): the registered best
    model's logged-model lookup goes to that server, not to a `./mlflow.db` in the cwd."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(REPO)
    bpfm = str(Path(sys.executable).parent / "bpfm")
    done = subprocess.run([bpfm, "leaderboard", "--experiment", "orch-first", "--tracking-uri",
                           grid_env.mlflow.uri, "--out", "r", "--no-log"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "r" / "report.html").is_file()
    assert not (tmp_path / "mlflow.db").exists()


def test_a_rerun_that_changes_nothing_registers_no_version_and_models_are_logged_once(
        first_grid, grid_env):
    from bpfm.orchestration.ray_grid import run_grid

    client = grid_env.client
    versions = client.search_model_versions("name = 'orch-first-mimic'")
    again = run_grid(load_profile(str(grid_env.root / "first.yaml")))
    assert again["resumed"] and again["errors"] == [] and len(again["cells"]) == 4
    assert len(client.search_model_versions("name = 'orch-first-mimic'")) == len(versions)
    quant = tracking.find_runs(client, first_grid["experiment_id"],
                               {tracking.GRID_RUN: first_grid["grid_run_id"],
                                tracking.KIND: "quant"})
    files = [f.path for f in client.list_artifacts(quant[0].info.run_id, "quantized")]
    assert files and "quantized/model.pt" not in files  # the model is the MLflow model only
    assert client.search_logged_models([first_grid["experiment_id"]],
                                       filter_string="name = 'quantized_model'")


def test_a_changed_recipe_or_store_is_a_new_experiment_or_an_error(first_grid, grid_env,
                                                                  tmp_path, monkeypatch):
    """Resuming a finished study with another recipe or MLflow store: with --name, an error
    naming the difference; by default a new experiment (name + hash of what changed) that trains
    every cell with the new recipe. Never the old table, never an empty success."""
    from bpfm.errors import BpfmError
    from bpfm.orchestration.ray_grid import run_grid

    profile = load_profile(str(grid_env.root / "first.yaml"))
    with pytest.raises(BpfmError, match=r"recipe lr: 0\.001 -> 0\.0003"):
        run_grid(profile, recipe={"lr": 3e-4}, name="orch-first")
    with monkeypatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
        with pytest.raises(BpfmError, match=r"MLflow store: http://.* -> sqlite:///"):
            run_grid(profile, name="orch-first")
    changed = run_grid(profile, recipe={"lr": 3e-4})
    assert changed["errors"] == [] and not changed["resumed"]
    assert changed["tune_path"].startswith(first_grid["tune_path"] + "-")
    train = tracking.runs_of(grid_env.client, changed["experiment_id"], changed["grid_run_id"],
                             "train")
    assert len(train) == 4 and {r.data.params["lr"] for r in train} == {"0.0003"}


def test_mlflow_shows_the_study_at_a_glance(first_grid, grid_env, synthetic_shards):
    """The experiment opens as model training, the grid run holds the summary as an MLflow table,
    each cell run has key metrics that sort and plot, and params name the user's URIs."""
    client = grid_env.client
    experiment = client.get_experiment(first_grid["experiment_id"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    table = client.load_table(first_grid["experiment_id"], "leaderboard.json",
                              run_ids=[first_grid["grid_run_id"]])
    assert len(table) == 4 and {"dbp_mae", "sbp_mase", "n", "bhs", "aami"} <= set(table.columns)
    for run in tracking.runs_of(client, first_grid["experiment_id"], first_grid["grid_run_id"],
                                "train"):
        metrics, params = run.data.metrics, run.data.params
        assert metrics["mae_mean"] == pytest.approx((metrics["sbp_mae"] + metrics["dbp_mae"]) / 2)
        assert metrics["bhs_sbp"] in {1, 2, 3, 4} and metrics["aami_pass"] in {-1, 0, 1}
        assert params["data"] == synthetic_shards
        assert not [v for v in params.values() if "bpfm-trial-" in v or "/ray/session" in v]


@contextlib.contextmanager
def killing_the_trial_process(epoch: int) -> Iterator[list[int]]:
    """SIGKILLs the trial process (a real fault: a worker dying) while it writes the checkpoint
    of `epoch`, after it reported the epoch before to Tune and before it reports this one. The
    process is found by its scratch folder, `bpfm-trial-<host>-<pid>-*` in the temp folder; once
    it has finished the epoch before, it runs in 2 ms slices between SIGSTOPs, so that the kill
    lands inside that window however fast the epoch is. Yields the PIDs it killed."""
    from bpfm.orchestration.ray_grid import TRIAL_WORK_PREFIX

    killed: list[int] = []
    done = threading.Event()
    started = time.time()

    def trial_folders() -> list[tuple[int, Path]]:
        found = []
        for folder in Path(tempfile.gettempdir()).glob(f"{TRIAL_WORK_PREFIX}*-*-*"):
            pid = folder.name.rsplit("-", 2)[1]
            if pid.isdigit() and folder.stat().st_mtime >= started - 1 and process_runs(int(pid)):
                found.append((int(pid), folder))
        return found

    def watch() -> None:
        while not done.is_set() and not killed:
            for pid, folder in trial_folders():
                checkpoints = folder / "out" / "checkpoints"
                if not (checkpoints / f"epoch-{epoch - 1:04d}").is_dir():
                    continue
                try:
                    while not done.is_set():
                        os.kill(pid, signal.SIGSTOP)
                        if any(f"{epoch:04d}" in p.name for p in checkpoints.iterdir()):
                            os.kill(pid, signal.SIGKILL)
                            killed.append(pid)
                            return
                        os.kill(pid, signal.SIGCONT)
                        time.sleep(0.002)
                except (ProcessLookupError, FileNotFoundError):
                    break  # the trial ended before its epoch
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield killed
    finally:
        done.set()
        watcher.join()
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def test_a_trial_whose_process_dies_resumes_from_its_checkpoint(first_grid, grid_env,
                                                                synthetic_shards):
    from bpfm.orchestration.ray_grid import run_grid

    axes = {**BASE_PROFILE["axes"], "freeze": ["unfrozen"]}
    path = write_profile(grid_env.root, "fault", study="orch-fault", axes=axes,
                         data={"uri": synthetic_shards}, storage=str(grid_env.root / "tune"))
    with killing_the_trial_process(epoch=2) as killed:
        result = run_grid(load_profile(str(path)))
    assert len(killed) == 1  # the fault did happen, once
    assert result["errors"] == []
    faulted = {c["cell"]: c for c in result["cells"]}
    clean = {c["cell"]: c for c in first_grid["cells"]}
    for cell, row in faulted.items():
        for metric in ("sbp_mae", "dbp_mae", "sbp_r2", "dbp_sd"):
            assert row[metric] == pytest.approx(clean[cell][metric], rel=1e-5), (cell, metric)
    e2 = next(c for c in result["cells"] if "-e2-" in c["cell"])
    steps = [m.step for m in grid_env.client.get_metric_history(e2["run_id"], "val_mae")]
    assert steps == [1, 2]  # epoch 1 was not trained (nor logged) again after the fault


def _driver(profile: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "pipelines/grid.py", "--profile", str(profile),
                                 "--json"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_a_finished_trial(driver: subprocess.Popen, experiment: str, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not [t for t, s in trial_states(experiment).items() if s == "TERMINATED"]:
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(0.5)


def test_a_killed_driver_resubmitted_resumes_without_rerunning_finished_cells(
        grid_env, synthetic_shards):
    storage = f"s3://{grid_env.s3.bucket}/resume"
    seeds = list(range(4))  # one-epoch trials, one at a time: the driver dies between two
    axes = {**BASE_PROFILE["axes"], "freeze": ["unfrozen"], "epochs": [1], "seed": seeds}
    path = write_profile(grid_env.root, "resume", study="orch-resume", axes=axes,
                         data={"uri": synthetic_shards}, storage=storage,
                         tune={"max_failures": 1, "max_concurrent_trials": 1})
    experiment = f"{storage}/orch-resume"
    env = {**os.environ, "RAY_ADDRESS": grid_env.address}
    log = grid_env.root / "driver.log"
    driver = _driver(path, env, log)
    try:
        _wait_for_a_finished_trial(driver, experiment, log)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finished = [t for t, s in trial_states(experiment).items() if s == "TERMINATED"]
    assert 1 <= len(finished) < len(seeds)  # killed mid-grid
    reports = {t: result_lines(experiment, t) for t in finished}
    assert set(reports.values()) == {1}

    rerun = subprocess.run([sys.executable, "pipelines/grid.py", "--profile", str(path), "--json"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = rerun.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    assert result.get("errors") == [] and rerun.returncode == 0, (
        result.get("errors"), rerun.stderr[-3000:])
    assert result["resumed"] is True
    assert set(trial_states(experiment).values()) == {"TERMINATED"}
    assert {t: result_lines(experiment, t) for t in finished} == reports  # not run again
    train = tracking.runs_of(grid_env.client, result["experiment_id"], result["grid_run_id"],
                             "train")
    cells = [r.data.tags[tracking.CELL] for r in train]
    assert len(cells) == len(seeds) == len(set(cells))  # one run per cell across both launches


def test_ctrl_c_stops_the_grid_gracefully_and_quantizes_what_was_trained(
        grid_env, synthetic_shards):
    storage = f"s3://{grid_env.s3.bucket}/interrupt"
    seeds = list(range(4))  # one-epoch trials, one at a time: Ctrl-C lands between two
    axes = {**BASE_PROFILE["axes"], "freeze": ["unfrozen"], "epochs": [1], "seed": seeds}
    path = write_profile(grid_env.root, "interrupt", study="orch-interrupt", axes=axes,
                         data={"uri": synthetic_shards}, storage=storage,
                         tune={"max_failures": 1, "max_concurrent_trials": 1},
                         quantize={"dynamic": {"mode": "dynamic", "weights": "per_channel"}})
    experiment = f"{storage}/orch-interrupt"
    env = {**os.environ, "RAY_ADDRESS": grid_env.address}
    log = grid_env.root / "interrupt.log"
    driver = _driver(path, env, log)
    try:
        _wait_for_a_finished_trial(driver, experiment, log)
        os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C sends the terminal's process group
        code = driver.wait(timeout=180)  # Tune ends its loop, stages 2 and 3 run on its own
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    text = log.read_text()
    assert "Stop signal received" in text, text[-3000:]  # Tune's own graceful stop
    assert "run the same bpfm command again" in text, text[-3000:]
    result = json.loads(text.strip().splitlines()[-1])
    assert code != 0 and any("interrupted" in e for e in result["errors"]), result["errors"]
    states = trial_states(experiment)
    finished = [t for t, s in states.items() if s == "TERMINATED"]
    assert 1 <= len(finished) < len(seeds), states  # stopped mid-grid, state saved
    quantized = tracking.find_runs(grid_env.client, result["experiment_id"],
                                   {tracking.GRID_RUN: result["grid_run_id"],
                                    tracking.KIND: "quant"})
    trained = tracking.runs_of(grid_env.client, result["experiment_id"],
                               result["grid_run_id"], "train")
    assert len(quantized) == len(trained) >= len(finished)  # every logged model got stage 2


def test_shard_job_converts_each_s3_file_once_and_publishes_one_manifest(
        grid_env, synthetic_subset_files, synthetic_shards):
    from bpfm.data.shards import open_shards
    from bpfm.io.storage import list_dir
    from pipelines.shard import shard_with_ray

    bucket = grid_env.s3.bucket
    s3 = grid_env.s3.client()
    for path in synthetic_subset_files:
        s3.upload_file(str(path), bucket, f"raw/{path.name}")
    out = f"s3://{bucket}/shards-ray"
    first = shard_with_ray([f"s3://{bucket}/raw"], out)
    reference = open_shards(synthetic_shards).manifest  # bpfm data shard of the same files
    assert first["files_converted"] == len(synthetic_subset_files) and not first["up_to_date"]
    assert first["key"] == reference["key"]  # same inputs and options: the same shard set
    assert first["partitions"] == reference["partitions"]
    assert open_shards(out).dataset().count_rows() == reference["rows"]

    again = shard_with_ray([f"s3://{bucket}/raw"], out)
    assert again["files_skipped"] == len(synthetic_subset_files) and again["up_to_date"]

    part = next(p for p in first["parts"] if "subset=train" in p["path"])
    s3.delete_object(Bucket=bucket, Key=f"shards-ray/{part['path']}")
    repaired = shard_with_ray([f"s3://{bucket}/raw"], out)
    assert repaired["files_converted"] == 1  # only the file that lost a part
    assert open_shards(out).dataset().count_rows() == reference["rows"]
    assert [n for n in list_dir(out) if n.startswith("gen-")] == [first["generation"]]
