"""Bytes from the object store and trainers' samples/s, with and without the node-local cache.

    python benchmarks/data_at_scale.py [--segments 14000] [--epochs 3] [--k 1,4,8] [--rounds 1]

K training processes on this node (as the paper profile's 0.25-GPU small trials share one) read
the `paper` protocol's train view of one shard set for E epochs each, started together, in three
modes: the same shards in a local folder, on S3 through the node cache (`bpfm.data.cache`, a
fresh cache folder per K: every run starts cold), and on S3 streamed (`--no-cache`). S3 is the
real SeaweedFS server of the tests; a loopback proxy in front of it counts every byte it sent
(HTTP included), so "sent" is measured, not estimated. A view's bytes are the bytes of the
parts it needs (what a cache must copy once). A trainer is the data side of `bpfm train`: the
same ShardDataset (shuffled, z-scored windows) through a DataLoader, timed from opening the
split to its last batch, first-epoch copies included, and over epochs 2+ alone (where a
cached trainer reads local files); no model step (on a 2-core machine that
would hide the data path; on a GPU node the loader's share of a step is what this measures).

Targets (issue 18): with the cache, sent <= 1.05 x the view's bytes for any K and E (streaming:
about K x E x); trainers' samples/s with the cache >= 0.9 x the local folder's. Prints a table
and one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BATCH = 256


def trainer(uri: str, mode: str, epochs: int, workers: int) -> None:
    """One training process: waits for "go" on stdin, then reads the view for `epochs`."""
    from torch.utils.data import DataLoader

    from bpfm.data.loader import ShardDataset
    from bpfm.training.evaluate import open_split

    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    split = open_split(uri, "mimic", "paper", cache=mode == "cache")
    samples, epoch_s = [], []
    for epoch in range(1, epochs + 1):
        began, count = time.perf_counter(), 0
        dataset = ShardDataset(split.train, batch_size=BATCH, shuffle=True, normalize=True)
        dataset.set_epoch(epoch)
        for batch in DataLoader(dataset, batch_size=None, num_workers=workers):
            count += len(batch["x"])
        samples.append(count)
        epoch_s.append(time.perf_counter() - began)
    seconds = time.perf_counter() - start
    later = sum(samples[1:]) / sum(epoch_s[1:]) if epochs > 1 else float("nan")
    print(json.dumps({"samples": sum(samples), "seconds": seconds, "epoch_s": epoch_s,
                      "samples_per_s": sum(samples) / seconds,
                      "later_samples_per_s": later}))


def run_trainers(uri: str, mode: str, k: int, epochs: int, workers: int, env: dict) -> list[dict]:
    command = [sys.executable, __file__, "--trainer", uri, mode, str(epochs), str(workers)]
    processes = [
        subprocess.Popen(
            command, env=env, cwd=REPO, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        for _ in range(k)
    ]
    for process in processes:  # all imported: start them together
        assert process.stdout.readline().strip() == "ready"
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=3600)
        if process.returncode != 0:
            raise SystemExit(f"a {mode} trainer failed (exit {process.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=14000, help="~15 KB of shards each")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--k", default="1,4,8", help="concurrent trainers per run")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per trainer")
    parser.add_argument("--rounds", type=int, default=1, help="repeats, in rotated mode order")
    parser.add_argument("--workdir", help="keeps the input and shards between runs")
    parser.add_argument("--trainer", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer:
        uri, mode, epochs, workers = args.trainer
        trainer(uri, mode, int(epochs), int(workers))
        return

    sys.path[:0] = [str(HERE), str(REPO)]
    from data_throughput import build_input

    from bpfm.data.shards import open_shards, write_shards
    from tests.services.proxy import counting_proxy_for
    from tests.services.s3 import start_seaweed_s3

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bpfm-data-at-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    input_file = build_input(workdir, args.segments)
    local = str(workdir / "shards")
    write_shards([input_file], local)
    server = start_seaweed_s3(workdir / f"seaweed-{os.getpid()}")
    proxy = counting_proxy_for(server.endpoint)
    try:
        saved = dict(os.environ)
        os.environ.update(server.env())
        uri = f"s3://{server.bucket}/pulsedb"
        write_shards([input_file], uri)
        os.environ.clear()
        os.environ.update(saved)
        shards = open_shards(local)
        view_bytes = sum(p["bytes"] for p in shards.parts("mimic", ["train"]))
        env = {**os.environ, **server.env(), "AWS_ENDPOINT_URL_S3": proxy.endpoint,
               "PYTHONPATH": str(REPO)}
        print(f"shard set {shards.manifest['bytes'] / 1e6:.0f} MB, {shards.manifest['rows']} "
              f"rows; view mimic/train (paper) parts {view_bytes / 1e6:.0f} MB; E = "
              f"{args.epochs} epochs, {args.workers} DataLoader workers per trainer")
        print(f"{'K':>2} {'mode':<7} {'S3 sent MB':>10} {'sent/view':>9} {'samples/s':>9} "
              f"{'vs local':>8} {'epochs 2+':>9} {'vs local':>8} {'epoch 1 s':>9} "
              f"{'wall s':>7}")
        rows = []
        modes = ("local", "cache", "stream")
        for round_ in range(args.rounds):
            for k in (int(v) for v in args.k.split(",")):
                by_mode = {}
                # a rotated order per round: no mode always runs after the same neighbour
                for mode in modes[round_ % 3 :] + modes[: round_ % 3]:
                    cache_dir = workdir / f"cache-k{k}"
                    shutil.rmtree(cache_dir, ignore_errors=True)
                    run_env = {**env, "BPFM_CACHE_DIR": str(cache_dir)}
                    proxy.reset()
                    began = time.perf_counter()
                    results = run_trainers(local if mode == "local" else uri, mode, k,
                                           args.epochs, args.workers, run_env)
                    by_mode[mode] = {
                        "round": round_, "k": k, "mode": mode, "epochs": args.epochs,
                        "sent_bytes": proxy.sent_to_clients, "view_bytes": view_bytes,
                        "sent_over_view": proxy.sent_to_clients / view_bytes,
                        "samples_per_s": sum(r["samples_per_s"] for r in results) / k,
                        "later_samples_per_s": sum(r["later_samples_per_s"] for r in results) / k,
                        "first_epoch_s": max(r["epoch_s"][0] for r in results),
                        "wall_s": time.perf_counter() - began, "trainers": results,
                    }
                    shutil.rmtree(cache_dir, ignore_errors=True)
                for mode in modes:
                    row = by_mode[mode]
                    row["vs_local"] = row["samples_per_s"] / by_mode["local"]["samples_per_s"]
                    row["later_vs_local"] = (
                        row["later_samples_per_s"] / by_mode["local"]["later_samples_per_s"]
                    )
                    rows.append(row)
                    print(
                        f"{k:>2} {mode:<7} {row['sent_bytes'] / 1e6:>10.1f} "
                        f"{row['sent_over_view']:>9.3f} {row['samples_per_s']:>9.0f} "
                        f"{row['vs_local']:>8.2f} {row['later_samples_per_s']:>9.0f} "
                        f"{row['later_vs_local']:>8.2f} {row['first_epoch_s']:>9.2f} "
                        f"{row['wall_s']:>7.1f}",
                        flush=True,
                    )
    finally:
        proxy.close()
        server.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    cached = [r for r in rows if r["mode"] == "cache"]
    medians = {
        f"k{k}": {
            key: statistics.median(r[key] for r in cached if r["k"] == k)
            for key in ("sent_over_view", "vs_local", "later_vs_local")
        }
        for k in sorted({r["k"] for r in cached})
    }
    print(f"cache vs local, median of {args.rounds} round(s): " + "; ".join(
        f"K={k[1:]}: sent/view {m['sent_over_view']:.3f}, samples/s {m['vs_local']:.2f}x "
        f"(epochs 2+ {m['later_vs_local']:.2f}x)" for k, m in medians.items()))
    summary = {
        "max_cached_sent_over_view": max(r["sent_over_view"] for r in cached),
        "cached_medians": medians,
        "rows": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
