"""PulseDB -> Parquet shards (schema v1, DESIGN section 3) in a folder or on s3://: the writer.

The format and the reading side live in `bpfm.data.shardset` (re-exported here).

Layout under the output URI:
    _manifest.json                                      written last: makes the set visible
    gen-<key>/source=<src>/subset=<name>/part-NNNNN.parquet

`<key>` hashes the sources' sha256s and the options. Parts go straight into their generation
folder, which no manifest names until the conversion has finished: that folder is the staging
area. Publishing is one atomic manifest write; older generations are deleted afterwards. Readers
see the old set or the new one, never a mix; a killed conversion leaves nothing visible; an
identical re-run finds its key in the manifest and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bpfm import storage
from bpfm.data.shardset import (
    MANIFEST,
    ROW_GROUP_SIZE,
    ROWS_PER_PART,
    SCHEMA,
    SCHEMA_VERSION,
    SIGNAL_BYTES,
    SIGNAL_LIST,
    WINDOW,
    ShardOptions,
    ShardSet,
    _read_manifest,
    inspect_shards,
    open_shards,
)
from bpfm.errors import BpfmError, DataError

__all__ = [  # the reading side is re-exported: callers import it from here
    "MANIFEST",
    "SCHEMA",
    "WINDOW",
    "ShardOptions",
    "ShardSet",
    "convert_file",
    "find_inputs",
    "inspect_shards",
    "open_shards",
    "write_shards",
]

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024
PARALLEL_MIN_BYTES = 256 << 20
DEFAULT_OPTIONS = ShardOptions()  # frozen, so one shared default is safe


# ----------------------------------------------------------------------------------- writing


def find_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Input files, with folders expanded to the *_Subset.mat files beneath them."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = sorted(path.rglob("*_Subset.mat"))
            if not files:
                raise DataError(path, "input", "folder holds no *_Subset.mat files")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(path, "input", "no such file or folder")
    return sorted({p.resolve() for p in found})


def _batch_table(batch, subset: str, rows: np.ndarray, options: ShardOptions) -> pa.Table:
    """Rows `rows` of a SegmentBatch as a table of `options.schema` (signals zero-copy)."""

    def signal(values: np.ndarray) -> pa.Array:
        flat = np.ascontiguousarray(values[rows], dtype="<f4").reshape(-1)
        if options.signals == "bytes":
            return pa.FixedSizeBinaryArray.from_buffers(
                SIGNAL_BYTES, len(rows), [None, pa.py_buffer(flat)]
            )
        return pa.FixedSizeListArray.from_arrays(pa.array(flat), type=SIGNAL_LIST)

    def optional(values: np.ndarray) -> pa.Array:
        values = np.asarray(values[rows], dtype=np.float32)
        return pa.array(values, mask=np.isnan(values))

    subjects = [batch.subject[i] for i in rows]
    ids = [f"{subset}/{s}/{k}" for s, k in zip(subjects, batch.segment_index[rows], strict=True)]
    abp = batch.abp if batch.abp is not None else np.full_like(batch.ecg, np.nan)
    columns = [
        pa.array(ids, pa.string()),
        pa.array(subjects, pa.string()),
        signal(batch.ecg),
        signal(batch.ppg),
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
    """Writes one (source, subset) partition as parts of whole row groups of ROW_GROUP_SIZE."""

    fs: object
    folder: str  # filesystem path of the partition folder
    relative: str  # the same, relative to the shard set's root
    next_part: int
    source: str
    subset: str
    options: ShardOptions
    pending: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0
    parts: list[dict] = field(default_factory=list)
    _sink: storage.HashingWriter | None = None
    _writer: pq.ParquetWriter | None = None
    _groups: list[int] = field(default_factory=list)

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= ROW_GROUP_SIZE:
            self._flush(ROW_GROUP_SIZE)

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
            name = f"part-{self.next_part:05d}.parquet"
            self._sink = storage.open_hashed_output(self.fs, f"{self.folder}/{name}")
            self._writer = pq.ParquetWriter(
                self._sink,
                self.options.schema,
                compression=self.options.compression,
                use_dictionary=["subject", "gender"],
                write_statistics=["segment_id", "subject", "sbp", "dbp"],
            )
            self.parts.append(
                {"path": f"{self.relative}/{name}", "source": self.source, "subset": self.subset}
            )
            self.next_part += 1
        self._writer.write_table(group, row_group_size=n)
        self._groups.append(n)
        if sum(self._groups) >= ROWS_PER_PART:
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
) -> dict:
    """Convert one PulseDB file into parts under `out_uri/generation/` (unpublished).

    A plain function of its arguments (a process-pool or Ray task). Streams the file in chunks,
    so memory stays bounded whatever its size. Returns the parts written (path, rows, row
    groups, bytes, sha256) and the rows dropped per reason."""
    from bpfm.data.pulsedb import open_pulsedb

    start = time.monotonic()
    fs, root = storage.filesystem_for(out_uri)
    writers: dict[str, _PartitionWriter] = {}

    def writer(source: str, subset: str) -> _PartitionWriter:
        if source not in writers:
            relative = f"{generation}/source={source}/subset={subset}"
            writers[source] = _PartitionWriter(
                fs, f"{root}/{relative}", relative, first_part, source, subset, options
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
             len(parts), sum(pulse.dropped.values()), seconds)  # fmt: skip
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
                   should_stop: Callable[[], bool] | None) -> None:  # fmt: skip
    """Stream validated batches into the per-source partition writers, logging progress."""
    done, last_log = 0, time.monotonic()
    for batch in pulse.iter_batches(chunk_size=chunk_size, drop_invalid=options.drop_invalid):
        if should_stop is not None and should_stop():
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


# Worker-process plumbing: errors cross the process boundary as plain dicts (DataError takes
# three arguments, so it does not survive pickling), and one shared event cancels the others.
_ABORT = None


def _init_worker(abort, level: int) -> None:
    global _ABORT
    _ABORT = abort
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s[%(process)d]: %(message)s", datefmt="%H:%M:%S"
    )


def _convert_task(path: str, out_uri: str, options: dict) -> dict:
    try:
        return convert_file(path, out_uri, should_stop=_ABORT.is_set, **options)
    except DataError as err:
        return {"error": {"file": err.file, "field": err.field, "problem": err.problem}}
    except BpfmError as err:
        return {"error": {"message": str(err)}}


def _raise_task_error(error: dict) -> None:
    if "message" in error:
        raise BpfmError(error["message"])
    raise DataError(error["file"], error["field"], error["problem"])


def _conversion_key(sources: list[dict], options: dict) -> str:
    described = {
        "schema_version": SCHEMA_VERSION,
        "options": options,
        "sources": sorted((s["subset"], s["sha256"]) for s in sources),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _describe_sources(files: list[Path], workers: int) -> list[dict]:
    """Size, sha256 and partition name of every input; two inputs may not share a subset name
    unless they are Subj_Wins files (their parts are numbered apart, see `first_part`)."""
    from bpfm.data.pulsedb import open_pulsedb

    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = list(pool.map(storage.sha256_file, files))
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
            source["segments"] / ROWS_PER_PART
        )
    return sources


def _run_conversions(sources: list[dict], out_uri: str, options: dict, workers: int) -> list:
    if workers <= 1 or len(sources) == 1:
        return [
            convert_file(s["path"], out_uri, first_part=s["first_part"], **options) for s in sources
        ]
    context = multiprocessing.get_context("spawn")  # the caller may hold threads (torch, Ray)
    abort = context.Event()
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(
        min(workers, len(sources)),
        mp_context=context,
        initializer=_init_worker,
        initargs=(abort, level),
    ) as pool:
        futures = [
            pool.submit(
                _convert_task, s["path"], out_uri, {**options, "first_part": s["first_part"]}
            )
            for s in sources
        ]
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    result = future.result()
                    if "error" in result:
                        _raise_task_error(result["error"])
        except BaseException:
            abort.set()  # running conversions stop at their next chunk
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return [future.result() for future in futures]


def _garbage_collect(out_uri: str, keep: str) -> None:
    """Delete generations other than `keep` (earlier sets, killed conversions). Best effort."""
    for name in storage.list_dir(out_uri):
        if name.startswith("gen-") and name != keep:
            try:
                storage.delete_dir(storage.join(out_uri, name))
            except BpfmError as err:
                log.warning("could not delete stale %s: %s", name, err)


def write_shards(
    inputs: Sequence[str | Path],
    out_uri: str,
    *,
    include_abp: bool = True,
    drop_invalid: bool = False,
    workers: int | None = None,
    signals: str = "list",
) -> dict:
    """Convert PulseDB files (or folders of *_Subset.mat) into a published shard set.

    Files convert in parallel processes (by default only when the input is large enough to pay
    for starting them); the manifest is written last. Returns the manifest, with
    `"up_to_date": True` when an identical conversion had already been published.
    `signals`: see ShardOptions."""
    out_uri = str(out_uri)
    files = find_inputs(inputs)
    start = time.monotonic()
    sources = _describe_sources(files, workers or multiprocessing.cpu_count())
    if workers is None:  # starting processes costs seconds: only worth it for large inputs
        large = sum(s["size"] for s in sources) >= PARALLEL_MIN_BYTES
        workers = min(len(files), multiprocessing.cpu_count()) if large else 1
    options = ShardOptions(include_abp, drop_invalid, signals)
    key = _conversion_key(sources, options.as_dict())
    generation = f"gen-{key[:16]}"
    current = _read_manifest(out_uri)
    if current is not None and current.get("key") == key:
        log.info("%s: already up to date (%s)", out_uri, generation)
        return {**current, "up_to_date": True}
    generation_uri = storage.join(out_uri, generation)
    storage.delete_dir(generation_uri)  # leftovers of a killed run with the same inputs
    task_options = {"generation": generation, "options": options}
    try:
        results = _run_conversions(sources, out_uri, task_options, workers)
    except BaseException:
        storage.delete_dir(generation_uri)
        raise
    manifest = _manifest(key, generation, sources, results, options)
    storage.publish_bytes(storage.join(out_uri, MANIFEST), json.dumps(manifest, indent=1).encode())
    _garbage_collect(out_uri, keep=generation)
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


def _manifest(
    key: str, generation: str, sources: list[dict], results: list[dict], options: ShardOptions
) -> dict:
    from bpfm import __version__

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
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "generation": generation,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "bpfm_version": __version__,
        "options": options.as_dict(),
        "schema": {f.name: str(f.type) for f in options.schema},
        "rows": sum(p["rows"] for p in parts),
        "bytes": sum(p["bytes"] for p in parts),
        "partitions": partitions,
        "dropped": dropped,
        "sources": sources,
        "parts": parts,
    }
