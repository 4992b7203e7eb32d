"""Run a trained BP model over windows in memory (`predict_arrays`) or a data view (`predict`).

The model predicts targets in training units; `meta` (saved beside the weights) says how to turn
them into mmHg: `estimate = output * target_scale + target_shift` (z-scores with standardised
targets; the identity for raw-mmHg training). The model dir these come from is
`bpfm.training.model_dir`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torch.utils.data import DataLoader

from bpfm.data.loader import ShardDataset, normalize_windows
from bpfm.devices import model_device, resolve_device
from bpfm.errors import BpfmError

if TYPE_CHECKING:
    from bpfm.data.splits import View

WINDOW_SHAPE = (2, 1250)  # (ECG, PPG) x 10 s at 125 Hz


@dataclass
class Predictions:
    segment_id: list[str]
    subject: list[str]
    target: np.ndarray  # [N, 2] mmHg, [SBP, DBP]
    estimate: np.ndarray  # [N, 2] mmHg

    def table(self) -> pa.Table:
        return pa.table(
            {
                "segment_id": pa.array(self.segment_id, pa.string()),
                "subject": pa.array(self.subject, pa.string()),
                "sbp": pa.array(self.target[:, 0], pa.float32()),
                "dbp": pa.array(self.target[:, 1], pa.float32()),
                "sbp_hat": pa.array(self.estimate[:, 0], pa.float32()),
                "dbp_hat": pa.array(self.estimate[:, 1], pa.float32()),
            }
        )


def target_scaling(meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) that map model outputs to mmHg."""
    scale = np.asarray(meta.get("target_scale", (1.0, 1.0)), dtype=np.float64)
    shift = np.asarray(meta.get("target_shift", (0.0, 0.0)), dtype=np.float64)
    return scale, shift


def check_batch(x: torch.Tensor, where: str = "input") -> None:
    """One-line errors for a window batch that is not [B, 2, 1250] or holds NaN/inf. Checked here
    rather than in the model, so that a quantized or compiled model gets the same checks."""
    if x.dim() != 3 or tuple(x.shape[1:]) != WINDOW_SHAPE:
        raise BpfmError(f"{where}: x: expected [batch, 2, 1250] (ECG, PPG), got {list(x.shape)}")
    if not torch.isfinite(x).all():
        raise BpfmError(f"{where}: x: contains NaN or infinite samples")


@torch.inference_mode()
def predict_arrays(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    meta: dict[str, Any],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Estimates in mmHg [N, 2] for windows x [N, 2, 1250] already in memory, as stored in the
    shards (the input normalising in `meta` is applied here)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    check_batch(x)
    if meta.get("normalize_inputs"):
        x = torch.from_numpy(normalize_windows(x.numpy().copy()))
    model.eval()
    target_device = model_device(model) if device is None else resolve_device(device)
    scale, shift = target_scaling(meta)
    outputs = [
        model(x[i : i + batch_size].to(target_device)).float().cpu().numpy()
        for i in range(0, x.shape[0], batch_size)
    ]
    return np.concatenate(outputs).astype(np.float64) * scale + shift


def _view_loader(view: View, batch_size: int, normalize: bool, num_workers: int = 0):
    dataset = ShardDataset(
        view, batch_size=batch_size, shuffle=False, seed=0, normalize=normalize, with_meta=True
    )
    return DataLoader(dataset, batch_size=None, num_workers=num_workers)


@torch.inference_mode()
def predict(
    model: nn.Module,
    view: View,
    meta: dict[str, Any],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> Predictions:
    """Estimates for every segment of a data view (`bpfm.data.splits.View`), in view order.
    `meta` is the model's meta (from `load_trained` or `fit`): target scaling and input
    normalising. Inputs go to `device` (default: where the model is); the model is not moved."""
    target_device = model_device(model) if device is None else resolve_device(device)
    scale, shift = target_scaling(meta)
    model.eval()
    segment_ids: list[str] = []
    subjects: list[str] = []
    targets: list[np.ndarray] = []
    estimates: list[np.ndarray] = []
    for batch in _view_loader(view, batch_size, bool(meta.get("normalize_inputs")), num_workers):
        x = batch["x"]
        check_batch(x)
        out = model(x.to(target_device, non_blocking=True)).float().cpu().numpy()
        estimates.append(out.astype(np.float64) * scale + shift)
        targets.append(batch["y"].numpy().astype(np.float64))
        segment_ids.extend(batch["segment_id"])
        subjects.extend(batch["subject"])
    if not targets:
        raise BpfmError("predict: view: the view holds no segments")
    return Predictions(segment_ids, subjects, np.concatenate(targets), np.concatenate(estimates))
