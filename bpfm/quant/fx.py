"""The `fx` backend: torch.ao FX graph mode quantization, as the paper's code.

Dynamic mode is the paper's best trade-off: a global QConfig with a dynamic quint8 placeholder
for activations and qint8 symmetric weights, so every nn.Linear becomes a dynamic int8 Linear
(the patch Conv2d stays fp32: torch.ao has no dynamic conv). Static mode observes activations
(quint8 affine) on calibration batches and quantizes the encoder's Linear layers; the patch
Conv2d, LayerNorm, residual adds, attention, GELU and the head stay fp32 (see
`qconfig_mapping`). Attention modules are swapped for a traceable form first (`traceable`).

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
from torch.ao.nn import quantized
from torch.ao.quantization import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    QConfig,
    QConfigMapping,
)
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from bpfm.errors import BpfmError
from bpfm.io.atomic import publish_file
from bpfm.model.attention import attention_core
from bpfm.model.cerebro import Attention
from bpfm.quant.quantized import QuantConfig, QuantizedModel

# The torch.ao warnings, by the start of their messages (warnings matches from the start).
AO_WARNINGS = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized "
                  r"tensor creation functions"),
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


def qconfig(config: QuantConfig, engine: str) -> QConfig:
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
                    "histogram": HistogramObserver}[config.observer]
        activation = observer.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                                        quant_min=0, quant_max=activation_max(engine))
    return QConfig(activation=activation, weight=weight)


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(e)) v of a CEReBrO `Attention`, from its qkv Linear's output
    [B, C, P, 3D] to the input of its proj Linear [B, C, P, D], through the model's own CPU path
    (`attention.attention_core`). A leaf for torch.fx: it runs on concrete tensors, so it keeps the
    broadcast products for short sequences, which symbolic tracing cannot (the traced model
    would otherwise take its SDPA branch, slower on CPU for 2 and 19 tokens)."""

    def __init__(self, heads: int, over_channels: bool):
        super().__init__()
        self.heads = heads
        self.over_channels = over_channels

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return attention_core(qkv, self.heads, self.over_channels)


class TraceableAttention(nn.Module):
    """qkv Linear -> AttentionCore -> proj Linear: the Linears (same objects, same names) are
    traced and quantized, the attention between them stays fp32."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.qkv = attention.qkv
        self.core = AttentionCore(attention.heads, attention.over_channels)
        self.proj = attention.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.core(self.qkv(x)))


def traceable(model: nn.Module) -> nn.Module:
    """`model` with each CEReBrO Attention swapped, in place, for a TraceableAttention."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Attention):
                setattr(parent, name, TraceableAttention(child))
    return model


def qconfig_mapping(model: nn.Module, config: QuantConfig, engine: str) -> QConfigMapping:
    """Dynamic: one global QConfig, as the paper (every Linear). Static: the Linear layers
    only, and not those of the model's `head`. Per-tensor quantization of the residual stream
    (LayerNorm, adds), the patch conv and the two outputs (the head) gave 5-8x the output error
    of the Linears alone (RMS change of SBP/DBP on the benchmark model 0.0125/0.0144 against
    0.0017/0.0030, in standardised units), at the same CPU time. The Linears hold all but 0.3 %
    of the weights: the small model's state_dict shrinks x3.55 (x3.58 with the conv quantized,
    whose activations double the output error)."""
    if config.mode == "dynamic":
        return QConfigMapping().set_global(qconfig(config, engine))
    mapping = QConfigMapping().set_object_type(nn.Linear, qconfig(config, engine))
    if isinstance(getattr(model, "head", None), nn.Module):
        mapping.set_module_name("head", None)
    return mapping


@torch.no_grad()
def quantize_fx(model: nn.Module, config: QuantConfig, batches: list[torch.Tensor],
                example: torch.Tensor) -> tuple[nn.Module, str]:
    """(converted GraphModule, engine) for a model in eval mode on CPU (changed in place)."""
    engine = select_engine()
    mapping = qconfig_mapping(model, config, engine)
    leaves = PrepareCustomConfig().set_non_traceable_module_classes([AttentionCore])
    with ao_warnings_filtered(), quantized_engine(engine):
        try:
            prepared = prepare_fx(traceable(model), mapping, (example,), leaves)
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
    buffer = io.BytesIO()
    with ao_warnings_filtered():
        torch.save(quantized, buffer)
    publish_file(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    return path


def load(path: Path) -> nn.Module:
    with ao_warnings_filtered(QTENSOR_LOAD_WARNING), quantized_engine(select_engine()):
        try:
            module = torch.load(path, map_location="cpu", weights_only=False)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError,
                ModuleNotFoundError, ValueError) as err:
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
    shell. Still so in torch 2.13: without this, torch.save + torch.load of a quantized Conv1d
    or Conv2d succeeds, and its first call fails with "'Conv2d' object has no attribute
    '_backward_hooks'". Registering a reducer for exactly those classes makes them pickle.
    Static mode now leaves the patch conv fp32; this still loads static models saved when it
    quantized the conv, and any model with a torch.ao quantized conv."""
    for name in ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                 "ConvTranspose3d"):
        copyreg.pickle(getattr(quantized, name), _reduce_quantized_conv)


_register_conv_pickling()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
