"""Trials spread over the nodes of a multi-node cluster (a head and a worker on this host)."""

from __future__ import annotations

import time

import pytest

from bpfm import tracking
from bpfm.profiles import load_profile
from tests.orchestration.conftest import BASE_PROFILE, two_node_ray, write_profile

pytestmark = pytest.mark.slow


def test_two_trials_of_one_cpu_run_on_both_nodes(tmp_path, synthetic_shards, mlflow_server):
    from bpfm.orchestration.ray_grid import run_grid

    uri = mlflow_server.uri  # every node logs to the tracking server
    env = {"MLFLOW_TRACKING_URI": uri, "BPFM_HOME": str(tmp_path / "home")}
    axes = {**BASE_PROFILE["axes"], "epochs": [1]}
    path = write_profile(
        tmp_path,
        "spread",
        study="orch-spread",
        axes=axes,
        data={"uri": synthetic_shards},
        storage=str(tmp_path / "tune"),
    )
    with two_node_ray(env) as nodes:
        assert len(nodes) == 2
        result = run_grid(load_profile(str(path)))
    assert result["errors"] == [] and result["n_trials"] == 2
    client = tracking.client(uri)
    runs = tracking.runs_of(client, result["experiment_id"], result["grid_run_id"], "train")
    assert {r.data.tags[tracking.NODE] for r in runs} == set(nodes)


def _intervals(runs, started: str, ended: str) -> list[tuple[float, float, object]]:
    return [(float(r.data.tags[started]), float(r.data.tags[ended]), r) for r in runs]


def _at_once(intervals: list[tuple[float, float, object]], moment: float) -> list:
    return [r for start, end, r in intervals if start <= moment < end]


def test_paper_resource_table_packs_trials_on_logical_gpus_and_stage_2_overlaps(
    tmp_path, synthetic_shards, mlflow_server
):
    """2 nodes x 2 logical GPUs, the paper profile's resource table (small 0.25 GPU / 4 CPU,
    large 1 GPU / 8 CPU): 2 small and 2 large trials (CPU torch: they train on CPU). What Ray
    assigned (GPU ids, node) and when each trial held it is read back from MLflow."""
    from bpfm.orchestration.ray_grid import run_grid

    uri = mlflow_server.uri
    env = {"MLFLOW_TRACKING_URI": uri, "BPFM_HOME": str(tmp_path / "home")}
    paper = load_profile("paper")
    resources = {s: {"cpu": r.cpu, "gpu": r.gpu} for s, r in paper.resources.items()}
    assert resources["small"]["gpu"] == 0.25 and resources["large"]["gpu"] == 1
    axes = {**BASE_PROFILE["axes"], "size": ["small", "large"], "freeze": ["frozen"],
            "epochs": [1], "seed": [1, 2]}
    path = write_profile(tmp_path, "packing", study="orch-packing", axes=axes,
                         data={"uri": synthetic_shards}, storage=str(tmp_path / "tune"),
                         resources=resources, quantize={"dynamic": {"mode": "dynamic"}},
                         quantize_options={"latency_runs": 0})
    # 14 logical CPUs a node: the 4 trials hold at most 24 of 28, stage 2 runs on the rest
    with two_node_ray(env, num_cpus=14, num_gpus=2) as nodes:
        began = time.time()
        result = run_grid(load_profile(str(path)))
        wall = time.time() - began
    assert result["errors"] == [] and result["n_trials"] == 4
    client = tracking.client(uri)
    runs = tracking.runs_of(client, result["experiment_id"], result["grid_run_id"], "train")
    assert len(runs) == 4
    trials = _intervals(runs, tracking.TRIAL_STARTED, tracking.TRIAL_ENDED)
    share = {"small": 0.25, "large": 1.0}
    for start, _, _ in trials:  # the GPU load can only rise when a trial starts
        running = _at_once(trials, start)
        per_gpu: dict[tuple[str, str], list] = {}
        for run in running:
            ids = run.data.tags[tracking.GPU_IDS].split(",")
            size = run.data.params["size"]
            assert len(ids) == 1 and ids[0] != ""  # one (logical) GPU per trial
            per_gpu.setdefault((run.data.tags[tracking.NODE], ids[0]), []).append(size)
        for sizes in per_gpu.values():
            assert sum(share[s] for s in sizes) <= 1.0  # never over-committed
            assert sizes.count("small") <= 4
            assert "large" not in sizes or sizes == ["large"]  # large never shares
    assert {r.data.tags[tracking.NODE] for r in runs} == set(nodes)
    # Stage 2 overlaps stage 1: a quantization ran before the last trial ended
    quant = tracking.find_runs(
        client,
        result["experiment_id"],
        {tracking.GRID_RUN: result["grid_run_id"], tracking.KIND: "quant"},
    )
    assert len(quant) == 4 and all(q.info.status == "FINISHED" for q in quant)
    last_trial_end = max(end for _, end, _ in trials)
    first_quant = min(q.info.start_time / 1000 for q in quant)
    stage_1 = last_trial_end - min(start for start, _, _ in trials)
    print(f"packing test: wall {wall:.0f} s, stage 1 {stage_1:.0f} s, first quantization "
          f"{first_quant - last_trial_end:+.0f} s from the last trial's end")
    assert first_quant < last_trial_end
