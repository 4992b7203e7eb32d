"""The calibration axis and an in-domain backbone through a real grid on local Ray: stage 0
pretrains the cell's ECG+PPG backbone on its train view, the cell trains from it, and its MLflow
run records the calibration methods, K and every method's metrics."""

from __future__ import annotations

import pytest

from bpfm import tracking
from bpfm.profiles import load_profile
from tests.orchestration.conftest import local_ray, write_profile

pytestmark = pytest.mark.slow


def test_grid_builds_the_in_domain_backbone_and_logs_calibrated_cells(synthetic_shards,
                                                                        tmp_path):
    from bpfm.orchestration.ray_grid import run_grid

    path = write_profile(
        tmp_path, "calib", study="orch-calib", data={"uri": synthetic_shards},
        storage=str(tmp_path / "tune"),
        axes={"size": ["small"], "freeze": ["frozen"], "epochs": [1], "init": ["pretrained_ecgppg"],
              "source": ["mimic"], "protocol": ["calfree"], "seed": [42],
              "calibration": ["none", "offset", "affine"]},
        train={"lr": 1.0e-3, "batch_size": 8, "eval_batch_size": 64, "max_steps_per_epoch": 1,
               "keep_checkpoints": 1, "calib_windows": 3},
        pretrain={"checkpoint": str(tmp_path / "backbones" / "cerebro-{size}.ckpt"), "steps": 2,
                  "options": {"batch_size": 4}},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with local_ray({"MLFLOW_TRACKING_URI": uri, "BPFM_HOME": str(tmp_path / "home")}):
        result = run_grid(load_profile(str(path)))
    assert result["errors"] == []
    backbone = tmp_path / "backbones" / "cerebro-small-ecgppg-mimic-calfree.ckpt"
    assert backbone.is_file() and not (tmp_path / "backbones" / "cerebro-small.ckpt").exists()
    client = tracking.client(uri)
    (run,) = tracking.runs_of(client, result["experiment_id"], result["grid_run_id"], "train")
    params, metrics = run.data.params, run.data.metrics
    assert params["init"] == "pretrained_ecgppg" and params["checkpoint"] == str(backbone)
    assert params["calibration"] == '["offset", "affine"]' and params["calib_windows"] == "3"
    assert metrics["calib_k"] == 3
    for method in ("none", "trivial", "offset", "affine"):
        assert metrics[f"cal_{method}_n"] == metrics["cal_none_n"] > 0
    assert metrics["cal_trivial_sbp_cal_mase"] == pytest.approx(1.0)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "calibration")]
    assert artifacts == ["calibration/calibrated_estimates.parquet"]
