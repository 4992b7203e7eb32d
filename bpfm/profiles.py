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
from bpfm.schema import field_problems

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
    cache: bool = True  # trials read a remote set from their node's cache (bpfm.data.cache)


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
    from bpfm.training.calibration import METHODS  # lazy: torch

    values = raw.pop("calibration", None)
    if values is None:
        return {}
    if not isinstance(values, list) or not values:
        raise _fail(path, "axes.calibration", "must be a non-empty list")
    bad = [v for v in values if v not in METHODS]
    if bad:
        raise _fail(path, "axes.calibration",
                    f"unknown value {bad[0]!r} (one of {', '.join(METHODS)})")
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


# TrainConfig fields a profile's `train:` may not set: the grid sets them per cell.
GRID_SET = ("data", "out", "report_epochs", *AXES)
# run_quantization's settings that stage 2 passes itself.
QUANT_SET = ("data", "source", "protocol", "out", "baseline")


def _first_problem(path: Path, section: str, problems: list[tuple[str, str]]) -> None:
    if problems:
        key, problem = problems[0]
        raise _fail(path, f"{section}.{key}", problem)


def _rebased(path: Path, section: str, err: BpfmError, prefix: str) -> BpfmError:
    """A config's own `validate()` error (`prefix: key: problem`) as `path: section.key: ...`."""
    key, _, problem = str(err).removeprefix(prefix).strip().partition(": ")
    return _fail(path, f"{section}.{key}", problem)


def _mapping(path: Path, key: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise _fail(path, key, f"must be a mapping, got {value!r}")
    return value


def _check_sections(path: Path, raw: dict) -> None:
    """`train:`, `quantize:`, `resources:` and `quantize_options:` against TrainConfig,
    QuantConfig, Resources and run_quantization, before anything starts."""
    from bpfm.export import ExportConfig, is_export_variant  # lazy: torch
    from bpfm.quant.quantized import QuantConfig  # lazy: torch
    from bpfm.quant.study import run_quantization  # lazy: torch
    from bpfm.training.config import TrainConfig  # lazy: torch

    train = _mapping(path, "train", raw.get("train") or {})
    for key in GRID_SET:
        if key in train:
            raise _fail(path, f"train.{key}", "set by the grid (axes, data.uri), not by train:")
    _first_problem(path, "train", field_problems(TrainConfig, train))
    for variant, options in (raw.get("quantize") or {}).items():
        section = f"quantize.{variant}"
        if is_export_variant(_mapping(path, section, options)):  # an on-device runtime
            try:
                ExportConfig.from_variant(options)
            except (BpfmError, TypeError) as err:
                raise _fail(path, section, str(err).removeprefix("quantize variant: ")) from None
            continue
        _first_problem(path, section, field_problems(QuantConfig, options))
        try:
            QuantConfig(**options).validate()
        except BpfmError as err:
            raise _rebased(path, section, err, "quantize:") from None
    for size, spec in _mapping(path, "resources", raw.get("resources") or {}).items():
        if size not in AXIS_CHOICES["size"]:
            sizes = ", ".join(AXIS_CHOICES["size"])
            raise _fail(path, f"resources.{size}", f"unknown size (sizes are {sizes})")
        spec = _mapping(path, f"resources.{size}", spec)
        _first_problem(path, f"resources.{size}", field_problems(Resources, spec))
        for key, value in spec.items():
            if not 0 <= value < float("inf"):
                raise _fail(path, f"resources.{size}.{key}", f"must be >= 0, got {value!r}")
        if spec.get("gpu", 0) > 1 and spec["gpu"] != int(spec["gpu"]):
            raise _fail(path, f"resources.{size}.gpu",
                        f"more than one GPU must be a whole number, got {spec['gpu']}")
    options = _mapping(path, "quantize_options", raw.get("quantize_options") or {})
    _first_problem(path, "quantize_options", field_problems(run_quantization, options, QUANT_SET))
    for key, least in (("threads", 1), ("latency_runs", 0), ("batch_size", 1),
                       ("calib_batch_size", 1)):
        if key in options and options[key] < least:
            raise _fail(path, f"quantize_options.{key}", f"must be >= {least}, got {options[key]}")


def _flag(path: Path, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, key, f"must be true or false, got {value!r}")
    return value


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
    _check_sections(path, raw)
    try:
        resources = {size: Resources(**spec) for size, spec in (raw.get("resources") or {}).items()}
        tune = TuneSpec(**(raw.get("tune") or {}))
        pretrain_spec = PretrainSpec(**pretrain) if pretrain else None
        data_spec = DataSpec(
            uri=str(data["uri"]),
            synthesize=data.get("synthesize"),
            inputs=tuple(str(p) for p in data.get("inputs") or () if p),
            cache=_flag(path, "data.cache", data.get("cache", True)),
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
    from bpfm.training.config import TrainConfig  # lazy: torch

    recipe = {k: v for k, v in raw.items() if k not in AXES}
    _first_problem(path, "train", field_problems(TrainConfig, recipe))
    return recipe
