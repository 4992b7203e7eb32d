"""Which torch device a run uses: one choice for training, evaluation, quantization and export."""

from __future__ import annotations

import torch
from torch import nn

from bpfm.errors import BpfmError


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` (CUDA when present), `cpu`, `cuda[:N]`; CUDA asked for but absent is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BpfmError(f"device: {device!r} requested but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise BpfmError(f"device: unknown device {device!r} (auto, cpu, cuda[:N])") from None


def model_device(model: nn.Module) -> torch.device:
    """Where the model's tensors live (CPU for a model without any, e.g. some quantized ones)."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
