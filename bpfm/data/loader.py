"""Shards -> torch batches: a streaming IterableDataset over a View (folder or s3:// shards).

Work is cut into units (a Parquet row group, or a slice of one when there are fewer row groups
than consumers). Every epoch the units are ordered by a permutation of (seed, epoch) that all
consumers agree on, and consumer c of C (C = world size x DataLoader workers) reads units c, c+C,
... So every row is read exactly once per epoch across ranks and workers. Rows are mixed in a
shuffle buffer seeded by (seed, epoch, consumer). Only the row groups being consumed are held in
memory, whatever the dataset size.

Use with `DataLoader(dataset, batch_size=None, num_workers=...)`; call `set_epoch(n)` before
each epoch (with non-persistent workers, which copy the dataset each epoch). Ranks may get a
few batches more or fewer than each other when units differ in size.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from queue import Empty, Queue

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from bpfm import storage
from bpfm.data.shards import WINDOW
from bpfm.data.splits import View

EPS = 1e-6


@dataclass(frozen=True)
class _Unit:
    part: int  # index into the view's parts
    row_group: int
    start: int  # row slice within the row group
    stop: int


@dataclass
class _Chunk:
    x: np.ndarray  # [n, 2, WINDOW] float32
    y: np.ndarray  # [n, 2] float32
    meta: dict[str, np.ndarray]  # object arrays of str, with_meta only

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray | slice) -> _Chunk:
        return _Chunk(self.x[index], self.y[index], {k: v[index] for k, v in self.meta.items()})

    @staticmethod
    def concat(chunks: list[_Chunk]) -> _Chunk:
        if len(chunks) == 1:
            return chunks[0]
        meta = {k: np.concatenate([c.meta[k] for c in chunks]) for k in chunks[0].meta}
        return _Chunk(np.concatenate([c.x for c in chunks]),
                      np.concatenate([c.y for c in chunks]), meta)


def _distributed() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _signal(column: pa.ChunkedArray) -> np.ndarray:
    """A signal column (fixed_size_list<float32>[WINDOW] or fixed_size_binary(4 * WINDOW)) as
    [n, WINDOW] float32, zero-copy where Arrow allows."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_fixed_size_binary(array.type):
        data = array.buffers()[1]
        return np.frombuffer(data, dtype="<f4", count=len(array) * WINDOW,
                             offset=array.offset * 4 * WINDOW).reshape(-1, WINDOW)
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, WINDOW)


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Run `items` in a background thread, `depth` ahead: Parquet decoding releases the GIL, so
    reading the next row group overlaps with shuffling and with the consumer's own work."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                queue.put((item, None))
            queue.put((done, None))
        except BaseException as err:  # handed to the consumer, raised there
            queue.put((done, err))

    thread = threading.Thread(target=produce, daemon=True, name="bpfm-prefetch")
    thread.start()
    try:
        while True:
            item, error = queue.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                queue.get(timeout=0.05)
            except Empty:
                pass


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

    def __init__(self, view: View, *, batch_size: int, shuffle: bool, seed: int = 42,
                 shuffle_buffer: int = 8192, normalize: bool = False, with_meta: bool = False,
                 drop_last: bool = False):
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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def columns(self) -> list[str]:
        wanted = ["ecg", "ppg", "sbp", "dbp"]
        wanted += ["segment_id", "subject"] if self.with_meta else []
        wanted += [self.view.key_column] if self.view.key_column else []
        return list(dict.fromkeys(wanted))

    def units(self, consumers: int = 1) -> list[_Unit]:
        """All units in a fixed order; row groups are cut into slices until each of
        `consumers` can get at least one."""
        groups = [(p, g, size) for p, part in enumerate(self._parts)
                  for g, size in enumerate(part["row_groups"])]
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
        chunks = _prefetch(self._read(mine))
        batches = self._shuffled(chunks, rng) if self.shuffle else self._in_order(chunks)
        for batch in batches:
            yield self._to_torch(batch)

    def _read(self, units: list[_Unit]) -> Iterator[_Chunk]:
        shards = self.view.shards
        open_part, handle = None, None
        for unit in units:
            with storage.storage_errors(shards.uri):
                if unit.part != open_part:
                    path = shards.part_path(self._parts[unit.part])
                    handle = pq.ParquetFile(shards.filesystem.open_input_file(path),
                                            pre_buffer=True)
                    open_part = unit.part
                table = handle.read_row_group(unit.row_group, columns=self.columns)
            if unit.stop - unit.start != table.num_rows:
                table = table.slice(unit.start, unit.stop - unit.start)
            chunk = self._chunk(table)
            if len(chunk):
                yield chunk

    def _chunk(self, table: pa.Table) -> _Chunk:
        mask = self.view.row_mask(table)
        keep = None if mask is None else np.flatnonzero(mask)
        n = table.num_rows if keep is None else len(keep)
        x = np.empty((n, 2, WINDOW), dtype=np.float32)
        for channel, name in enumerate(("ecg", "ppg")):
            signal = _signal(table[name])
            x[:, channel] = signal if keep is None else signal[keep]
        y = np.stack([table["sbp"].to_numpy(), table["dbp"].to_numpy()], axis=1)
        y = y.astype(np.float32, copy=False) if keep is None else y[keep].astype(np.float32)
        if self.normalize:
            normalize_windows(x)
        meta = {}
        if self.with_meta:
            for name in ("segment_id", "subject"):
                values = np.asarray(table[name].to_pylist(), dtype=object)
                meta[name] = values if keep is None else values[keep]
        return _Chunk(x, y, meta)

    def _in_order(self, chunks: Iterator[_Chunk]) -> Iterator[_Chunk]:
        carry: list[_Chunk] = []
        for chunk in chunks:
            data = _Chunk.concat([*carry, chunk])
            full = len(data) // self.batch_size * self.batch_size
            for start in range(0, full, self.batch_size):
                yield data.take(slice(start, start + self.batch_size))
            carry = [data.take(slice(full, None))] if full < len(data) else []
        yield from self._tail(carry)

    def _shuffled(self, chunks: Iterator[_Chunk], rng: np.random.Generator) -> Iterator[_Chunk]:
        """Fill the buffer, permute, emit all but half a buffer (which mixes with what follows)."""
        buffer: list[_Chunk] = []
        rows = 0
        for chunk in chunks:
            buffer.append(chunk)
            rows += len(chunk)
            if rows < self.shuffle_buffer:
                continue
            data = _Chunk.concat(buffer).take(rng.permutation(rows))
            emit = (rows - self.shuffle_buffer // 2) // self.batch_size * self.batch_size
            for start in range(0, emit, self.batch_size):
                yield data.take(slice(start, start + self.batch_size))
            buffer, rows = [data.take(slice(emit, None))], rows - emit
        if rows:
            data = _Chunk.concat(buffer).take(rng.permutation(rows))
            full = rows // self.batch_size * self.batch_size
            for start in range(0, full, self.batch_size):
                yield data.take(slice(start, start + self.batch_size))
            yield from self._tail([data.take(slice(full, None))] if full < rows else [])

    def _tail(self, carry: list[_Chunk]) -> Iterator[_Chunk]:
        if carry and not self.drop_last and len(carry[0]):
            yield carry[0]

    def _to_torch(self, batch: _Chunk) -> dict:
        out = {"x": torch.from_numpy(np.ascontiguousarray(batch.x)),
               "y": torch.from_numpy(np.ascontiguousarray(batch.y))}
        for name, values in batch.meta.items():
            out[name] = values.tolist()
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
