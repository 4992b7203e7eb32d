"""Shard-set format (schema v1, DESIGN section 3) and reading a published set: `open_shards`.

A set is named by its `_manifest.json` (written by `bpfm.data.shards`); readers see exactly the
parts it lists under `gen-<key>/source=<src>/subset=<name>/`, never a half-written generation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from bpfm import storage
from bpfm.errors import BpfmError

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"
WINDOW = 1250
ROW_GROUP_SIZE = 4096
ROWS_PER_PART = 16384
SIGNAL_LIST = pa.list_(pa.field("item", pa.float32(), nullable=False), WINDOW)
SIGNAL_BYTES = pa.binary(4 * WINDOW)  # float32 little-endian, see ShardOptions.signals
SIGNAL_COLUMNS = ("ecg", "ppg", "abp")


def _schema(signal: pa.DataType, include_abp: bool) -> pa.Schema:
    return pa.schema([
        pa.field("segment_id", pa.string(), nullable=False),
        pa.field("subject", pa.string(), nullable=False),
        pa.field("ecg", signal, nullable=False),
        pa.field("ppg", signal, nullable=False),
        *([pa.field("abp", signal)] if include_abp else []),
        pa.field("sbp", pa.float32(), nullable=False),
        pa.field("dbp", pa.float32(), nullable=False),
        pa.field("age", pa.float32()),
        pa.field("height", pa.float32()),
        pa.field("weight", pa.float32()),
        pa.field("bmi", pa.float32()),
        pa.field("gender", pa.string()),
    ])  # fmt: skip


SCHEMA = _schema(SIGNAL_LIST, include_abp=True)


@dataclass(frozen=True)
class ShardOptions:
    """How a shard set is written (recorded in its manifest; part of the conversion key).

    `signals`: "list" stores schema v1 as DESIGN section 3 has it, fixed_size_list<float32>[1250]
    with zstd. Parquet has no fixed-size list, so readers rebuild every row from per-value
    repetition/definition levels: about 10x slower than "bytes", which stores the same float32
    values as fixed_size_binary(5000) without compression (float signals gain ~10% from zstd).
    The loader reads both alike. `include_abp=False` drops the abp column rather than writing
    nulls: pyarrow < 26 cannot read null fixed-size lists from Parquet (apache/arrow#35692)."""

    include_abp: bool = True
    drop_invalid: bool = False
    signals: str = "list"

    def __post_init__(self) -> None:
        if self.signals not in ("list", "bytes"):
            raise BpfmError(f"signals: '{self.signals}' unknown (choose list or bytes)")

    @property
    def schema(self) -> pa.Schema:
        signal = SIGNAL_LIST if self.signals == "list" else SIGNAL_BYTES
        return _schema(signal, self.include_abp)

    @property
    def compression(self) -> str | dict[str, str]:
        """zstd everywhere, except for "bytes" signals (a dict: keys are leaf column paths)."""
        if self.signals == "list":
            return "zstd"
        return {f.name: "none" if f.name in SIGNAL_COLUMNS else "zstd" for f in self.schema}

    def as_dict(self) -> dict:
        return {
            "include_abp": self.include_abp,
            "drop_invalid": self.drop_invalid,
            "signals": self.signals,
            "row_group_size": ROW_GROUP_SIZE,
            "rows_per_part": ROWS_PER_PART,
            "compression": self.compression,
        }

    @classmethod
    def from_dict(cls, options: dict) -> ShardOptions:
        return cls(options["include_abp"], options["drop_invalid"], options.get("signals", "list"))


PARTITIONING = pa.schema([("source", pa.string()), ("subset", pa.string())])


# ----------------------------------------------------------------------------------- reading


def _read_manifest(out_uri: str) -> dict | None:
    uri = storage.join(out_uri, MANIFEST)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


class ShardSet:
    """A published shard set: its manifest and the parts it names (and nothing else)."""

    def __init__(self, uri: str, manifest: dict):
        self.uri = uri
        self.manifest = manifest
        self.filesystem, self.root = storage.filesystem_for(uri)

    def __repr__(self) -> str:
        return f"ShardSet({self.uri!r}, rows={self.manifest['rows']})"

    def __getstate__(self) -> dict:  # filesystems are rebuilt from the URI in the new process
        return {"uri": self.uri, "manifest": self.manifest}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["uri"], state["manifest"])

    def sources(self) -> list[str]:
        return sorted(self.manifest["partitions"])

    def subsets(self, source: str) -> list[str]:
        return sorted(self.manifest["partitions"].get(source, {}))

    def rows(self, source: str, subset: str) -> int:
        return self.manifest["partitions"].get(source, {}).get(subset, 0)

    def parts(self, source: str | None = None, subsets: Sequence[str] | None = None) -> list[dict]:
        return [
            p
            for p in self.manifest["parts"]
            if (source is None or p["source"] == source)
            and (subsets is None or p["subset"] in subsets)
        ]

    def part_path(self, part: dict) -> str:
        return f"{self.root}/{part['path']}"

    def dataset(
        self, source: str | None = None, subsets: Sequence[str] | None = None
    ) -> pads.Dataset:
        """A pyarrow dataset over exactly the manifest's parts, with `source`/`subset` columns."""
        paths = [self.part_path(p) for p in self.parts(source, subsets)]
        options = ShardOptions.from_dict(self.manifest["options"])
        schema = pa.unify_schemas([options.schema, PARTITIONING])
        with storage.storage_errors(self.uri):
            return pads.dataset(
                paths,
                schema=schema,
                format="parquet",
                filesystem=self.filesystem,
                partitioning=pads.partitioning(PARTITIONING, flavor="hive"),
                partition_base_dir=f"{self.root}/{self.manifest['generation']}",
            )


def open_shards(uri: str | ShardSet) -> ShardSet:
    """Open a published shard set; a folder without `_manifest.json` is refused."""
    if isinstance(uri, ShardSet):
        return uri
    uri = str(uri)
    manifest = _read_manifest(uri)
    if manifest is None:
        raise BpfmError(
            f"{uri}: no {MANIFEST}: not a bpfm shard set, or its conversion "
            "did not finish (run `bpfm data shard` again)"
        )
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BpfmError(
            f"{uri}: {MANIFEST}: schema_version {manifest.get('schema_version')} "
            f"is not supported (expected {SCHEMA_VERSION})"
        )
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
        "created": manifest["created"],
        "rows": manifest["rows"],
        "bytes": manifest["bytes"],
        "parts": len(manifest["parts"]),
        "sources": [s["name"] for s in manifest["sources"]],
        "dropped": manifest["dropped"],
        "partitions": partitions,
    }
