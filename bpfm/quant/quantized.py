"""What a quantized BP model is: the `QuantConfig` that names a variant, the `InputQuantizer` in
front of the network, and `QuantizedModel` (an `nn.Module`, so `bpfm.training.predict` runs it
like the fp32 model)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from bpfm.errors import BpfmError
from bpfm.schema import from_fields

MODES = ("fp32", "dynamic", "static")
OBSERVERS = ("minmax", "moving_average", "histogram")
WEIGHTS = ("per_channel", "per_tensor")
BACKENDS = ("fx", "pt2e")
FX_FILE = "model.pt"  # pickled QuantizedModel (torch.save)
PT2E_FILE = "model.pt2"  # torch.export.save of the converted graph
CONFIG_EXTRA = "bpfm_quant.json"  # the QuantConfig + input quantizer inside a .pt2 archive
WINDOW_SHAPE = (2, 1250)  # (ECG, PPG) x 10 s at 125 Hz


@dataclass(frozen=True)
class QuantConfig:
    mode: str = "dynamic"  # fp32 (the baseline, unchanged) | dynamic | static
    observer: str = "minmax"  # activation observer of static mode
    weights: str = "per_channel"  # int8 symmetric weights, one scale per output channel or tensor
    backend: str = "fx"
    # training batches observed by static mode (and by a static input quantizer)
    calib_batches: int = 8
    quantize_input: bool = False  # round ECG and PPG to 8 bits, one scale per channel (the paper)
    compile: bool = True  # pt2e: latency measured on the Inductor-compiled graph

    def validate(self) -> QuantConfig:
        """One-line errors for every setting a user can get wrong; returns self."""
        for name, valid in (("mode", MODES), ("observer", OBSERVERS), ("weights", WEIGHTS),
                            ("backend", BACKENDS)):
            if getattr(self, name) not in valid:
                raise BpfmError(
                    f"quantize: {name}: unknown {getattr(self, name)!r} (valid: {', '.join(valid)})"
                )
        if not isinstance(self.calib_batches, int) or self.calib_batches < 1:
            raise BpfmError(f"quantize: calib_batches: must be >= 1, got {self.calib_batches!r}")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.mode == "static"

    @property
    def name(self) -> str:
        """A short variant name, e.g. `fx-static-histogram-per_channel+input`."""
        if self.mode == "fp32":
            return "fp32"
        parts = [self.backend, self.mode]
        if self.mode == "static":
            parts.append(self.observer)
        parts.append(self.weights)
        return "-".join(parts) + ("+input" if self.quantize_input else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QuantConfig:
        return from_fields(cls, values, "quantize config")


class InputQuantizer(nn.Module):
    """Rounds the input to 8 bits with one scale and zero point per channel (ECG, PPG), as a
    sensor front end delivering int8 samples would; the paper's per-channel input quantization.

    Affine, as the paper's activations: scale = (max - min) / 255, zero point =
    floor(-min / scale + 0.5), with min <= 0 <= max so that 0 stays exact. `dynamic` takes min and
    max of each window and channel on the fly; otherwise they are calibrated per channel on
    training batches. Plain float ops, so it traces, exports and compiles with either backend."""

    levels = 255

    def __init__(self, channels: int = 2, dynamic: bool = False):
        super().__init__()
        self.dynamic = dynamic
        self.register_buffer("low", torch.full((channels,), float("inf")))
        self.register_buffer("high", torch.full((channels,), float("-inf")))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        self.low.copy_(torch.minimum(self.low, x.amin(dim=(0, 2))))
        self.high.copy_(torch.maximum(self.high, x.amax(dim=(0, 2))))

    def _round(self, x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        low, high = low.clamp(max=0.0), high.clamp(min=0.0)
        scale = ((high - low) / self.levels).clamp(min=1e-8)
        zero_point = torch.floor(-low / scale + 0.5)
        q = torch.clamp(torch.round(x / scale) + zero_point, 0, self.levels)
        return (q - zero_point) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            return self._round(x, x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True))
        return self._round(x, self.low.view(1, -1, 1), self.high.view(1, -1, 1))

    def describe(self) -> dict[str, Any]:
        return {"dynamic": self.dynamic, "low": self.low.tolist(), "high": self.high.tolist()}

    @classmethod
    def from_description(cls, values: dict[str, Any]) -> InputQuantizer:
        quantizer = cls(len(values["low"]), bool(values["dynamic"]))
        quantizer.low.copy_(torch.tensor(values["low"]))
        quantizer.high.copy_(torch.tensor(values["high"]))
        return quantizer


class QuantizedModel(nn.Module):
    """A quantized BP model: forward(x [B, 2, 1250]) -> [B, 2] in the fp32 model's units."""

    def __init__(self, net: nn.Module, config: QuantConfig, input_quantizer: InputQuantizer | None,
                 engine: str | None = None):
        super().__init__()
        self.net = net
        self.input_quantizer = input_quantizer
        self.config = config
        self.engine = engine  # fx: the torch.backends.quantized engine; pt2e: x86_inductor
        self._compiled: Any = None  # bpfm.quant.convert.runnable's compiled graph, kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self.net(x)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = dict(state)
        state["_compiled"] = None  # compiled code does not pickle
        return state


def config_json(quantized: QuantizedModel) -> str:
    """The config and input quantizer as JSON (stored inside a .pt2 archive)."""
    quantizer = quantized.input_quantizer
    return json.dumps({"config": quantized.config.to_dict(),
                       "input_quantizer": quantizer.describe() if quantizer else None})
