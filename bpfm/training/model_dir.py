"""The model dir: what a trained model is on disk. `out/` and each `out/epoch-<N>/` hold
`model.safetensors` (weights + meta), `config.json` (the `TrainConfig`), `predictions.parquet`
(test estimates) and `metrics.json`; each file is published atomically and `metrics.json` comes
last, so a dir with `metrics.json` is complete. `write_model_dir` writes one, `load_trained` and
`read_metrics` read it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from torch import nn

from bpfm.errors import BpfmError
from bpfm.io.atomic import publish_file, write_json
from bpfm.model import load_model, save_model
from bpfm.schema import field_problems
from bpfm.training.config import TrainConfig
from bpfm.training.predict import Predictions


def write_model_dir(
    model_dir: Path,
    model: nn.Module,
    meta: dict[str, Any],
    config: dict[str, Any],
    metrics: dict[str, Any],
    predictions: Predictions,
) -> Path:
    """Publish a complete model dir (weights + meta, config, predictions, metrics last)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "metrics.json").unlink(missing_ok=True)  # incomplete until rewritten
    save_model(model_dir / "model.safetensors", model, meta)  # atomic itself
    write_json(model_dir / "config.json", config)
    publish_file(
        model_dir / "predictions.parquet", lambda tmp: pq.write_table(predictions.table(), tmp)
    )
    write_json(model_dir / "metrics.json", metrics)
    return model_dir


def read_metrics(model_dir: str | Path) -> dict[str, Any]:
    """A model dir's metrics.json (present only once the dir is complete)."""
    path = Path(model_dir) / "metrics.json"
    if not path.is_file():
        raise BpfmError(f"{path}: missing (not a finished bpfm model dir)")
    return json.loads(path.read_text())


def load_trained(model_dir: str | Path) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """(model in eval mode on CPU, the TrainConfig it was trained with, meta) from a model dir
    written by `fit` (`out/` or `out/epoch-<N>/`)."""
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not model_dir.is_dir():
        raise BpfmError(f"{model_dir}: model dir: no such folder")
    if not config_file.is_file():
        raise BpfmError(f"{config_file}: missing (not a bpfm model dir)")
    try:
        values = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise BpfmError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise BpfmError(f"{config_file}: not a mapping of TrainConfig fields (holds a "
                        f"{type(values).__name__}; a hand-edited file?)")
    values.pop("trained_in_run_of", None)  # epoch-prefix dirs note the run they came from
    for key, problem in field_problems(TrainConfig, values)[:1]:
        raise BpfmError(f"{config_file}: {key}: {problem}")
    config = TrainConfig.from_dict(values)
    model, meta = load_model(model_dir / "model.safetensors")
    return model.eval(), config, meta
