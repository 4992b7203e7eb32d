"""Which launch paths a job on a Ray cluster refuses (bpfm.orchestration.job_paths; the job itself
is tests/orchestration/test_job_submit.py)."""

from __future__ import annotations

import pytest

from bpfm.errors import BpfmError
from bpfm.orchestration.job_paths import check_job_paths

COPY = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_abc"


def test_a_local_store_inside_the_jobs_copy_is_refused_with_what_to_set():
    paths = {"MLflow store (MLFLOW_TRACKING_URI)": f"sqlite:///{COPY}/.bpfm/mlflow.db"}
    with pytest.raises(BpfmError, match="temporary copy.*MLFLOW_TRACKING_URI.*runtime-env-json"):
        check_job_paths(paths, on_cluster=True, nodes=1, cwd=COPY)
    check_job_paths(paths, on_cluster=False, nodes=1, cwd=COPY)  # its own local Ray: fine


def test_local_paths_on_a_multi_node_cluster_need_a_shared_filesystem():
    paths = {"Tune storage (--storage)": "/srv/bpfm/ray", "data (--data)": "s3://b/shards",
             "MLflow store (MLFLOW_TRACKING_URI)": "http://mlflow:5000"}
    check_job_paths(paths, on_cluster=True, nodes=1, cwd="/srv")
    with pytest.raises(BpfmError, match=r"Tune storage \(--storage\) /srv/bpfm/ray .* 3-node"):
        check_job_paths(paths, on_cluster=True, nodes=3, cwd="/srv", shared_fs=False)
    check_job_paths(paths, on_cluster=True, nodes=3, cwd="/srv", shared_fs=True)
