"""The training recipe of one run: `TrainConfig` (a plain dataclass; what `config.json` of a
model dir holds) and the choices its fields take. `validate()` gives the one-line errors."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from bpfm.data.splits import PROTOCOLS
from bpfm.errors import BpfmError
from bpfm.model import HEADS, SIZE_ALIASES, SIZES
from bpfm.schema import from_fields
from bpfm.training.calibration import check_methods, parse_methods

SOURCES = ("mimic", "vitaldb", "other")
# Named backbones (DESIGN: `pretrained` is the EEG one; the others are in-domain SimMIM on the
# train view's ECG+PPG windows, from scratch or continuing the EEG one; see bpfm.training.pretrain).
BACKBONE_INITS = ("pretrained", "pretrained_ecgppg", "pretrained_eeg_then_ecgppg")
INITS = (*BACKBONE_INITS, "xavier")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")  # both after an optional linear warm-up
TOTAL_DEPENDENT_SCHEDULES = ("cosine",)
LOSSES = ("mse", "huber")


@dataclass
class TrainConfig:
    data: str = ""  # shard set URI (folder or s3://)
    data_generation: str = ""  # the shard generation read; "" = the one published at the start
    cache: bool = True  # read a remote set's parts from this node's copy (bpfm.data.cache)
    source: str = "mimic"
    protocol: str = "paper"
    size: str = "small"
    freeze: str = "unfrozen"
    init: str = "xavier"
    checkpoint: str | None = None  # backbone for init="pretrained"
    head: str = "paper"
    head_hidden: tuple[int, ...] = ()
    head_dropout: float = 0.0
    drop_path: float = 0.2
    epochs: int = 100
    lr: float = 1e-4
    batch_size: int = 1024
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    loss: str = "mse"
    huber_delta: float = 1.0  # in loss units (z-scores when standardised)
    standardize_targets: bool = True
    normalize_inputs: bool = True  # z-score each window and channel (see module doc)
    seed: int = 42  # init, dropout, shuffling
    split_seed: int = 42  # the split, kept apart so seeds vary the model, not the test set
    device: str = "auto"  # cuda when present
    amp: bool = True  # bf16 autocast on CUDA (no effect on CPU)
    compile: bool = False  # torch.compile the training steps (for GPUs; see compile_for_training)
    report_epochs: tuple[int, ...] = ()
    out: str = "runs/train"
    num_workers: int = 0
    max_steps_per_epoch: int | None = None  # tiny runs (tests, demo)
    eval_batch_size: int = 256
    keep_checkpoints: int = 2
    calibration: tuple[str, ...] = ()  # per-subject calibration methods (bpfm.training.calibration)
    calib_windows: int = 5  # K calibration windows per test subject

    def __post_init__(self) -> None:
        self.head_hidden = tuple(int(h) for h in self.head_hidden)
        self.calibration = parse_methods(self.calibration)
        self.report_epochs = tuple(sorted({int(e) for e in self.report_epochs}))

    def validate(self) -> TrainConfig:
        """One-line errors for every setting a user can get wrong; returns self."""
        choices = {
            "source": SOURCES, "protocol": PROTOCOLS, "size": (*SIZES, *SIZE_ALIASES),
            "freeze": ("frozen", "unfrozen"), "init": INITS, "head": HEADS,
            "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "loss": LOSSES,
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise BpfmError(
                    f"train: {name}: unknown {getattr(self, name)!r} (valid: {', '.join(valid)})"
                )
        if not self.data:
            raise BpfmError("train: data: no shard set given (--data URI)")
        if self.init in BACKBONE_INITS and not self.checkpoint:
            raise BpfmError(f"train: checkpoint: init {self.init!r} needs --checkpoint URI")
        check_methods(self.calibration, self.calib_windows, "train: calibration")
        positive = {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                    "eval_batch_size": self.eval_batch_size, "huber_delta": self.huber_delta,
                    "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive.items():
            if not 0 < value < math.inf:
                raise BpfmError(f"train: {name}: must be positive and finite, got {value}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise BpfmError(
                f"train: max_steps_per_epoch: must be >= 1, got {self.max_steps_per_epoch}"
            )
        if not (0 <= self.weight_decay < math.inf and 0 <= self.warmup_epochs < math.inf):
            raise BpfmError("train: weight_decay/warmup_epochs: must be finite, not negative")
        if self.num_workers < 0:
            raise BpfmError(f"train: num_workers: must be >= 0, got {self.num_workers}")
        bad = [e for e in self.report_epochs if not 1 <= e <= self.epochs]
        if bad:
            raise BpfmError(f"train: report_epochs: {bad} outside 1..{self.epochs}")
        early = [e for e in self.report_epochs if e < self.epochs]
        if early and self.schedule in TOTAL_DEPENDENT_SCHEDULES:
            raise BpfmError(
                f"train: report_epochs: schedule {self.schedule!r} depends on the total epochs, "
                f"so the epoch-{early[0]} model of a {self.epochs}-epoch run is not an "
                f"{early[0]}-epoch model; use schedule 'constant' or separate runs"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return from_fields(cls, values, "train config")
