"""ExecuTorch: pt2e quantization with the XNNPACK quantizer (int8 weights symmetric per output
channel; int8 activations, static or dynamic), lowered with the XNNPACK partitioner to a `.pte`
and run by ExecuTorch's Python runtime.

Static activations use the observer asked for (torchao's MinMax, MovingAverageMinMax or
Histogram; XNNPACK's own default is Histogram). The converted graph before lowering is the torch
int8 model the `.pte` must agree with (parity).

What is exported is `bpfm.export.xnnpack_graph.for_xnnpack` of the model: the same function (to
float32 rounding) written with ops the XNNPACK partitioner delegates (LayerNorm as means by
constant-row Linears with its affine folded into the next Linear, the patch conv as a Linear,
qkv split in three, the 2-channel attention as tanh of centred scores, the 19-patch one as
batched matmuls, reshapes whose only dynamic size is an inferred batch). The training graph left
280 ops of the small model on portable kernels in 66 partitions (LayerNorm alone 14 % of a
batch-64 run); the rewrite lowers to one XNNPACK partition with the input's slice and the
positional tables' broadcast on portable kernels, and dynamic int8 quantizes the patch Linear
too. Its normalisation, means and attention arithmetic stay fp32 in every int8 mode
(`FP32_MODULES`); only the Linears are int8. Static int8 lowers `biases_apart` of the
rewrite, the Linears' biases int8 adds after them: no int32 biases with their own per-channel
scales, 109 KB less in the small model's file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import statistics
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from bpfm.errors import BpfmError
from bpfm.export import MAX_BATCH, ExportConfig, RuntimeModel, first_line
from bpfm.export.xnnpack_graph import FP32_MODULES, biases_apart, for_xnnpack
from bpfm.quant.pt2e import _quiet_torchao_import
from bpfm.training.predict import WINDOW_SHAPE

if TYPE_CHECKING:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

# executorch and torchao are imported inside the functions that need them: they are the optional
# `.[edge]` extra (without it this module still imports, and `load` still names a foreign file in
# one line), and torchao's import-time warnings are silenced where it is imported (`_quiet`).

MAGIC = b"ET12"  # the flatbuffer file identifier of a .pte, bytes 4..8
LOWERING_WARNING = "isinstance(treespec, LeafSpec)"  # torch's own deprecation, per lowering


def _quiet():
    return _quiet_torchao_import()


def quantizer_for(config: ExportConfig) -> XNNPACKQuantizer:
    with _quiet():
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e import (
            HistogramObserver,
            MinMaxObserver,
            MovingAverageMinMaxObserver,
        )

    dynamic = config.mode == "dynamic"
    qconfig = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    if not dynamic:
        observer = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
                    "histogram": HistogramObserver}[config.observer]
        spec = dataclasses.replace(qconfig.input_activation,
                                   observer_or_fake_quant_ctr=observer.with_args(eps=2**-12))
        qconfig = dataclasses.replace(qconfig, input_activation=spec, output_activation=spec)
    quantizer = XNNPACKQuantizer().set_global(qconfig)
    for module_type in FP32_MODULES:  # norms, means and attention arithmetic stay fp32
        quantizer.set_module_type(module_type, None)
    return quantizer


def _exported(module: nn.Module) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        return torch.export.export(module, (torch.zeros(2, *WINDOW_SHAPE),),
                                   dynamic_shapes=({0: batch},))
    except Exception as err:  # a model torch.export cannot capture
        raise BpfmError(f"export: model: torch.export failed ({first_line(err)})") from None


@torch.no_grad()
def quantized_reference(model: nn.Module, config: ExportConfig,
                        calib: list[torch.Tensor]) -> nn.Module:
    """The converted pt2e graph: the torch int8 model that the .pte runs."""
    with _quiet():
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(_exported(model).module(), quantizer_for(config))
    for x in calib if config.mode == "static" else [torch.zeros(2, *WINDOW_SHAPE)]:
        prepared(x[:MAX_BATCH])
    return allow_exported_model_train_eval(convert_pt2e(prepared))


def export(model: nn.Module, config: ExportConfig, calib: list[torch.Tensor],
           path: Path) -> dict[str, Any]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = for_xnnpack(model)
    if config.mode == "static":  # no int32 biases nor their scales (see `biases_apart`)
        model = biases_apart(model)
    reference = None if config.mode == "fp32" else quantized_reference(model, config, calib)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=rf".*{LOWERING_WARNING}", category=FutureWarning)
        program = _exported(reference if reference is not None else model)
        try:
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            buffer = lowered.to_executorch().buffer
        except Exception as err:  # an op XNNPACK or the edge dialect cannot take
            raise BpfmError(f"export: executorch: lowering failed ({first_line(err)})") from None
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(buffer)
    tmp.replace(path)
    return {"reference": reference, "delegated": _delegation(lowered)}


def _delegation(lowered) -> dict[str, int]:
    """How many ops XNNPACK took and how many stayed on ExecuTorch's portable kernels (where
    time goes when a latency target is missed)."""
    graph = lowered.exported_program().graph
    calls = [n for n in graph.nodes if n.op == "call_function"]
    delegate = sum("executorch_call_delegate" in str(n.target) for n in calls)
    portable = [n for n in calls if "executorch_call_delegate" not in str(n.target)
                and "getitem" not in str(n.target)]
    return {"xnnpack_partitions": delegate, "portable_ops": len(portable)}


@contextlib.contextmanager
def _native_stderr_silenced():
    """The runtime's C++ logs (CPU probing, threadpool size, verification) go straight to file
    descriptor 2, or through the pybindings' redirect to sys.stderr; bpfm reports a broken
    program as one line of its own instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(io.StringIO()):
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class ExecutorchModel(RuntimeModel):
    format = "executorch"

    def __init__(self, path: Path, threads: int = 1):
        super().__init__(path)
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        with _native_stderr_silenced():
            # XNNPACK's threadpool is process-wide and starts at the core count
            _unsafe_reset_threadpool(threads)
            try:
                program = Runtime.get().load_program(self.path)
                self.method = program.load_method("forward")
            except Exception as err:  # the runtime's errors for a broken program vary
                raise BpfmError(f"{path}: not a valid ExecuTorch program "
                                f"({first_line(err)})") from None
        if self.method is None:
            raise BpfmError(f"{path}: not a bpfm BP model (no forward method)")

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.method.execute([torch.from_numpy(x)])[0].numpy()


def load(path: Path, *, threads: int = 1) -> ExecutorchModel:
    with path.open("rb") as handle:
        head = handle.read(8)
    if head[4:8] != MAGIC:  # checked first: the runtime logs its own errors on stderr
        raise BpfmError(f"{path}: not an ExecuTorch program (no {MAGIC.decode()} identifier)")
    with _quiet():
        return ExecutorchModel(path, threads)



# ETDump events that wrap others (a delegate call holds its XNNPACK ops) or are not per run
WRAPPER_EVENTS = {"DELEGATE_CALL", "OPERATOR_CALL", "Method::init", "Program::load_method",
                  "Method::execute"}


def profile(path: Path, x: torch.Tensor, runs: int = 5,
            threads: int = 1) -> list[tuple[str, float]]:
    """(op, share of op time) from the runtime's ETDump (XNNPACK ops by kind, e.g. `Fully
    Connected (NC, QS8, QC8W) GEMM`, and portable kernels such as `native_layer_norm.out`),
    largest first."""
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="bpfm-etdump-") as tmp, _native_stderr_silenced():
        _unsafe_reset_threadpool(threads)
        program = Runtime.get().load_program(path, enable_etdump=True)
        method = program.load_method("forward")
        for _ in range(runs):
            method.execute([x])
        dump = str(Path(tmp) / "run.etdp")
        program.write_etdump_result_to_file(dump, str(Path(tmp) / "debug.bin"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no debug buffer: timings only
            frame = Inspector(etdump_path=dump).to_dataframe()
    per_op: dict[str, float] = defaultdict(float)
    for name, raw in zip(frame["event_name"], frame["raw"], strict=True):
        if name not in WRAPPER_EVENTS and len(raw):
            per_op[re.sub(r" #\d+$", "", name).removeprefix("native_call_")] += \
                statistics.median(raw)
    total = sum(per_op.values()) or 1.0
    return sorted(((op, ms / total) for op, ms in per_op.items()), key=lambda t: -t[1])


def size_breakdown(path: Path) -> dict[str, int]:
    """Bytes of a `.pte` by kind: the weights XNNPACK holds (`weights`: int8 or fp32 matrices
    and biases, deduplicated by content), their per-channel `scales` (a static int8 Linear with
    a bias would carry two sets, its weight's and its int32 bias's: `biases_apart` moves the
    bias to an int8 add), the program's constant segment (the positional tables' rows; in
    static int8 the int8 biases too),
    the XNNPACK graphs (`delegate_graphs`), the program flatbuffer (ops, values, plan) and
    alignment padding. Where an int8 file is bigger than a quarter of the fp32 one."""
    import struct

    from executorch.exir._serialize._program import _flatbuffer_to_program, deserialize_pte_binary

    data = path.read_bytes()
    program_size = struct.unpack("<Q", data[16:24])[0]  # the extended header after ET12
    pte = deserialize_pte_binary(data)
    program = _flatbuffer_to_program(data[:program_size])
    named = pte.named_data
    scales = sum(len(named.buffers[e.buffer_index]) for k, e in named.pte_data.items()
                 if k.startswith("scale_"))
    constant = program.constant_segment
    out = {
        "file": len(data),
        "weights": sum(len(b) for b in named.buffers) - scales,
        "scales": scales,
        "constant_segment": program.segments[constant.segment_index].size
        if constant.offsets else 0,
        "delegate_graphs": sum(len(d.data) for d in pte.program.backend_delegate_data),
        "program": program_size,
    }
    out["padding"] = out["file"] - sum(v for k, v in out.items() if k != "file")
    return out
