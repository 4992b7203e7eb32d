"""The on-device exports against the torch model, side by side in one run on 1 thread (issue 20):
ExecuTorch (.pte, XNNPACK) and ONNX Runtime (.onnx), fp32 and INT8, of a small model trained
briefly on synthetic data.

Targets:
- parity: int8 exports within 0.1 mmHg of the torch int8 model's MAE; fp32 exports within 1e-4
  max abs output difference of the torch fp32 model;
- size: int8 file >= 3.8x smaller than the same runtime's fp32 file;
- latency: the best int8 runtime at batch 1 and at batch 64 >= 2.0x faster than bpfm's fp32
  eager model, and >= 1.0x against that runtime's own fp32 export;
- memory: the int8 .pte at batch 1 peaks < 64 MB RSS above the interpreter's baseline.

    .venv/bin/python benchmarks/deploy.py [--formats executorch,onnx] [--modes fp32,dynamic,static]
        [--observers all|minmax,...] [--steps 40] [--subjects 40] [--runs 20] [--workdir DIR]

Static exports run once per calibrator of their runtime (`--observers all`, the default:
ExecuTorch's MinMax, MovingAverageMinMax and Histogram; ONNX Runtime's MinMax, Entropy and
Percentile), so every INT8 variant the issue names (dynamic and each static calibrator) is
exported to both runtimes and measured in the same run.

Every export goes through `bpfm.export.run.run_export` (metrics, parity, size, peak RSS in a
fresh process); latency is one interleaved measurement of every runtime and the torch fp32
model (`bpfm.quant.measure.timings`, median of --runs after warm-up, 1 thread), so ratios come
from the same minutes of a shared machine. Where a latency target is missed, ONNX Runtime's
per-operator profile of its best int8 file and ExecuTorch's delegation summary say where time
goes. The .pte files are lowered from `bpfm.export.xnnpack_graph.for_xnnpack`, the model
rewritten into ops XNNPACK delegates (one partition instead of 66, see
`bpfm.export.executorch`); the torch fp32 row is the training model itself. Each file's bytes by
kind (`size_breakdown` of `bpfm.export.executorch` for a .pte, of `bpfm.export.onnx` for a .onnx,
with the largest fp32 tensors an int8 .onnx still holds) show what an int8 file carries beyond a
quarter of the fp32 one. Prints tables, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantization import prepare_data, train  # noqa: E402  (the same data and model)

THREADS = 1


def variants(formats: list[str], modes: list[str], observers: str) -> list[tuple[str, str, str]]:
    """(format, mode, observer) of every export to run; static once per asked calibrator."""
    from bpfm.export import OBSERVERS

    out = []
    for fmt in formats:
        for mode in modes:
            if mode != "static":
                out.append((fmt, mode, "minmax"))
                continue
            names = OBSERVERS[fmt] if observers == "all" else \
                [o for o in observers.split(",") if o in OBSERVERS[fmt]]
            out.extend((fmt, mode, o) for o in names)
    return out


def run(args, workdir: Path) -> dict:
    from bpfm.export import ExportConfig, load_export
    from bpfm.export.run import run_export
    from bpfm.quant.measure import timings
    from bpfm.training.model_dir import load_trained

    data = prepare_data(workdir, args.subjects)
    model_dir = train(data, "small", args.steps, workdir / "model-small")
    results, runtimes = {}, {}
    for fmt, mode, observer in variants(args.formats, args.modes, args.observers):
        config = ExportConfig(fmt, mode, observer, calib_batches=args.calib_batches)
        logging.info("exporting %s", config.name)
        # a --workdir rerun reuses fp32 files (no int8 reference to rebuild for them)
        done = workdir / config.name / config.file_name
        reuse = done if mode == "fp32" and done.is_file() else None
        results[config.name] = run_export(model_dir, config, out=workdir / config.name,
                                          file=reuse, latency_runs=0,
                                          threads=THREADS)
        runtimes[config.name] = load_export(results[config.name]["model_file"],
                                            threads=THREADS)
    model, _, _ = load_trained(model_dir)
    load_before = os.getloadavg()
    timed = timings({"torch-fp32": model, **runtimes}, (1, 64), runs=args.runs, threads=THREADS)
    load = {"before": load_before, "after": os.getloadavg()}
    for name, result in results.items():
        result["timing"] = timed[name]
    return {"results": results, "torch_fp32": timed["torch-fp32"], "load": load}


def _fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def report(measured: dict) -> dict:
    results, torch_fp32 = measured["results"], measured["torch_fp32"]
    print(f"\nsmall model, {THREADS} thread, load average {measured['load']['before'][0]:.1f} -> "
          f"{measured['load']['after'][0]:.1f} (a shared machine: compare ratios, not times)")
    print(f"{'variant':34} {'MiB':>6} {'xfp32':>6} {'maxabs fp32':>11} {'dMAE int8':>9} "
          f"{'b1 ms':>7} {'b64 ms':>8} {'b1 x':>5} {'b64 x':>6} {'RSS+ MiB':>8}")
    print(f"{'torch-fp32 (eager)':34} {results[next(iter(results))]['fp32_size_mib']:6.2f} "
          f"{'':>6} {'':>11} {'':>9} {torch_fp32[1]['wall_ms']:7.2f} "
          f"{torch_fp32[64]['wall_ms']:8.1f}")
    rows = {}
    for name, r in results.items():
        fmt, mode = r["format"], r["config"]["mode"]
        own_fp32 = results.get(f"{fmt}-fp32")
        rows[name] = row = {
            "size_mib": r["size_mib"],
            "reduction_vs_runtime_fp32": own_fp32["size_mib"] / r["size_mib"] if own_fp32 else
            r.get("runtime_reduction_factor"),
            "max_abs_fp32": r["parity_max_abs_fp32"],
            "mae_diff_int8_mmhg": r["parity_mae_diff_int8"],
            "rss_above_baseline_mib_b1": r.get("rss_above_baseline_mib_b1"),
            "mode": mode, "format": fmt,
        }
        for b in (1, 64):
            ms = r["timing"][b]["wall_ms"]
            row[f"ms_b{b}"] = ms
            row[f"x_torch_b{b}"] = torch_fp32[b]["wall_ms"] / ms
            row[f"x_runtime_fp32_b{b}"] = (own_fp32["timing"][b]["wall_ms"] / ms
                                           if own_fp32 else None)
        print(f"{name:34} {row['size_mib']:6.2f} {_fmt(row['reduction_vs_runtime_fp32']):>6} "
              f"{row['max_abs_fp32']:11.2e} {_fmt(row['mae_diff_int8_mmhg'], '+.3f'):>9} "
              f"{row['ms_b1']:7.2f} {row['ms_b64']:8.1f} {row['x_torch_b1']:5.2f} "
              f"{row['x_torch_b64']:6.2f} {_fmt(row['rss_above_baseline_mib_b1'], '.1f'):>8}")
    breakdown = {"pte_bytes": pte_breakdown(results), "onnx_bytes": onnx_breakdown(results)}
    return {"rows": rows, "targets": targets(rows, results), **breakdown}


def pte_breakdown(results: dict) -> dict:
    """Where each .pte's bytes go: an int8 file's overhead over a quarter of the fp32 file."""
    from bpfm.export.executorch import size_breakdown

    return _print_breakdown(results, "executorch", size_breakdown)


def onnx_breakdown(results: dict) -> dict:
    """The same for each .onnx, and the largest fp32 tensors an int8 file still carries."""
    from bpfm.export.onnx import fp32_matrices, size_breakdown

    parts = _print_breakdown(results, "onnx", size_breakdown)
    for name, r in results.items():
        if r["format"] == "onnx" and r["config"]["mode"] != "fp32":
            largest = ", ".join(f"{ops} {shape} {size / 1e3:.1f} KB"
                                for ops, shape, size in fp32_matrices(Path(r["model_file"]))[:3])
            print(f"  {name}: largest fp32 tensors: {largest or 'none'}")
    return parts


def _print_breakdown(results: dict, fmt: str, size_breakdown) -> dict:
    from bpfm.export import SUFFIXES

    parts = {name: size_breakdown(Path(r["model_file"])) for name, r in results.items()
             if r["format"] == fmt}
    if parts:
        widths = {k: max(len(k), 7) for k in next(iter(parts.values()))}
        print(f"\n{SUFFIXES[fmt]} bytes by kind (KB)\n{'variant':34} "
              + " ".join(f"{k:>{w}}" for k, w in widths.items()))
        for name, p in parts.items():
            print(f"{name:34} " + " ".join(f"{p[k] / 1e3:{w}.1f}" for k, w in widths.items()))
    return parts


def targets(rows: dict, results: dict) -> dict:
    int8 = {n: r for n, r in rows.items() if r["mode"] != "fp32"}
    fp32 = {n: r for n, r in rows.items() if r["mode"] == "fp32"}
    checks = {}
    for name, r in int8.items():
        checks[f"parity {name}: |dMAE| vs torch int8 < 0.1 mmHg"] = (
            abs(r["mae_diff_int8_mmhg"]), abs(r["mae_diff_int8_mmhg"]) < 0.1)
        if r["reduction_vs_runtime_fp32"] is not None:
            checks[f"size {name}: >= 3.8x vs {r['format']} fp32"] = (
                r["reduction_vs_runtime_fp32"], r["reduction_vs_runtime_fp32"] >= 3.8)
    for name, r in fp32.items():
        checks[f"parity {name}: max abs vs torch fp32 < 1e-4"] = (
            r["max_abs_fp32"], r["max_abs_fp32"] < 1e-4)
    for b in (1, 64):
        if not int8:
            break
        best = max(int8, key=lambda n: int8[n][f"x_torch_b{b}"])
        checks[f"latency b{b}: best int8 ({best}) >= 2.0x vs torch fp32"] = (
            int8[best][f"x_torch_b{b}"], int8[best][f"x_torch_b{b}"] >= 2.0)
        own = int8[best][f"x_runtime_fp32_b{b}"]
        if own is not None:
            checks[f"latency b{b}: {best} >= 1.0x vs its runtime's fp32"] = (own, own >= 1.0)
    for name, r in int8.items():
        if r["format"] == "executorch" and r["rss_above_baseline_mib_b1"] is not None:
            above_mb = r["rss_above_baseline_mib_b1"] * 2**20 / 1e6
            checks[f"memory {name}: RSS at b1 < 64 MB above baseline"] = (above_mb, above_mb < 64)
    print("\ntargets")
    for label, (value, ok) in checks.items():
        print(f"  {'PASS' if ok else 'MISS'}  {label}: {value:.4g}")
    missed = [label for label, (_, ok) in checks.items() if not ok and "latency" in label]
    if missed:
        where_time_goes(results)
    return {label: {"value": value, "pass": ok} for label, (value, ok) in checks.items()}


def where_time_goes(results: dict) -> None:
    import torch

    from bpfm.export import runtime_module

    print("\nwhere time goes (a latency target was missed): share of op time per op kind")
    for name, r in results.items():
        if r["config"]["mode"] == "fp32":
            continue
        profile = runtime_module(r["format"]).profile
        for b in (1, 64):
            shares = profile(Path(r["model_file"]), torch.randn(b, 2, 1250), runs=5)
            top = ", ".join(f"{op} {share:.0%}" for op, share in shares[:6])
            print(f"  {name} b{b}: {top}")
        if "delegated" in r:
            print(f"  {name}: {r['delegated']['xnnpack_partitions']} XNNPACK partition(s), "
                  f"{r['delegated']['portable_ops']} op(s) left on portable kernels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="executorch,onnx")
    parser.add_argument("--modes", default="fp32,dynamic,static")
    parser.add_argument("--observers", default="all",
                        help="static calibrators: all, or a comma list (per runtime)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    args.formats, args.modes = args.formats.split(","), args.modes.split(",")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with contextlib.ExitStack() as stack:
        # the report reads the files (breakdowns, profiles): the temporary folder outlives it
        workdir = args.workdir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="bpfm-deploy-"))
        measured = run(args, Path(workdir))
        summary = report(measured)
    print(json.dumps({"load": measured["load"], **summary}, default=float))


if __name__ == "__main__":
    main()
