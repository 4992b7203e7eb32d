"""ONNX Runtime: the fp32 model exported with `torch.onnx.export` (batch dimension dynamic),
quantized with `onnxruntime.quantization` (dynamic; or static QDQ with its MinMax, Entropy or
Percentile calibrator on the calibration batches), run by an `InferenceSession`.

Weights are int8 symmetric per output channel, activations uint8 affine. Only the ops that hold
weights (MatMul, Gemm, Conv) are quantized, as in bpfm's pt2e backend: QDQ pairs around Add,
LayerNorm or Softmax cost time on CPU without saving a byte.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bpfm.errors import BpfmError
from bpfm.export import ExportConfig, RuntimeModel, first_line
from bpfm.training.predict import WINDOW_SHAPE

OPSET = 18
QUANTIZED_OPS = ["MatMul", "Gemm", "Conv"]
INPUT, OUTPUT = "x", "bp"


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
                                        op_types_to_quantize=QUANTIZED_OPS)
            except Exception as err:  # an op or calibration onnxruntime cannot handle
                raise BpfmError(f"export: onnx: quantization failed ({first_line(err)})") from None
            finally:
                logger.setLevel(level)
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
