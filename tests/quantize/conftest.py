"""Fixtures for the quantization tests: one briefly trained small model dir (trained once per
session on the shared synthetic shards), loaded model, calibration and test batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory, synthetic_shards: str) -> Path:
    """A `small` model trained for a few steps: weights no longer at their init, so that
    quantization error shows in the metrics as it would on a real model."""
    from bpfm.training.config import TrainConfig
    from bpfm.training.loop import fit

    out = tmp_path_factory.mktemp("quant-model") / "model"
    config = TrainConfig(data=synthetic_shards, source="mimic", protocol="paper", size="small",
                         epochs=1, batch_size=32, max_steps_per_epoch=4, lr=1e-3, drop_path=0.0,
                         eval_batch_size=64, out=str(out), device="cpu")
    fit(config, resume=False)
    return out


@pytest.fixture(scope="session")
def trained(trained_model_dir: Path):
    """(model, TrainConfig, meta) of the trained model dir."""
    from bpfm.training.model_dir import load_trained

    return load_trained(trained_model_dir)


@pytest.fixture(scope="session")
def split(trained):
    from bpfm.training.evaluate import open_split

    _, config, _ = trained
    return open_split(config.data, config.source, config.protocol, config.split_seed)


@pytest.fixture(scope="session")
def calib_batches(trained, split) -> list[torch.Tensor]:
    """Two training batches, normalised as the model was trained (as `run_quantization` does)."""
    from bpfm.quant.study import calibration_batches

    normalize = bool(trained[2].get("normalize_inputs"))
    return calibration_batches(split.train, 2, batch_size=32, normalize=normalize)


@pytest.fixture(scope="session")
def test_windows(trained, split) -> torch.Tensor:
    """All windows of the test view as one batch (a few), as `predict` feeds them."""
    from bpfm.data.loader import ShardDataset

    normalize = bool(trained[2].get("normalize_inputs"))
    batches = ShardDataset(split.test, batch_size=256, shuffle=False, normalize=normalize)
    return torch.cat([b["x"] for b in batches])


@pytest.fixture
def logged_cell(tmp_path: Path, trained_model_dir: Path) -> dict:
    """A grid run in a sqlite MLflow store with one trained cell logged under it, as stage 1
    leaves it for stage 2: the keyword arguments `quantize_model` takes besides variants."""
    from bpfm import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment(client, "bpfm-stage-2-test")
    grid = client.create_run(experiment, run_name="grid").info.run_id
    cell, _ = tracking.child_run(client, experiment, grid, key="cell", name="cell",
                                 tags={tracking.KIND: "train"}, params={})
    tracking.log_model_dir(client, cell, trained_model_dir)
    return {"tracking_uri": uri, "experiment_id": experiment, "grid_run_id": grid,
            "study": "bpfm-stage-2-test", "cell": "cell", "cell_run_id": cell}
