"""PulseDB -> Parquet shards (schema v2, see `bpfm.data.shardset`) in a folder or on s3://.

The format and the reading side live in `bpfm.data.shardset`, the manifest in
`bpfm.data.manifest` (both re-exported here).

Layout under the output URI:
    _manifest.json                                      written last: makes the set visible
    gen-<key>/_manifest.json                            the generation's own copy (pinned runs)
    gen-<key>/source=<src>/subset=<name>/part-NNNNN.parquet

`<key>` hashes the sources' sha256s and the options. Parts go straight into their generation
folder, which no manifest names until the conversion has finished: that folder is the staging
area. Publishing is one atomic manifest write; the previous generations beyond the kept ones
are deleted afterwards (`bpfm.data.generations`). Readers see the old set or the new one, never
a mix; a killed or interrupted conversion leaves nothing visible; an identical re-run finds its
key in the manifest, verifies the set and does nothing, or converts again the inputs whose
parts fail verification (`bpfm.data.repair`).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bpfm.data import repair
from bpfm.data.generations import publish_manifest, published_manifest
from bpfm.data.manifest import build_manifest, conversion_key, describe_sources
from bpfm.data.parallel import run_conversions
from bpfm.data.published import inspect_shards, open_shards
from bpfm.data.shardset import (
    BLOCK_BYTES,
    MANIFEST,
    ROW_GROUP_SIZE,
    ROWS_PER_PART,
    SCHEMA,
    SCHEMA_V1,
    SCHEMA_VERSION,
    SIGNAL_BYTES,
    SIGNAL_LIST,
    SIGNAL_PAIR,
    WINDOW,
    ShardOptions,
    ShardSet,
    read_manifest,
    signal_array,
)
from bpfm.data.verify import verify_shards
from bpfm.errors import BpfmError, DataError
from bpfm.io import interrupts, storage

__all__ = [  # the reading side and the manifest helpers are re-exported: import them from here
    "MANIFEST",
    "ROW_GROUP_SIZE",
    "SCHEMA",
    "SCHEMA_V1",
    "SCHEMA_VERSION",
    "WINDOW",
    "ShardOptions",
    "ShardSet",
    "build_manifest",
    "conversion_key",
    "convert_file",
    "describe_sources",
    "find_inputs",
    "inspect_shards",
    "open_shards",
    "read_manifest",
    "signal_array",
    "write_shards",
]

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024
PARALLEL_MIN_BYTES = 256 << 20
DEFAULT_OPTIONS = ShardOptions()  # frozen, so one shared default is safe


def find_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Input files, with folders expanded to the *_Subset.mat files beneath them."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = sorted(path.rglob("*_Subset.mat"))
            if not files:
                raise DataError(path, "input", "folder holds no *_Subset.mat files")
            for file in files:
                if not file.is_file():
                    raise DataError(file, "input", "is a folder, expected a .mat file")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(path, "input", "no such file or folder")
    return sorted({p.resolve() for p in found})


def _batch_table(batch, subset: str, rows: np.ndarray, options: ShardOptions) -> pa.Table:
    """Rows `rows` of a SegmentBatch as a table of `options.schema` (signals zero-copy)."""
    def raw(values: np.ndarray, kind: pa.DataType) -> pa.Array:
        flat = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
        return pa.FixedSizeBinaryArray.from_buffers(kind, len(rows), [None, pa.py_buffer(flat)])

    def signal(values: np.ndarray) -> pa.Array:
        if options.signals == "list":
            flat = np.ascontiguousarray(values[rows], dtype="<f4").reshape(-1)
            return pa.FixedSizeListArray.from_arrays(pa.array(flat), type=SIGNAL_LIST)
        return raw(values[rows], SIGNAL_BYTES)

    def optional(values: np.ndarray) -> pa.Array:
        values = np.asarray(values[rows], dtype=np.float32)
        return pa.array(values, mask=np.isnan(values))

    subjects = [batch.subject[i] for i in rows]
    ids = [f"{subset}/{s}/{k}" for s, k in zip(subjects, batch.segment_index[rows], strict=True)]
    abp = batch.abp if batch.abp is not None else np.full_like(batch.ecg, np.nan)
    columns = [
        pa.array(ids, pa.string()),
        pa.array(subjects, pa.string()),
        *(
            [raw(np.stack([batch.ecg[rows], batch.ppg[rows]], axis=1), SIGNAL_PAIR)]
            if options.signals == "packed"
            else [signal(batch.ecg), signal(batch.ppg)]
        ),
        *([signal(abp)] if options.include_abp else []),
        pa.array(batch.sbp[rows], pa.float32()),
        pa.array(batch.dbp[rows], pa.float32()),
        optional(batch.age),
        optional(batch.height),
        optional(batch.weight),
        optional(batch.bmi),
        pa.array([batch.gender[i] or None for i in rows], pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=options.schema)


@dataclass
class _PartitionWriter:
    """Writes one (source, subset) partition as parts of whole row groups of
    `options.row_group_size` rows, a part closed once it holds `options.rows_per_part`."""

    fs: object
    folder: str  # filesystem path of the partition folder
    relative: str  # the same, relative to the shard set's root
    next_part: int
    source: str
    subset: str
    options: ShardOptions
    suffix: str = ""  # part names: part-NNNNN<suffix>.parquet (a repair's parts, see repair)
    pending: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0
    parts: list[dict] = field(default_factory=list)
    _sink: storage.HashingWriter | None = None
    _writer: pq.ParquetWriter | None = None
    _groups: list[int] = field(default_factory=list)

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.options.row_group_size:
            self._flush(self.options.row_group_size)

    def close(self) -> list[dict]:
        if self.pending_rows:
            self._flush(self.pending_rows)
        self._close_part()
        return self.parts

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.pending)
        group, rest = table.slice(0, n), table.slice(n)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self._writer is None:
            name = f"part-{self.next_part:05d}{self.suffix}.parquet"
            self._sink = storage.open_hashed_output(
                self.fs, f"{self.folder}/{name}", BLOCK_BYTES
            )
            self._writer = pq.ParquetWriter(
                self._sink,
                self.options.schema,
                compression=self.options.compression,
                use_dictionary=["subject", "gender"],
                write_statistics=["segment_id", "subject", "sbp", "dbp"],
                **self.options.page_options,
            )
            self.parts.append(
                {"path": f"{self.relative}/{name}", "source": self.source, "subset": self.subset}
            )
            self.next_part += 1
        self._writer.write_table(group, row_group_size=n)
        self._groups.append(n)
        if sum(self._groups) >= self.options.rows_per_part:
            self._close_part()

    def _close_part(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        self.parts[-1].update(
            rows=sum(self._groups),
            row_groups=self._groups,
            bytes=self._sink.size,
            sha256=self._sink.hexdigest(),
            block_bytes=BLOCK_BYTES,
            block_sha256=self._sink.block_sha256,
        )
        self._writer, self._sink, self._groups = None, None, []

    def abandon(self) -> None:
        """Close an open part after a failure, ignoring errors. An object store would otherwise
        finish the upload whenever the stream is garbage-collected, possibly after the caller
        has deleted the generation folder."""
        for closable in (self._writer, self._sink):
            if closable is not None:
                try:
                    closable.close()
                except Exception:  # the original error is the one worth reporting
                    pass
        self._writer, self._sink = None, None


def convert_file(
    input_path: str | Path,
    out_uri: str,
    *,
    generation: str,
    first_part: int = 0,
    options: ShardOptions = DEFAULT_OPTIONS,
    chunk_size: int = CHUNK_SIZE,
    should_stop: Callable[[], bool] | None = None,
    part_suffix: str = "",
) -> dict:
    """Convert one PulseDB file into parts under `out_uri/generation/` (unpublished).

    A plain function of its arguments (a process-pool or Ray task). Streams the file in chunks,
    so memory stays bounded whatever its size. Returns the parts written (path, rows, row
    groups, bytes, sha256) and the rows dropped per reason."""
    from bpfm.data.pulsedb import open_pulsedb  # lazy: h5py

    start = time.monotonic()
    fs, root = storage.filesystem_for(out_uri)
    writers: dict[str, _PartitionWriter] = {}

    def writer(source: str, subset: str) -> _PartitionWriter:
        if source not in writers:
            relative = f"{generation}/source={source}/subset={subset}"
            writers[source] = _PartitionWriter(
                fs, f"{root}/{relative}", relative, first_part, source, subset, options,
                part_suffix,
            )
        return writers[source]

    with open_pulsedb(input_path) as pulse:
        if pulse.n_segments == 0:
            raise DataError(input_path, "Subset", "empty subset: no segments")
        log.info("%s: converting %d segments -> %s", input_path, pulse.n_segments, out_uri)
        try:
            _write_batches(pulse, writer, out_uri, options, chunk_size, should_stop)
            with storage.storage_errors(out_uri):
                parts = [part for w in writers.values() for part in w.close()]
        except BaseException:
            for open_writer in writers.values():
                open_writer.abandon()
            raise
    rows = sum(part["rows"] for part in parts)
    if rows == 0 and not options.drop_invalid:
        raise DataError(input_path, "Subset", "empty subset: no segments")
    seconds = time.monotonic() - start
    log.info("%s: %d rows in %d parts, %d dropped, %.1f s", Path(input_path).name, rows,
             len(parts), sum(pulse.dropped.values()), seconds)
    return {
        "file": str(input_path),
        "subset": pulse.name,
        "kind": pulse.kind,
        "segments": pulse.n_segments,
        "rows": rows,
        "dropped": pulse.dropped,
        "parts": parts,
        "seconds": seconds,
    }


def _write_batches(pulse, writer, out_uri: str, options: ShardOptions, chunk_size: int,
                   should_stop: Callable[[], bool] | None) -> None:
    """Stream validated batches into the per-source partition writers, logging progress."""
    done, last_log = 0, time.monotonic()
    for batch in pulse.iter_batches(chunk_size=chunk_size, drop_invalid=options.drop_invalid):
        if should_stop is not None and should_stop():
            interrupts.check()  # a signal to this process, else another conversion failed
            raise BpfmError(f"{pulse.path}: conversion cancelled")
        sources = np.asarray(batch.source)
        for source in np.unique(sources):
            rows = np.flatnonzero(sources == source)
            table = _batch_table(batch, pulse.name, rows, options)
            with storage.storage_errors(out_uri):
                writer(str(source), pulse.name).add(table)
        done += len(batch)
        if time.monotonic() - last_log > 10:
            last_log = time.monotonic()
            log.info("%s: %d of %d segments converted", pulse.path.name, done, pulse.n_segments)


def write_shards(
    inputs: Sequence[str | Path],
    out_uri: str,
    *,
    include_abp: bool = True,
    drop_invalid: bool = False,
    workers: int | None = None,
    signals: str = "packed",
    rows_per_part: int = ROWS_PER_PART,
    row_group_size: int = ROW_GROUP_SIZE,
) -> dict:
    """Convert PulseDB files (or folders of *_Subset.mat) into a published shard set.

    Files convert in parallel processes (by default only when the input is large enough to pay
    for starting them); the manifest is written last. Returns the manifest, with
    `"up_to_date": True` when an identical conversion had already been published.
    `signals`, `rows_per_part`, `row_group_size`: see ShardOptions (the sizes are part of the
    conversion key: other sizes make another generation)."""
    out_uri = str(out_uri)
    files = find_inputs(inputs)
    start = time.monotonic()
    options = ShardOptions(include_abp, drop_invalid, signals, rows_per_part, row_group_size)
    sources = describe_sources(files, workers or multiprocessing.cpu_count(),
                               rows_per_part=options.rows_per_part)
    if workers is None:  # starting processes costs seconds: only worth it for large inputs
        large = sum(s["size"] for s in sources) >= PARALLEL_MIN_BYTES
        workers = min(len(files), multiprocessing.cpu_count()) if large else 1
    key = conversion_key(sources, options.as_dict())
    generation = f"gen-{key[:16]}"
    current = published_manifest(out_uri)
    task_options = {"generation": generation, "options": options}
    same = current if current is not None and current["key"] == key else None
    if same is None:  # not published now: this key's generation may still be kept, intact
        same = _own_copy(out_uri, generation, key)
    if same is not None:
        return _verified_or_repaired(out_uri, same, current, sources, task_options, workers)
    generation_uri = storage.join(out_uri, generation)
    storage.delete_dir(generation_uri)  # leftovers of a killed run with the same inputs
    try:
        results = run_conversions(convert_file, sources, out_uri, task_options, workers)
    except BaseException:
        storage.delete_dir(generation_uri)
        raise
    manifest = build_manifest(key, generation, sources, results, options)
    interrupts.check()  # a stop requested before this point publishes nothing
    manifest = publish_manifest(out_uri, manifest, current)
    seconds = time.monotonic() - start
    megabytes = sum(s["size"] for s in sources) / 1e6
    log.info(
        "%s: published %d rows in %d parts (%.0f MB of input in %.1f s, %.0f MB/s)",
        out_uri,
        manifest["rows"],
        len(manifest["parts"]),
        megabytes,
        seconds,
        megabytes / max(seconds, 1e-9),
    )
    return {**manifest, "up_to_date": False}


def _own_copy(out_uri: str, generation: str, key: str) -> dict | None:
    """The manifest copy of `generation`'s own folder when it is this key's (a set whose
    published manifest was damaged), else None."""
    try:
        copy = read_manifest(out_uri, generation)
    except BpfmError:
        return None
    return copy if copy is not None and copy["key"] == key else None


def _verified_or_repaired(out_uri: str, same: dict, current: dict | None, sources: list[dict],
                          task_options: dict, workers: int) -> dict:
    """An identical conversion exists: deep-verify it; publish it again when only the published
    manifest was missing or damaged, convert again only the sources whose parts fail (into new
    part files: the published ones stay readable until the new manifest replaces them)."""
    shards = ShardSet(out_uri, same)
    task_options = {**task_options, "generation": same["generation"]}
    report = verify_shards(shards, deep=True)
    interrupts.check()
    if report["ok"] and same is current:
        log.info("%s: already up to date (%s)", out_uri, same["generation"])
        return {**current, "up_to_date": True}
    for problem in report["problems"][:5]:
        log.warning("%s: %s: %s", out_uri, problem["path"], problem["problem"])
    bad, kept = repair.plan(same, sources, report)
    suffix = repair.new_suffix()
    todo = [sources[i] for i in bad]
    log.info("%s: converting %d of %d inputs again (%s)", out_uri, len(todo), len(sources),
             ", ".join(Path(s["path"]).name for s in todo) or "none; republishing")
    try:
        fresh = run_conversions(convert_file, todo, out_uri, {**task_options,
                                "part_suffix": suffix}, workers)
    except BaseException:
        repair.delete_suffixed(shards, suffix)
        raise
    results = {**kept, **dict(zip(bad, fresh, strict=True))}
    manifest = build_manifest(same["key"], same["generation"], sources,
                              [results[i] for i in range(len(sources))], task_options["options"])
    interrupts.check()
    manifest = publish_manifest(out_uri, manifest, current)
    repair.delete_parts(shards, {p["path"] for p in same["parts"]} -
                        {p["path"] for p in manifest["parts"]})
    log.info("%s: repaired %s (%d rows)", out_uri, same["generation"], manifest["rows"])
    return {**manifest, "up_to_date": False, "repaired": [Path(s["path"]).name for s in todo]}
