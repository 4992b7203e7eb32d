"""Trials spread over the nodes of a multi-node cluster (a head and a worker on this host)."""

from __future__ import annotations

import pytest

from bpfm import tracking
from bpfm.profiles import load_profile
from tests.orchestration.conftest import BASE_PROFILE, two_node_ray, write_profile

pytestmark = pytest.mark.slow


def test_two_trials_of_one_cpu_run_on_both_nodes(tmp_path, synthetic_shards, mlflow_server):
    from bpfm.tune import run_grid

    uri = mlflow_server.uri  # every node logs to the tracking server
    env = {"MLFLOW_TRACKING_URI": uri, "BPFM_HOME": str(tmp_path / "home")}
    axes = {**BASE_PROFILE["axes"], "epochs": [1]}
    path = write_profile(tmp_path, "spread", study="orch-spread", axes=axes,
                         data={"uri": synthetic_shards}, storage=str(tmp_path / "tune"))
    with two_node_ray(env) as nodes:
        assert len(nodes) == 2
        result = run_grid(load_profile(str(path)))
    assert result["errors"] == [] and result["n_trials"] == 2
    client = tracking.client(uri)
    runs = tracking.runs_of(client, result["experiment_id"], result["grid_run_id"], "train")
    assert {r.data.tags[tracking.NODE] for r in runs} == set(nodes)
