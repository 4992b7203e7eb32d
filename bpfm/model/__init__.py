"""CEReBrO for blood pressure. `create_model(size, head=...)` builds an initialised `BPModel`
(`bp_model`: encoder + head, init, freeze); `cerebro` is the encoder and its size registry;
`checkpoint` saves, loads and maps official checkpoints. The names below are the public API."""

from bpfm.model.bp_model import (
    FREEZE_POLICIES,
    HEADS,
    BPModel,
    apply_freeze,
    count_parameters,
    create_model,
    init_xavier,
    make_head,
)
from bpfm.model.cerebro import SIZE_ALIASES, SIZES, CerebroConfig, CerebroEncoder, size_config
from bpfm.model.checkpoint import LoadReport, load_model, load_pretrained_backbone, save_model

__all__ = [
    "FREEZE_POLICIES",
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
