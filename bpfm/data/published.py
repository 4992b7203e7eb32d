"""Opening a published shard set: `open_shards` reads its manifest (the published generation or a
pinned one) and reads its parts directly or, for a remote set, through this node's cache
(`bpfm.data.cache`); `inspect_shards` summarises one."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bpfm.data.cache import CachedShardSet
from bpfm.data.shardset import MANIFEST, READABLE_VERSIONS, ShardSet, read_manifest
from bpfm.errors import BpfmError
from bpfm.io import storage


def open_shards(
    uri: str | ShardSet, generation: str | None = None, *, cache: bool = False
) -> ShardSet:
    """Open a published shard set; a folder without `_manifest.json` is refused.

    `generation`: the generation a run pinned (its checkpoint names it): the published one, or
    one of the previous generations a republish keeps (`bpfm.data.generations`). `cache`: read
    a remote set's parts through this node's cache (`bpfm.data.cache`; local sets ignore it)."""
    if isinstance(uri, ShardSet):
        return uri
    uri = str(uri)
    manifest = read_manifest(uri)
    if manifest is None:
        raise BpfmError(
            f"{uri}: no {MANIFEST}: not a bpfm shard set, or its conversion "
            "did not finish (run `bpfm data shard` again)"
        )
    if generation and generation != manifest["generation"]:
        pinned = read_manifest(uri, generation)
        if pinned is None or pinned["generation"] != generation:
            raise BpfmError(
                f"{uri}: generation {generation} is no longer kept (published now: "
                f"{manifest['generation']}; `bpfm data gc` or later publishes removed it)"
            )
        manifest = pinned
    if manifest["schema_version"] not in READABLE_VERSIONS:
        raise BpfmError(
            f"{uri}: {MANIFEST}: schema_version {manifest['schema_version']} is not "
            f"supported (this bpfm reads {' and '.join(map(str, READABLE_VERSIONS))})"
        )
    if cache and not storage.is_local(uri):
        return CachedShardSet(uri, manifest)
    return ShardSet(uri, manifest)


def _stats(values: pa.ChunkedArray) -> tuple[float, float]:
    array = values.to_numpy().astype(np.float64)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def inspect_shards(uri: str) -> dict:
    """Rows, subjects and SBP/DBP mean and SD per source and subset, bytes, schema version."""
    shards = open_shards(uri)
    partitions = {}
    for source in shards.sources():
        for subset in shards.subsets(source):
            with storage.storage_errors(shards.uri):
                table = shards.dataset(source, [subset]).to_table(columns=["subject", "sbp", "dbp"])
            sbp, dbp = _stats(table["sbp"]), _stats(table["dbp"])
            partitions[f"{source}/{subset}"] = {
                "rows": table.num_rows,
                "subjects": len(pc.unique(table["subject"])),
                "sbp_mean": sbp[0],
                "sbp_sd": sbp[1],
                "dbp_mean": dbp[0],
                "dbp_sd": dbp[1],
            }
    manifest = shards.manifest
    return {
        "uri": shards.uri,
        "schema_version": manifest["schema_version"],
        "generation": manifest["generation"],
        "created": manifest.get("created"),
        "rows": manifest["rows"],
        "bytes": manifest["bytes"],
        "parts": len(manifest["parts"]),
        "sources": [s["name"] for s in manifest["sources"]],
        "dropped": manifest["dropped"],
        "partitions": partitions,
    }
