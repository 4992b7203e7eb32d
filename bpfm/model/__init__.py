"""CEReBrO for blood pressure: `create_model(size, head=...)` builds an initialised `BPModel`;
`bpfm.model.checkpoint` saves, loads, freezes and maps official checkpoints."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bpfm.errors import BpfmError
from bpfm.model.bp_model import HEADS, BPModel, make_head
from bpfm.model.cerebro import SIZE_ALIASES, SIZES, CerebroConfig, CerebroEncoder, size_config
from bpfm.model.checkpoint import (
    LoadReport,
    apply_freeze,
    count_parameters,
    init_xavier,
    load_model,
    load_pretrained_backbone,
    save_model,
)

__all__ = [
    "HEADS",
    "SIZES",
    "SIZE_ALIASES",
    "BPModel",
    "CerebroConfig",
    "CerebroEncoder",
    "LoadReport",
    "apply_freeze",
    "count_parameters",
    "create_model",
    "init_xavier",
    "load_model",
    "load_pretrained_backbone",
    "make_head",
    "save_model",
    "size_config",
]


def create_model(
    size: str,
    *,
    head: str = "paper",
    head_hidden: Sequence[int] = (),
    head_dropout: float = 0.0,
    in_channels: int = 2,
    drop_path: float = 0.2,
    device: str | torch.device | None = None,
) -> BPModel:
    """A CEReBrO BP model with the paper's xavier init. `device="meta"` builds it without memory
    (for parameter counts); `in_channels` is recorded for checks, the encoder takes any count."""
    config = size_config(size, drop_path=drop_path)
    if not 1 <= in_channels <= config.max_channels:
        raise BpfmError(f"in_channels: {in_channels} not in 1..{config.max_channels}")
    spec = {
        "size": SIZE_ALIASES.get(size, size),
        "head": head,
        "head_hidden": [int(h) for h in head_hidden],
        "head_dropout": float(head_dropout),
        "in_channels": int(in_channels),
        "drop_path": float(drop_path),
    }
    with torch.device(device or "cpu"):
        model = BPModel(
            CerebroEncoder(config),
            make_head(head, config.dim, 2, head_hidden, head_dropout),
            spec,
        )
        init_xavier(model)
    return model
