"""Named backbones of the grid's `init` axis, built in stage 0 (Ray-free: which checkpoints a grid
needs and how to pretrain each; `bpfm.orchestration.ray_grid` runs them as tasks).

- `pretrained`: the EEG backbone, one per size (`pretrain.checkpoint` with `{size}`);
- `pretrained_ecgppg`: SimMIM on the ECG+PPG windows of the cell's source and protocol train
  view, from xavier, one per (size, source, protocol);
- `pretrained_eeg_then_ecgppg`: the same, continuing the EEG backbone of that size.

In-domain backbones sit beside the EEG one: `cerebro-small.ckpt` ->
`cerebro-small-ecgppg-mimic-calfree.ckpt` / `cerebro-small-eeg-then-ecgppg-mimic-calfree.ckpt`.
Each is made from the train view only, so a protocol's test subjects never reach its backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from bpfm.orchestration.grid import Cell
    from bpfm.profiles import PretrainSpec

EEG = "pretrained"
IN_DOMAIN = {"pretrained_ecgppg": "ecgppg", "pretrained_eeg_then_ecgppg": "eeg-then-ecgppg"}


def backbone_key(init: str, size: str, source: str, protocol: str) -> str:
    """The key of a cell's backbone in `TrialContext.pretrained` (the EEG one: its size)."""
    return size if init == EEG else f"{init}/{size}/{source}/{protocol}"


@dataclass(frozen=True)
class BackboneJob:
    key: str
    spec: dict[str, Any]  # PretrainConfig fields
    after: tuple[str, ...] = field(default=())  # keys whose checkpoints this one continues


def _in_domain_uri(eeg_uri: str, tag: str, source: str, protocol: str) -> str:
    return f"{eeg_uri.removesuffix('.ckpt')}-{tag}-{source}-{protocol}.ckpt"


def backbone_jobs(
    pretrain_spec: PretrainSpec, cells: Iterable[Cell], data: str, split_seed: int = 42
) -> list[BackboneJob]:
    """Every backbone the cells need, the EEG ones first (others may continue them).
    `split_seed` must be the cells' own, so that a backbone sees exactly their train view."""
    eeg: dict[str, BackboneJob] = {}
    domain: dict[str, BackboneJob] = {}
    base = {**pretrain_spec.options, "steps": pretrain_spec.steps}
    for cell in cells:
        if cell.init != EEG and cell.init not in IN_DOMAIN:
            continue
        eeg_uri = pretrain_spec.checkpoint_for(cell.size)
        if cell.init == EEG or cell.init == "pretrained_eeg_then_ecgppg":
            eeg.setdefault(cell.size, BackboneJob(cell.size, {**base, "out": eeg_uri,
                                                              "size": cell.size}))
        if cell.init in IN_DOMAIN:
            key = backbone_key(cell.init, cell.size, cell.source, cell.protocol)
            spec = {**base, "size": cell.size, "data": data, "source": cell.source,
                    "protocol": cell.protocol, "split_seed": split_seed,
                    "out": _in_domain_uri(eeg_uri, IN_DOMAIN[cell.init], cell.source,
                                          cell.protocol)}
            after: tuple[str, ...] = ()
            if cell.init == "pretrained_eeg_then_ecgppg":
                spec["init_checkpoint"] = eeg_uri
                after = (cell.size,)
            domain.setdefault(key, BackboneJob(key, spec, after))
    return [*eeg.values(), *domain.values()]
