"""Evaluate BP models on a split's views: `evaluate(model_dir, ...)` is the entry point of
`bpfm evaluate`; `model_split` finds the views a trained model is measured on (for quantization
and export too); `model_dir_payload` builds the `metrics.json` of a model dir while training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from bpfm.data.loader import view_size, view_subjects
from bpfm.data.shards import open_shards
from bpfm.data.splits import Split, make_split
from bpfm.devices import resolve_device
from bpfm.errors import BpfmError
from bpfm.metrics import compute_metrics
from bpfm.training.config import TrainConfig
from bpfm.training.model_dir import load_trained
from bpfm.training.predict import Predictions, predict


def open_split(data: str, source: str, protocol: str, seed: int = 42, cache: bool = True,
               generation: str | None = None) -> Split:
    """The `bpfm.data.splits.Split` of a shard set (train / val / test views); `cache`: a remote
    set's parts are read from this node's copy (`bpfm.data.cache`); `generation`: a pinned one
    (`model_generation`) instead of the one published now."""
    return make_split(open_shards(data, generation, cache=cache), source, protocol, seed=seed)


def model_generation(config: TrainConfig, data: str | None) -> str | None:
    """The shard generation a trained model is evaluated on: the one it trained on when it is
    evaluated on its own shard set (a republish keeps it readable, and the test view is then the
    one training held out), else the other set's published one."""
    own = not data or data == config.data
    return (config.data_generation or None) if own else None


def model_split(model_dir: str | Path, config: TrainConfig, data: str | None = None,
                source: str | None = None,
                protocol: str | None = None) -> tuple[Split, str, str, str]:
    """(split, data, source, protocol): the views a trained model is measured on, its own data
    (at the generation it trained on) unless others are given."""
    generation = model_generation(config, data)
    data, source = data or config.data, source or config.source
    protocol = protocol or config.protocol
    if not data:
        raise BpfmError(f"{model_dir}: data: the model dir names no shard set; pass --data URI")
    split = open_split(data, source, protocol, config.split_seed, config.cache, generation)
    return split, data, source, protocol


def split_summary(split: Split) -> dict[str, Any]:
    """Label, protocol, source and segment / subject counts per view (for metrics.json)."""
    summary: dict[str, Any] = {
        "label": split.label,
        "protocol": split.protocol,
        "source": split.source,
    }
    for name in ("train", "val", "test"):
        view = getattr(split, name)
        summary[f"n_{name}"] = view_size(view)
        summary[f"n_{name}_subjects"] = view_subjects(view)
    return summary


def require_segments(summary: dict[str, Any], data: str) -> dict[str, Any]:
    """`summary` (of `split_summary`) when every view holds segments, else a one-line error
    naming the shard set, protocol and view (before training, not after its first epoch)."""
    for name in ("train", "val", "test"):
        if not summary[f"n_{name}"]:
            raise BpfmError(
                f"{data}: protocol {summary['protocol']}, source {summary['source']}: the {name} "
                f"view holds no segments ({summary['label']})"
            )
    return summary


def mean_mae(predictions: Predictions) -> tuple[float, float, float]:
    """(mean of SBP and DBP MAE, SBP MAE, DBP MAE) in mmHg."""
    mae = np.abs(predictions.target - predictions.estimate).mean(axis=0)
    return float(mae.mean()), float(mae[0]), float(mae[1])


def model_dir_payload(
    model: nn.Module,
    split: Split,
    meta: dict[str, Any],
    val_predictions: Predictions,
    *,
    batch_size: int,
) -> tuple[dict[str, Any], Predictions]:
    """(metrics.json payload without training history, test predictions) for the model as it
    is now. The MASE baseline is the train view's mean, `meta["target_mean"]`."""
    test_pred = predict(model, split.test, meta, batch_size=batch_size)
    baseline = meta["target_mean"]
    payload = {
        "test": compute_metrics(test_pred.target, test_pred.estimate, test_pred.subject, baseline),
        "val": compute_metrics(
            val_predictions.target, val_predictions.estimate, val_predictions.subject, baseline
        ),
    }
    return payload, test_pred


def evaluate(
    model_dir: str | Path,
    data: str | None = None,
    source: str | None = None,
    protocol: str | None = None,
    *,
    device: str = "auto",
    batch_size: int = 256,
    calibration: tuple[str, ...] = (),
    calib_windows: int = 5,
) -> dict[str, Any]:
    """Test metrics of a trained model on the data, source and protocol it was trained with,
    or on others (e.g. a MIMIC model on VitalDB). The MASE baseline stays the train mean of the
    model's own training data. `calibration` methods (bpfm.training.calibration) add a `calibration`
    entry: each method, `none` and the trivial calibrated predictor on the windows left after
    each test subject's `calib_windows`."""
    model, config, meta = load_trained(model_dir)
    overrides = {"data": data or config.data, "source": source or config.source,
                 "protocol": protocol or config.protocol}
    checked = type(config).from_dict({**config.to_dict(), **overrides}).validate()
    target_device = resolve_device(device)
    split = open_split(checked.data, checked.source, checked.protocol, checked.split_seed,
                       checked.cache, model_generation(config, data))
    predictions = predict(model.to(target_device), split.test, meta, batch_size=batch_size)
    metrics = compute_metrics(
        predictions.target, predictions.estimate, predictions.subject, meta.get("target_mean")
    )
    result = {**metrics, **overrides, "model_dir": str(model_dir), "split": split.label}
    if calibration:
        from bpfm.training.calibration import check_methods, evaluate_calibration

        methods = check_methods(calibration, calib_windows, "evaluate: calibration")
        result["calibration"] = evaluate_calibration(
            model, meta, split, methods, calib_windows, batch_size=batch_size
        )
    return result
