"""ONNX Runtime: the fp32 model exported with `torch.onnx.export` (batch dimension dynamic),
quantized with `onnxruntime.quantization` (dynamic; or static QDQ with its MinMax, Entropy or
Percentile calibrator on the calibration batches), run by an `InferenceSession`.

Weights are int8 symmetric per output channel, activations uint8 affine. Only the ops that hold
weights (MatMul, Gemm, Conv) are quantized, and only their inputs (`STATIC_OPTIONS`): QDQ pairs
around Add, LayerNorm or Softmax cost time on CPU without saving a byte. Opset 20 has a Gelu op,
which ONNX Runtime runs as one kernel (fused with the bias Add in a static graph); opset 18's
erf form was five ops and a quarter of the dynamic model's time at batch 64.

Both the fp32 and the int8 file are written through `slim`: the exporter's per-node stack traces
and module paths, shape inference's value_info and long generated names are 9 % of an int8 file
(the int8 / fp32 size ratio was 3.5x with them, 3.8x without). `size_breakdown` says where a
file's bytes go; what an int8 file carries beyond a quarter of the fp32 one is fp32 per-channel
scales, biases, LayerNorm affine and the positional table (~170 KB of the small model).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from bpfm.errors import BpfmError
from bpfm.export import ExportConfig, RuntimeModel, first_line
from bpfm.training.predict import WINDOW_SHAPE

if TYPE_CHECKING:
    import onnx

OPSET = 20  # Gelu is an op from 20 on: one kernel, not the five ops of its erf form
QUANTIZED_OPS = ["MatMul", "Gemm", "Conv"]
INPUT, OUTPUT = "x", "bp"
# a static MatMul's output stays fp32: without a QuantizeLinear after it ONNX Runtime runs the
# weight's DequantizeLinear and the MatMul as one MatMulIntegerToFloat (a QLinearMatMul and a
# DequantizeLinear otherwise): 1.2x faster at batch 64, and one rounding fewer
STATIC_OPTIONS = {"OpTypesToExcludeOutputQuantization": QUANTIZED_OPS}
# (op type, input index) of the tensors a quantized graph reads as int8 weights, as scales and
# as zero points
WEIGHT_INPUTS = {("DequantizeLinear", 0), ("MatMulInteger", 1), ("ConvInteger", 1)}
SCALE_INPUTS = {("DequantizeLinear", 1), ("QuantizeLinear", 1)}
ZERO_POINT_INPUTS = {("DequantizeLinear", 2), ("QuantizeLinear", 2), ("MatMulInteger", 2),
                     ("MatMulInteger", 3), ("ConvInteger", 2), ("ConvInteger", 3)}


def export_fp32(model: nn.Module, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    # the exporter reports each of its steps on stdout
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            torch.onnx.export(model, (torch.zeros(2, *WINDOW_SHAPE),), str(path), dynamo=True,
                              dynamic_shapes=({0: batch},), input_names=[INPUT],
                              output_names=[OUTPUT], opset_version=OPSET,
                              external_data=False, verbose=False)
        except Exception as err:  # a model the exporter cannot translate
            raise BpfmError(f"export: onnx: torch.onnx.export failed ({first_line(err)})") from None


def slim(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with what ONNX Runtime reads and nothing else (in place): no debug records,
    each distinct initializer stored once, short tensor names.

    torch.onnx.export tags every node with its stack trace, module path and FX node (and the
    graph with the ExportedProgram's signature), and ONNX Runtime's quantization tools keep the
    tags: 395 KB of the small model's int8 file, 9 % of it. Shape inference leaves a value_info
    per tensor (ONNX Runtime infers its own), and per-channel quantization an all-zero zero point
    per weight (equal ones are shared here: 12 KB)."""
    _drop_debug_records(model)
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in model.graph.node for a in n.attribute):
        return model  # subgraphs name outer tensors: no renaming (not a bpfm graph)
    _share_equal_initializers(model.graph)
    _shorten_names(model.graph)
    return model


def _drop_node_records(node: onnx.NodeProto) -> None:
    del node.metadata_props[:]
    node.doc_string = ""


def _drop_debug_records(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        _drop_node_records(node)
    del model.graph.value_info[:]
    del model.graph.metadata_props[:]  # the ExportedProgram's signature, 9 KB
    del model.metadata_props[:]
    model.graph.doc_string = model.doc_string = ""


def _share_equal_initializers(graph: onnx.GraphProto) -> None:
    from onnx import numpy_helper  # lazy: onnx

    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    kept = []
    for tensor in graph.initializer:
        key = (tensor.data_type, tuple(tensor.dims), numpy_helper.to_array(tensor).tobytes())
        if key in first:
            alias[tensor.name] = first[key]
        else:
            first[key] = tensor.name
            kept.append(tensor)
    if alias:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        for node in graph.node:
            node.input[:] = [alias.get(name, name) for name in node.input]


def _shorten_names(graph: onnx.GraphProto) -> None:
    """Every tensor but the graph's input and output renamed to a short counter; nodes unnamed
    (names are for people, and an exported graph's `val_187_DequantizeLinear_Output` tells
    them nothing)."""
    public = {v.name for v in [*graph.input, *graph.output]}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in public:
            return name  # "" marks an omitted optional input
        return names.setdefault(name, format(len(names), "x"))

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]


def _save_slim(source: Path, target: Path) -> None:
    import onnx  # lazy: onnx

    onnx.save(slim(onnx.load(str(source))), str(target))


def size_breakdown(path: Path) -> dict[str, int]:
    """Bytes of a `.onnx` by kind; they add up to the file. Tensor payloads by role: the int8
    `weights` of quantized ops, their fp32 `scales` and int8 `zero_points` (per channel, and
    the activations' scalars), `int32_biases` (static Gemm), fp32 tensors left unquantized with
    two or more axes (`fp32_matrices`: weights the quantizer skipped, positional tables) and
    the rest (`fp32_vectors`: biases, LayerNorm affine), `other_tensors` (int64 shapes, axes).
    Then the protobuf around them: `tensor_headers` (names, dims, types), `nodes`,
    `value_info`, `metadata` (debug records of nodes and model) and `rest` (graph inputs and
    outputs, opsets, framing). Where an int8 file is bigger than a quarter of the fp32 one."""
    import onnx  # lazy: onnx

    model = onnx.load(str(path))
    graph = model.graph
    out = dict.fromkeys(["file", "weights", "scales", "zero_points", "int32_biases",
                         "fp32_matrices", "fp32_vectors", "other_tensors", "tensor_headers",
                         "nodes", "value_info", "metadata", "rest"], 0)
    out["file"] = path.stat().st_size
    roles = initializer_roles(graph)
    for tensor in graph.initializer:
        payload = _payload_bytes(tensor)
        out[roles[tensor.name]] += payload
        out["tensor_headers"] += tensor.ByteSize() - payload
    for node in graph.node:
        bare = onnx.NodeProto()
        bare.CopyFrom(node)
        _drop_node_records(bare)
        out["nodes"] += bare.ByteSize()
        out["metadata"] += node.ByteSize() - bare.ByteSize()
    out["value_info"] = sum(v.ByteSize() for v in graph.value_info)
    out["metadata"] += sum(p.ByteSize() for p in [*model.metadata_props,
                                                    *graph.metadata_props])
    out["rest"] = out["file"] - sum(v for k, v in out.items() if k != "file")
    return out


def _payload_bytes(tensor: onnx.TensorProto) -> int:
    from onnx import numpy_helper  # lazy: onnx

    return len(tensor.raw_data) if tensor.raw_data else numpy_helper.to_array(tensor).nbytes


def initializer_roles(graph: onnx.GraphProto) -> dict[str, str]:
    """Initializer name -> its `size_breakdown` kind, from the slots of the nodes reading it.
    A dynamic graph multiplies a weight's scale with DynamicQuantizeLinear's input scale."""
    from onnx import TensorProto  # lazy: onnx

    slots: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for node in graph.node:
        for index, name in enumerate(node.input):
            slots[name].add((node.op_type, index))
    runtime_scales = {n.output[1] for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
    dynamic_scales = {name for n in graph.node if n.op_type == "Mul"
                      and runtime_scales & set(n.input) for name in n.input}
    roles = {}
    for tensor in graph.initializer:
        used = slots[tensor.name]
        if tensor.data_type == TensorProto.INT32:
            role = "int32_biases"
        elif tensor.data_type in (TensorProto.INT8, TensorProto.UINT8):
            role = "weights" if used & WEIGHT_INPUTS else \
                "zero_points" if used & ZERO_POINT_INPUTS else "other_tensors"
        elif tensor.data_type == TensorProto.FLOAT:
            role = "scales" if used & SCALE_INPUTS or tensor.name in dynamic_scales else \
                "fp32_matrices" if sum(d > 1 for d in tensor.dims) >= 2 else "fp32_vectors"
        else:
            role = "other_tensors"
        roles[tensor.name] = role
    return roles


def fp32_matrices(path: Path) -> list[tuple[str, list[int], int]]:
    """(reading op types, shape, bytes) of each fp32 tensor with two or more axes, largest
    first: what a quantized file still carries at full width."""
    import onnx  # lazy: onnx

    graph = onnx.load(str(path)).graph
    roles = initializer_roles(graph)
    readers: dict[str, set[str]] = defaultdict(set)
    for node in graph.node:
        for name in node.input:
            readers[name].add(node.op_type)
    found = [("/".join(sorted(readers[t.name])), list(t.dims), _payload_bytes(t))
             for t in graph.initializer if roles[t.name] == "fp32_matrices"]
    return sorted(found, key=lambda t: -t[2])

class _Batches:
    """onnxruntime's CalibrationDataReader over the calibration batches."""

    def __init__(self, batches: list[torch.Tensor]):
        # the histogram calibrators stack each tensor's batches: a short last batch breaks them
        full = [b for b in batches if b.shape[0] == batches[0].shape[0]]
        self._iter = iter([{INPUT: b.numpy().astype(np.float32)} for b in full])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)


def export(model: nn.Module, config: ExportConfig, calib: list[torch.Tensor],
           path: Path) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )  # lazy: onnxruntime
    from onnxruntime.quantization.shape_inference import quant_pre_process  # lazy: onnxruntime

    with tempfile.TemporaryDirectory(prefix=".bpfm-onnx-", dir=path.parent) as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_fp32(model, fp32)
        _save_slim(fp32, fp32)
        result: dict[str, Any] = {"fp32_file_bytes": fp32.stat().st_size}
        final = Path(tmp) / "model.onnx"
        if config.mode == "fp32":
            final = fp32
        else:
            ready = Path(tmp) / "pre.onnx"  # shapes inferred and graph optimised, as ORT advises
            quant_pre_process(str(fp32), str(ready))
            # the quantizer logs a line per tensor it skips or calibrates
            logger = logging.getLogger()
            level = logger.level
            logger.setLevel(logging.ERROR)
            try:
                if config.mode == "dynamic":
                    quantize_dynamic(str(ready), str(final), per_channel=True,
                                     weight_type=QuantType.QInt8,
                                     op_types_to_quantize=QUANTIZED_OPS)
                else:
                    method = {"minmax": CalibrationMethod.MinMax,
                              "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}
                    method = method[config.observer]
                    with contextlib.redirect_stdout(io.StringIO()):
                        quantize_static(str(ready), str(final), _Batches(calib),
                                        quant_format=QuantFormat.QDQ, per_channel=True,
                                        activation_type=QuantType.QUInt8,
                                        weight_type=QuantType.QInt8, calibrate_method=method,
                                        op_types_to_quantize=QUANTIZED_OPS,
                                        extra_options=STATIC_OPTIONS)
            except Exception as err:  # an op or calibration onnxruntime cannot handle
                raise BpfmError(f"export: onnx: quantization failed ({first_line(err)})") from None
            finally:
                logger.setLevel(level)
            _save_slim(final, final)
        final.replace(path)
    return result


class OnnxModel(RuntimeModel):
    format = "onnx"

    def __init__(self, path: Path, threads: int = 1, profile_prefix: str | None = None):
        super().__init__(path)
        import onnxruntime as ort  # lazy: onnxruntime

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: no warnings on stderr per session
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # InvalidProtobuf, Fail, ... for a broken or foreign file
            raise BpfmError(f"{path}: not a valid ONNX model ({first_line(err)})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != list(WINDOW_SHAPE):
            shapes = [i.shape for i in inputs]
            raise BpfmError(f"{path}: not a bpfm BP model (inputs {shapes}, expected one "
                            "[batch, 2, 1250])")
        self.input = inputs[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: x})[0]


def load(path: Path, *, threads: int = 1) -> OnnxModel:
    return OnnxModel(path, threads)


def profile(path: Path, x: torch.Tensor, runs: int = 5,
            threads: int = 1) -> list[tuple[str, float]]:
    """(op type, share of node time) from ONNX Runtime's own profiler, largest first."""
    with tempfile.TemporaryDirectory(prefix="bpfm-ort-profile-") as tmp:
        model = OnnxModel(path, threads, profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(runs):
            model.run(x.numpy())
        events = json.loads(Path(model.session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_op[event.get("args", {}).get("op_name", "?")] += float(event.get("dur", 0))
    total = sum(per_op.values()) or 1.0
    return sorted(((op, us / total) for op, us in per_op.items()), key=lambda t: -t[1])
