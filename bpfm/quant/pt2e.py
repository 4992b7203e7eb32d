"""The `pt2e` backend: torchao export quantization with `X86InductorQuantizer`.

The model is exported (batch dimension dynamic), annotated, calibrated and converted into a
reference graph of quantize/dequantize ops around fp32 ops with int8 weight constants. That graph
is slow in eager mode; `torch.compile` with Inductor freezing turns the Q/DQ patterns into int8
kernels (`bpfm.quant.convert.runnable`). Static mode uses the same activation observers as `fx`
(quint8 affine) and int8 symmetric weights; dynamic mode quantizes activations on the fly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch._inductor.config as inductor_config
from torch import nn

from bpfm.errors import BpfmError
from bpfm.io.atomic import publish_file
from bpfm.quant.fx import activation_max
from bpfm.quant.quantized import (
    CONFIG_EXTRA,
    WINDOW_SHAPE,
    InputQuantizer,
    QuantConfig,
    QuantizedModel,
    config_json,
)

if TYPE_CHECKING:
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

MAX_BATCH = 1 << 16
INDUCTOR_INT8_LOWERING = r"torch\._inductor\.mkldnn_lowerings"
ENGINE = "x86_inductor"  # what runs the converted graph: Inductor's int8 (oneDNN) kernels


@contextlib.contextmanager
def _quiet_torchao_import() -> Iterator[None]:
    """torchao logs a warning per CUDA extension it cannot load on CPU-only torch (harmless)."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quantizer_for(config: QuantConfig) -> X86InductorQuantizer:
    """An X86InductorQuantizer whose global config has the observer and weight scheme asked for."""
    with _quiet_torchao_import():
        from torchao.quantization.pt2e import (
            HistogramObserver,
            MinMaxObserver,
            MovingAverageMinMaxObserver,
            PerChannelMinMaxObserver,
            PlaceholderObserver,
        )  # lazy: torchao
        from torchao.quantization.pt2e.quantizer import QuantizationSpec  # lazy: torchao
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            QuantizationConfig,
            X86InductorQuantizer,
        )  # lazy: torchao

    eps = {"eps": 2**-12}  # as torchao's default x86 config
    dynamic = config.mode == "dynamic"
    if dynamic:
        observer = PlaceholderObserver
    else:
        observer = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
                    "histogram": HistogramObserver}[config.observer]
    # 7-bit activations without VNNI, dynamic ones too: Inductor's int8 kernels saturate on
    # such CPUs (toy check: compiled output off by 0.064 with 0..255, 0.005 with 0..127)
    activation = QuantizationSpec(
        dtype=torch.uint8, quant_min=0, quant_max=activation_max("x86"),
        qscheme=torch.per_tensor_affine, is_dynamic=dynamic,
        observer_or_fake_quant_ctr=observer.with_args(**eps),
    )
    per_channel = config.weights == "per_channel"
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-128, quant_max=127,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
        ch_axis=0 if per_channel else None, is_dynamic=False,
        observer_or_fake_quant_ctr=(PerChannelMinMaxObserver if per_channel
                                    else MinMaxObserver).with_args(**eps),
    )
    # Linear layers only: Inductor cannot constant-fold the int8 Conv2d of the patch embedding
    # under freezing (no fake kernel for onednn.qconv_prepack in torch 2.13), and that conv
    # holds 0.3 % of the weights. Every other op X86InductorQuantizer would annotate here
    # is a Linear anyway.
    return X86InductorQuantizer().set_module_type_qconfig(
        nn.Linear, QuantizationConfig(activation, activation, weight, None, False)
    )


def export(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    except Exception as err:  # a model torch.export cannot capture
        raise BpfmError(f"quantize: model: torch.export failed ({_first_line(err)})") from None


@torch.no_grad()
def quantize_pt2e(model: nn.Module, config: QuantConfig, batches: list[torch.Tensor],
                  example: torch.Tensor) -> nn.Module:
    """The converted (reference Q/DQ) GraphModule of a model in eval mode on CPU."""
    with _quiet_torchao_import():
        from torchao.quantization.pt2e import allow_exported_model_train_eval  # lazy: torchao

        # lazy: torchao
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(export(model, example).module(), quantizer_for(config))
    # Dynamic mode has nothing to calibrate, but one pass runs every observer once (the weight
    # observers then do not warn that they were never run).
    for x in batches if config.mode == "static" else [example]:
        prepared(x)
    return allow_exported_model_train_eval(convert_pt2e(prepared))


def save(quantized: QuantizedModel, path: Path) -> Path:
    """torch.export.save of the converted graph; the config rides along as an extra file."""
    program = export(quantized.net, torch.zeros(2, *WINDOW_SHAPE))
    extra = {CONFIG_EXTRA: config_json(quantized)}
    publish_file(path, lambda tmp: torch.export.save(program, tmp, extra_files=extra))
    return path


def load(path: Path) -> nn.Module:

    if not zipfile.is_zipfile(path):  # checked first: torch.export.load logs a traceback
        raise BpfmError(f"{path}: not a bpfm quantized model (not a .pt2 zip archive)")
    extra = {CONFIG_EXTRA: ""}
    with _quiet_torchao_import():
        # lazy: torchao
        import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)
    try:
        program = torch.export.load(path, extra_files=extra)
        values = json.loads(extra[CONFIG_EXTRA])
    except Exception as err:  # torch.export.load raises a variety of errors for foreign files
        raise BpfmError(f"{path}: not a bpfm quantized model ({_first_line(err)})") from None
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    described = values.get("input_quantizer")
    quantizer = InputQuantizer.from_description(described) if described else None
    net = allow_exported_model_train_eval(program.module())
    return QuantizedModel(net, QuantConfig.from_dict(values["config"]), quantizer,
                          ENGINE).eval()


class CompiledModel(nn.Module):
    """A quantized model compiled by Inductor with freezing (weights become constants, so the
    int8 weight packing is folded and the Q/DQ patterns become int8 kernels), one graph per
    batch size in `batch_sizes`. Other batch sizes run in chunks of the largest one, the last
    chunk zero-padded, so nothing recompiles outside the freezing config: a graph compiled
    without it keeps the weight packing, which Inductor cannot trace."""

    def __init__(self, quantized: nn.Module, batch_sizes: tuple[int, ...] = (1, 64)):
        super().__init__()
        self.quantized = quantized
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.graph = torch.compile(quantized, dynamic=False)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with inductor_config.patch(freezing=True), warnings.catch_warnings():
            # Inductor's own int8 lowering copies a tensor with torch.tensor() and warns about
            # it, once per Linear, on every compile
            warnings.filterwarnings("ignore", message="To copy construct from a tensor",
                                    category=UserWarning, module=INDUCTOR_INT8_LOWERING)
            return self.graph(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] in self.batch_sizes:
            return self._run(x)
        chunk = self.batch_sizes[-1]
        outputs = []
        for start in range(0, x.shape[0], chunk):
            part = x[start : start + chunk]
            size = part.shape[0]
            if size < chunk:
                part = torch.cat([part, part.new_zeros(chunk - size, *part.shape[1:])])
            outputs.append(self._run(part)[:size])
        return torch.cat(outputs)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
