"""What a grid costs before it runs: GPU-hours, data read per node with and without the node
cache, checkpoint storage, and how its fractional-GPU trials pack onto a cluster's GPUs.

Pure functions over a `GridPlan`, a profile's resource table and (when readable) the shard
set's manifest; the dry run (`bpfm grid --dry-run`) prints them.

Throughput (training samples/s on one whole GPU, batch 1024, bf16 autocast, compiled): H100
large is measured (`benchmarks/train_throughput.py --device cuda`: 17,100 samples/s, 34 % MFU);
the other entries scale it by the sizes' analytic training FLOPs per sample at the same MFU, so
they are upper bounds for the small models, which are launch-bound well below 34 % MFU. Other
GPU kinds scale by their dense bf16 peak. Frozen trials are costed like unfrozen ones (the
backward still runs through every block to reach the patch embedding). An evaluation sample
costs a third of a training one (forward only)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from bpfm.orchestration.grid import GridPlan, TrialPlan
from bpfm.profiles import Profile

MEASURED_GPU = "H100"
MEASURED_SIZE = "large"
MEASURED_SAMPLES_PER_S = 17_100.0
# Training GFLOPs per sample (forward x3; benchmarks/train_throughput.py `forward_flops`).
TRAIN_GFLOP_PER_SAMPLE = {"small": 0.817, "medium": 9.113, "large": 19.420}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}
EVAL_COST = 1.0 / 3.0  # an evaluation sample against a training one
ROW_READ_BYTES = 10_000 + 16  # what the loader reads per row: ecg_ppg and the labels
ROW_STORED_BYTES = 15_100  # a part's bytes per row with abp (when no manifest is readable)
# PulseDB's published Train counts (research/pulsedb.md), used only without a readable manifest:
# VitalDB_Train is counted; MIMIC's Train is its five-subset total at VitalDB's Train share.
PUBLISHED_TRAIN_ROWS = {"mimic": 612_000, "vitaldb": 465_480}
# (train, validation) shares of the train subset's rows per protocol
SPLIT_SHARES = {"paper": (0.8, 0.1), "calbased": (0.9, 0.1), "calfree": (0.9, 0.1),
                "aami": (0.9, 0.1)}


def samples_per_s(size: str, gpu_kind: str) -> float:
    """Training samples/s of one trial of `size` on a whole GPU of `gpu_kind`."""
    from bpfm.model import SIZE_ALIASES  # lazy: torch

    size = SIZE_ALIASES.get(size, size)
    if gpu_kind not in BF16_PEAK_TFLOPS:
        known = ", ".join(BF16_PEAK_TFLOPS)
        raise ValueError(f"gpu kind {gpu_kind!r} unknown (known: {known})")
    flops = TRAIN_GFLOP_PER_SAMPLE[MEASURED_SIZE] / TRAIN_GFLOP_PER_SAMPLE[size]
    return (MEASURED_SAMPLES_PER_S * flops * BF16_PEAK_TFLOPS[gpu_kind]
            / BF16_PEAK_TFLOPS[MEASURED_GPU])


@dataclass(frozen=True)
class DataSizes:
    """Rows and stored bytes of the subsets a trial reads, per source (from the manifest)."""

    rows: dict[str, int]  # source -> rows of its train subset
    part_bytes: dict[str, int]  # source -> bytes of the parts its trials read (train + tests)
    from_manifest: bool
    note: str = ""


def data_sizes(manifest: dict | None, sources: list[str], note: str = "") -> DataSizes:
    if manifest is None:
        rows = {s: PUBLISHED_TRAIN_ROWS.get(s, 0) for s in sources}
        stored = {s: r * ROW_STORED_BYTES for s, r in rows.items()}  # the train subsets' parts
        return DataSizes(rows, stored, False, note)
    rows, stored = {}, {}
    for source in sources:
        subsets = manifest["partitions"].get(source, {})
        train = next((s for s in ("train", "vitaldb_train") if s in subsets), None)
        rows[source] = subsets.get(train, sum(subsets.values())) if subsets else 0
        stored[source] = sum(p["bytes"] for p in manifest["parts"] if p["source"] == source)
    return DataSizes(rows, stored, True, note)


@functools.cache
def parameters(size: str, freeze: str) -> tuple[int, int]:
    """(total, trainable) parameters, counted on the meta device (nothing allocated)."""
    import torch  # lazy: torch

    from bpfm.model import apply_freeze, count_parameters, create_model  # lazy: torch

    with torch.device("meta"):
        model = create_model(size)
    return count_parameters(apply_freeze(model, freeze))


def trial_cost(trial: TrialPlan, profile: Profile, sizes: DataSizes, gpu_kind: str) -> dict:
    train_share, val_share = SPLIT_SHARES[trial.protocol]
    subset_rows = sizes.rows.get(trial.source, 0)
    train_rows, val_rows = int(subset_rows * train_share), int(subset_rows * val_share)
    test_rows = val_rows  # the test view is about as large as the validation view
    rate = samples_per_s(trial.size, gpu_kind)
    seconds = trial.epochs * (train_rows + EVAL_COST * val_rows) / rate
    seconds += len(trial.report_epochs) * EVAL_COST * test_rows / rate
    gpu = profile.resources_for(trial.size).gpu
    total, trainable = parameters(trial.size, trial.freeze)
    # per epoch the train and the validation pass each scan the whole subset (views are row
    # masks over its parts)
    streamed = trial.epochs * 2 * subset_rows * ROW_READ_BYTES
    # int8 weights take about a byte per parameter
    quantized = sum(4 * total if v.get("mode") == "fp32" else total
                    for v in profile.quantize.values())
    return {
        "trial": trial.id,
        "size": trial.size,
        "gpu": gpu,
        "epochs": trial.epochs,
        "samples_per_epoch": train_rows,
        "samples_per_s": round(rate),
        "gpu_hours": seconds / 3600,
        "wall_hours": seconds / 3600 / gpu if gpu > 0 else None,
        "streamed_bytes": streamed,
        "checkpoint_bytes": 4 * total + 8 * trainable,  # weights + Adam's two moments
        "model_bytes": 4 * total * len(trial.report_epochs),  # a model dir per cell
        "quantized_bytes": len(trial.report_epochs) * quantized,
    }


def pack(trials: list[dict], gpus: int) -> list[dict]:
    """Greedy list scheduling of trials (longest first) onto `gpus` GPUs of capacity 1: a trial
    starts on the fullest GPU it fits on as soon as one has room (what Ray's fractional GPU
    resources allow). Returns per trial its GPU index and start/end in hours."""
    waiting = sorted((t for t in trials if t["gpu"] > 0), key=lambda t: -t["wall_hours"])
    free = [1.0] * gpus
    running: list[tuple[float, int, float]] = []  # (end, gpu, share)
    placed, now = [], 0.0
    while waiting:
        for trial in list(waiting):
            fits = [g for g in range(gpus) if free[g] + 1e-9 >= trial["gpu"]]
            if not fits:
                continue
            g = min(fits, key=lambda i: free[i])
            free[g] -= trial["gpu"]
            end = now + trial["wall_hours"]
            running.append((end, g, trial["gpu"]))
            placed.append({"trial": trial["trial"], "gpu_index": g, "start_h": now, "end_h": end})
            waiting.remove(trial)
        if waiting:
            if not running:
                raise ValueError(f"a trial asks for more than one GPU: {waiting[0]['trial']}")
            running.sort()
            end, g, share = running.pop(0)
            now, free[g] = end, free[g] + share
    return placed


def cost_plan(
    plan: GridPlan,
    profile: Profile,
    manifest: dict | None,
    *,
    gpu_kind: str = MEASURED_GPU,
    gpus: int = 8,
    gpus_per_node: int = 8,
    note: str = "",
) -> dict[str, Any]:
    sources = sorted({t.source for t in plan.trials})
    sizes = data_sizes(manifest, sources, note)
    trials = [trial_cost(t, profile, sizes, gpu_kind) for t in plan.trials]
    placed = pack(trials, gpus)
    nodes = max(1, math.ceil(gpus / gpus_per_node))
    cached_per_node = sum(sizes.part_bytes.values())  # every node copies what its trials read
    streamed = sum(t["streamed_bytes"] for t in trials)
    per_gpu: dict[int, dict[str, int]] = {}
    size_of = {t["trial"]: t["size"] for t in trials}
    for entry in placed:
        counts = per_gpu.setdefault(entry["gpu_index"], {})
        size = size_of[entry["trial"]]
        counts[size] = counts.get(size, 0) + 1
    shares = {s: profile.resources_for(s).gpu for s in sorted({t["size"] for t in trials})}
    return {
        "gpu_kind": gpu_kind,
        "gpus": gpus,
        "nodes": nodes,
        "samples_from_manifest": sizes.from_manifest,
        "note": sizes.note,
        "trials": trials,
        "packing": {
            "per_gpu_at_once": {s: math.floor(1 / g) if g > 0 else 0 for s, g in shares.items()},
            "trials_per_gpu": {str(g): c for g, c in sorted(per_gpu.items())},
            "schedule": placed,
            "makespan_hours": max((p["end_h"] for p in placed), default=0.0),
        },
        "total": {
            "epochs": sum(t["epochs"] for t in trials),
            "gpu_hours": sum(t["gpu_hours"] for t in trials),
            "read_per_node_cached_bytes": cached_per_node,
            "read_per_node_streamed_bytes": streamed / nodes,
            "checkpoint_bytes": sum(t["checkpoint_bytes"] for t in trials),
            "model_bytes": sum(t["model_bytes"] + t["quantized_bytes"] for t in trials),
        },
    }


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n < 1e12 else f"{n / 1e12:,.1f} TB"


def format_cost_plan(cost: dict[str, Any]) -> str:
    total, packing = cost["total"], cost["packing"]
    source = "the manifest" if cost["samples_from_manifest"] else "PulseDB's published counts"
    lines = [
        f"cost plan on {cost['gpus']} x {cost['gpu_kind']} ({cost['nodes']} node(s)); samples "
        f"per epoch from {source}{': ' + cost['note'] if cost['note'] else ''}",
    ]
    for t in cost["trials"]:
        wall = f"{t['wall_hours']:.1f} h on {t['gpu']:g} GPU" if t["wall_hours"] else "CPU"
        lines.append(
            f"  {t['trial']}: {t['epochs']} epochs x {t['samples_per_epoch']:,} samples at "
            f"{t['samples_per_s']:,}/s = {t['gpu_hours']:.2f} GPU-h ({wall}); streamed "
            f"{_gb(t['streamed_bytes'])}; checkpoint {_gb(t['checkpoint_bytes'])}"
        )
    at_once = ", ".join(f"{s} {n} per GPU" for s, n in packing["per_gpu_at_once"].items())
    lines += [
        f"total: {total['epochs']} epochs, {total['gpu_hours']:.1f} GPU-hours; data read per "
        f"node {_gb(total['read_per_node_cached_bytes'])} with the node cache, "
        f"{_gb(total['read_per_node_streamed_bytes'])} without; checkpoints "
        f"{_gb(total['checkpoint_bytes'])}, models {_gb(total['model_bytes'])}",
        f"packing: {at_once}; makespan {packing['makespan_hours']:.1f} h",
    ]
    for gpu, counts in packing["trials_per_gpu"].items():
        lines.append(
            f"  GPU {gpu} over the run: " + ", ".join(f"{n} {s}" for s, n in counts.items())
        )
    return "\n".join(lines)
