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
into a temporary file beside its target under the part's lock, checked against the manifest's
size and sha256, and renamed into place: a file at the target path is complete, and a killed
copier leaves only its temporary file (removed by the next copier of that part) and releases its
lock with its process. Before a copy the cache makes room under `BPFM_CACHE_MAX_GB` (default
100) by deleting least-recently-used generations that no live process holds; parts being copied
at that moment by other processes may take it briefly past the cap.

A part is hashed as it is copied (a thread reads the next block while the last one is hashed
and written) and flushed with fdatasync before its rename: sizes are all a reader checks at the
final path, and without the flush a power loss could leave a right-sized file of zeros there
(`_make_durable`). Once a reader's first part of a (source, subset) is in place, PREFETCH_THREADS
background copies of that partition's other parts start, in the order the reader said it will
open them (`will_read`, which the loader calls with a shuffled epoch's order), so the first epoch
reads parts as they land instead of stopping for each copy; a part another process is copying
is skipped (a non-blocking lock) and waited for last, so K trainers started together copy
different parts at once. Small-column reads through `dataset()` (a split's subjects, the target
statistics' labels) go to the object store by column ranges, a few bytes a row, so opening a
split copies nothing.
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
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import platformdirs
import psutil
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from filelock import FileLock, Timeout

from bpfm.data.shardset import ShardSet
from bpfm.errors import BpfmError
from bpfm.io import storage
from bpfm.io.ahead import ahead

log = logging.getLogger(__name__)

DIR_ENV = "BPFM_CACHE_DIR"
MAX_GB_ENV = "BPFM_CACHE_MAX_GB"
DEFAULT_MAX_GB = 100.0
BLOCK = 8 << 20
LEASES, USED = ".leases", ".used"
PREFETCH_THREADS = 2  # copies at once per reading process, beside the part the reader waits on

_held: set[Path] = set()  # lease files this process wrote (removed at exit)
_prefetch_lock = threading.Lock()


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

    def fetch(
        self, fs: pafs.FileSystem, remote: str, part: dict, uri: str, wait: bool = True
    ) -> Path | None:
        """The verified local copy of one part (`remote`: its path in `fs`), copying it first
        when this node has none. `uri` names the shard set in errors. With `wait=False`, None
        when another copier holds the part (a prefetcher then moves on to the next part)."""
        target = self.root / part["path"]
        if _complete(target, part):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(target.with_name(target.name + ".lock"), timeout=-1 if wait else 0)
        try:
            lock.acquire()
        except Timeout:
            return None
        try:
            if _complete(target, part):  # another process copied it while we waited
                return target
            for stale in target.parent.glob(f".{target.name}.*.tmp"):  # killed copiers'
                stale.unlink(missing_ok=True)
            self.make_room(part["bytes"], keep=part["path"].split("/", 1)[0])
            temp = target.with_name(f".{target.name}.{_holder()}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                self._copy(fs, remote, temp, part, uri)
                os.replace(temp, target)
            finally:
                temp.unlink(missing_ok=True)
        finally:
            lock.release()
        log.info("cached %s (%.1f MB) in %s", part["path"], part["bytes"] / 1e6, self.root)
        return target

    @staticmethod
    def _copy(fs: pafs.FileSystem, remote: str, temp: Path, part: dict, uri: str) -> None:
        """Copy one part to `temp`, hashing as it goes: a thread reads the next block from the
        store while this one hashes and writes the last (sha256 and file writes release the
        GIL), so the checks add little to the transfer itself. Made durable before the caller
        renames it into place (see `_make_durable`)."""
        digest, size = hashlib.sha256(), 0
        with storage.storage_errors(storage.join(uri, part["path"])):
            with fs.open_input_stream(remote) as source, open(temp, "wb") as out:
                blocks = ahead(iter(partial(source.read, BLOCK), b""), name="bpfm-cache-read")
                with closing(blocks):  # its thread stops before `source` closes
                    for block in blocks:
                        digest.update(block)
                        out.write(block)
                        size += len(block)
                _make_durable(out)
        where = f"{storage.join(uri, part['path'])}"
        if size != part["bytes"]:
            raise BpfmError(f"{where}: bytes: {size} read, the manifest says {part['bytes']}")
        if part.get("sha256") and digest.hexdigest() != part["sha256"]:
            raise BpfmError(f"{where}: sha256: the object differs from the manifest's checksum")

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


def _make_durable(out) -> None:
    """Flush a copy's data to disk before its rename publishes it. A reader trusts a part at
    its final path after a size check alone, and a killed process can never leave a torn file
    there (the rename is atomic and comes after the last write), but after a power loss or
    kernel crash a file system may keep the rename and lose data it had not written yet (ext4
    delayed allocation for a new name, XFS): the right size with zeros inside, which the size
    check would pass. fdatasync (data and size, not timestamps) costs ~0.1 s per 211 MB part
    here, against ~0.6 s for its transfer."""
    out.flush()
    getattr(os, "fdatasync", os.fsync)(out.fileno())


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


class CachedShardSet(ShardSet):
    """A remote shard set whose parts are read from this node's cache (copied on first use):
    `filesystem` and `root` are the cache's, so readers take the local fast path."""

    # Every part is checked against the manifest's size and sha256 as it is copied, which is
    # stronger than the cheap check before training (that check would copy every part of every
    # source, not just the view's).
    verified_on_read = True

    def __init__(self, uri: str, manifest: dict, cache: NodeCache | None = None):
        super().__init__(uri, manifest)
        self.remote_filesystem, self.remote_root = self.filesystem, self.root
        self.cache = cache or NodeCache.from_env()
        self.cache.lease(manifest["generation"])
        self.filesystem, self.root = pafs.LocalFileSystem(), str(self.cache.root)
        self._prefetching: set[tuple[int, str, str]] = set()
        self._reading_order: dict[str, int] = {}  # part path -> rank in the reader's order

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

    def will_read(self, parts: Sequence[dict]) -> None:
        """The parts a reader will open, in its order (a shuffled epoch's): the background
        copies follow that order, so the part it needs next is the one copied next."""
        self._reading_order = {p["path"]: rank for rank, p in enumerate(parts)}

    def part_path(self, part: dict) -> str:
        # The reader's own part first, with the bandwidth to itself; the copies of the rest
        # start once it is in place.
        path = self.cache.fetch(self.remote_filesystem, self._remote(part), part, self.uri)
        self._prefetch(part["source"], part["subset"])
        return str(path)

    def _remote(self, part: dict) -> str:
        return f"{self.remote_root}/{part['path']}"

    def _prefetch(self, source: str, subset: str) -> None:
        """On the first read of a (source, subset), copy its other parts in background threads
        while the reader works on the parts it asked for: the first epoch then reads while the
        cache fills instead of stopping for each part's copy. Parts another process (a trainer
        or DataLoader worker on this node) is copying are skipped at first and waited for at
        the end, so K readers started together copy different parts at once."""
        key = (os.getpid(), source, subset)  # a forked DataLoader worker starts its own
        with _prefetch_lock:
            if key in self._prefetching:
                return
            self._prefetching.add(key)
        last = len(self._reading_order)
        queue = sorted(self.parts(source, [subset]),
                       key=lambda p: self._reading_order.get(p["path"], last))
        for _ in range(PREFETCH_THREADS):
            threading.Thread(target=self._copy_parts, args=(queue,), daemon=True,
                             name="bpfm-cache-prefetch").start()

    def _copy_parts(self, queue: list[dict]) -> None:
        deferred = []
        try:
            while True:
                with _prefetch_lock:
                    if not queue:
                        break
                    part = queue.pop(0)
                remote = self._remote(part)
                if self.cache.fetch(self.remote_filesystem, remote, part, self.uri, wait=False):
                    continue
                deferred.append(part)
            for part in deferred:  # held by other copiers then; most are complete by now
                self.cache.fetch(self.remote_filesystem, self._remote(part), part, self.uri)
        except Exception as err:  # the reader's own fetch of that part raises it in full
            log.warning("cache: prefetch of %s stopped: %s", self.uri, err)
