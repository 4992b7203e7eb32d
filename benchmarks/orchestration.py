"""What orchestration costs: Tune overhead per trial, and the epochs prefix sharing saves.

    .venv/bin/python benchmarks/orchestration.py [--trials 16] [--work-s 1.0] [--no-bpfm]

1. bare Tune: N trials that each do `--work-s` seconds of single-threaded torch work and report
   once, on local Ray with 2 CPUs (2 trials at a time), with a new actor per trial (Tune's
   default) and with actors reused (what bpfm uses). Overhead per trial =
   (wall x concurrency - sum of trial work) / N.
2. bpfm's trainable: N one-epoch cells of the `small` model (one optimizer step, evaluation,
   model dir, MLflow logging, Tune checkpoint) through `run_grid`'s stage 1, against the same N
   `fit` calls run back to back in one process without Ray or MLflow.
3. prefix sharing on the `paper` profile: epochs trained with and without it.
Ray's start-up is timed apart. Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def busy(seconds: float) -> float:
    """Single-threaded torch work for about `seconds`; returns the seconds it took."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        a = torch.tanh(a @ a)
    return time.perf_counter() - start


def bare_trainable(config: dict) -> None:
    from ray import tune

    tune.report({"work_s": busy(config["work_s"])})


def bare_tune(trials: int, work_s: float, storage: Path, reuse_actors: bool) -> dict:
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(bare_trainable, {"cpu": 1}),
        param_space={"i": tune.grid_search(list(range(trials))), "work_s": work_s},
        tune_config=tune.TuneConfig(reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name=f"bare-{reuse_actors}", storage_path=str(storage),
                                  verbose=0),
    )
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    work = sum(r.metrics["work_s"] for r in results)
    return _overhead(trials, wall, work, concurrency=2)


def _overhead(trials: int, wall: float, work: float, concurrency: int) -> dict:
    return {
        "trials": trials, "wall_s": round(wall, 2), "sum_trial_compute_s": round(work, 2),
        "overhead_per_trial_s": round((wall * concurrency - work) / trials, 2),
        "efficiency": round(work / (wall * concurrency), 3),
    }


def bpfm_profile(folder: Path, data: str, trials: int) -> Path:
    profile = {
        "study": "bench-orchestration", "data": {"uri": data}, "storage": str(folder / "tune"),
        "axes": {"size": ["small"], "freeze": ["unfrozen"], "epochs": [1], "init": ["xavier"],
                 "source": ["mimic"], "protocol": ["paper"], "seed": list(range(trials))},
        "train": {"batch_size": 8, "eval_batch_size": 64, "max_steps_per_epoch": 1,
                  "keep_checkpoints": 1},
        "resources": {"small": {"cpu": 1}}, "tune": {"max_failures": 0}, "quantize": {},
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def fit_back_to_back(data: str, trials: int, folder: Path) -> float:
    """Sum of N plain `fit` calls (one thread, as each Ray trial gets)."""
    import torch

    from bpfm.training.config import TrainConfig
    from bpfm.training.loop import fit

    torch.set_num_threads(1)
    total = 0.0
    for seed in range(trials):
        config = TrainConfig(data=data, source="mimic", protocol="paper", size="small",
                             freeze="unfrozen", init="xavier", epochs=1, seed=seed, batch_size=8,
                             eval_batch_size=64, max_steps_per_epoch=1, keep_checkpoints=1,
                             out=str(folder / f"plain-{seed}"))
        start = time.perf_counter()
        fit(config, resume=False)
        total += time.perf_counter() - start
    return total


def bpfm_tune(data: str, trials: int, folder: Path) -> dict:
    from ray import tune

    from bpfm import tracking
    from bpfm.orchestration.grid import plan_grid
    from bpfm.orchestration.ray_grid import (
        TrialContext,
        make_tuner,
        search_space,
        train_cell,
        trial_resources,
    )
    from bpfm.profiles import load_profile

    profile = load_profile(str(bpfm_profile(folder, data, trials)))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(client, profile.study)
    parent = tracking.start_grid_run(client, experiment_id, name="bench", tags={}, params={},
                                     resume=False)
    ctx = TrialContext(data=data, train=profile.train, tracking_uri=uri,
                       experiment_id=experiment_id, parent_run_id=parent, study=profile.study)
    plan = plan_grid(profile)
    tuner = make_tuner(tune.with_parameters(train_cell, ctx=ctx),
                       param_space=search_space(profile.axes, plan.share_prefix),
                       storage=profile.storage, name="bench", resources=trial_resources(profile, 0),
                       max_failures=0)
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    assert not any(r.error for r in results), [r.error for r in results if r.error]
    plain = fit_back_to_back(data, trials, folder)
    return {**_overhead(trials, wall, plain, concurrency=2),
            "mean_trainable_s": round(sum(r.metrics["time_total_s"] for r in results) / trials, 2),
            "mean_plain_fit_s": round(plain / trials, 2)}


def prefix_sharing() -> dict:
    from bpfm.orchestration.grid import plan_grid
    from bpfm.profiles import load_profile

    plan = plan_grid(load_profile("paper"))
    saved = plan.epochs_without_sharing - plan.epochs_trained
    return {"cells": len(plan.cells), "trials": len(plan.trials),
            "epochs_trained": plan.epochs_trained,
            "epochs_without_sharing": plan.epochs_without_sharing, "epochs_saved": saved,
            "saved_fraction": round(saved / plan.epochs_without_sharing, 3)}


def synthetic_data(folder: Path) -> str:
    from bpfm.data.shards import write_shards
    from bpfm.data.synth import SynthConfig, write_synthetic_pulsedb

    synth = write_synthetic_pulsedb(folder / "pulsedb", SynthConfig(subjects=16,
                                                                      segments_per_subject=12,
                                                                      seed=7))
    write_shards(synth.subset_files, str(folder / "shards"))
    return str(folder / "shards")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--work-s", type=float, default=1.0)
    parser.add_argument("--no-bpfm", action="store_true", help="skip the bpfm trainable part")
    args = parser.parse_args()
    import ray

    report: dict = {"prefix_sharing_paper": prefix_sharing()}
    with tempfile.TemporaryDirectory(prefix="bpfm-bench-") as tmp:
        folder = Path(tmp)
        data = None if args.no_bpfm else synthetic_data(folder)
        ray_temp = f"/tmp/ray-bench{os.getpid() % 10000}"  # Ray's socket paths must stay short
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_temp)
        report["ray_init_s"] = round(time.perf_counter() - start, 2)
        try:
            for reuse in (False, True):
                key = f"bare_tune_{'reused_actors' if reuse else 'new_actor_per_trial'}"
                report[key] = bare_tune(args.trials, args.work_s, folder / "bare", reuse)
            if data is not None:
                report["bpfm_trainable"] = bpfm_tune(data, args.trials, folder)
        finally:
            ray.shutdown()
            shutil.rmtree(ray_temp, ignore_errors=True)
    for name, part in report.items():
        print(f"{name}: {part}")
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
