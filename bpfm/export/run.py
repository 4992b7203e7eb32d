"""Export a trained model dir to a runtime and check the export against the model it came
from: `run_export(model_dir, ExportConfig(...), out=...)` (what `bpfm export` and the grid's
export variants run).

The out dir holds the file (`model.pte` / `model.onnx`), `parity.json` (outputs of the runtime
against the torch fp32 model and the torch int8 model on the test view: max abs difference,
MAE difference in mmHg), `export.json` (size, latency at batch 1 and 64, peak RSS at batch 1,
MACs per window, changes against fp32) and `metrics.json` (the full clinical metrics of the
runtime's own outputs), written last: a dir with `metrics.json` is complete.

The torch int8 reference: for ExecuTorch the converted pt2e graph that was lowered (the same
quantized model); for ONNX Runtime bpfm's own pt2e int8 model of the same mode (`bpfm
quantize --backend pt2e`; Entropy and Percentile calibrate like its histogram observer).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bpfm.errors import BpfmError
from bpfm.export import ExportConfig, RuntimeModel, export_model, format_of, load_export
from bpfm.io.atomic import publish_file, write_json
from bpfm.metrics import compute_metrics
from bpfm.model import SIZE_ALIASES
from bpfm.quant.convert import quantize
from bpfm.quant.measure import MIB, latency_ms, state_dict_bytes
from bpfm.quant.quantized import QuantConfig
from bpfm.quant.study import calibration_batches
from bpfm.training.evaluate import model_split
from bpfm.training.model_dir import load_trained
from bpfm.training.predict import WINDOW_SHAPE, Predictions, predict, target_scaling

if TYPE_CHECKING:
    from bpfm.data.splits import Split
    from bpfm.training.config import TrainConfig

log = logging.getLogger(__name__)

RESULT_FILE = "export.json"
PARITY_FILE = "parity.json"
BATCH_SIZES = (1, 64)
DELTA_KEYS = ("sbp_mae", "dbp_mae", "sbp_r2", "dbp_r2")
REFERENCE_OBSERVER = {"minmax": "minmax", "entropy": "histogram", "percentile": "histogram",
                      "moving_average": "moving_average", "histogram": "histogram"}


def check_size(model_dir: Path, train_config: TrainConfig, meta: dict[str, Any]) -> None:
    """The weights must be of the size config.json names (a copied-over model file is not)."""
    spec = meta.get("model") or {}
    named = SIZE_ALIASES.get(train_config.size, train_config.size)
    if spec.get("size") != named:
        raise BpfmError(f"{model_dir / 'config.json'}: size: {train_config.size!r}, but "
                        f"model.safetensors holds a {spec.get('size')!r} model")


def macs_per_window(model: nn.Module) -> int:
    """Multiply-adds of one window, counted by torch's FLOP counter (matmuls and convs)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *WINDOW_SHAPE))
    return counter.get_total_flops() // 2


def peak_rss(path: Path, threads: int = 1) -> dict[str, float]:
    """Peak RSS of a fresh process running the file at batch 1 (see `bpfm/export/rss.py`)."""
    script = Path(__file__).with_name("rss.py")
    # -P: the script's folder holds bpfm's executorch.py and onnx.py, which would shadow the
    # runtimes' own packages
    done = subprocess.run([sys.executable, "-P", str(script), str(path), "--threads",
                           str(threads)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BpfmError(f"{path}: peak RSS: the runtime process failed ({last})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compare(pred: Predictions, ref: Predictions, meta: dict[str, Any]) -> dict[str, Any]:
    scale, _ = target_scaling(meta)
    diff = np.abs(pred.estimate - ref.estimate)
    mae = np.abs(pred.target - pred.estimate).mean(axis=0)
    mae_ref = np.abs(ref.target - ref.estimate).mean(axis=0)
    return {
        "max_abs_output": float((diff / scale).max()),  # in the model's own output units
        "max_abs_mmhg": float(diff.max()),
        "mae_diff_mmhg": {"sbp": float(mae[0] - mae_ref[0]), "dbp": float(mae[1] - mae_ref[1]),
                          "mean": float((mae - mae_ref).mean())},
    }


def _int8_reference(model: nn.Module, config: ExportConfig, exported: dict[str, Any],
                    calib: list[torch.Tensor]) -> tuple[nn.Module | None, str | None]:
    if config.mode == "fp32":
        return None, None
    if exported.get("reference") is not None:
        return exported["reference"], "the converted pt2e graph (XNNPACK quantizer), lowered"
    qconfig = QuantConfig(mode=config.mode, observer=REFERENCE_OBSERVER[config.observer],
                          backend="pt2e", compile=False)
    return quantize(model, qconfig, calib), f"bpfm quantize {qconfig.name} (torch, eager)"


def run_export(
    model_dir: str | Path,
    config: ExportConfig | None,
    *,
    out: str | Path,
    data: str | None = None,
    source: str | None = None,
    protocol: str | None = None,
    file: str | Path | None = None,
    threads: int = 1,
    latency_runs: int = 20,
    rss: bool = True,
    batch_size: int = 256,
    calib_batch_size: int = 64,
) -> dict[str, Any]:
    """Export the model of `model_dir` (or take the export `file` made earlier), evaluate the
    runtime on the test view, compare it with the torch model, measure it; write the out dir.
    `latency_runs=0` skips latency, `rss=False` the peak-RSS process."""
    if file is None and config is None:
        raise BpfmError("export: give an ExportConfig or an export file")
    if config is not None:
        config = config.validate()
    model_dir, out = Path(model_dir), Path(out)
    model, train_config, meta = _load_checked(model_dir, config, file, threads)
    split, data, source, protocol = model_split(model_dir, train_config, data, source, protocol)
    calib = _calibration(config, split, train_config, meta, data, calib_batch_size)

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)  # incomplete until rewritten
    start = time.perf_counter()
    path, exported = _export_or_copy(model, config, calib, file, out)
    export_s = time.perf_counter() - start
    runtime: RuntimeModel = load_export(path, threads=threads)

    test, fp32_test, parity = _evaluate(runtime, model, config, exported, calib, split, meta,
                                        batch_size)
    fp32_bytes = state_dict_bytes(model)
    size = path.stat().st_size
    latency = _latency(runtime, model, latency_runs, threads)
    result: dict[str, Any] = {
        "variant": config.name if config else f"{runtime.format}-file",
        "format": runtime.format, "config": config.to_dict() if config else None,
        "model_dir": str(model_dir), "data": data, "source": source, "protocol": protocol,
        "split": split.label, "model_file": str(path), "export_s": export_s,
        "size_mib": size / MIB, "fp32_size_mib": fp32_bytes / MIB,
        "reduction_factor": fp32_bytes / size, "threads": threads, "latency_runs": latency_runs,
        "macs_per_window": macs_per_window(model), "test": test,
        "fp32": {"test": fp32_test, "size_mib": fp32_bytes / MIB,
                 **{f"latency_ms_b{b}": latency["fp32"].get(b) for b in BATCH_SIZES}},
        "parity_max_abs_fp32": parity["torch_fp32"]["max_abs_output"],
        "parity_mae_diff_int8": (parity["torch_int8"] or {}).get("mae_diff_mmhg", {}).get("mean"),
    }
    result.update(_against_fp32(exported, size, latency, test, fp32_test))
    if rss:
        result.update(_peak_rss_b1(path, threads))
    _write_out_dir(out, parity, result, runtime.format)
    return result


def _load_checked(model_dir: Path, config: ExportConfig | None, file: str | Path | None,
                  threads: int) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """The trained model, with an export `file` made earlier checked first: of the asked format
    and loadable, so a broken file fails before any data is read."""
    model, train_config, meta = load_trained(model_dir)
    check_size(model_dir, train_config, meta)
    if file is not None:
        fmt = format_of(file)
        if config is not None and config.format != fmt:
            raise BpfmError(f"{file}: format: a {fmt} file, but --format {config.format}")
        load_export(file, threads=threads)
    return model, train_config, meta


def _calibration(config: ExportConfig | None, split: Split, train_config: TrainConfig,
                 meta: dict[str, Any], data: str | None,
                 batch_size: int) -> list[torch.Tensor]:
    """Training batches for static activations, normalised as the model was trained; none for
    the other modes (they never read them)."""
    if config is None or config.mode != "static":
        return []
    calib = calibration_batches(split.train, config.calib_batches, batch_size=batch_size,
                                seed=train_config.seed,
                                normalize=bool(meta.get("normalize_inputs")))
    if not calib:
        raise BpfmError(f"{data}: train view: no segments to calibrate static export on")
    return calib


def _evaluate(runtime: RuntimeModel, model: nn.Module, config: ExportConfig | None,
              exported: dict[str, Any], calib: list[torch.Tensor], split: Split,
              meta: dict[str, Any], batch_size: int) -> tuple[dict, dict, dict[str, Any]]:
    """(the runtime's test metrics, the torch fp32 model's, the parity between them)."""
    pred = predict(runtime, split.test, meta, batch_size=batch_size)
    fp32_pred = predict(model, split.test, meta, batch_size=batch_size)
    baseline = meta.get("target_mean")
    test = compute_metrics(pred.target, pred.estimate, pred.subject, baseline)
    fp32_test = compute_metrics(fp32_pred.target, fp32_pred.estimate, fp32_pred.subject, baseline)
    parity = _parity(pred, fp32_pred, model, config, exported, calib, split, meta, batch_size)
    return test, fp32_test, parity


def _latency(runtime: RuntimeModel, model: nn.Module, runs: int,
             threads: int) -> dict[str, dict[int, float]]:
    """Milliseconds per batch size of the runtime and the torch fp32 model (empty when `runs`
    is 0, so the result's latency keys are still there, as None)."""
    if not runs:
        return {"runtime": {}, "fp32": {}}
    return latency_ms({"runtime": runtime, "fp32": model}, BATCH_SIZES, runs=runs,
                      threads=threads)


def _against_fp32(exported: dict[str, Any], size: int, latency: dict[str, dict[int, float]],
                  test: dict[str, Any], fp32_test: dict[str, Any]) -> dict[str, Any]:
    """The runtime's own size, delegation, latency and metrics set against the torch fp32
    model's."""
    result: dict[str, Any] = {}
    if "fp32_file_bytes" in exported:  # ONNX: the fp32 file of the same runtime, made on the way
        result["runtime_fp32_size_mib"] = exported["fp32_file_bytes"] / MIB
        result["runtime_reduction_factor"] = exported["fp32_file_bytes"] / size
    if "delegated" in exported:
        result["delegated"] = exported["delegated"]
    for b in BATCH_SIZES:
        ms, base = latency["runtime"].get(b), latency["fp32"].get(b)
        result[f"latency_ms_b{b}"] = ms
        result[f"speedup_b{b}"] = base / ms if ms and base else None
    for key in DELTA_KEYS:
        result[f"delta_{key}"] = float(np.float64(test[key]) - np.float64(fp32_test[key]))
    return result


def _peak_rss_b1(path: Path, threads: int) -> dict[str, float]:
    memory = peak_rss(path, threads)
    return {"peak_rss_mib_b1": memory["peak_mib"],
            "rss_above_baseline_mib_b1": memory["above_baseline_mib"]}


def _write_out_dir(out: Path, parity: dict[str, Any], result: dict[str, Any],
                   runtime_format: str) -> None:
    """`metrics.json` last: its presence is what marks the out dir complete."""
    test = result["test"]
    write_json(out / PARITY_FILE, parity)
    write_json(out / RESULT_FILE, result)
    write_json(out / "metrics.json", {"test": test, "variant": result["variant"],
                                      "split": result["split"], "format": runtime_format})
    log.info("%s: %.2f MiB (x%.2f smaller than torch fp32), MAE SBP %.2f / DBP %.2f mmHg, "
             "max |out - torch fp32| %.2g", result["variant"], result["size_mib"],
             result["reduction_factor"], test["sbp_mae"], test["dbp_mae"],
             result["parity_max_abs_fp32"])


def _export_or_copy(model: nn.Module, config: ExportConfig | None, calib: list[torch.Tensor],
                    file: str | Path | None, out: Path) -> tuple[Path, dict[str, Any]]:
    """(the runtime file in `out`, what the export reported): exported now, or the given
    `file` published into `out` (a copy, unless it is already there)."""
    if file is None:
        path = out / config.file_name
        return path, export_model(model, config, calib, path)
    path = out / f"model{Path(file).suffix}"
    if Path(file).resolve() != path.resolve():
        publish_file(path, lambda tmp: shutil.copyfile(file, tmp))
    return path, {}


def _parity(pred: Predictions, fp32_pred: Predictions, model: nn.Module,
            config: ExportConfig | None, exported: dict[str, Any], calib: list[torch.Tensor],
            split: Split, meta: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """The runtime's estimates against torch's fp32 model and, for an INT8 export, against the
    torch INT8 model the same quantizer makes (`_int8_reference`)."""
    parity: dict[str, Any] = {"torch_fp32": _compare(pred, fp32_pred, meta), "torch_int8": None,
                              "torch_int8_model": None, "split": split.label,
                              "n": int(len(pred.target))}
    if config is not None:
        reference, described = _int8_reference(model, config, exported, calib)
        if reference is not None:
            ref_pred = predict(reference, split.test, meta, batch_size=batch_size)
            parity["torch_int8"] = _compare(pred, ref_pred, meta)
            parity["torch_int8_model"] = described
    return parity
