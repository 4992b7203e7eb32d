"""The shard-set manifest (`_manifest.json`): describing inputs, the conversion key, building the
manifest from per-file results. Used by `write_shards` and by `pipelines/shard.py` (the Ray job)
alike; reading a manifest is `shardset.read_manifest`, publishing one (and keeping or deleting
generations) `bpfm.data.generations`."""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from bpfm import __version__
from bpfm.data.shardset import ROWS_PER_PART, ShardOptions
from bpfm.errors import DataError
from bpfm.io import storage
from bpfm.io.interrupts import check


def conversion_key(sources: list[dict], options: dict) -> str:
    """A hash of the inputs' subset names and sha256s and the options (`ShardOptions.as_dict`):
    equal keys mean an identical conversion."""
    described = {
        "schema_version": ShardOptions.from_dict(options).schema_version,
        "options": options,
        "sources": sorted((s["subset"], s["sha256"]) for s in sources),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def describe_sources(
    files: list[Path], workers: int, *, rows_per_part: int = ROWS_PER_PART
) -> list[dict]:
    """Size, sha256 and partition name of every input; two inputs may not share a subset name
    unless they are Subj_Wins files (their parts are numbered apart, see `first_part`: each
    input reserves a part number per `rows_per_part` segments, `ShardOptions.rows_per_part`)."""
    from bpfm.data.pulsedb import open_pulsedb  # lazy: h5py
    with ThreadPoolExecutor(max(1, workers)) as pool:  # a stop request ends hashing too
        digests = list(pool.map(lambda f: storage.sha256_file(f, poll=check), files))
    sources, names = [], {}
    for path, digest in zip(files, digests, strict=True):
        with open_pulsedb(path) as pulse:
            kind, name, n = pulse.kind, pulse.name, pulse.n_segments
        if kind == "subset" and name in names:
            raise DataError(path, "input", f"subset name '{name}' also comes from {names[name]}")
        names[name] = path
        sources.append(
            {
                "path": str(path),
                "name": path.name,
                "size": path.stat().st_size,
                "sha256": digest,
                "kind": kind,
                "subset": name,
                "segments": n,
            }
        )
    offset: dict[str, int] = {}
    for source in sources:
        source["first_part"] = offset.get(source["subset"], 0)
        offset[source["subset"]] = source["first_part"] + math.ceil(
            source["segments"] / rows_per_part
        )
    return sources


def build_manifest(
    key: str, generation: str, sources: list[dict], results: list[dict], options: ShardOptions
) -> dict:
    """The manifest of a finished conversion: `results` are `convert_file`'s, one per source."""
    partitions: dict[str, dict[str, int]] = {}
    dropped: dict[str, int] = {}
    parts = []
    for source, result in zip(sources, results, strict=True):
        source.update(rows=result["rows"], dropped=result["dropped"])
        source.pop("first_part")
        for reason, count in result["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + count
        for part in result["parts"]:
            parts.append(part)
            by_subset = partitions.setdefault(part["source"], {})
            by_subset[part["subset"]] = by_subset.get(part["subset"], 0) + part["rows"]
    return {
        "format": "bpfm-shards",
        "schema_version": options.schema_version,
        "key": key,
        "generation": generation,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "bpfm_version": __version__,
        "options": options.as_dict(),
        "schema": {f.name: str(f.type) for f in options.schema},
        "signal_layout": options.signal_layout,
        "rows": sum(p["rows"] for p in parts),
        "bytes": sum(p["bytes"] for p in parts),
        "partitions": partitions,
        "dropped": dropped,
        "sources": sources,
        "parts": parts,
    }
