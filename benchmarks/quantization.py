"""INT8 quantization against fp32, like the paper's Tables III and IV: size in MiB and reduction
factor, CPU latency at batch 1 and 64 and speed-up, and the change of R^2 and MAE, for a model of
each size trained briefly on synthetic data.

Targets (issue 4): reduction >= 3.5 (small), >= 3.85 (medium, large) (paper 3.57 / 3.87 /
3.90); fx dynamic >= 2x faster than fp32 at batch 64, pt2e >= 4x; |delta R^2| <= 0.002.

    .venv/bin/python benchmarks/quantization.py [--sizes small,medium] [--steps 60]
        [--subjects 120] [--threads 1] [--runs 20] [--backends fx,pt2e] [--workdir DIR]

Everything runs in a temporary folder (or --workdir): synthetic PulseDB (bpfm.data.synth), shards,
`bpfm.training.loop.fit` for --steps steps of 32 windows, then `run_quantization` per variant
(metrics, size) and one interleaved latency measurement of all variants of a size (median of
--runs, after warm-up, at --threads torch threads) against the fp32 model in eager mode, as the
paper ran it. pt2e variants are timed compiled (Inductor, freezing, compiled at --threads);
their cold compile takes minutes on a busy 2-core machine and is reported apart. Wall time on a
shared machine is noisy: the tables also give the thread's CPU time (which leaves out the time
other processes held the core) and the load average around the timing; compare ratios from the
same run. The change of R^2 on a small test set is mostly chance: quantization noise correlates
by chance with the residuals of a weak model (noise ~ 2 sd(residual) sd(change) / (var(y)
sqrt(n))), hence the larger default --subjects (about 0.1 * 0.6 * 0.75 * 24 * subjects test
windows). Prints tables, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

VARIANTS = {  # name -> QuantConfig fields
    "fx-dynamic": {"mode": "dynamic", "weights": "per_channel", "backend": "fx"},
    "fx-static": {"mode": "static", "observer": "minmax", "weights": "per_channel",
                  "backend": "fx"},
    "pt2e-dynamic": {"mode": "dynamic", "weights": "per_channel", "backend": "pt2e"},
    "pt2e-static": {"mode": "static", "observer": "minmax", "weights": "per_channel",
                    "backend": "pt2e"},
}
PAPER_RF = {"small": 3.57, "medium": 3.87, "large": 3.90}


def prepare_data(workdir: Path, subjects: int) -> str:
    from bpfm.data.shards import write_shards
    from bpfm.data.synth import SynthConfig, write_synthetic_pulsedb

    shards = workdir / "shards"
    if not (shards / "_manifest.json").is_file():
        synth = write_synthetic_pulsedb(
            workdir / "pulsedb",
            SynthConfig(subjects=subjects, segments_per_subject=24, seed=3, sources=("mimic",)),
        )
        write_shards([p for p in synth.subset_files if p.name.startswith("Train")], str(shards))
    return str(shards)


def train(data: str, size: str, steps: int, out: Path) -> Path:
    from bpfm.training.config import TrainConfig
    from bpfm.training.loop import fit

    if not (out / "metrics.json").is_file():
        fit(TrainConfig(data=data, source="mimic", protocol="paper", size=size, epochs=1,
                        batch_size=32, max_steps_per_epoch=steps, lr=3e-4, drop_path=0.0,
                        eval_batch_size=64, device="cpu", out=str(out)), resume=False)
    return out


def bench_size(model_dir: Path, size: str, variants: dict, args, workdir: Path) -> dict:
    import torch

    from bpfm.quant.convert import load_quantized, runnable
    from bpfm.quant.measure import fixed_threads, timings
    from bpfm.quant.quantized import QuantConfig
    from bpfm.quant.study import run_quantization
    from bpfm.training.model_dir import load_trained

    results = {"fp32": run_quantization(model_dir, QuantConfig("fp32"), out=workdir / "fp32",
                                        latency_runs=0, threads=args.threads)}
    for name, fields in variants.items():
        results[name] = run_quantization(model_dir, QuantConfig(**fields, calib_batches=8),
                                         out=workdir / name, latency_runs=0,
                                         threads=args.threads,
                                         baseline=results["fp32"])
    model, _, _ = load_trained(model_dir)
    models = {"fp32": model}
    for name in variants:
        models[name] = runnable(load_quantized(workdir / name))
        # compile (pt2e) outside the timing, at the thread count it is timed at
        with torch.inference_mode(), fixed_threads(args.threads):
            for batch in (1, 64):
                models[name](torch.zeros(batch, 2, 1250))
    load_before = os.getloadavg()
    timed = timings(models, (1, 64), runs=args.runs, threads=args.threads)
    load = {"before": load_before, "after": os.getloadavg()}
    for name, result in results.items():
        result["latency"] = {b: t["wall_ms"] for b, t in timed[name].items()}
        result["cpu"] = {b: t["cpu_ms"] for b, t in timed[name].items()}
        result["load"] = load
    return results


def print_tables(size: str, results: dict, threads: int, runs: int) -> dict:
    fp32 = results["fp32"]
    base_lat, base_cpu = fp32["latency"], fp32["cpu"]
    rows = {}
    load = " / ".join(f"{a:.2f}, {b:.2f}, {c:.2f}" for a, b, c in fp32["load"].values())
    print(f"\n## {size}: {fp32['test']['n']} test windows, threads={threads}, median of {runs}, "
          f"load average (1, 5, 15 min) before / after timing: {load}")
    print("\nTable IV-like: size (MiB = 2^20 bytes) and reduction factor (paper: "
          f"x{PAPER_RF.get(size, float('nan')):.2f})")
    print("| variant | size MiB | size kind | reduction |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['size_mib']:.2f} | {r['size_kind']} | x{r['reduction_factor']:.2f} |")
    print("\nLatency (ms, wall and thread CPU time) and speed-up against fp32 eager")
    print("| variant | b1 ms | b64 ms | speed-up b1 | speed-up b64 | CPU b1 ms | CPU b64 ms | "
          "CPU speed-up b1 | CPU speed-up b64 | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        lat, cpu = r["latency"], r["cpu"]
        up1, up64 = base_lat[1] / lat[1], base_lat[64] / lat[64]
        cpu1, cpu64 = base_cpu[1] / cpu[1], base_cpu[64] / cpu[64]
        compile_s = f"{r['compile_s']:.0f}" if r.get("compile_s") else "-"
        print(f"| {name} | {lat[1]:.1f} | {lat[64]:.1f} | x{up1:.2f} | x{up64:.2f} | "
              f"{cpu[1]:.1f} | {cpu[64]:.1f} | x{cpu1:.2f} | x{cpu64:.2f} | {compile_s} |")
        rows[name] = {"size_mib": r["size_mib"], "reduction_factor": r["reduction_factor"],
                      "latency_ms_b1": lat[1], "latency_ms_b64": lat[64], "speedup_b1": up1,
                      "speedup_b64": up64, "cpu_ms_b1": cpu[1], "cpu_ms_b64": cpu[64],
                      "cpu_speedup_b1": cpu1, "cpu_speedup_b64": cpu64,
                      "load": r["load"]}
    print("\nTable III-like: test R^2 and MAE (mmHg), change against fp32")
    print("| variant | SBP R2 | DBP R2 | dR2 SBP | dR2 DBP | SBP MAE | DBP MAE | dMAE SBP | "
          "dMAE DBP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        t = r["test"]
        print(f"| {name} | {t['sbp_r2']:.4f} | {t['dbp_r2']:.4f} | {r['delta_sbp_r2']:+.4f} | "
              f"{r['delta_dbp_r2']:+.4f} | {t['sbp_mae']:.2f} | {t['dbp_mae']:.2f} | "
              f"{r['delta_sbp_mae']:+.3f} | {r['delta_dbp_mae']:+.3f} |")
        rows[name].update({k: r[k] for k in ("delta_sbp_r2", "delta_dbp_r2", "delta_sbp_mae",
                                             "delta_dbp_mae")})
        rows[name].update(sbp_r2=t["sbp_r2"], dbp_r2=t["dbp_r2"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="small")
    parser.add_argument("--steps", type=int, default=60, help="training steps of 32 windows")
    parser.add_argument("--subjects", type=int, default=120)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--backends", default="fx,pt2e")
    parser.add_argument("--workdir", help="keep data, models and results here (reused)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    backends = set(args.backends.split(","))
    variants = {k: v for k, v in VARIANTS.items() if v["backend"] in backends}
    with tempfile.TemporaryDirectory(prefix="bpfm-quant-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        data = prepare_data(workdir, args.subjects)
        summary = {"threads": args.threads, "runs": args.runs, "steps": args.steps}
        for size in args.sizes.split(","):
            model_dir = train(data, size, args.steps, workdir / f"model-{size}")
            results = bench_size(model_dir, size, variants, args, workdir / f"quant-{size}")
            summary[size] = print_tables(size, results, args.threads, args.runs)
        print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
