"""Bytes from the object store and trainers' samples/s, with and without the node-local cache.

    python benchmarks/data_at_scale.py [--segments 48000] [--epochs 10] [--k 1,4,8] [--rounds 1]
        [--step train|none] [--model 16x2] [--modes local,cache,stream] [--workdir DIR]

K training processes on this node (as the paper profile's 0.25-GPU small trials share one) train
on the `paper` protocol's train view of one shard set for E epochs each, started together, in
three modes: the same shards in a local folder, on S3 through the node cache (`bpfm.data.cache`,
a fresh cache folder per K: every run starts cold), and on S3 streamed (`--no-cache`). S3 is the
real SeaweedFS server of the tests; a loopback proxy in front of it counts every byte it sent
(HTTP included), so "sent" is measured, not estimated. `--modes` may add "cache-parts": the
cache reading a set whose manifest has no block checksums (written before them), so each part
is copied whole before it is read, as the cache did until 2026-12-03. A view's bytes are the
bytes of the parts it needs (what a cache must copy once).

A trainer is `bpfm train`'s epoch loop (`bpfm.training.loop`'s model, optimizer, lr schedule,
loss and train loader: shuffled, z-scored windows, standardised targets from the view's label
statistics): per batch a forward, loss, backward and optimizer step, one torch thread per
trainer; a sample counts once trained on. It is timed from opening the split to its last step,
first-epoch copies included, and over epochs 2+ alone (where a cached trainer reads local
files); "wait" is its share of that time spent opening the split or waiting for a batch. The
last lines give each mode's samples/s against the local folder's had the runs stopped after
e = 1, 2, ..., E epochs (from the same runs' epoch times): a cold copy is a first-epoch cost, and
these show how it amortizes. `--step none` drops the step (the data path alone).

The model (`--model`, a registered size or DIMxDEPTH, a reduced CEReBrO with DIM/8 heads): the
target is about trials on GPU nodes, where what matters is a step's time against a batch's
data time. There, small trains several times faster than large's 17,100 samples/s (H100,
compiled) and a 0.25-GPU trial gets a quarter of that, against ~250k segments/s of local
reading: data is ~5-25 % of a step. On this 2-core CPU small steps at 141 samples/s (data
would be 0.1 %) while the default 16x2 (dim 16, depth 2, 2 heads: both attention kinds, 9.0k
parameters) steps at ~12,000 samples/s alone, which gives the local folder a measured wait share
of 10-12 % (table below), inside that range. The set's default 48,000 segments make 3 parts
(16,384 rows a part, as every conversion writes), 720 MB: with fewer than two parts nothing can
overlap a copy. K = 1, 4, 8 x 3 modes x 10 epochs take ~20 min.

Targets (issue 18): with the cache, sent <= 1.05 x the view's bytes for any K and E (streaming
sends K x E x 0.67: it reads only the columns training needs, two thirds of a part, each epoch);
trainers' samples/s with the cache >= 0.9 x the local folder's. Prints a table and one JSON
object as its last line.

Measured 2026-12-04 on an idle host (load < 1.2; E = 10, K = 1 three rounds, K = 4 and 8 one):

     K mode     sent/view   vs local (rounds)   epochs 2+   epoch 1 s   wait
     1 local        0.000   1.00                1.00        3.3-3.5     10-11 %
     1 cache        1.000   0.89 0.99 0.92      0.95-1.06   5.3-5.6     14 %
     1 stream       6.675   0.85 0.89 0.87      0.85-0.89   3.5-3.9     16-18 %
     4 cache        1.002   0.97                0.99        14.2        13 %  (local 11.7 s, 11 %)
     4 stream      26.701   0.78                0.77        14.3        15 %
     8 cache        1.003   1.01                1.02        26.4        12 %  (local 24.9 s, 11 %)
     8 stream      53.403   0.81                0.81        30.1        14 %

     cache vs local had the runs stopped after e epochs (medians):
       e =    1     2     3     4     6     10
     K = 1  0.63  0.76  0.83  0.86  0.90  0.92
     K = 4  0.81  0.87  0.91  0.92  0.94  0.97
     K = 8  0.95  0.96  0.99  1.00  1.00  1.01

Where K = 1's first epoch goes (a cold copy of the 720 MB view, no step, `perf` and process
CPU times): the copying process spends ~1.05 s user (sha256 at ~1.6 GB/s, the S3 client) and
~1.5 s system, most of it in the kernel copying into page cache that is new memory; the `weed`
server ~1.05 s, the counting proxy ~0.25 s; in all ~3.85 s of CPU against ~0.5 s to read the
same epoch from a local folder whose pages are already in memory. This host is a Firecracker
VM with free page reporting (kernel `page_reporting.page_reporting_order=11`): memory the guest
frees goes back to the host, and touching it again costs a host fault, ~1-1.8 s for 720 MB of
new file pages against 0.13 s for pages reused at once. One trainer steps on one core and the
copy gets the other, at ~190 MB/s against the trainer's ~220 MB/s of reading: the first epoch
takes ~2 s longer, which is 17 % of a 3-epoch run and 8 % of a 10-epoch one. At K = 4 and 8
that copy is shared by the K trainers. Reusing one read buffer per thread and memory-mapping
in-progress copies changed nothing measurable (5 A/B rounds: 2.08-2.80 s against 2.20-2.32 s
per cold copy); leaving out the blocks that hold only ABP would save 19 % of the copy at 8 MB
blocks (17 of 88 blocks here), not enough to close E = 3. On a GPU node the object store's CPU
is not the node's, memory is not handed back to a host page by page, and a trial's step is not
on the cores that copy.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BATCH = 256
MODES = ("local", "cache", "stream", "cache-parts")
DEFAULT_MODEL = "16x2"  # see the module doc: a GPU node's step-to-data-time ratio


def _register_reduced(model: str) -> str:
    """The size name of `model`: a registered one (small, medium, large) or DIMxDEPTH, a
    reduced CEReBrO (heads = DIM / 8) registered here under that name."""
    from bpfm.model.cerebro import SIZES, CerebroConfig, register_size

    if model in SIZES or "x" not in model:
        return model
    dim, depth = (int(v) for v in model.split("x"))
    register_size(model)(lambda **o: CerebroConfig(dim=dim, depth=depth, heads=max(1, dim // 8),
                                                   **o))
    return model


class Training(NamedTuple):
    config: Any  # bpfm.training.config.TrainConfig
    step: Callable[[dict], None]  # one training step on a batch
    set_targets: Callable[[Any], None]  # the target scaling from an open split's train view


def _training(model: str, uri: str, workers: int) -> Training:
    """`bpfm train`'s model, loss, optimizer and lr schedule for `model`, and one step on a
    batch (forward, loss on standardised targets, backward, optimizer step)."""
    from bpfm.training import loop
    from bpfm.training.config import TrainConfig

    config = TrainConfig(data=uri, size=_register_reduced(model), batch_size=BATCH,
                         num_workers=workers, device="cpu")
    net = loop.build_model(config)
    optimizer = loop._make_optimizer(config, net)
    scheduler = loop._make_scheduler(config, optimizer, steps_per_epoch=1)
    loss_fn = loop._loss_fn(config)
    net.train()
    targets = {}  # set once the split is open: target shift and scale, as `bpfm train`'s

    def step(batch: dict) -> None:
        y = (batch["y"] - targets["shift"]) / targets["scale"]
        loss = loss_fn(net(batch["x"]).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    def set_targets(split) -> None:
        import numpy as np
        import torch

        from bpfm.data.loader import view_target_stats

        mean, std = (np.asarray(v, dtype=np.float64) for v in view_target_stats(split.train))
        meta = loop._target_meta(config, mean, std)
        targets.update(shift=torch.tensor(meta["target_shift"], dtype=torch.float32),
                       scale=torch.tensor(meta["target_scale"], dtype=torch.float32))

    return Training(config, step, set_targets)


def _open(uri: str, mode: str):
    """The paper split of `uri` as `mode` reads it; "cache-parts": through the cache as if the
    set had been written before block checksums (each part copied whole before it is read)."""
    from bpfm.data.cache import CachedShardSet
    from bpfm.data.shards import open_shards
    from bpfm.data.splits import make_split
    from bpfm.training.evaluate import open_split

    if mode != "cache-parts":
        return open_split(uri, "mimic", "paper", cache=mode == "cache")
    manifest = open_shards(uri).manifest
    for part in manifest["parts"]:
        part.pop("block_sha256", None)
    return make_split(CachedShardSet(uri, manifest), "mimic", "paper")


def trainer(uri: str, mode: str, epochs: int, workers: int, model: str) -> None:
    """One training process: waits for "go" on stdin, then trains on the view for `epochs`
    (model "none": reads it only). Prints its samples, times and the time it waited for
    batches."""
    import torch
    from torch.utils.data import DataLoader

    from bpfm.data.loader import ShardDataset

    torch.set_num_threads(1)  # K trainers share the node's cores, as fractional-GPU trials do
    train = None if model == "none" else _training(model, uri, workers)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    split = _open(uri, mode)
    if train is not None:
        train.set_targets(split)
    samples, epoch_s, wait_s = [], [], []
    for epoch in range(1, epochs + 1):
        began, count, waited = time.perf_counter(), 0, 0.0
        if train is None:
            dataset = ShardDataset(split.train, batch_size=BATCH, shuffle=True, normalize=True)
            dataset.set_epoch(epoch)
            batches = DataLoader(dataset, batch_size=None, num_workers=workers)
        else:  # `bpfm train`'s loader: same dataset, seed and workers
            from bpfm.training import loop

            batches = loop._train_loader(train.config, split.train, epoch, torch.device("cpu"))
        batches = iter(batches)
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - asked
            if batch is None:
                break
            if train is not None:
                train.step(batch)
            count += len(batch["x"])  # counted once trained on
        samples.append(count)
        epoch_s.append(time.perf_counter() - began)
        wait_s.append(waited)
    seconds = time.perf_counter() - start
    later = sum(samples[1:]) / sum(epoch_s[1:]) if epochs > 1 else float("nan")
    opened = seconds - sum(epoch_s)
    # samples/s had the run stopped after e epochs: a first-epoch copy's share shrinks with e
    through = [sum(samples[:e]) / (opened + sum(epoch_s[:e])) for e in range(1, epochs + 1)]
    print(json.dumps({"samples": sum(samples), "seconds": seconds, "epoch_s": epoch_s,
                      "samples_per_s_through": through,
                      "wait_s": wait_s, "open_s": opened,
                      "samples_per_s": sum(samples) / seconds,
                      "later_samples_per_s": later,
                      "wait_share": (sum(wait_s) + opened) / seconds}))


def run_trainers(uri: str, mode: str, k: int, epochs: int, workers: int, model: str,
                 env: dict) -> list[dict]:
    command = [sys.executable, __file__, "--trainer", uri, mode, str(epochs), str(workers), model]
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


def _through(row: dict) -> list[float]:
    """A run's mean samples/s per trainer had it stopped after each epoch."""
    trainers = row["trainers"]
    return [sum(t["samples_per_s_through"][e] for t in trainers) / len(trainers)
            for e in range(row["epochs"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=48000,
                        help="~15 KB of shards each; 16,384 a part (48,000: 3 parts, 725 MB)")
    parser.add_argument("--epochs", type=int, default=10,
                        help="per trainer; the ratios after each epoch e <= E print too")
    parser.add_argument("--k", default="1,4,8", help="concurrent trainers per run")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per trainer")
    parser.add_argument("--rounds", type=int, default=1, help="repeats, in rotated mode order")
    parser.add_argument("--workdir", help="keeps the input and shards between runs")
    parser.add_argument("--step", choices=("train", "none"), default="train",
                        help="per batch: bpfm train's training step, or none (read only)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="small, medium, large or DIMxDEPTH (a reduced CEReBrO)")
    parser.add_argument("--modes", default="local,cache,stream",
                        help="of local, cache, stream, cache-parts (parts copied whole: the "
                             "cache before block checksums)")
    parser.add_argument("--trainer", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer:
        uri, mode, epochs, workers, model = args.trainer
        trainer(uri, mode, int(epochs), int(workers), model)
        return
    model = "none" if args.step == "none" else args.model

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
               "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        print(f"shard set {shards.manifest['bytes'] / 1e6:.0f} MB, {shards.manifest['rows']} "
              f"rows; view mimic/train (paper) parts {view_bytes / 1e6:.0f} MB; E = "
              f"{args.epochs} epochs, {args.workers} DataLoader workers per trainer; step: "
              f"{'none (data only)' if model == 'none' else f'train {model}, batch {BATCH}'}")
        print(f"{'K':>2} {'mode':<11} {'S3 sent MB':>10} {'sent/view':>9} {'samples/s':>9} "
              f"{'vs local':>8} {'epochs 2+':>9} {'vs local':>8} {'epoch 1 s':>9} "
              f"{'wait':>5} {'wall s':>7}")
        rows = []
        modes = tuple(args.modes.split(","))
        if "local" not in modes or not set(modes) <= set(MODES):
            raise SystemExit(f"--modes: local and any of {', '.join(MODES[1:])}")
        for round_ in range(args.rounds):
            for k in (int(v) for v in args.k.split(",")):
                by_mode = {}
                # a rotated order per round: no mode always runs after the same neighbour
                turn = round_ % len(modes)
                for mode in modes[turn:] + modes[:turn]:
                    cache_dir = workdir / f"cache-k{k}"
                    shutil.rmtree(cache_dir, ignore_errors=True)
                    run_env = {**env, "BPFM_CACHE_DIR": str(cache_dir)}
                    proxy.reset()
                    began = time.perf_counter()
                    results = run_trainers(local if mode == "local" else uri, mode, k,
                                           args.epochs, args.workers, model, run_env)
                    by_mode[mode] = {
                        "round": round_, "k": k, "mode": mode, "epochs": args.epochs,
                        "sent_bytes": proxy.sent_to_clients, "view_bytes": view_bytes,
                        "sent_over_view": proxy.sent_to_clients / view_bytes,
                        "samples_per_s": sum(r["samples_per_s"] for r in results) / k,
                        "later_samples_per_s": sum(r["later_samples_per_s"] for r in results) / k,
                        "first_epoch_s": max(r["epoch_s"][0] for r in results),
                        "wait_share": sum(r["wait_share"] for r in results) / k,
                        "wall_s": time.perf_counter() - began, "trainers": results,
                    }
                    shutil.rmtree(cache_dir, ignore_errors=True)
                for mode in modes:
                    row = by_mode[mode]
                    row["vs_local"] = row["samples_per_s"] / by_mode["local"]["samples_per_s"]
                    row["later_vs_local"] = (
                        row["later_samples_per_s"] / by_mode["local"]["later_samples_per_s"]
                    )
                    row["vs_local_through"] = [
                        mean / local for mean, local in
                        zip(_through(row), _through(by_mode["local"]), strict=True)
                    ]
                    rows.append(row)
                    print(
                        f"{k:>2} {mode:<11} {row['sent_bytes'] / 1e6:>10.1f} "
                        f"{row['sent_over_view']:>9.3f} {row['samples_per_s']:>9.0f} "
                        f"{row['vs_local']:>8.2f} {row['later_samples_per_s']:>9.0f} "
                        f"{row['later_vs_local']:>8.2f} {row['first_epoch_s']:>9.2f} "
                        f"{row['wait_share']:>5.0%} {row['wall_s']:>7.1f}",
                        flush=True,
                    )
    finally:
        proxy.close()
        server.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    medians = {
        mode: {
            f"k{k}": {
                key: statistics.median(r[key] for r in rows if (r["mode"], r["k"]) == (mode, k))
                for key in ("sent_over_view", "vs_local", "later_vs_local")
            }
            for k in sorted({r["k"] for r in rows})
        }
        for mode in modes
        if mode.startswith("cache")
    }
    for mode, by_k in medians.items():
        print(f"{mode} vs local, median of {args.rounds} round(s): " + "; ".join(
            f"K={k[1:]}: sent/view {m['sent_over_view']:.3f}, samples/s {m['vs_local']:.2f}x "
            f"(epochs 2+ {m['later_vs_local']:.2f}x)" for k, m in by_k.items()))
    for mode in (m for m in modes if m != "local"):
        for k in sorted({r["k"] for r in rows}):
            through = [r["vs_local_through"] for r in rows if (r["mode"], r["k"]) == (mode, k)]
            print(f"{mode} K={k} vs local, median, had the runs stopped after e epochs: "
                  + ", ".join(f"e={e} {statistics.median(t[e - 1] for t in through):.2f}"
                              for e in range(1, args.epochs + 1)))
    cached = [r for r in rows if r["mode"].startswith("cache")]
    summary = {
        "max_cached_sent_over_view": max((r["sent_over_view"] for r in cached), default=None),
        "cached_medians": medians,
        "rows": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
