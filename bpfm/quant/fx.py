"""The `fx` backend: torch.ao FX graph mode quantization, as the paper's code.

Dynamic mode is the paper's best trade-off: a global QConfig with a dynamic quint8 placeholder
for activations and qint8 symmetric weights, so every nn.Linear becomes a dynamic int8 Linear
(the patch Conv2d stays fp32: torch.ao has no dynamic conv). Static mode observes activations
(quint8 affine) on calibration batches and quantizes every op the x86 backend supports (Linear,
Conv2d, LayerNorm, add); attention and GELU stay fp32.

torch.ao is deprecated and warns on every call; `ao_warnings_filtered` silences exactly those
warnings, only around this backend's calls.
"""

from __future__ import annotations

import contextlib
import copyreg
import io
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from bpfm.errors import BpfmError

# The torch.ao warnings, by the start of their messages (warnings matches from the start).
AO_WARNINGS = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized "
                  r"tensor creation functions"),  # fmt: skip
    (UserWarning, r"Please use quant_min and quant_max to specify the range for observers"),
)
# torch's own unpickler of quantized tensors (`_rebuild_qtensor`) still reads TypedStorage.
QTENSOR_LOAD_WARNING = (UserWarning, r"TypedStorage is deprecated")
# Engines in order of preference: x86 (fbgemm or onednn per op) on x86 CPUs, qnnpack on ARM.
ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")


@contextlib.contextmanager
def ao_warnings_filtered(*extra: tuple[type[Warning], str]) -> Iterator[None]:
    with warnings.catch_warnings():
        for category, message in (*AO_WARNINGS, *extra):
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def select_engine() -> str:
    supported = torch.backends.quantized.supported_engines
    for engine in ENGINES:
        if engine in supported:
            return engine
    raise BpfmError(f"quantize: backend: no quantized engine in this torch build ({supported})")


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def activation_max(engine: str) -> int:
    """Top of the quint8 activation range. fbgemm (x86) multiplies u8 x s8 pairs into int16,
    which saturates without VNNI; 7-bit activations avoid that, as torch's x86 default qconfig
    does with reduce_range (given here as quant_max, which reduce_range is deprecated for)."""
    if engine in ("x86", "fbgemm") and not _has_vnni():
        return 127
    return 255


def _has_vnni() -> bool:
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe and probe())


def qconfig(config, engine: str):
    from torch.ao.quantization import (
        HistogramObserver,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
        PerChannelMinMaxObserver,
        PlaceholderObserver,
        QConfig,
    )

    if config.weights == "per_channel":
        weight = PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric
        )
    else:
        weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    if config.mode == "dynamic":
        activation = PlaceholderObserver.with_args(
            dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True
        )
    else:
        observer = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
                    "histogram": HistogramObserver}[config.observer]  # fmt: skip
        activation = observer.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                                        quant_min=0, quant_max=activation_max(engine))  # fmt: skip
    return QConfig(activation=activation, weight=weight)


@torch.no_grad()
def quantize_fx(model: nn.Module, config, batches: list[torch.Tensor],
                example: torch.Tensor) -> tuple[nn.Module, str]:  # fmt: skip
    """(converted GraphModule, engine) for a model in eval mode on CPU."""
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = select_engine()
    # One global QConfig, as the paper: torch.ao quantizes every op its x86 backend supports.
    mapping = QConfigMapping().set_global(qconfig(config, engine))
    with ao_warnings_filtered(), quantized_engine(engine):
        try:
            prepared = prepare_fx(model, mapping, (example,))
        except Exception as err:  # a model torch.fx cannot trace symbolically
            raise BpfmError(f"quantize: model: torch.fx cannot trace it ({err})") from None
        if config.mode == "static":
            for x in batches:
                prepared(x)
        return _picklable(convert_fx(prepared)), engine


def _picklable(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop type annotations that torch.fx recorded as strings (modules written with
    `from __future__ import annotations`): a GraphModule cannot pickle them."""
    if any(isinstance(node.type, str) for node in graph_module.graph.nodes):
        for node in graph_module.graph.nodes:
            if isinstance(node.type, str):
                node.type = None
        graph_module.recompile()
    return graph_module


def save(quantized: nn.Module, path: Path) -> Path:
    """The whole module, pickled (a GraphModule re-creates its code on load)."""
    from bpfm.model.checkpoint import write_bytes_atomic

    buffer = io.BytesIO()
    with ao_warnings_filtered():
        torch.save(quantized, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def load(path: Path) -> nn.Module:
    from bpfm.quant import QuantizedModel

    with ao_warnings_filtered(QTENSOR_LOAD_WARNING), quantized_engine(select_engine()):
        try:
            module = torch.load(path, map_location="cpu", weights_only=False)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError,
                ModuleNotFoundError, ValueError) as err:  # fmt: skip
            raise BpfmError(f"{path}: not a bpfm quantized model ({_first_line(err)})") from None
    if not isinstance(module, QuantizedModel):
        raise BpfmError(f"{path}: holds a {type(module).__name__}, not a bpfm quantized model")
    return module.eval()


def _rebuild_quantized_conv(cls: type, state: tuple) -> nn.Module:
    """What the quantized conv's own __deepcopy__ does: a Module shell, then its __setstate__."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.__setstate__(state)
    return module


def _reduce_quantized_conv(module: nn.Module):
    return _rebuild_quantized_conv, (type(module), module.__getstate__())


def _register_conv_pickling() -> None:
    """torch.ao's quantized convs define __getstate__/__setstate__ for TorchScript only: plain
    pickle (torch.save of a whole model, MLflow's pickle format) restores them without a Module
    shell and fails on load. Registering a reducer for exactly those classes makes them pickle."""
    from torch.ao.nn import quantized

    for name in ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                 "ConvTranspose3d"):  # fmt: skip
        copyreg.pickle(getattr(quantized, name), _reduce_quantized_conv)


_register_conv_pickling()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
