"""A node-local cache of remote shard parts: each part a view reads is copied once per node from
the object store, then read through the same memory-mapped fast path as a local folder.

Why not fsspec's `filecache` / `simplecache`: their metadata file is rewritten by every process
(no cross-process locking), they verify nothing against the manifest, know no size cap shared by
processes and cannot tell a generation a live trial still reads from a stale one. The mechanism
here is small: pyarrow's filesystem for the copy, `filelock` (already a dependency of torch and
Ray) for the locks, and psutil for telling live processes from dead ones.

Layout under `BPFM_CACHE_DIR` (default `~/.cache/bpfm/shards`, see `platformdirs`):

    .lock                                   cache-wide: leases and eviction
    gen-<key>/.used                         its mtime orders generations by last use (LRU)
    gen-<key>/.leases/<host>-<pid>          one per process that opened the generation
    gen-<key>/source=<s>/subset=<n>/part-NNNNN.parquet   complete, verified copies only
    ...part-NNNNN.parquet.lock              held while one process copies that part

A generation is keyed by the manifest's `gen-<key>` (a hash of the inputs and options), so the
same content shares one copy, and a new conversion never reads an old copy. A part is copied
into a temporary file beside its target under the part's lock (`PartCopy`) and renamed into
place once complete and flushed with fdatasync: a file at the target path is complete (sizes
are all a reader checks there; without the flush a power loss could leave a right-sized file of
zeros, see `_make_durable`), and a killed copier leaves only its temporary file (removed by the
next copier of that part) and releases its lock with its process. Before a copy the cache makes
room under `BPFM_CACHE_MAX_GB` (default 100) by deleting least-recently-used generations that no
live process holds; parts being copied at that moment by other processes may take it briefly
past the cap.

The unit of a copy is a block of the manifest's `block_bytes` (8 MB), checked against its
`block_sha256` as it lands, so a reader takes a row group as soon as that row group's blocks
(and the footer's) are in, without waiting for the rest of its part: the copying process reads
its own in-progress copies that way (`open_part`), other processes wait for the complete file.
Blocks are copied in the order the reader said it will read row groups (`will_read`, which the
loader calls with a shuffled epoch's order) by the reader itself and PREFETCH_THREADS
background threads that share out the blocks of the row group needed first, then every part of
the partition whole, so each copy started completes. A part another process copies is skipped
(a non-blocking lock) and waited for last, so K trainers started together copy different parts
at once. Parts recorded without block checksums (written before them) are copied as one block
checked against the part's sha256. Small-column reads through `dataset()` (a split's subjects,
the target statistics' labels) go to the object store by column ranges, a few bytes a row, so
opening a split copies nothing.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from bpfm.data.shardset import ShardSet
from bpfm.errors import BpfmError
from bpfm.io import storage

log = logging.getLogger(__name__)

DIR_ENV = "BPFM_CACHE_DIR"
MAX_GB_ENV = "BPFM_CACHE_MAX_GB"
DEFAULT_MAX_GB = 100.0
READ_BYTES = 8 << 20  # one GET from the store (a block, or 8 MB of a part without blocks)
LEASES, USED = ".leases", ".used"
PREFETCH_THREADS = 2  # copies at once per reading process, beside the part the reader waits on

_held: set[Path] = set()  # lease files this process wrote (removed at exit)


def default_root() -> Path:
    return Path(platformdirs.user_cache_dir("bpfm")) / "shards"


@dataclass(frozen=True)
class NodeCache:
    root: Path
    max_bytes: int

    @classmethod
    def from_env(cls) -> NodeCache:
        root = Path(os.environ.get(DIR_ENV) or default_root()).expanduser().absolute()
        text = os.environ.get(MAX_GB_ENV) or str(DEFAULT_MAX_GB)
        try:
            max_gb = float(text)
        except ValueError:
            raise BpfmError(f"{MAX_GB_ENV}: {text!r} is not a number of GB") from None
        if not max_gb > 0:
            raise BpfmError(f"{MAX_GB_ENV}: must be positive, got {text}")
        return cls(root, int(max_gb * 1e9))

    # ------------------------------------------------------------------------------- leases

    def _lock(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / ".lock")

    def lease(self, generation: str) -> Path:
        """Mark `generation` as open by this process (never evicted while it lives) and as
        just used. Under the cache-wide lock, so an eviction never races a new reader."""
        folder = self.root / generation
        path = folder / LEASES / _holder()
        with self._lock():
            (folder / LEASES).mkdir(parents=True, exist_ok=True)
            if path not in _held:
                path.write_text(str(_started(os.getpid())))
                _held.add(path)
            (folder / USED).touch()
            for other in (folder / LEASES).iterdir():
                if not _alive(other):
                    other.unlink(missing_ok=True)
        return path

    def live_holders(self, generation: str) -> list[str]:
        folder = self.root / generation / LEASES
        return sorted(p.name for p in folder.glob("*") if _alive(p)) if folder.is_dir() else []

    # ------------------------------------------------------------------------------- parts

    def claim(
        self, fs: pafs.FileSystem, remote: str, part: dict, uri: str, wait: bool = True
    ) -> Path | PartCopy | None:
        """The complete local copy of one part (`remote`: its path in `fs`), or, when this node
        has none, a new `PartCopy` of it that this process now holds the part's lock for. With
        `wait=False`, None when another copier holds the part instead of waiting for it."""
        target = self.root / part["path"]
        if _complete(target, part):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # not thread-local: the thread that lands a part's last block releases its lock
        lock = FileLock(target.with_name(target.name + ".lock"), timeout=-1 if wait else 0,
                        thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            return None
        try:
            if _complete(target, part):  # another process copied it while we waited
                lock.release()
                return target
            for stale in target.parent.glob(f".{target.name}.*.tmp"):  # killed copiers'
                stale.unlink(missing_ok=True)
            self.make_room(part["bytes"], keep=part["path"].split("/", 1)[0])
            return PartCopy(fs, remote, part, target, lock, uri)
        except BaseException:
            lock.release()
            raise

    def fetch(
        self, fs: pafs.FileSystem, remote: str, part: dict, uri: str, wait: bool = True
    ) -> Path | None:
        """The verified local copy of one part, copying all of it first when this node has
        none (see `claim`)."""
        copy = self.claim(fs, remote, part, uri, wait)
        return copy.complete() if isinstance(copy, PartCopy) else copy

    # ----------------------------------------------------------------------------- eviction

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*.parquet") if p.is_file())

    def make_room(self, need: int, keep: str) -> list[str]:
        """Delete least-recently-used generations no live process holds (never `keep`) until
        `need` more bytes fit under the cap; returns the generations deleted."""
        with self._lock():
            used = self.used_bytes()
            if used + need <= self.max_bytes:
                return []
            candidates = sorted(
                (g for g in self.root.glob("gen-*") if g.is_dir() and g.name != keep),
                key=lambda g: _mtime(g / USED),
            )
            evicted = []
            for folder in candidates:
                if used + need <= self.max_bytes:
                    break
                if self.live_holders(folder.name):
                    continue
                size = sum(p.stat().st_size for p in folder.rglob("*.parquet") if p.is_file())
                trash = self.root / f".trash-{uuid.uuid4().hex}"
                folder.rename(trash)  # gone for readers at once; deleted at leisure
                shutil.rmtree(trash, ignore_errors=True)
                used -= size
                evicted.append(folder.name)
                log.info("cache: evicted %s (%.1f MB, least recently used)", folder.name,
                         size / 1e6)
            if used + need > self.max_bytes:
                raise BpfmError(
                    f"{self.root}: {MAX_GB_ENV}: {need / 1e9:.2f} GB more do not fit under "
                    f"{self.max_bytes / 1e9:g} GB ({used / 1e9:.2f} GB held by generations "
                    "live processes read); raise the cap or read without the cache (--no-cache)"
                )
            return evicted


def _make_durable(fd: int) -> None:
    """Flush a copy's data to disk before its rename publishes it. A reader trusts a part at
    its final path after a size check alone, and a killed process can never leave a torn file
    there (the rename is atomic and comes after the last write), but after a power loss or
    kernel crash a file system may keep the rename and lose data it had not written yet (ext4
    delayed allocation for a new name, XFS): the right size with zeros inside, which the size
    check would pass. fdatasync (data and size, not timestamps) costs ~0.1 s per 211 MB part
    here, against ~0.6 s for its transfer."""
    getattr(os, "fdatasync", os.fsync)(fd)


PENDING, TAKEN, LANDED = 0, 1, 2  # a block's state in a PartCopy


class PartCopy:
    """One part being copied into the cache by this process, under the part's lock: a
    temporary file of the part's size beside its target, filled block by block (blocks of the
    manifest's `block_bytes`, each checked against its `block_sha256` before anyone reads it),
    made durable and renamed into place once every block is in. Threads share it: each takes
    pending blocks, copies them and marks them landed; a reader waits only for the blocks of the
    row group it needs (`blocks_of`). A part recorded without block checksums is one block
    checked against the part's sha256."""

    def __init__(self, fs: pafs.FileSystem, remote: str, part: dict, target: Path,
                 lock: FileLock, uri: str):
        self.target, self._lock = target, lock
        self.where = storage.join(uri, part["path"])
        self.size = part["bytes"]
        if part.get("block_sha256"):
            self.block_bytes, self._hashes = part["block_bytes"], part["block_sha256"]
        else:
            self.block_bytes, self._hashes = max(self.size, 1), [part.get("sha256")]
        self._state = [PENDING] * len(self._hashes)
        self._cond = threading.Condition()
        self._footer = threading.Lock()
        self._groups: list[tuple[int, int]] | None = None  # row groups' byte ranges
        self.error: BaseException | None = None
        self.done = self._closed = False
        self._writers = 0  # threads copying blocks now
        self.temp = target.with_name(f".{target.name}.{_holder()}.{uuid.uuid4().hex[:8]}.tmp")
        with storage.storage_errors(self.where):
            self._source = fs.open_input_file(remote)
            found = self._source.size()
        if found != self.size:
            raise BpfmError(f"{self.where}: bytes: the object has {found}, the manifest says "
                            f"{self.size}")
        self._fd = os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        os.ftruncate(self._fd, self.size)

    def all_blocks(self) -> range:
        return range(len(self._state))

    def _span(self, start: int, stop: int) -> range:
        return range(start // self.block_bytes, (stop - 1) // self.block_bytes + 1)

    def blocks_of(self, row_group: int) -> range:
        """The blocks row group `row_group` lies in (the footer's blocks are copied first, to
        find them)."""
        if len(self._state) == 1:
            return self.all_blocks()
        with self._footer:
            if self._groups is None:
                self.fill(self._span(self.size - 8, self.size))
                with self._readable() as handle:  # the same file after its rename, if any
                    handle.seek(self.size - 8)
                    tail = handle.read(8)
                    if tail[4:] != b"PAR1":
                        raise BpfmError(f"{self.where}: not a Parquet file (no footer)")
                    footer = int.from_bytes(tail[:4], "little")
                    self.fill(self._span(self.size - 8 - footer, self.size))
                    self._groups = _row_group_ranges(pq.read_metadata(handle))
        start, stop = self._groups[row_group]
        return self._span(start, stop)

    def fill(self, blocks: Sequence[int], wait: bool = True) -> None:
        """Copy the blocks of `blocks` no other thread has taken, one at a time in their order
        (threads on the same blocks share them out: the blocks a reader needs first get every
        copying thread); then (`wait`) wait for the rest. Raises the copy's error (a block's,
        any thread's)."""
        with self._cond:
            self._raise_error()
            self._writers += 1
        try:
            while True:
                with self._cond:
                    block = next((b for b in blocks if self._state[b] == PENDING), None)
                    if block is None or self.error is not None:
                        break
                    self._state[block] = TAKEN
                try:
                    self._fetch(block)
                except BaseException as err:
                    self._fail(err)
                    raise
                self._land(block)
        finally:
            self._leave()
        if wait:
            with self._cond:
                while self.error is None and any(self._state[b] != LANDED for b in blocks):
                    self._cond.wait()
                self._raise_error()

    def _readable(self):
        with self._cond:  # its path changes when the last block lands
            return open(self.target if self.done else self.temp, "rb")

    def complete(self) -> Path:
        """Copy every block not yet taken, wait for the part to be in place, and return it."""
        self.fill(self.all_blocks())
        with self._cond:
            while self.error is None and not self.done:
                self._cond.wait()
            self._raise_error()
        return self.target

    def open(self) -> pq.ParquetFile:
        """The copy for reading row groups whose blocks have landed (plain reads, not a memory
        map: the file is still being written)."""
        with self._cond:  # not between the rename and its path
            return pq.ParquetFile(str(self.target if self.done else self.temp))

    def _fetch(self, block: int) -> None:
        start = block * self.block_bytes
        stop = min(start + self.block_bytes, self.size)
        digest = hashlib.sha256()
        with storage.storage_errors(self.where):
            for at in range(start, stop, READ_BYTES):
                # a pyarrow buffer from its memory pool: `read_at`'s bytes would be a fresh
                # allocation (page faults, zeroing) and one more copy for every 8 MB
                size = min(READ_BYTES, stop - at)
                data = self._source.get_stream(at, size).read_buffer(size)
                digest.update(data)
                os.pwrite(self._fd, data, at)
        expected = self._hashes[block]
        if expected and digest.hexdigest() != expected:
            which = f" (block {block}, bytes {start}-{stop})" if len(self._hashes) > 1 else ""
            raise BpfmError(f"{self.where}: sha256: the object differs from the manifest's "
                            f"checksum{which}")

    def _land(self, block: int) -> None:
        with self._cond:
            self._state[block] = LANDED
            complete = all(s == LANDED for s in self._state)
            self._cond.notify_all()
        if complete:
            _make_durable(self._fd)
            with self._cond:
                os.replace(self.temp, self.target)
                self.done = True
                self._cond.notify_all()
            self._lock.release()
            log.info("cached %s (%.1f MB)", self.where, self.size / 1e6)

    def _fail(self, err: BaseException) -> None:
        """The copy is off: nothing of it stays (a thread still writing writes to an unlinked
        file), and the part is free for the next copier."""
        with self._cond:
            if self.error is not None:
                return
            self.error = err
            Path(self.temp).unlink(missing_ok=True)
            self._cond.notify_all()
        self._lock.release()

    def _leave(self) -> None:
        """A thread is done writing blocks: the last one out closes the file once the copy is
        complete or failed (never under a thread still writing to it)."""
        with self._cond:
            self._writers -= 1
            last = self._writers == 0 and not self._closed and (self.done or bool(self.error))
            self._closed |= last
        if last:
            os.close(self._fd)
            self._source.close()

    def _raise_error(self) -> None:
        if self.error is not None:
            if isinstance(self.error, BpfmError):
                raise BpfmError(str(self.error))
            raise BpfmError(f"{self.where}: copy failed: {self.error}") from self.error


def _row_group_ranges(metadata: pq.FileMetaData) -> list[tuple[int, int]]:
    """Each row group's byte range: from its first column chunk (dictionary page, if any,
    else first data page) to the end of its last."""
    ranges = []
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        chunks = [group.column(c) for c in range(group.num_columns)]
        starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset
                  for c in chunks]
        stops = [s + c.total_compressed_size for s, c in zip(starts, chunks, strict=True)]
        ranges.append((min(starts), max(stops)))
    return ranges


def _holder() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _started(pid: int) -> float:
    return psutil.Process(pid).create_time()


def _alive(lease: Path) -> bool:
    """A lease of this host counts while its process lives (the same PID started at the same
    time: PIDs are reused); one of another host (a shared cache folder) always counts."""
    host, _, pid = lease.name.rpartition("-")
    if host != socket.gethostname():
        return True
    try:
        return abs(_started(int(pid)) - float(lease.read_text())) < 1.0
    except (psutil.Error, ValueError, OSError):
        return False


def _complete(target: Path, part: dict) -> bool:
    try:
        return target.stat().st_size == part["bytes"]
    except FileNotFoundError:
        return False


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


@atexit.register
def _release() -> None:
    for path in _held:
        if path.name == _holder():  # not a forked child's inherited copy of the set
            path.unlink(missing_ok=True)


@dataclass
class _Copying:
    """One process's copying for one cached shard set (a forked DataLoader worker starts its
    own): its part copies, the parts other processes copy, and the background queue."""

    copies: dict[str, PartCopy] = field(default_factory=dict)
    elsewhere: set[str] = field(default_factory=set)  # parts another process holds
    queue: list[tuple[dict, int | None]] = field(default_factory=list)  # None: every block
    started: set[tuple[str, str]] = field(default_factory=set)  # (source, subset) queued
    mutex: threading.Lock = field(default_factory=threading.Lock)


class CachedShardSet(ShardSet):
    """A remote shard set whose parts are read from this node's cache (copied on first use):
    `filesystem` and `root` are the cache's, so readers take the local fast path."""

    # Every block is checked against the manifest's sha256 as it is copied, before a reader
    # reads it, which is stronger than the cheap check before training (that check would copy
    # every part of every source, not just the view's).
    verified_on_read = True

    def __init__(self, uri: str, manifest: dict, cache: NodeCache | None = None):
        super().__init__(uri, manifest)
        self.remote_filesystem, self.remote_root = self.filesystem, self.root
        self.cache = cache or NodeCache.from_env()
        self.cache.lease(manifest["generation"])
        self.filesystem, self.root = pafs.LocalFileSystem(), str(self.cache.root)
        self._copying: dict[int, _Copying] = {}  # by process id
        self._reading_order: dict[tuple[str, int], int] = {}  # (part, row group) -> rank

    def __repr__(self) -> str:
        return f"CachedShardSet({self.uri!r}, rows={self.manifest['rows']}, {self.cache.root})"

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "manifest": self.manifest, "cache": self.cache}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["uri"], state["manifest"], state["cache"])

    def dataset(
        self, source: str | None = None, subsets: Sequence[str] | None = None
    ) -> pads.Dataset:
        """The remote parts': what reads through a dataset are small columns (subjects for a
        split, labels for target statistics; a few bytes a row, read by column ranges), and
        taking them from the copies would make every reader wait for the whole view before
        its first batch. The signals a trainer reads still come from the verified copies."""
        return ShardSet(self.uri, self.manifest).dataset(source, subsets)

    def will_read(self, row_groups: Sequence[tuple[dict, int]]) -> None:
        """The row groups a reader will read, in its order (a shuffled epoch's): the background
        copies follow that order, so the blocks it needs next are the ones copied next."""
        self._reading_order = {(p["path"], g): rank for rank, (p, g) in enumerate(row_groups)}
        state = self._state()
        with state.mutex:
            state.queue.sort(key=self._rank)

    def part_path(self, part: dict) -> str:
        """The complete local copy of `part` (copied first, all of it, with the bandwidth to
        itself; the background copies of its partition start after it)."""
        copy = self._claim(part, wait=True)
        path = copy.complete() if isinstance(copy, PartCopy) else copy
        self._queue_partition(part)
        return str(path)

    def open_part(self, part: dict) -> pq.ParquetFile | _PartReader:
        """`part` for reading row groups: its complete copy, or while this process copies it,
        a reader whose row groups wait for their own blocks only."""
        self._queue_partition(part)
        copy = self._claim(part, wait=True)
        if isinstance(copy, PartCopy):
            return _PartReader(copy)
        return pq.ParquetFile(str(copy), memory_map=True)

    # --------------------------------------------------------------------------- copying

    def _state(self) -> _Copying:
        return self._copying.setdefault(os.getpid(), _Copying())

    def _rank(self, item: tuple[dict, int | None]) -> int:
        part, group = item
        last = len(self._reading_order)  # a part's "every block" item after the row groups
        return last if group is None else self._reading_order.get((part["path"], group), last)

    def _claim(self, part: dict, wait: bool) -> Path | PartCopy | None:
        """This process's copy of `part` (started now if no process on this node copies it), or
        its complete copy. A part another process copies: with `wait`, its complete copy once
        that process is done; else None."""
        state, path = self._state(), part["path"]
        with state.mutex:  # the part's file lock is per process: one claim at a time here
            copy = state.copies.get(path)
            if copy is not None and copy.error is None:
                return copy.target if copy.done else copy
            if path not in state.elsewhere:
                copy = self.cache.claim(self.remote_filesystem, self._remote(part), part,
                                        self.uri, wait=False)
                if isinstance(copy, PartCopy):
                    state.copies[path] = copy
                if copy is not None:
                    return copy
                state.elsewhere.add(path)
        if not wait:
            return None
        return self.cache.fetch(self.remote_filesystem, self._remote(part), part, self.uri)

    def _remote(self, part: dict) -> str:
        return f"{self.remote_root}/{part['path']}"

    def _queue_partition(self, part: dict) -> None:
        """On the first read of a (source, subset), copy its parts in background threads while
        the reader works: its row groups in the reader's order, then every part whole (so each
        copy this process starts completes and releases its lock). Parts another process (a
        trainer or DataLoader worker on this node) copies are skipped and waited for last, so
        K readers started together copy different parts at once."""
        state, key = self._state(), (part["source"], part["subset"])
        with state.mutex:
            if key in state.started:
                return
            state.started.add(key)
            parts = self.parts(*key[:1], [key[1]])
            state.queue += [(p, g) for p in parts for g in range(len(p["row_groups"]))
                            if (p["path"], g) in self._reading_order]
            state.queue += [(p, None) for p in parts]
            state.queue.sort(key=self._rank)
        for _ in range(PREFETCH_THREADS):
            threading.Thread(target=self._copy_queue, args=(state,), daemon=True,
                             name="bpfm-cache-prefetch").start()

    def _copy_queue(self, state: _Copying) -> None:
        """A background copier: the blocks of the queue's first item until none is left to
        take (the other copiers take blocks of the same item meanwhile), then the next."""
        failed: set[str] = set()
        while True:
            with state.mutex:
                if not state.queue:
                    break
                item = state.queue[0]
            part, group = item
            if part["path"] not in failed:
                try:
                    copy = self._claim(part, wait=False)
                    if isinstance(copy, PartCopy):
                        blocks = copy.all_blocks() if group is None else copy.blocks_of(group)
                        copy.fill(blocks, wait=False)
                except Exception as err:  # the reader's own read of that part raises it in full
                    log.warning("cache: prefetch of %s stopped: %s", part["path"], err)
                    failed.add(part["path"])
            with state.mutex:
                if state.queue and state.queue[0] is item:
                    state.queue.pop(0)
        for path in sorted(state.elsewhere - failed):  # mostly complete by now
            part = next(p for p in self.manifest["parts"] if p["path"] == path)
            try:
                self.cache.fetch(self.remote_filesystem, self._remote(part), part, self.uri)
            except Exception as err:
                log.warning("cache: prefetch of %s stopped: %s", path, err)


class _PartReader:
    """Row groups of a part this process is still copying, each read once its blocks are in
    (copying them here first when no thread has taken them yet)."""

    def __init__(self, copy: PartCopy):
        self._copy = copy
        self._file: pq.ParquetFile | None = None

    def read_row_group(self, row_group: int, columns: Sequence[str] | None = None) -> pa.Table:
        self._copy.fill(self._copy.blocks_of(row_group))
        if self._file is None:
            self._file = self._copy.open()
        return self._file.read_row_group(row_group, columns=columns)
