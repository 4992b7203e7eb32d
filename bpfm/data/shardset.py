"""Shard-set format (DESIGN section 3, schema v2 below) and `ShardSet`, one published set
(opened by `bpfm.data.published.open_shards`).

A set is named by its `_manifest.json` (written by `bpfm.data.shards`); readers see exactly the
parts it lists under `gen-<key>/source=<src>/subset=<name>/`, never a half-written generation.

Schema v2 (written by default) differs from DESIGN's v1 in the signal columns only: ECG and PPG
share one column `ecg_ppg`, fixed_size_binary(10000) holding a row-major float32 [2, 1250]
(ECG_F then PPG_F, little-endian), and `abp` is fixed_size_binary(5000); signal columns are not
compressed. A local row group then reads as zero-copy [n, 2, 1250] views of the mapped file,
and a batch is one contiguous gather of whole rows: an order of magnitude faster to load than
v1's fixed_size_list, which Parquet rebuilds value by value (zstd saves only ~10% on float
signals). v1 sets (`signals` "list", or "bytes": fixed_size_binary(5000) per channel)
still read everywhere and can still be written (`ShardOptions(signals="list")`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bpfm.errors import BpfmError
from bpfm.io import storage

READABLE_VERSIONS = (1, 2)
MANIFEST = "_manifest.json"
WINDOW = 1250
ROW_GROUP_SIZE = 4096
ROWS_PER_PART = 16384
# Each part also records the sha256 of every block of this many bytes: a node cache checks a
# part block by block as it lands, so a reader can take a row group before the whole part is in
# (`bpfm.data.cache`). 8 MB: ~7 blocks to a 4,096-row group, ~90 hashes a GB in the manifest.
BLOCK_BYTES = 8 << 20
SIGNAL_LIST = pa.list_(pa.field("item", pa.float32(), nullable=False), WINDOW)  # v1
SIGNAL_BYTES = pa.binary(4 * WINDOW)  # float32 little-endian [1250]
SIGNAL_PAIR = pa.binary(2 * 4 * WINDOW)  # float32 little-endian [2, 1250]: ECG, PPG
SIGNAL_COLUMNS = ("ecg_ppg", "ecg", "ppg", "abp")
SIGNAL_ENCODINGS = {"packed": 2, "list": 1, "bytes": 1}  # ShardOptions.signals -> schema version
SCHEMA_VERSION = SIGNAL_ENCODINGS["packed"]  # what the writer produces by default


def _schema(signals: str, include_abp: bool) -> pa.Schema:
    if signals == "packed":
        waves = [pa.field("ecg_ppg", SIGNAL_PAIR, nullable=False)]
        abp = SIGNAL_BYTES
    else:
        abp = SIGNAL_LIST if signals == "list" else SIGNAL_BYTES
        waves = [pa.field("ecg", abp, nullable=False), pa.field("ppg", abp, nullable=False)]
    return pa.schema([
        pa.field("segment_id", pa.string(), nullable=False),
        pa.field("subject", pa.string(), nullable=False),
        *waves,
        *([pa.field("abp", abp)] if include_abp else []),
        pa.field("sbp", pa.float32(), nullable=False),
        pa.field("dbp", pa.float32(), nullable=False),
        pa.field("age", pa.float32()),
        pa.field("height", pa.float32()),
        pa.field("weight", pa.float32()),
        pa.field("bmi", pa.float32()),
        pa.field("gender", pa.string()),
    ])


SCHEMA = _schema("packed", include_abp=True)
SCHEMA_V1 = _schema("list", include_abp=True)


@dataclass(frozen=True)
class ShardOptions:
    """How a shard set is written (recorded in its manifest; part of the conversion key).

    `signals`: "packed" writes schema v2 (see the module docstring); "list" writes DESIGN's v1
    (fixed_size_list<float32>[1250] per channel, zstd); "bytes" the v1 columns as
    fixed_size_binary(5000). `include_abp=False` drops the abp column rather than writing
    nulls: pyarrow < 26 cannot read null fixed-size lists from Parquet (apache/arrow#35692).
    `row_group_size`: rows a row group; `rows_per_part`: a part is closed after the row group
    that brings it to this many rows (so it holds a whole number of row groups), and each input
    reserves part numbers at this rate (`describe_sources`)."""

    include_abp: bool = True
    drop_invalid: bool = False
    signals: str = "packed"
    rows_per_part: int = ROWS_PER_PART
    row_group_size: int = ROW_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.signals not in SIGNAL_ENCODINGS:
            choices = ", ".join(SIGNAL_ENCODINGS)
            raise BpfmError(f"signals: '{self.signals}' unknown (choose one of {choices})")
        for name in ("rows_per_part", "row_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BpfmError(f"{name}: expected a positive integer, got {value!r}")

    @property
    def schema_version(self) -> int:
        return SIGNAL_ENCODINGS[self.signals]

    @property
    def schema(self) -> pa.Schema:
        return _schema(self.signals, self.include_abp)

    @property
    def compression(self) -> str | dict[str, str]:
        """zstd everywhere for "list"; else raw signals (a dict: keys are leaf column paths)."""
        if self.signals == "list":
            return "zstd"
        return {f.name: "none" if f.name in SIGNAL_COLUMNS else "zstd" for f in self.schema}

    @property
    def page_options(self) -> dict[str, int]:
        """ParquetWriter options: raw signals get one data page per row group (pyarrow's default
        cuts pages of 1024 rows), so a row group's signals are one block of the file for readers
        that map it; bpfm's loader lets pyarrow decode either layout."""
        if self.signals == "list":
            return {}
        return {"write_batch_size": self.row_group_size, "data_page_size": 64 << 20}

    @property
    def signal_layout(self) -> dict[str, str]:
        """How each signal column holds its values (written into the manifest for readers
        without bpfm)."""
        one = f"float32 [{WINDOW}]" if self.signals == "list" else f"float32 LE [{WINDOW}]"
        if self.signals == "packed":
            layout = {"ecg_ppg": f"float32 LE [2, {WINDOW}] per row: ECG_F, then PPG_F"}
        else:
            layout = {"ecg": f"{one}: ECG_F", "ppg": f"{one}: PPG_F"}
        if self.include_abp:
            layout["abp"] = f"{one}: ABP_Raw (mmHg)"
        return layout

    def as_dict(self) -> dict:
        return {
            "include_abp": self.include_abp,
            "drop_invalid": self.drop_invalid,
            "signals": self.signals,
            "row_group_size": self.row_group_size,
            "rows_per_part": self.rows_per_part,
            "compression": self.compression,
        }

    @classmethod
    def from_dict(cls, options: dict) -> ShardOptions:
        """From a manifest's `options` (v1 manifests may lack `signals`: "list"; one lacking the
        sizes gets the constants)."""
        return cls(
            options["include_abp"],
            options["drop_invalid"],
            options.get("signals", "list"),
            options.get("rows_per_part", ROWS_PER_PART),
            options.get("row_group_size", ROW_GROUP_SIZE),
        )


def signal_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A signal column of any version as float32 [n, 1250] ("ecg", "ppg", "abp") or
    [n, 2, 1250] ("ecg_ppg"), zero-copy for the binary encodings (the writer stores no nulls:
    a missing ABP is NaN)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_fixed_size_binary(column.type):
        width = column.type.byte_width // 4
        shape = (-1, 2, WINDOW) if width == 2 * WINDOW else (-1, WINDOW)
        count, offset = len(column) * width, column.offset * 4 * width
        return np.frombuffer(column.buffers()[1], "<f4", count, offset).reshape(shape)
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, WINDOW)


PARTITIONING = pa.schema([("source", pa.string()), ("subset", pa.string())])


# ----------------------------------------------------------------------------------- reading


# What every reader relies on: key -> type (a manifest lacking one is refused in one line).
MANIFEST_KEYS = {"format": str, "schema_version": int, "key": str, "generation": str,
                 "options": dict, "rows": int, "bytes": int, "partitions": dict,
                 "dropped": dict, "sources": list, "parts": list}
PART_KEYS = {"path": str, "source": str, "subset": str, "rows": int, "bytes": int}
OPTION_KEYS = ("include_abp", "drop_invalid")


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", dict: "an object", list: "a list"}[kind]


def parse_manifest(data: bytes, uri: str) -> dict:
    """A manifest's bytes -> the manifest, checked for every key readers use; any problem is one
    BpfmError naming the file (invalid JSON, a missing key, a value of the wrong type)."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BpfmError(f"{uri}: not valid JSON ({err}): truncated or edited by hand?") from None
    if not isinstance(manifest, dict):
        raise BpfmError(f"{uri}: not a JSON object")
    for key, kind in MANIFEST_KEYS.items():
        if key not in manifest:
            raise BpfmError(f"{uri}: {key}: missing key")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise BpfmError(f"{uri}: {key}: expected {_type_name(kind)}")
    for key in OPTION_KEYS:
        if key not in manifest["options"]:
            raise BpfmError(f"{uri}: options.{key}: missing key")
    try:  # the values readers take from it (sizes, signal encoding)
        ShardOptions.from_dict(manifest["options"])
    except BpfmError as err:
        raise BpfmError(f"{uri}: options.{err}") from None
    for i, part in enumerate(manifest["parts"]):
        if not isinstance(part, dict):
            raise BpfmError(f"{uri}: parts[{i}]: expected an object")
        for key, kind in PART_KEYS.items():
            if not isinstance(part.get(key), kind) or isinstance(part.get(key), bool):
                problem = "missing key" if key not in part else f"expected {_type_name(kind)}"
                raise BpfmError(f"{uri}: parts[{i}].{key}: {problem}")
        if "block_sha256" in part:
            _check_blocks(part, f"{uri}: parts[{i}]")
    for i, source in enumerate(manifest["sources"]):
        if not isinstance(source, dict) or not isinstance(source.get("name"), str):
            raise BpfmError(f"{uri}: sources[{i}]: expected an object with a name")
    return manifest


def _check_blocks(part: dict, where: str) -> None:
    """A part's optional block checksums (written since the node cache reads by block): one
    sha256 per `block_bytes` of the part, the last block shorter."""
    size, hashes = part.get("block_bytes"), part["block_sha256"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise BpfmError(f"{where}.block_bytes: expected a positive integer")
    if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
        raise BpfmError(f"{where}.block_sha256: expected a list of strings")
    if len(hashes) != -(-part["bytes"] // size):
        raise BpfmError(f"{where}.block_sha256: {len(hashes)} checksums for "
                        f"{-(-part['bytes'] // size)} blocks of {size} bytes")


def read_manifest(out_uri: str, generation: str | None = None) -> dict | None:
    """The published manifest (`out/_manifest.json`), or the copy a generation folder keeps
    (`out/<generation>/_manifest.json`, for runs pinned to it); None when there is none."""
    uri = storage.join(out_uri, *([generation] if generation else []), MANIFEST)
    return parse_manifest(storage.read_bytes(uri), uri) if storage.exists(uri) else None


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

    @property
    def generation(self) -> str:
        return self.manifest["generation"]

    @property
    def options(self) -> ShardOptions:
        return ShardOptions.from_dict(self.manifest["options"])

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

    def open_part(self, part: dict) -> pq.ParquetFile:
        """`part` for reading row groups: a local file memory-mapped (no read copy), an object
        in a store with its column chunks read as coalesced ranges."""
        path = self.part_path(part)
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            return pq.ParquetFile(path, memory_map=True)
        return pq.ParquetFile(self.filesystem.open_input_file(path), pre_buffer=True)

    def will_read(self, row_groups: Sequence[tuple[dict, int]]) -> None:
        """A reader's (part, row group) order: nothing to do here; a node cache copies in it."""

    def dataset(
        self, source: str | None = None, subsets: Sequence[str] | None = None
    ) -> pads.Dataset:
        """A pyarrow dataset over exactly the manifest's parts, with `source`/`subset` columns."""
        paths = [self.part_path(p) for p in self.parts(source, subsets)]
        schema = pa.unify_schemas([self.options.schema, PARTITIONING])
        with storage.storage_errors(self.uri):
            return pads.dataset(
                paths,
                schema=schema,
                format="parquet",
                filesystem=self.filesystem,
                partitioning=pads.partitioning(PARTITIONING, flavor="hive"),
                partition_base_dir=f"{self.root}/{self.manifest['generation']}",
            )
