"""Post-training INT8 quantization behind one interface over two backends:
`quantize(model, QuantConfig(...), calib_batches)` returns a `QuantizedModel`;
`save_quantized` / `load_quantized` round-trip it. The backends are `bpfm.quant.fx` (torch.ao
FX graph mode, as the paper) and `bpfm.quant.pt2e` (torchao export quantization)."""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bpfm.errors import BpfmError
from bpfm.quant import fx, pt2e
from bpfm.quant.measure import graph_tensor_bytes, state_dict_bytes
from bpfm.quant.quantized import (
    FX_FILE,
    PT2E_FILE,
    WINDOW_SHAPE,
    InputQuantizer,
    QuantConfig,
    QuantizedModel,
)

log = logging.getLogger(__name__)


def _as_input(batch: Any) -> torch.Tensor:
    x = batch["x"] if isinstance(batch, dict) else batch
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise BpfmError("quantize: calib_batches: expected tensors [batch, channels, samples]")
    return x.detach().float().cpu()


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calib_batches: Iterable[torch.Tensor | dict] | None = None,
) -> QuantizedModel:
    """Quantize a copy of `model` (eval, CPU) as `config` says. `calib_batches`: input tensors
    [B, 2, 1250] (or loader dicts with "x"), needed by static mode; at most
    `config.calib_batches` of them are used."""
    config.validate()
    batches = [_as_input(b) for b in itertools.islice(calib_batches or (), config.calib_batches)]
    if config.needs_calibration and not batches:
        raise BpfmError("quantize: calib_batches: static quantization needs calibration data "
                        "(training batches), got none")
    model = copy.deepcopy(model).float().cpu().eval()
    input_quantizer = _input_quantizer(config, batches)
    if input_quantizer is not None:  # later layers calibrate on what they will see
        batches = [input_quantizer(x) for x in batches]
    # batch 2: torch.export would specialise a batch of 1 and refuse other sizes
    example = torch.zeros(2, *(batches[0].shape[1:] if batches else WINDOW_SHAPE))
    engine = None
    if config.mode == "fp32":
        net = model
    elif config.backend == "fx":
        net, engine = fx.quantize_fx(model, config, batches, example)
    else:
        net, engine = pt2e.quantize_pt2e(model, config, batches, example), pt2e.ENGINE
    log.info("quantized: %s (%d calibration batches)", config.name, len(batches))
    return QuantizedModel(net, config, input_quantizer, engine).eval()


def _input_quantizer(config: QuantConfig, batches: list[torch.Tensor]) -> InputQuantizer | None:
    if not config.quantize_input or config.mode == "fp32":
        return None
    dynamic = config.mode == "dynamic"
    channels = batches[0].shape[1] if batches else 2
    quantizer = InputQuantizer(channels, dynamic=dynamic)
    if not dynamic:
        for x in batches:
            quantizer.observe(x)
    return quantizer


def save_quantized(quantized: QuantizedModel, out: str | Path) -> Path:
    """Write the model into folder `out`: `model.pt` (fx, fp32: the pickled module) or
    `model.pt2` (pt2e: the exported program, config inside). Returns the file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if quantized.config.backend == "pt2e" and quantized.config.mode != "fp32":
        return pt2e.save(quantized, out / PT2E_FILE)
    return fx.save(quantized, out / FX_FILE)


def load_quantized(path: str | Path) -> QuantizedModel:
    """A model written by `save_quantized` (its file, or the folder holding it). Loading
    `model.pt` unpickles code: load only files you trust."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / name for name in (PT2E_FILE, FX_FILE) if (path / name).is_file()]
        if not candidates:
            raise BpfmError(f"{path}: no {PT2E_FILE} or {FX_FILE} (not a quantized model folder)")
        path = candidates[0]
    if not path.is_file():
        raise BpfmError(f"{path}: no such file")
    if path.suffix == ".pt2":
        return pt2e.load(path)
    return fx.load(path)


def runnable(quantized: QuantizedModel, batch_sizes: tuple[int, ...] = (1, 64)) -> nn.Module:
    """The fastest runnable form: for pt2e the Inductor-compiled graph (freezing on), one per
    batch size, compiled lazily on first use (~20 s each on an idle machine, minutes on a busy
    one) and kept with the model; for fx and fp32 the model itself."""
    config = quantized.config
    if config.backend != "pt2e" or not config.compile or config.mode == "fp32":
        return quantized
    kept = quantized._compiled
    if kept is None or kept.batch_sizes != tuple(sorted(set(batch_sizes))):
        # kept out of the submodules: it wraps the model, and is neither saved nor sized
        quantized.__dict__["_compiled"] = pt2e.CompiledModel(quantized, batch_sizes)
    return quantized._compiled


def size_bytes(quantized: QuantizedModel) -> tuple[int, str]:
    """(bytes, kind): the saved state_dict as the paper measured it (fx, fp32), or the bytes of
    the tensors the pt2e graph holds (int8 weights + fp32 rest), whose state_dict is not a
    meaningful size."""
    if quantized.config.backend == "pt2e" and quantized.config.mode != "fp32":
        return graph_tensor_bytes(quantized.net), "int8_tensor_bytes"
    return state_dict_bytes(quantized.net), "state_dict"
