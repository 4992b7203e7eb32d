"""Deployable exports of a trained BP model for the two on-device runtimes of PyTorch models.

- `executorch` (`bpfm.export.executorch`): pt2e quantization with the XNNPACK quantizer, lowered
  with the XNNPACK partitioner to a `.pte`, run by ExecuTorch's Python runtime.
- `onnx` (`bpfm.export.onnx`): `torch.onnx.export` of the fp32 model, quantized with
  `onnxruntime.quantization` (dynamic, or static QDQ with a MinMax / Entropy / Percentile
  calibrator), run by an ONNX Runtime `InferenceSession`.

`ExportConfig` names one export; `export_model` writes its file; `load_export` opens a file as a
`RuntimeModel` (an `nn.Module` without parameters, so `bpfm.training.predict.predict` and the
latency code run it like the torch model). `bpfm.export.run.run_export` adds the data, metrics,
parity and measurements. The runtimes are the optional extra `.[edge]`; a missing one is a one-line
error. """

from __future__ import annotations

import abc
import importlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from bpfm.errors import BpfmError

FORMATS = ("executorch", "onnx")
MODES = ("fp32", "dynamic", "static")
# static activations: each runtime's own calibrators (ExecuTorch's are torchao observers)
OBSERVERS = {"executorch": ("minmax", "moving_average", "histogram"),
             "onnx": ("minmax", "entropy", "percentile")}
# the grid's variant `backend:` names -> export format
BACKENDS = {"executorch": "executorch", "onnxruntime": "onnx"}
SUFFIXES = {"executorch": ".pte", "onnx": ".onnx"}
PACKAGES = {"executorch": "executorch", "onnx": "onnxruntime"}
MAX_BATCH = 64  # exported batch bound; larger batches run in chunks (memory is planned for it)


@dataclass(frozen=True)
class ExportConfig:
    format: str = "executorch"  # executorch | onnx
    mode: str = "static"  # fp32 | dynamic | static
    observer: str = "minmax"  # static activations' calibrator (see OBSERVERS)
    calib_batches: int = 8  # training batches static mode calibrates on

    def validate(self) -> ExportConfig:
        if self.format not in FORMATS:
            raise BpfmError(f"export: format: unknown {self.format!r} "
                            f"(valid: {', '.join(FORMATS)})")
        if self.mode not in MODES:
            raise BpfmError(f"export: mode: unsupported {self.mode!r} for {self.format} "
                            f"(valid: {', '.join(MODES)})")
        if self.observer not in OBSERVERS[self.format]:
            raise BpfmError(f"export: observer: unknown {self.observer!r} for {self.format} "
                            f"(valid: {', '.join(OBSERVERS[self.format])})")
        if not isinstance(self.calib_batches, int) or self.calib_batches < 1:
            raise BpfmError(f"export: calib_batches: must be >= 1, got {self.calib_batches!r}")
        return self

    @property
    def name(self) -> str:
        """e.g. `executorch-static-histogram`, `onnx-dynamic`, `onnx-fp32`."""
        parts = [self.format, self.mode] + ([self.observer] if self.mode == "static" else [])
        return "-".join(parts)

    @property
    def file_name(self) -> str:
        return "model" + SUFFIXES[self.format]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_variant(cls, options: dict[str, Any]) -> ExportConfig:
        """A grid variant (`backend: executorch|onnxruntime`, mode, observer, calib_batches)."""
        values = dict(options)
        backend = values.pop("backend", None)
        if backend not in BACKENDS:
            raise BpfmError(f"quantize variant: backend: {backend!r} is not an export runtime "
                            f"(valid: {', '.join(BACKENDS)})")
        values.pop("weights", None)  # both runtimes quantize weights per channel
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BpfmError(f"quantize variant: {', '.join(unknown)}: not an export field")
        if values.get("mode", "static") == "static" and "observer" not in values:
            values["observer"] = "minmax"
        return cls(format=BACKENDS[backend], **values).validate()


def is_export_variant(options: dict[str, Any]) -> bool:
    return options.get("backend") in BACKENDS


def runtime_module(fmt: str) -> ModuleType:
    """The bpfm module of a format, its runtime imported (one line when the extra is missing)."""
    try:
        importlib.import_module(PACKAGES[fmt])
    except ImportError:
        raise BpfmError(f"export: {fmt}: the {PACKAGES[fmt]} package is not installed "
                        "(pip install -e '.[edge]')") from None
    return importlib.import_module(f"bpfm.export.{fmt}")


class RuntimeModel(nn.Module, abc.ABC):
    """A runtime's model as a torch module: forward(x [B, 2, 1250]) -> [B, 2] float32, batches
    above MAX_BATCH run in chunks. Subclasses implement `run(x: np.ndarray) -> np.ndarray`."""

    format = ""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    @abc.abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """One batch of at most MAX_BATCH windows through the runtime: [B, 2] float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(torch.float32).contiguous()
        parts = [torch.from_numpy(np.asarray(self.run(x[i : i + MAX_BATCH].numpy())))
                 for i in range(0, x.shape[0], MAX_BATCH)]
        return torch.cat(parts)

    def check(self) -> RuntimeModel:
        """A foreign model (another input or output shape) is one line, not a late failure."""
        try:
            out = np.asarray(self.run(np.zeros((1, 2, 1250), np.float32)))
        except BpfmError:
            raise
        except Exception as err:  # each runtime raises its own types for a wrong input
            raise BpfmError(f"{self.path}: not a bpfm BP model (a [1, 2, 1250] window fails: "
                            f"{first_line(err)})") from None
        if out.shape != (1, 2):
            raise BpfmError(f"{self.path}: not a bpfm BP model (output shape {list(out.shape)}, "
                            "expected [1, 2])")
        return self


def format_of(path: str | Path) -> str:
    suffix = Path(path).suffix
    for fmt, known in SUFFIXES.items():
        if suffix == known:
            return fmt
    raise BpfmError(f"{path}: export file: unknown suffix {suffix!r} (.pte or .onnx)")


def load_export(path: str | Path, *, threads: int = 1) -> RuntimeModel:
    """Open a `.pte` or `.onnx` file with its runtime, checked to be a BP model."""
    path = Path(path)
    fmt = format_of(path)
    if not path.is_file():
        raise BpfmError(f"{path}: export file: no such file")
    return runtime_module(fmt).load(path, threads=threads).check()


def export_model(model: nn.Module, config: ExportConfig, calib: list[torch.Tensor],
                 path: Path) -> dict[str, Any]:
    """Write the export file of a fp32 model (eval, CPU) to `path`; returns what it learnt on the
    way (e.g. ExecuTorch's torch int8 reference graph under "reference")."""
    config = config.validate()
    if config.mode == "static" and not calib:
        raise BpfmError("export: static mode needs calibration batches")
    return runtime_module(config.format).export(for_window(model), config, calib, path)


def for_window(model: nn.Module) -> nn.Module:
    """A copy of `model` whose positional tables keep only the rows a bpfm window reads.

    An export takes [batch, 2, 1250] windows only: 2 of the encoder's 64 channel rows and 19 of
    its 100 patch rows are ever used. The other rows are weights no int8 mode shrinks (the
    encoding is an add, not a matmul) and cost 55 KB of the small model's file, 1.5 % of an
    int8 one. The outputs are the same: `positional_encoding` slices the first rows."""
    import copy

    from bpfm.model.cerebro import CerebroEncoder
    from bpfm.training.predict import WINDOW_SHAPE

    encoders = [m for m in model.modules() if isinstance(m, CerebroEncoder)]
    if not encoders:
        return model
    model = copy.deepcopy(model)
    channels = WINDOW_SHAPE[0]
    for encoder in (m for m in model.modules() if isinstance(m, CerebroEncoder)):
        patches = WINDOW_SHAPE[1] // encoder.config.patch_size
        with torch.no_grad():
            encoder.channel_encoding = nn.Parameter(encoder.channel_encoding[:, :channels].clone())
            encoder.patch_encoding = nn.Parameter(encoder.patch_encoding[:, :patches].clone())
    return model


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
