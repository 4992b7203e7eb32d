"""Checking a published shard set against its manifest (`bpfm data verify`).

The cheap check (always): every part the manifest lists exists with the size it records, its
Parquet footer reads, and the footer's rows, row groups and columns are the manifest's; the
manifest's totals add up. It reads one footer per part, so it runs whenever a set is opened for
training. `deep=True` also hashes every part and compares the sha256 the writer recorded (bytes
changed in place at the same size pass the cheap check). `bpfm data shard` runs the deep check
over a set it would otherwise call up to date, and re-converts the sources of failing parts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bpfm.data.shardset import MANIFEST, ShardSet
from bpfm.errors import BpfmError
from bpfm.io import storage

THREADS = 8  # footers are small reads: on S3 each is a round trip, so several at once
HASH_BLOCK = 8 << 20


def _columns(schema: pa.Schema) -> list[tuple[str, str]]:
    return [(f.name, str(f.type)) for f in schema]


def check_part(shards: ShardSet, part: dict, deep: bool) -> str | None:
    """The first problem of one part, or None when it matches its manifest entry."""
    generation = shards.generation
    if not part["path"].startswith(f"{generation}/") or ".." in part["path"].split("/"):
        return f"path outside the generation folder {generation}/"
    fs, path = shards.filesystem, shards.part_path(part)
    try:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return "missing"
        if info.size != part["bytes"]:
            return f"{info.size} bytes, the manifest says {part['bytes']} (truncated or replaced?)"
        with fs.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle).metadata
        if meta.num_rows != part["rows"]:
            return f"{meta.num_rows} rows in its footer, the manifest says {part['rows']}"
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        if "row_groups" in part and groups != part["row_groups"]:
            return f"row groups {groups}, the manifest says {part['row_groups']}"
        if _columns(meta.schema.to_arrow_schema()) != _columns(shards.options.schema):
            return "its columns are not the manifest's schema"
        if deep:
            if not part.get("sha256"):
                return "the manifest records no sha256 for it"
            if storage.sha256_file(path, HASH_BLOCK, fs=fs) != part["sha256"]:
                return "sha256 differs from the manifest's: its bytes changed"
    except (OSError, pa.ArrowException) as err:
        return f"unreadable ({' '.join(str(err).split())[:200]})"
    return None


def _totals(manifest: dict) -> list[str]:
    """Problems of the manifest itself: totals that do not add up to its parts."""
    problems = []
    parts = manifest["parts"]
    for key in ("rows", "bytes"):
        total = sum(p[key] for p in parts)
        if manifest[key] != total:
            problems.append(f"{key}: {manifest[key]}, its parts add up to {total}")
    partitions: dict[str, dict[str, int]] = {}
    for p in parts:
        by_subset = partitions.setdefault(p["source"], {})
        by_subset[p["subset"]] = by_subset.get(p["subset"], 0) + p["rows"]
    if manifest["partitions"] != partitions:
        problems.append("partitions: row counts differ from its parts'")
    return problems


def verify_shards(shards: ShardSet, *, deep: bool = False) -> dict[str, Any]:
    """Every problem found: {"ok", "problems": [{"path", "problem"}], counts...}."""
    manifest = shards.manifest
    with ThreadPoolExecutor(THREADS) as pool:
        found = list(pool.map(lambda p: check_part(shards, p, deep), manifest["parts"]))
    problems = [  # the parts first: a total that does not add up usually follows from one
        {"path": part["path"], "problem": problem}
        for part, problem in zip(manifest["parts"], found, strict=True)
        if problem is not None
    ]
    problems += [{"path": MANIFEST, "problem": p} for p in _totals(manifest)]
    return {
        "uri": shards.uri,
        "generation": shards.generation,
        "deep": deep,
        "ok": not problems,
        "parts": len(manifest["parts"]),
        "rows": manifest["rows"],
        "bytes": manifest["bytes"],
        "problems": problems,
    }


def describe_problems(report: dict[str, Any]) -> str:
    """One line: how many problems, and the first."""
    problems = report["problems"]
    first = problems[0]
    more = f" (and {len(problems) - 1} more: `bpfm data verify`)" if len(problems) > 1 else ""
    return (
        f"{report['uri']}: {first['path']}: {first['problem']}{more}; the set fails verification"
        " (`bpfm data shard` with the same inputs repairs it)"
    )


def require_intact(shards: ShardSet) -> None:
    """The cheap check before training: a one-line BpfmError when any part fails it."""
    if getattr(shards, "verified_on_read", False):
        return
    report = verify_shards(shards)
    if not report["ok"]:
        raise BpfmError(describe_problems(report))
