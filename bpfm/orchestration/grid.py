"""The grid as data: cells (one trained model each), trials (what Tune runs), the dry-run plan,
the summary tables, and stage 0's data (synthesized and sharded when a profile says how).

Epoch-prefix sharing: when the learning-rate schedule does not depend on the total number of
epochs, the 100-epoch model of a configuration is its 200-epoch run's state at epoch 100, so the
cells that differ only in `epochs` are one trial reporting at each of those epochs."""

from __future__ import annotations

import itertools
import logging
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

from bpfm.data.shards import MANIFEST, write_shards
from bpfm.errors import BpfmError
from bpfm.io import storage
from bpfm.profiles import AXES, Profile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """One point of the grid: one trained model, one MLflow run."""

    size: str
    freeze: str
    epochs: int
    init: str
    source: str
    protocol: str
    seed: int

    @property
    def id(self) -> str:
        return (
            f"{self.size}-{self.freeze}-e{self.epochs}-{self.init}-{self.source}"
            f"-{self.protocol}-s{self.seed}"
        )

    def axes(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrialPlan:
    """One Tune trial: trains to the largest epoch count of its cells, reporting each cell's."""

    size: str
    freeze: str
    init: str
    source: str
    protocol: str
    seed: int
    report_epochs: tuple[int, ...]

    @property
    def epochs(self) -> int:
        return max(self.report_epochs)

    @property
    def id(self) -> str:
        epochs = "+".join(str(e) for e in self.report_epochs)
        return (
            f"{self.size}-{self.freeze}-e{epochs}-{self.init}-{self.source}-{self.protocol}"
            f"-s{self.seed}"
        )

    def cells(self) -> list[Cell]:
        return [self.cell(e) for e in self.report_epochs]

    def cell(self, epochs: int) -> Cell:
        return Cell(
            self.size, self.freeze, epochs, self.init, self.source, self.protocol, self.seed
        )

    def tune_config(self) -> dict[str, Any]:
        """The trial's entry in Tune's search space (plain values only)."""
        return {
            "size": self.size,
            "freeze": self.freeze,
            "init": self.init,
            "source": self.source,
            "protocol": self.protocol,
            "seed": self.seed,
            "epochs": self.epochs,
            "report_epochs": list(self.report_epochs),
        }


def trial_from_config(config: dict[str, Any]) -> TrialPlan:
    return TrialPlan(
        size=config["size"],
        freeze=config["freeze"],
        init=config["init"],
        source=config["source"],
        protocol=config["protocol"],
        seed=int(config["seed"]),
        report_epochs=tuple(int(e) for e in config.get("report_epochs") or [config["epochs"]]),
    )


def expand_cells(axes: dict[str, tuple]) -> list[Cell]:
    """The full factorial grid, in axis order."""
    return [Cell(*values) for values in itertools.product(*(axes[a] for a in AXES))]


def shares_epoch_prefix(train: dict[str, Any]) -> bool:
    """Whether the recipe's schedule lets a longer run stand in for the shorter ones."""
    from bpfm.training.config import TOTAL_DEPENDENT_SCHEDULES, TrainConfig  # lazy: torch

    return train.get("schedule", TrainConfig.schedule) not in TOTAL_DEPENDENT_SCHEDULES


def plan_trials(cells: list[Cell], share_prefix: bool) -> list[TrialPlan]:
    """Group cells into trials: one per configuration when sharing, else one per cell."""
    groups: dict[tuple, set[int]] = {}
    for cell in cells:
        key = (cell.size, cell.freeze, cell.init, cell.source, cell.protocol, cell.seed)
        groups.setdefault(key if share_prefix else (*key, cell.epochs), set()).add(cell.epochs)
    return [
        TrialPlan(*key[:6], report_epochs=tuple(sorted(epochs))) for key, epochs in groups.items()
    ]


@dataclass(frozen=True)
class GridPlan:
    cells: list[Cell]
    trials: list[TrialPlan]
    share_prefix: bool

    @property
    def epochs_trained(self) -> int:
        return sum(t.epochs for t in self.trials)

    @property
    def epochs_without_sharing(self) -> int:
        return sum(c.epochs for c in self.cells)


def plan_grid(profile: Profile, train: dict[str, Any] | None = None) -> GridPlan:
    """Cells and trials of a profile, with the recipe `train` (profile's own when None)."""
    train = profile.train if train is None else train
    cells = expand_cells(profile.axes)
    share = shares_epoch_prefix(train)
    return GridPlan(cells=cells, trials=plan_trials(cells, share), share_prefix=share)


def check_trials(profile: Profile, recipe: dict[str, Any], recipe_path: str | None = None) -> None:
    """Every trial's TrainConfig (profile recipe, --recipe, the trial's axes) validated the way
    the trial will validate it, so that a bad value fails before Ray or stage 0 start, not in
    every trial after them. Errors name the file the value came from."""
    from bpfm.training.config import TrainConfig  # lazy: torch

    train = {**profile.train, **recipe}
    for trial in plan_grid(profile, train).trials:
        values = {**train, **trial.tune_config(), "data": profile.data.uri, "out": "check"}
        if trial.init != "xavier" and not values.get("checkpoint"):
            if profile.pretrain is None:
                raise BpfmError(f"{profile.path}: pretrain: the grid has pretrained cells but no "
                                "pretrain.checkpoint")
            # stage 0 builds it (the EEG one per size, in-domain ones from it): the trial gets
            # a checkpoint either way, so check with the EEG one's URI
            values["checkpoint"] = profile.pretrain.checkpoint_for(trial.size)
        try:
            TrainConfig.from_dict(values).validate()
        except BpfmError as err:
            message = str(err).removeprefix("train: ")
            key = message.split(":", 1)[0]
            where = recipe_path if recipe_path and key in recipe else profile.path
            raise BpfmError(f"{where}: train.{message}") from None


def dry_run(profile: Profile, train: dict[str, Any], cluster_gpus: float | None = None) -> dict:
    """What a launch would run: cells, trials, resources, quantization jobs; runs nothing."""
    plan = plan_grid(profile, train)
    trials = []
    for trial in plan.trials:
        spec = profile.resources_for(trial.size)
        resources = (
            spec.on_cluster(cluster_gpus)
            if cluster_gpus is not None
            else {"cpu": spec.cpu, "gpu": spec.gpu}
        )
        trials.append(
            {
                "trial": trial.id,
                "cells": [c.id for c in trial.cells()],
                "epochs": trial.epochs,
                "resources": resources,
            }
        )
    return {
        "profile": profile.name,
        "study": profile.study,
        "data": profile.data.uri,
        "storage": profile.storage,
        "n_cells": len(plan.cells),
        "n_trials": len(plan.trials),
        "epoch_prefix_sharing": plan.share_prefix,
        "epochs_trained": plan.epochs_trained,
        "epochs_without_sharing": plan.epochs_without_sharing,
        "quantize_variants": list(profile.quantize),
        "n_quantization_runs": len(plan.cells) * len(profile.quantize),
        "trials": trials,
    }


def format_dry_run(plan: dict) -> str:
    lines = [
        f"profile {plan['profile']} (study {plan['study']}): {plan['n_cells']} cells in "
        f"{plan['n_trials']} trials, {plan['epochs_trained']} epochs to train "
        f"({plan['epochs_without_sharing']} without epoch-prefix sharing); "
        f"{plan['n_quantization_runs']} quantization runs ({', '.join(plan['quantize_variants'])})",
        f"data {plan['data']}  storage {plan['storage']}",
    ]
    for trial in plan["trials"]:
        res = ", ".join(f"{k}={v:g}" for k, v in trial["resources"].items())
        lines.append(f"  trial {trial['trial']}  [{res}]")
        lines.extend(f"    cell {cell}" for cell in trial["cells"])
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain fixed-width table: the grid's summary on stdout."""
    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        return "-" if value is None else str(value)

    cells = [[show(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells)
    return "\n".join(out)


# ----------------------------------------------------------------------------- stage 0: data


def ensure_data(profile: Profile) -> str:
    """Stage 0: the profile's shard set; synthesized and sharded first when it has no manifest
    and the profile says how (the demo / nightly), else a one-line error."""
    uri = profile.data.uri
    if storage.exists(storage.join(uri, MANIFEST)):
        return uri
    if profile.data.synthesize is None:
        raise BpfmError(
            f"{profile.path}: data.uri: {uri} has no {MANIFEST} (shard PulseDB "
            "first: pipelines/shard.py or `bpfm data shard`)"
        )
    from bpfm.data.synth import SynthConfig, write_synthetic_pulsedb  # lazy: h5py, scipy

    log.info("stage 0: synthesizing PulseDB and sharding it to %s", uri)
    with tempfile.TemporaryDirectory(prefix="bpfm-synth-") as tmp:
        synth = write_synthetic_pulsedb(tmp, SynthConfig(**profile.data.synthesize))
        write_shards([*synth.subset_files, *profile.data.inputs], uri)
    return uri


TRAIN_COLUMNS = [
    "cell",
    "sbp_mae",
    "dbp_mae",
    "sbp_sd",
    "dbp_sd",
    "sbp_r2",
    "dbp_r2",
    "sbp_bhs_grade",
    "dbp_bhs_grade",
    "aami",
]
# what the printed summary (bpfm.report.summary, the paper's Table II) reads besides TRAIN_COLUMNS
SUMMARY_COLUMNS = ["source", "init", "freeze", "epochs", "sbp_mase", "dbp_mase", "n", "n_subjects"]
QUANT_COLUMNS = [
    "cell",
    "variant",
    "size_mib",
    "latency_ms_b1",
    "latency_ms_b64",
    "sbp_mae",
    "dbp_mae",
    "sbp_r2",
    "dbp_r2",
]
