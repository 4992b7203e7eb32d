"""Quantize a trained model dir and measure the variant against its fp32 model:
`run_quantization(model_dir, QuantConfig(...), out=...)` (what `bpfm quantize` and the grid's
stage 2 run). The quantization itself lives in `bpfm.quant` (one interface, `fx` and `pt2e`
backends); this module adds the data, the clinical metrics, size and latency.

For each variant: the full test metrics (`bpfm.metrics.compute_metrics`), the size in MiB
(saved state_dict as the paper measured; for pt2e the bytes of the graph's tensors, see
`size_kind`), CPU latency at batch 1 and 64 (median, fixed thread count), and the reduction
factor, speed-ups and metric changes against fp32. Writes `out/quant.json` and the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bpfm.data.loader import ShardDataset
from bpfm.data.splits import Split, View
from bpfm.errors import BpfmError
from bpfm.io.atomic import write_json
from bpfm.metrics import compute_metrics
from bpfm.quant.convert import quantize, runnable, save_quantized, size_bytes
from bpfm.quant.measure import MIB, fixed_threads, latency_ms, state_dict_bytes
from bpfm.quant.quantized import (
    WINDOW_SHAPE,
    QuantConfig,
    QuantizedModel,
)
from bpfm.training.evaluate import model_split
from bpfm.training.model_dir import load_trained
from bpfm.training.predict import predict

log = logging.getLogger(__name__)

RESULT_FILE = "quant.json"
BATCH_SIZES = (1, 64)
DELTA_KEYS = ("sbp_mae", "dbp_mae", "sbp_r2", "dbp_r2")


def calibration_batches(view: View, count: int, *, batch_size: int = 64, seed: int = 42,
                        normalize: bool = False) -> list[torch.Tensor]:
    """The first `count` shuffled batches [B, 2, 1250] of a view (the training view)."""
    dataset = ShardDataset(view, batch_size=batch_size, shuffle=True, seed=seed,
                           normalize=normalize)
    batches = []
    for batch in dataset:
        batches.append(batch["x"])
        if len(batches) == count:
            break
    return batches


def _test_metrics(model: nn.Module, split: Split, meta: dict[str, Any], batch_size: int) -> dict:
    pred = predict(model, split.test, meta, batch_size=batch_size, device="cpu")
    return compute_metrics(pred.target, pred.estimate, pred.subject, meta.get("target_mean"))


def _runnable(quantized: QuantizedModel, threads: int) -> tuple[nn.Module, float | None]:
    """(the module to evaluate and time, seconds spent compiling). A pt2e graph runs compiled:
    its eager reference form is several times slower than fp32. Its graphs for the timed batch
    sizes are compiled here, at the thread count they are timed at (Inductor's kernels keep
    the count they were compiled for), so that compile time is reported apart from latency."""
    fast = runnable(quantized, BATCH_SIZES)
    if fast is quantized:
        return quantized, None
    start = time.perf_counter()
    try:
        with torch.inference_mode(), fixed_threads(threads):
            for batch in BATCH_SIZES:
                fast(torch.zeros(batch, *WINDOW_SHAPE))
    except Exception as err:  # Inductor needs a working C++ compiler; its errors vary
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BpfmError(f"quantize: compile: Inductor failed ({first}); pass --no-compile "
                        "(QuantConfig compile=False) to run the slower eager graph") from None
    return fast, time.perf_counter() - start


def _calibration_data(config: QuantConfig, split: Split, seed: int, normalize: bool, data: str,
                      batch_size: int) -> list[torch.Tensor]:
    """Static quantization's calibration batches from the training view; none for dynamic."""
    if config.mode != "static":
        return []
    calib = calibration_batches(split.train, config.calib_batches, batch_size=batch_size,
                                seed=seed, normalize=normalize)
    if not calib:
        raise BpfmError(f"{data}: train view: no segments to calibrate static quantization on")
    return calib


def _fp32_and_latency(
    model: nn.Module, timed: nn.Module, split: Split, meta: dict[str, Any], batch_size: int,
    baseline: Mapping[str, Any] | None, threads: int, latency_runs: int,
) -> tuple[dict[str, Any], dict[int, float]]:
    """The fp32 block (reused from `baseline`, else evaluated and timed here beside the
    quantized model) and the quantized model's latency per batch size."""
    fp32 = dict(baseline["fp32"]) if baseline and "fp32" in baseline else None
    models: dict[str, nn.Module] = {"quantized": timed}
    if fp32 is None:
        fp32 = {"size_mib": state_dict_bytes(model) / MIB,
                "test": _test_metrics(model, split, meta, batch_size)}
        models["fp32"] = model
    latency = latency_ms(models, BATCH_SIZES, runs=latency_runs, threads=threads) \
        if latency_runs else {name: {} for name in models}
    if "fp32" in models:
        fp32.update({f"latency_ms_b{b}": latency["fp32"].get(b) for b in BATCH_SIZES})
    return fp32, latency["quantized"]


def _comparisons(test: dict[str, Any], fp32: dict[str, Any],
                 latency: dict[int, float]) -> dict[str, Any]:
    """Latency and speed-up per batch size, and the metric changes against fp32."""
    result: dict[str, Any] = {}
    for b in BATCH_SIZES:
        ms, base = latency.get(b), fp32.get(f"latency_ms_b{b}")
        result[f"latency_ms_b{b}"] = ms
        result[f"speedup_b{b}"] = base / ms if ms and base else None
    for key in DELTA_KEYS:
        result[f"delta_{key}"] = _delta(test.get(key), fp32["test"].get(key))
    return result


def run_quantization(
    model_dir: str | Path,
    config: QuantConfig,
    *,
    data: str | None = None,
    source: str | None = None,
    protocol: str | None = None,
    out: str | Path,
    threads: int = 1,
    latency_runs: int = 20,
    batch_size: int = 256,
    calib_batch_size: int = 64,
    baseline: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Quantize the model of `model_dir` (written by `bpfm.training.loop.fit`), evaluate it on the
    test view of its data (or of `data`/`source`/`protocol`), measure it against fp32, and write
    `out/quant.json` plus the model (`out/model.pt` or `out/model.pt2`).

    `latency_runs=0` skips latency. `baseline`: an earlier result of the same model dir (e.g. the
    fp32 variant's) whose `fp32` block is reused instead of evaluating and timing fp32 again."""
    config = config.validate()
    if threads < 1 or latency_runs < 0:
        raise BpfmError(f"quantize: threads/latency_runs: need threads >= 1 and runs >= 0, got "
                        f"{threads}/{latency_runs}")
    model, train_config, meta = load_trained(model_dir)
    split, data, source, protocol = model_split(model_dir, train_config, data, source, protocol)
    calib = _calibration_data(config, split, train_config.seed,
                              bool(meta.get("normalize_inputs")), data, calib_batch_size)

    start = time.perf_counter()
    quantized = quantize(model, config, calib)
    quantize_s = time.perf_counter() - start
    timed, compile_s = _runnable(quantized, threads)
    size, size_kind = size_bytes(quantized)
    test = _test_metrics(timed, split, meta, batch_size)
    fp32, latency = _fp32_and_latency(model, timed, split, meta, batch_size, baseline, threads,
                                      latency_runs)

    result: dict[str, Any] = {
        "variant": config.name, **config.to_dict(), "engine": quantized.engine,
        "model_dir": str(model_dir), "data": data, "source": source, "protocol": protocol,
        "split": split.label, "test": test, "fp32": fp32,
        "size_mib": size / MIB, "size_kind": size_kind,
        "reduction_factor": fp32["size_mib"] / (size / MIB),
        "threads": threads, "latency_runs": latency_runs,
        "quantize_s": quantize_s, "compile_s": compile_s,
        **_comparisons(test, fp32, latency),
    }
    out = Path(out)
    result["model_file"] = str(save_quantized(quantized, out))
    write_json(out / RESULT_FILE, result)
    log.info("%s: %.2f MiB (x%.2f smaller), MAE SBP %.2f / DBP %.2f mmHg, b64 %s ms", config.name,
             result["size_mib"], result["reduction_factor"], test["sbp_mae"], test["dbp_mae"],
             _fmt(result["latency_ms_b64"]))
    return result


def _delta(value: Any, reference: Any) -> float | None:
    if value is None or reference is None:
        return None
    return float(np.float64(value) - np.float64(reference))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"
