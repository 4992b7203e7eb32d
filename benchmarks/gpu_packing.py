"""Does packing small trials onto one GPU pay? K training processes share the device at once (as
the paper profile's 0.25-GPU small trials are packed by Ray), each timing its own steps over the
same wall-clock window; the aggregate samples/s of K processes is set against one alone.

    python benchmarks/gpu_packing.py --device cuda --procs 1,2,4 [--size small] [--batch 1024]
    python benchmarks/gpu_packing.py --device cpu --procs 1,2 --batch 32 --seconds 5   # a smoke run

Each worker builds the model, warms up, waits for a common start time, then runs training steps
(bpfm's model, bf16 autocast on CUDA, fused Adam: `train_throughput.make_step`) until a common end
time, synchronising only at the end. Start and end are shared wall-clock times so that all K
processes are timed while all K run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import make_step  # noqa: E402

from bpfm.model import create_model  # noqa: E402


def worker(device: str, size: str, batch: int, start_at: float, end_at: float) -> dict:
    device_ = torch.device(device)
    model = create_model(size).to(device_)
    x = torch.randn(batch, 2, 1250, device=device_)
    y = torch.randn(batch, 2, device=device_)
    step = make_step(model, x, y, train=True, autocast=device_.type == "cuda", adam="fused")
    for _ in range(3):
        step()
    if device_.type == "cuda":
        torch.cuda.synchronize()
    time.sleep(max(0.0, start_at - time.time()))
    began, steps = time.time(), 0
    while time.time() < end_at:
        step()
        steps += 1
    if device_.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - began
    return {"steps": steps, "seconds": seconds, "samples_per_s": steps * batch / seconds}


def run_packed(k: int, args: argparse.Namespace) -> dict:
    """K workers at once; returns their samples/s and the aggregate."""
    start_at = time.time() + args.setup_seconds
    end_at = start_at + args.seconds
    command = [sys.executable, __file__, "--worker", "--device", args.device, "--size", args.size,
               "--batch", str(args.batch), "--start-at", str(start_at), "--end-at", str(end_at)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(k)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=args.setup_seconds + args.seconds + 120)
        if proc.returncode != 0:
            raise SystemExit(f"worker exited {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    late = [r for r in results if r["seconds"] < 0.8 * args.seconds]
    per = [r["samples_per_s"] for r in results]
    return {"procs": k, "per_process_samples_s": per, "aggregate_samples_s": sum(per),
            "late_workers": len(late)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--procs", default="1,2,4", help="comma-separated process counts")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed window per count")
    parser.add_argument("--setup-seconds", type=float, default=40.0,
                        help="time given to every worker to start and warm up before the window")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--end-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.device, args.size, args.batch, args.start_at, args.end_at)))
        return
    rows = [run_packed(int(k), args) for k in args.procs.split(",")]
    alone = rows[0]["aggregate_samples_s"] / rows[0]["procs"]
    for row in rows:
        row["aggregate_vs_one_alone"] = row["aggregate_samples_s"] / alone
        if not args.json:
            per = ", ".join(f"{v:.0f}" for v in row["per_process_samples_s"])
            print(f"{row['procs']} process(es): aggregate {row['aggregate_samples_s']:.0f} "
                  f"samples/s = {row['aggregate_vs_one_alone']:.2f}x one alone (each: {per})"
                  + (f"; {row['late_workers']} started late" if row["late_workers"] else ""))
    if args.json:
        print(json.dumps({"device": args.device, "size": args.size, "batch": args.batch,
                          "load_avg_1m": os.getloadavg()[0], "results": rows}))


if __name__ == "__main__":
    main()
