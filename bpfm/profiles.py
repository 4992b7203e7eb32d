"""Grid profiles: plain YAML files (`pipelines/profiles/<name>.yaml`) mapped onto one dataclass.

A profile says which data to use, where Tune keeps its state, the grid axes, the training recipe
shared by every cell, the resources per model size, and the quantization variants of stage 2.
Strings may hold `{home}` (the embedded default's folder), `{repo}` (this checkout) and
`${VAR}` / `${VAR:-default}`."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bpfm import defaults
from bpfm.errors import BpfmError

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILE_DIR = REPO_ROOT / "pipelines" / "profiles"

# The grid's axes, in the order cells are named and listed.
AXES = ("size", "freeze", "epochs", "init", "source", "protocol", "seed")
# Axes evaluated inside every cell rather than multiplying cells: calibration is post hoc (the
# trained model is the same for every method), so each cell reports every listed method.
EVAL_AXES = ("calibration",)
AXIS_CHOICES: dict[str, tuple[str, ...]] = {
    "size": ("small", "medium", "base", "large"),
    "freeze": ("frozen", "unfrozen"),
    "init": ("pretrained", "pretrained_ecgppg", "pretrained_eeg_then_ecgppg", "xavier"),
    "source": ("mimic", "vitaldb", "other"),
    "protocol": ("paper", "calbased", "calfree", "aami"),
}
TOP_LEVEL = (
    "study",
    "description",
    "data",
    "storage",
    "axes",
    "train",
    "pretrain",
    "resources",
    "tune",
    "quantize",
    "quantize_options",
)
_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class Resources:
    """What one trial of a size asks Ray for. `gpu` may be fractional so small models share a GPU;
    it is dropped when the cluster has no GPU, and the trial then runs on CPUs."""

    cpu: float = 1.0
    gpu: float = 0.0

    def on_cluster(self, cluster_gpus: float) -> dict[str, float]:
        if cluster_gpus <= 0 or self.gpu <= 0:
            return {"cpu": self.cpu}
        return {"cpu": self.cpu, "gpu": self.gpu}


@dataclass(frozen=True)
class DataSpec:
    uri: str
    synthesize: dict[str, Any] | None = None  # stage 0 writes synthetic PulseDB when no manifest
    inputs: tuple[str, ...] = ()  # further PulseDB files sharded with the synthetic ones


@dataclass(frozen=True)
class PretrainSpec:
    checkpoint: str  # may hold `{size}`; a missing file is made by stage 0
    steps: int = 20
    options: dict[str, Any] = field(default_factory=dict)

    def checkpoint_for(self, size: str) -> str:
        return self.checkpoint.replace("{size}", size)


@dataclass(frozen=True)
class TuneSpec:
    max_concurrent_trials: int = 0  # 0: as many as resources allow
    max_failures: int = 2
    checkpoint_every: int = 1  # epochs between Tune checkpoints (full training state)


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path
    study: str
    data: DataSpec
    storage: str
    axes: dict[str, tuple]
    train: dict[str, Any]
    pretrain: PretrainSpec | None
    resources: dict[str, Resources]
    tune: TuneSpec
    quantize: dict[str, dict[str, Any]]  # variant name -> QuantConfig fields
    quantize_options: dict[str, Any] = field(default_factory=dict)  # run_quantization kwargs
    description: str = ""

    def resources_for(self, size: str) -> Resources:
        return self.resources.get(size, Resources())


def expand(value: Any) -> Any:
    """Substitute `{home}`, `{repo}` and `${VAR}` / `${VAR:-default}` in every string."""
    if isinstance(value, str):
        text = value.replace("{home}", str(defaults.home())).replace("{repo}", str(REPO_ROOT))
        return _ENV.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), text)
    if isinstance(value, list):
        return [expand(v) for v in value]
    if isinstance(value, dict):
        return {k: expand(v) for k, v in value.items()}
    return value


def profile_path(name_or_path: str) -> Path:
    """A profile by name (`demo` -> pipelines/profiles/demo.yaml) or by file path."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.is_file():
        return path
    return PROFILE_DIR / f"{name_or_path}.yaml"


def _fail(path: Path, key: str, problem: str) -> BpfmError:
    return BpfmError(f"{path}: {key}: {problem}")


def _eval_axes(path: Path, raw: dict) -> dict[str, Any]:
    """`axes.calibration` -> the recipe's `calibration` methods (checked here, one line)."""
    from bpfm.calibration import METHODS

    values = raw.pop("calibration", None)
    if values is None:
        return {}
    if not isinstance(values, list) or not values:
        raise _fail(path, "axes.calibration", "must be a non-empty list")
    bad = [v for v in values if v not in METHODS]
    if bad:
        raise _fail(path, "axes.calibration",
                    f"unknown value {bad[0]!r} (one of {', '.join(METHODS)})")  # fmt: skip
    return {"calibration": [v for v in dict.fromkeys(values) if v != "none"]}


def _axes(path: Path, raw: dict) -> dict[str, tuple]:
    unknown = sorted(set(raw) - set(AXES))
    if unknown:
        raise _fail(path, f"axes.{unknown[0]}", f"unknown axis (axes are {', '.join(AXES)})")
    axes: dict[str, tuple] = {}
    for name in AXES:
        values = raw.get(name)
        if not isinstance(values, list) or not values:
            raise _fail(path, f"axes.{name}", "must be a non-empty list")
        if name in ("epochs", "seed"):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise _fail(path, f"axes.{name}", f"must be integers, got {values}")
            if name == "epochs" and min(values) < 1:
                raise _fail(path, "axes.epochs", "must be >= 1")
        else:
            bad = [v for v in values if v not in AXIS_CHOICES[name]]
            if bad:
                choices = ", ".join(AXIS_CHOICES[name])
                raise _fail(path, f"axes.{name}", f"unknown value {bad[0]!r} (one of {choices})")
        axes[name] = tuple(dict.fromkeys(values))
    return axes


def load_profile(name_or_path: str) -> Profile:
    """Read and check a profile; every mistake is one line naming the file and the key."""
    path = profile_path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise BpfmError(f"{path}: profile: not found (profiles: {known})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise _fail(path, "yaml", str(err).replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise _fail(path, "profile", "must be a mapping")
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise _fail(path, unknown[0], f"unknown key (keys are {', '.join(TOP_LEVEL)})")
    raw = expand(raw)
    for key in ("study", "data", "storage", "axes"):
        if key not in raw:
            raise _fail(path, key, "missing")
    data = raw["data"]
    if not isinstance(data, dict) or "uri" not in data:
        raise _fail(path, "data.uri", "missing")
    pretrain = raw.get("pretrain")
    axes = dict(raw["axes"]) if isinstance(raw["axes"], dict) else {}
    evaluated = _eval_axes(path, axes)
    quantize = raw.get("quantize") or {}
    if not isinstance(quantize, dict) or not all(isinstance(v, dict) for v in quantize.values()):
        raise _fail(path, "quantize", "must map variant names to QuantConfig fields")
    try:
        resources = {size: Resources(**spec) for size, spec in (raw.get("resources") or {}).items()}
        tune = TuneSpec(**(raw.get("tune") or {}))
        pretrain_spec = PretrainSpec(**pretrain) if pretrain else None
        data_spec = DataSpec(
            uri=str(data["uri"]),
            synthesize=data.get("synthesize"),
            inputs=tuple(str(p) for p in data.get("inputs") or () if p),
        )
    except TypeError as err:
        raise _fail(path, "profile", str(err)) from None
    return Profile(
        name=path.stem,
        path=path,
        study=str(raw["study"]),
        description=str(raw.get("description", "")),
        data=data_spec,
        storage=str(raw["storage"]),
        axes=_axes(path, axes),
        train={**dict(raw.get("train") or {}), **evaluated},
        pretrain=pretrain_spec,
        resources=resources,
        tune=tune,
        quantize=quantize,
        quantize_options=dict(raw.get("quantize_options") or {}),
    )


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file (YAML or JSON) of TrainConfig overrides, as `bpfm search` writes it.

    Grid axes in a recipe are ignored: the grid sets them per cell."""
    path = Path(path)
    if not path.is_file():
        raise BpfmError(f"{path}: recipe: not found")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise BpfmError(f"{path}: recipe: not valid YAML/JSON ({err})") from None
    if isinstance(raw, dict) and isinstance(raw.get("train"), dict):
        raw = raw["train"]  # a recipe may nest its overrides under `train:`
    if not isinstance(raw, dict):
        raise BpfmError(f"{path}: recipe: must be a mapping of TrainConfig fields")
    return {k: v for k, v in raw.items() if k not in AXES}
