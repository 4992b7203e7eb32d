"""Data throughput: segments/s and peak RSS of (a) a naive h5py Dataset reading the .mat segment
by segment, (b) bpfm's ShardDataset over local shards, (b'') the same over memory-mapped Arrow IPC
copies of the shards (what a zero-copy format would give), (c) batches gathered from a plain
in-memory float32 copy (the limit); ratios b/a and b/c; the converter's MB/s of input.

Targets (issue 2): b/a >= 20, b/c >= 0.3, loader RSS < 1 GB, converter >= 50 MB/s.

    python benchmarks/data_throughput.py [--segments 20480] [--workdir DIR] [--signals list]

The input is a synthetic Train_Subset.mat: the MIMIC rows of a small synthetic PulseDB release's
Train subset, tiled (fresh subject ids and noise per tile) up to --segments rows, in PulseDB's
v7.3 layout. Shards are written as schema v2 (`--signals packed`, the default) unless
`--signals` names a v1 encoding. Each phase runs in its own subprocess so that peak RSS values do
not mix; every phase reads warm files (the page cache). Prints numbers; not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 256


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_input(workdir: Path, segments: int) -> Path:
    """Tile a small synthetic Train subset up to `segments` rows (~75 MB per 1,000 segments)."""
    import numpy as np

    from bpfm.data.matfile import create_matfile
    from bpfm.data.pulsedb import open_pulsedb
    from bpfm.data.subsets import SubsetWriter
    from bpfm.data.synth import SynthConfig, write_synthetic_pulsedb

    target = workdir / "input" / "Train_Subset.mat"
    if target.exists():
        return target
    small = write_synthetic_pulsedb(
        workdir / "small", SynthConfig(subjects=6, segments_per_subject=40, seed=1)
    )
    train = next(p for p in small.subset_files if p.name == "Train_Subset.mat")
    blocks: dict[str, list] = {}
    with open_pulsedb(train) as pulse:
        for b in pulse.iter_batches(chunk_size=512):
            for i, subject in enumerate(b.subject):
                if b.source[i] != "mimic":  # one source: the loader reads one view of it all
                    continue
                blocks.setdefault(subject + "0", []).append(
                    (
                        np.stack([b.ecg[i], b.ppg[i], b.abp[i]]),
                        b.sbp[i],
                        b.dbp[i],
                        b.age[i],
                        b.height[i],
                        b.weight[i],
                        b.bmi[i],
                        b.gender[i],
                    )
                )
    rows_per_tile = sum(len(rows) for rows in blocks.values())
    rng = np.random.default_rng(0)
    tiles = -(-segments // rows_per_tile)
    target.parent.mkdir(parents=True, exist_ok=True)
    with create_matfile(target) as f:
        writer = SubsetWriter(f, tiles * rows_per_tile)
        for tile in range(tiles):
            for name, rows in blocks.items():
                columns = list(zip(*rows, strict=True))
                values = dict(
                    zip(
                        ("SBP", "DBP", "Age", "Height", "Weight", "BMI"),
                        (np.asarray(c, dtype=np.float64) for c in columns[1:7]),
                        strict=True,
                    )
                )
                # fresh noise per tile, or repeated rows would compress unrealistically well
                signals = np.stack(columns[0]).astype(np.float64)
                signals += rng.normal(0, 1e-3, signals.shape)
                writer.append(f"p{tile:03d}{name[1:]}", signals, values, list(columns[7]))
    return target


def phase_convert(input_file: str, shards: str, signals: str) -> dict:
    import shutil

    from bpfm.data.shards import write_shards

    shutil.rmtree(shards, ignore_errors=True)  # measure a conversion, not an up-to-date no-op
    size = Path(input_file).stat().st_size
    start = time.perf_counter()
    manifest = write_shards([input_file], shards, signals=signals)
    seconds = time.perf_counter() - start
    return {
        "rows": manifest["rows"],
        "input_mb": size / 1e6,
        "seconds": seconds,
        "mb_per_s": size / 1e6 / seconds,
        "shard_mb": manifest["bytes"] / 1e6,
        "peak_rss_mb": peak_rss_mb(),
    }


def phase_naive(input_file: str, limit: int) -> dict:
    """What a naive torch Dataset over the .mat does: one h5py read per segment, random order."""
    import h5py
    import numpy as np
    import torch

    with h5py.File(input_file, "r") as f:
        signals, sbp, dbp = f["Subset/Signals"], f["Subset/SBP"], f["Subset/DBP"]
        order = np.random.default_rng(0).permutation(signals.shape[2])[:limit]
        start = time.perf_counter()
        for begin in range(0, len(order), BATCH):
            xs, ys = [], []
            for i in order[begin : begin + BATCH]:
                xs.append(torch.from_numpy(signals[:, 0:2, i].T.astype(np.float32)))
                ys.append(torch.tensor([sbp[0, i], dbp[0, i]], dtype=torch.float32))
            torch.stack(xs), torch.stack(ys)
        seconds = time.perf_counter() - start
    return {
        "segments": len(order),
        "seconds": seconds,
        "per_s": len(order) / seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def _epochs(epochs: int, run_epoch) -> dict:
    """segments/s of the first epoch (cold: fresh memory, page faults) and of the later ones."""
    rates = []
    for epoch in range(epochs):
        start = time.perf_counter()
        count = run_epoch(epoch)
        rates.append(count / (time.perf_counter() - start))
    later = rates[1:] or rates
    median = float(sorted(later)[len(later) // 2])
    return {
        "segments": count,
        "first_per_s": rates[0],
        "per_s": median,
        "peak_rss_mb": peak_rss_mb(),
    }


def _view(shards: str):
    from bpfm.data.shards import open_shards
    from bpfm.data.splits import View

    return View(open_shards(shards), "mimic", ("train",), "all")


def _feather_dataset(shards: str):
    """ShardDataset reading Arrow IPC (Feather v2, uncompressed) copies of the parts, one record
    batch per row group, memory-mapped: pyarrow hands out views of the mapped file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bpfm.data.loader import ShardDataset

    class FeatherDataset(ShardDataset):
        def _read(self, units):
            open_part, handle = None, None
            for unit in units:
                if unit.part != open_part:
                    path = self.view.shards.part_path(self._parts[unit.part])
                    feather = path.removesuffix(".parquet") + ".arrow"
                    if not Path(feather).exists():
                        with pq.ParquetFile(path) as source, pa.OSFile(feather, "wb") as sink:
                            with pa.ipc.new_file(sink, source.schema_arrow) as writer:
                                for group in range(source.num_row_groups):
                                    writer.write_table(source.read_row_group(group))
                    handle = pa.ipc.open_file(pa.memory_map(feather))
                    open_part = unit.part
                batch = handle.get_batch(unit.row_group)
                table = pa.Table.from_batches([batch]).select(self.columns)
                yield from self._chunks(table, unit)

    return FeatherDataset


def phase_loader(shards: str, epochs: int, path: str = "parquet") -> dict:
    """`path`: parquet = bpfm's loader (pyarrow decodes each row group of the memory-mapped
    file: one copy); feather = memory-mapped Arrow IPC copies of the parts (zero-copy views)."""
    from bpfm.data.loader import ShardDataset

    view = _view(shards)
    rss_before = peak_rss_mb()
    cls = _feather_dataset(shards) if path == "feather" else ShardDataset
    if path == "feather":
        list(cls(view, batch_size=4096, shuffle=False))  # write the copies (and warm them)
    dataset = cls(view, batch_size=BATCH, shuffle=True, seed=0)

    def run_epoch(epoch: int) -> int:
        dataset.set_epoch(epoch)
        return sum(len(batch["y"]) for batch in dataset)

    return {**_epochs(epochs, run_epoch), "rss_after_imports_mb": rss_before}


def phase_memory(shards: str, epochs: int) -> dict:
    """The limit: the same float32 rows already in RAM, gathered into shuffled batches."""
    import numpy as np
    import torch

    from bpfm.data.loader import ShardDataset

    batches = list(ShardDataset(_view(shards), batch_size=4096, shuffle=False))
    x = np.concatenate([b["x"].numpy() for b in batches])
    y = np.concatenate([b["y"].numpy() for b in batches])
    del batches

    def run_epoch(epoch: int) -> int:
        order = np.random.default_rng(epoch).permutation(len(x))
        for begin in range(0, len(order), BATCH):
            index = order[begin : begin + BATCH]
            torch.from_numpy(x[index]), torch.from_numpy(y[index])
        return len(order)

    return {**_epochs(epochs, run_epoch), "in_memory_mb": x.nbytes / 1e6}


def run_phase(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--phase", *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"phase {args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=20480)
    parser.add_argument(
        "--naive-limit", type=int, default=3000, help="segments the naive reader reads (it is slow)"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="alternating loader runs per path")
    parser.add_argument("--workdir", default=None)
    parser.add_argument(
        "--signals",
        default="packed",
        choices=("packed", "list", "bytes"),
        help="shard signal encoding: packed = schema v2, list = DESIGN's v1 (see ShardOptions)",
    )
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        name, *rest = args.phase
        phases = {
            "convert": phase_convert,
            "naive": phase_naive,
            "loader": phase_loader,
            "memory": phase_memory,
        }
        rest = [int(r) if r.isdigit() else r for r in rest]
        print(json.dumps(phases[name](*rest)))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bpfm-bench-"))
    start = time.perf_counter()
    input_file = build_input(workdir, args.segments)
    print(
        f"input: {input_file} ({input_file.stat().st_size / 1e6:.0f} MB, built in "
        f"{time.perf_counter() - start:.0f} s)"
    )
    shards = str(workdir / f"shards-{args.signals}")
    convert = run_phase("convert", str(input_file), shards, args.signals)
    naive = run_phase("naive", str(input_file), str(args.naive_limit))
    # the loader's read paths alternate, `--rounds` times, so load on the machine hits all alike
    paths = ("parquet", "feather")
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    for _ in range(args.rounds):
        for p in paths:
            runs[p].append(run_phase("loader", shards, str(args.epochs), p))
    loaders = {p: sorted(r, key=lambda x: x["per_s"])[len(r) // 2] for p, r in runs.items()}
    loader = loaders["parquet"]
    memory = run_phase("memory", shards, str(args.epochs))
    print(f"segments in Train subset: {convert['rows']}; shard signals: {args.signals}")
    print(
        f"converter: {convert['input_mb']:.0f} MB in {convert['seconds']:.1f} s = "
        f"{convert['mb_per_s']:.0f} MB/s of input (shards {convert['shard_mb']:.0f} MB, "
        f"peak RSS {convert['peak_rss_mb']:.0f} MB)   target >= 50 MB/s"
    )
    for label, result in (
        ("(a) naive h5py per segment", naive),
        ("(b) bpfm ShardDataset", loader),
        ("(b'') mapped Arrow IPC", loaders["feather"]),
        ("(c) in-memory float32", memory),
    ):
        first = f"(first epoch {result['first_per_s']:.0f})" if "first_per_s" in result else ""
        print(
            f"{label:28s} {result['per_s']:>8.0f} segments/s {first:22s} peak RSS "
            f"{result['peak_rss_mb']:.0f} MB"
        )
    print(
        f"loader RSS after imports (torch, pyarrow): {loader['rss_after_imports_mb']:.0f} MB   "
        "target: loader RSS < 1 GB"
    )
    print(
        f"b/a = {loader['per_s'] / naive['per_s']:.1f} (first epoch "
        f"{loader['first_per_s'] / naive['per_s']:.1f})   target >= 20"
    )
    for p in paths:
        rates = " ".join(f"{r['per_s']:.0f}" for r in runs[p])
        print(f"loader via {p:8s} rounds: {rates} segments/s")
    print(f"feather/parquet = {loaders['feather']['per_s'] / loader['per_s']:.2f}")
    print(
        f"b/c = {loader['per_s'] / memory['per_s']:.2f} (first epochs "
        f"{loader['first_per_s'] / memory['first_per_s']:.2f})   target >= 0.3"
    )


if __name__ == "__main__":
    main()
