"""Shards -> torch batches: a streaming IterableDataset over a View (folder or s3:// shards).

Work is cut into units (a Parquet row group, or a slice of one when there are fewer row groups
than consumers). Every epoch the units are ordered by a permutation of (seed, epoch) that all
consumers agree on, and consumer c of C (C = world size x DataLoader workers) reads units c, c+C,
... So every row is read exactly once per epoch across ranks and workers. Rows are mixed in a
shuffle buffer seeded by (seed, epoch, consumer). Only the row groups being consumed are held in
memory, whatever the dataset size.

Each batch is built with one vectorised gather of whole rows per pooled chunk, straight into
the batch array: no per-sample Python work. pyarrow decodes each row group first (local files
memory-mapped); that copy keeps the loader at ~270k segments/s on 2 busy cores
(benchmarks/data_throughput.py), far above what training consumes, so bpfm reads no Parquet
pages itself.

Use with `DataLoader(dataset, batch_size=None, num_workers=...)`; call `set_epoch(n)` before
each epoch (with non-persistent workers, which copy the dataset each epoch). Ranks may get a
few batches more or fewer than each other when units differ in size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import IterableDataset, get_worker_info

from bpfm.data.shards import ROW_GROUP_SIZE, SIGNAL_PAIR, WINDOW, signal_array
from bpfm.data.splits import View
from bpfm.io import storage
from bpfm.io.ahead import ahead

EPS = 1e-6
# Granularity of the shuffle pool (zero-copy slices of a row group): a whole row group, so a
# batch gathers from few, large blocks (~1.6x faster than 1024-row chunks). Uniform sampling
# from the pool does not depend on how it is cut.
CHUNK_ROWS = ROW_GROUP_SIZE
ROW_BYTES = SIGNAL_PAIR.byte_width  # one row's float32 [2, WINDOW]


@dataclass(frozen=True)
class _Unit:
    part: int  # index into the view's parts
    row_group: int
    start: int  # row slice within the row group
    stop: int


@dataclass
class _Chunk:
    """Rows of one unit. `x` holds each row's float32 [2, WINDOW] (ECG, PPG) as raw bytes
    (numpy gathers whole rows of bytes faster than rows of floats): for schema v2 a view of
    pyarrow's buffer, for v1 a stacked copy.
    `order` lists the rows of the view (after its row mask) not yet emitted, in emission
    order."""

    x: np.ndarray  # uint8 [n, ROW_BYTES], C-contiguous rows
    y: np.ndarray  # [n, 2] float32
    meta: dict[str, np.ndarray]  # object arrays of str, with_meta only
    order: np.ndarray
    done: int = 0

    @property
    def left(self) -> int:
        return len(self.order) - self.done

    def pop(self, k: int) -> np.ndarray:
        rows = self.order[self.done : self.done + k]
        self.done += len(rows)
        return rows


def _distributed() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def normalize_windows(x: np.ndarray) -> np.ndarray:
    """z-score each window and channel along time (in place)."""
    mean = x.mean(axis=-1, keepdims=True)
    std = x.std(axis=-1, keepdims=True)
    x -= mean
    x /= std + EPS
    return x


class ShardDataset(IterableDataset):
    """Batches `{"x": [B, 2, 1250] (ECG, PPG), "y": [B, 2] (SBP, DBP)}` float32 from a View
    (plus `segment_id` and `subject` lists with `with_meta`)."""

    def __init__(
        self,
        view: View,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 42,
        shuffle_buffer: int = 8192,
        normalize: bool = False,
        with_meta: bool = False,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.view = view
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = max(shuffle_buffer, batch_size)
        self.normalize = normalize
        self.with_meta = with_meta
        self.drop_last = drop_last
        self.epoch = 0
        self._parts = view.parts()
        self._packed = view.shards.options.signals == "packed"  # schema v2

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def columns(self) -> list[str]:
        signals = ["ecg_ppg"] if self._packed else ["ecg", "ppg"]
        wanted = [*signals, "sbp", "dbp"]
        wanted += ["segment_id", "subject"] if self.with_meta else []
        wanted += [self.view.key_column] if self.view.key_column else []
        return list(dict.fromkeys(wanted))

    def units(self, consumers: int = 1) -> list[_Unit]:
        """All units in a fixed order; row groups are cut into slices until each of
        `consumers` can get at least one."""
        groups = [
            (p, g, size)
            for p, part in enumerate(self._parts)
            for g, size in enumerate(part["row_groups"])
        ]
        pieces = math.ceil(consumers / len(groups)) if groups else 1
        units = []
        for p, g, size in groups:
            bounds = np.linspace(0, size, min(pieces, size) + 1).astype(int)
            units += [_Unit(p, g, int(a), int(b)) for a, b in zip(bounds, bounds[1:], strict=False)]
        return units

    def __iter__(self) -> Iterator[dict]:
        rank, world = _distributed()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        consumer, consumers = rank * workers + worker, world * workers
        units = self.units(consumers)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(units))
            units = [units[i] for i in order]
        mine = units[consumer::consumers]
        rng = np.random.default_rng([self.seed, self.epoch, consumer])
        chunks = ahead(self._read(mine), name="bpfm-prefetch")
        yield from self._shuffled(chunks, rng) if self.shuffle else self._in_order(chunks)

    def _read(self, units: list[_Unit]) -> Iterator[_Chunk]:
        shards = self.view.shards
        shards.will_read([(self._parts[u.part], u.row_group) for u in units])
        open_part, handle = None, None
        for unit in units:
            with storage.storage_errors(shards.uri):
                if unit.part != open_part:
                    handle = shards.open_part(self._parts[unit.part])
                    open_part = unit.part
                table = handle.read_row_group(unit.row_group, columns=self.columns)
            yield from self._chunks(table, unit)

    def _chunks(self, table: pa.Table, unit: _Unit) -> Iterator[_Chunk]:
        """The unit's rows in chunks of at most CHUNK_ROWS."""
        for start in range(unit.start, unit.stop, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, unit.stop)
            chunk = self._chunk(table.slice(start, stop - start))
            if chunk.left:
                yield chunk

    def _chunk(self, table: pa.Table) -> _Chunk:
        mask = self.view.row_mask(table)
        order = np.arange(table.num_rows) if mask is None else np.flatnonzero(mask)
        y = np.stack([table["sbp"].to_numpy(), table["dbp"].to_numpy()], axis=1)
        meta = {}
        if self.with_meta:
            for name in ("segment_id", "subject"):
                meta[name] = np.asarray(table[name].to_pylist(), dtype=object)
        if self._packed:
            x = signal_array(table["ecg_ppg"]).view(np.uint8)
        else:  # v1: one sequential copy here (in the prefetch thread) keeps batch
            # gathers whole
            x = np.stack([signal_array(table["ecg"]), signal_array(table["ppg"])], 1).view(np.uint8)
        return _Chunk(x.reshape(table.num_rows, ROW_BYTES), y.astype(np.float32), meta, order)

    def _in_order(self, chunks: Iterator[_Chunk]) -> Iterator[dict]:
        picks: list[tuple[_Chunk, np.ndarray]] = []
        size = 0
        for chunk in chunks:
            while chunk.left:
                rows = chunk.pop(self.batch_size - size)
                picks.append((chunk, rows))
                size += len(rows)
                if size == self.batch_size:
                    yield self._batch(picks, size)
                    picks, size = [], 0
        if size and not self.drop_last:
            yield self._batch(picks, size)

    def _shuffled(self, chunks: Iterator[_Chunk], rng: np.random.Generator) -> Iterator[dict]:
        """A shuffle buffer: each batch draws rows uniformly without replacement from all rows
        pooled so far, and the pool is topped up to `shuffle_buffer` rows from the stream. Each
        row is copied once, straight from Arrow memory into its batch."""
        pool: list[_Chunk] = []
        pooled, more = 0, True
        while True:
            while more and pooled < self.shuffle_buffer:
                chunk = next(chunks, None)
                if chunk is None:
                    more = False
                    break
                chunk.order = rng.permutation(chunk.order)
                pool.append(chunk)
                pooled += chunk.left
            size = min(self.batch_size, pooled)
            if size == 0 or (size < self.batch_size and self.drop_last):
                return
            counts = rng.multivariate_hypergeometric([c.left for c in pool], size)
            picks = [(c, c.pop(int(k))) for c, k in zip(pool, counts, strict=True) if k]
            pool = [c for c in pool if c.left]
            pooled -= size
            yield self._batch(picks, size)

    def _batch(self, picks: list[tuple[_Chunk, np.ndarray]], size: int) -> dict:
        """One vectorised gather of whole [2, WINDOW] rows per chunk, straight into the batch
        (mode="clip": rows are in range anyway, and "raise" would gather via a temporary)."""
        x = np.empty((size, 2, WINDOW), dtype=np.float32)
        x_bytes = x.reshape(size, -1).view(np.uint8)
        y = np.empty((size, 2), dtype=np.float32)
        at = 0
        for chunk, rows in picks:
            end = at + len(rows)
            np.take(chunk.x, rows, axis=0, out=x_bytes[at:end], mode="clip")
            np.take(chunk.y, rows, axis=0, out=y[at:end], mode="clip")
            at = end
        if self.normalize:
            normalize_windows(x)
        out = {"x": torch.from_numpy(x), "y": torch.from_numpy(y)}
        for name in picks[0][0].meta:
            out[name] = [v for chunk, rows in picks for v in chunk.meta[name][rows].tolist()]
        return out


def view_target_stats(view: View) -> tuple[np.ndarray, np.ndarray]:
    """Mean and SD (population) of (SBP, DBP) over the view's rows."""
    table = view.read(["sbp", "dbp"])
    y = np.stack([table["sbp"].to_numpy(), table["dbp"].to_numpy()], axis=1).astype(np.float64)
    if len(y) == 0:
        return np.full(2, np.nan), np.full(2, np.nan)
    return y.mean(axis=0), y.std(axis=0)


def view_size(view: View) -> int:
    """Rows in the view (from the manifest when the view takes whole partitions)."""
    if view.key_column is None:
        return sum(part["rows"] for part in view.parts())
    return view.read([view.key_column]).num_rows


def view_subjects(view: View) -> int:
    """Distinct subjects in the view."""
    return len(pc.unique(view.read(["subject"])["subject"]))
