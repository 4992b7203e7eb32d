"""Seeded mutations of a small real MAT-file, each a function editing a copy in place.

Four families, as an adversary (or a failing disk) would produce them: bytes flipped (mostly in
the HDF5 metadata: superblock, object headers, B-trees, heaps), the file truncated at every
structural boundary (object headers, dataset data and chunks), a dataset swapped for a group,
and a cell element's reference redirected to another object."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from bpfm.data.matfile import HEADER_BYTES


@dataclass(frozen=True)
class Mutation:
    family: str  # flip | truncate | swap | redirect
    name: str
    apply: Callable[[Path], None]


def _objects(f: h5py.File) -> list[h5py.HLObject]:
    found = [f]
    f.visititems(lambda _name, obj: found.append(obj))
    return found


def boundaries(path: Path) -> list[int]:
    """File offsets where an HDF5 structure starts or ends: the superblock, every object
    header, every dataset's contiguous data or chunk, and the end of file."""
    size = path.stat().st_size
    offsets = {HEADER_BYTES, HEADER_BYTES + 8, HEADER_BYTES + 48, size - 1}
    with h5py.File(path, "r") as f:
        for obj in _objects(f):
            addr = h5py.h5o.get_info(obj.id).addr + HEADER_BYTES
            offsets.update({addr, addr + 16})
            if isinstance(obj, h5py.Dataset):
                start = obj.id.get_offset()
                if start is not None:
                    offsets.update({start, start + obj.id.get_storage_size() // 2})
                elif obj.chunks:
                    for i in range(obj.id.get_num_chunks()):
                        chunk = obj.id.get_chunk_info(i)
                        offsets.update({chunk.byte_offset, chunk.byte_offset + chunk.size // 2})
    return sorted(o for o in offsets if HEADER_BYTES <= o < size)


def _metadata_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges holding metadata: the superblock and each object header's first bytes."""
    ranges = [(HEADER_BYTES, HEADER_BYTES + 96)]
    with h5py.File(path, "r") as f:
        for obj in _objects(f):
            addr = h5py.h5o.get_info(obj.id).addr + HEADER_BYTES
            ranges.append((addr, addr + 272))
    return ranges


def _flip(offsets: list[int], masks: list[int]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = bytearray(path.read_bytes())
        for offset, mask in zip(offsets, masks, strict=True):
            data[offset % len(data)] ^= mask
        path.write_bytes(bytes(data))

    return apply


def _truncate(offset: int) -> Callable[[Path], None]:
    return lambda path: os.truncate(path, offset)


def _swap(name: str) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            del f[name]
            f.create_group(name).attrs["MATLAB_class"] = np.bytes_("double")

    return apply


def _redirect(field: str, row: int, target: str) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            refs = f[field][()]
            if target == "null":
                refs[0, row] = h5py.Reference()
            elif target.startswith("row:"):
                refs[0, row] = refs[0, int(target[4:])]
            else:
                refs[0, row] = f[target].ref
            f[field][...] = refs

    return apply


REDIRECT_TARGETS = ("/", "/Subset", "/#refs#", "/Subset/Signals", "/Subset/SBP",
                    "/Subset/Subject", "/#refs#/a", "null", "row:0")


def mutations(path: Path, seed: int = 0, total: int = 240) -> list[Mutation]:
    """At least `total` mutations of the file at `path` (which is left as it is)."""
    rng = np.random.default_rng(seed)
    out: list[Mutation] = []
    for offset in boundaries(path):
        out.append(Mutation("truncate", f"truncate@{offset}", _truncate(offset)))
    with h5py.File(path, "r") as f:
        group = f["Subset"]
        n = group["SBP"].shape[1]
        fields = sorted(group)
        element = group["Subject"][0, 0]
        element_name = f[element].name
    for name in [f"/Subset/{k}" for k in fields] + ["/Subset", element_name]:
        out.append(Mutation("swap", f"swap-group:{name}", _swap(name)))
    for field in ("/Subset/Subject", "/Subset/Gender"):
        for target in REDIRECT_TARGETS:
            row = int(rng.integers(n))
            out.append(Mutation("redirect", f"redirect:{field}[{row}]->{target}",
                                _redirect(field, row, target)))
    size = path.stat().st_size
    ranges = _metadata_ranges(path)
    while len(out) < total:
        k = int(rng.integers(1, 5))
        if rng.random() < 0.75:  # most flips in metadata: data flips mostly just change values
            low, high = ranges[int(rng.integers(len(ranges)))]
            offsets = [int(o) for o in rng.integers(low, min(high, size), k)]
        else:
            offsets = [int(o) for o in rng.integers(HEADER_BYTES, size, k)]
        masks = [int(m) for m in rng.integers(1, 256, k)]
        name = "flip@" + ",".join(f"{o}^{m:02x}" for o, m in zip(offsets, masks, strict=True))
        out.append(Mutation("flip", name, _flip(offsets, masks)))
    return out
