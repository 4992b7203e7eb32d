"""MATLAB v7.3 MAT-file primitives over h5py: the 512-byte MATLAB header, `MATLAB_class`
attributes, and cell/struct-array elements stored as object references into `/#refs#`.

h5py's high-level API costs ~300 us per small dataset; PulseDB files hold one referenced dataset
per cell element (millions in a large file), so both directions use the low-level API here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
from h5py import h5a, h5d, h5r, h5s, h5t

HEADER_BYTES = 512
REFS_GROUP = "#refs#"
_CLASS_VALUES = {name: np.array(name) for name in (b"double", b"char")}
_ONE_U8 = np.array(1, dtype=np.uint8)
_TWO_I32 = np.array(2, dtype=np.int32)


def matlab_header(created: datetime | None = None) -> bytes:
    """The first 128 bytes MATLAB writes into a v7.3 file's user block.

    116 bytes of text, 8 bytes of subsystem offset (zero), version 0x0200 and the endian marker
    'IM' at offsets 124-127, exactly as `save -v7.3` does on a little-endian machine."""
    stamp = (created or datetime.now()).strftime("%a %b %d %H:%M:%S %Y")
    text = f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {stamp} HDF5 schema 1.00 ."
    return text.encode("ascii").ljust(116, b" ") + bytes(8) + b"\x00\x02IM"


@contextmanager
def create_matfile(path: str | Path) -> Iterator[h5py.File]:
    """Write a v7.3 MAT-file: yields an open h5py file with a 512-byte user block; on success the
    MATLAB header is stamped and the file appears at `path` atomically (never half written)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with h5py.File(partial, "w", userblock_size=HEADER_BYTES, libver="earliest") as f:
            yield f
        with open(partial, "r+b") as raw:
            raw.write(matlab_header())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def set_matlab_class(obj: h5py.Dataset | h5py.Group, matlab_class: str) -> None:
    obj.attrs["MATLAB_class"] = np.bytes_(matlab_class)


def set_struct(group: h5py.Group, field_names: Sequence[str]) -> None:
    """Mark a group as a MATLAB struct; MATLAB lists (and only shows) fields in MATLAB_fields."""
    set_matlab_class(group, "struct")
    vlen = h5py.vlen_dtype(np.dtype("S1"))
    names = np.empty(len(field_names), dtype=object)
    names[:] = [np.frombuffer(name.encode("ascii"), dtype="S1") for name in field_names]
    group.attrs.create("MATLAB_fields", names, dtype=vlen)


def ref_array(refs: Sequence[h5r.Reference]) -> np.ndarray:
    data = np.empty(len(refs), dtype=h5py.ref_dtype)
    data[:] = list(refs)
    return data


def write_refs(
    group: h5py.Group, name: str, refs: Sequence[h5r.Reference], matlab_class: str | None = "cell"
) -> h5py.Dataset:
    """A MATLAB N x 1 cell array, or (matlab_class None) a field of a 1 x N struct array:
    object references, HDF5 shape (1, N)."""
    ds = group.create_dataset(name, data=ref_array(refs).reshape(1, -1))
    if matlab_class:
        set_matlab_class(ds, matlab_class)
    return ds


class RefWriter:
    """Creates the datasets under `/#refs#` that cell elements point to, and returns their refs.

    Names follow MATLAB's scheme (a, b, ..., z, ba, bb, ...); `a` is MATLAB's canonical empty."""

    def __init__(self, f: h5py.File):
        # Appending to an existing file (tests patch files) must not reuse a taken name.
        self._existing = REFS_GROUP in f
        self._group = f.require_group(REFS_GROUP)
        self._gid = self._group.id
        self._types: dict[np.dtype, h5t.TypeID] = {}
        self._spaces: dict[tuple[int, ...], h5s.SpaceID] = {}
        self._scalar_space = h5s.create(h5s.SCALAR)
        if "a" not in self._group:
            empty = self._group.create_dataset("a", data=np.zeros(2, dtype=np.uint64))
            set_matlab_class(empty, "canonical empty")
            empty.attrs["MATLAB_empty"] = np.uint8(1)
        self._count = len(self._group)

    def _next_name(self) -> bytes:
        while True:
            n, letters = self._count, ""
            while True:
                n, rem = divmod(n, 26)
                letters = chr(ord("a") + rem) + letters
                if n == 0:
                    break
            self._count += 1
            if not self._existing or letters not in self._group:
                return letters.encode("ascii")

    def _type(self, dtype: np.dtype) -> h5t.TypeID:
        if dtype not in self._types:
            self._types[dtype] = h5t.py_create(dtype)
        return self._types[dtype]

    def _space(self, shape: tuple[int, ...]) -> h5s.SpaceID:
        if shape not in self._spaces:
            self._spaces[shape] = h5s.create_simple(shape)
        return self._spaces[shape]

    def _attr(self, dsid: h5d.DatasetID, name: bytes, value: np.ndarray) -> None:
        attr = h5a.create(dsid, name, self._type(value.dtype), self._scalar_space)
        attr.write(value)

    def _dataset(self, data: np.ndarray, matlab_class: bytes) -> h5d.DatasetID:
        data = np.ascontiguousarray(data)
        dsid = h5d.create(
            self._gid, self._next_name(), self._type(data.dtype), self._space(data.shape)
        )
        dsid.write(h5s.ALL, h5s.ALL, data)
        self._attr(dsid, b"MATLAB_class", _CLASS_VALUES[matlab_class])
        return dsid

    def double(self, data: np.ndarray | float) -> h5r.Reference:
        """A referenced double array in HDF5 order: a scalar is (1, 1), a 1-D array of L values
        becomes (1, L), i.e. MATLAB's L x 1 column."""
        data = np.asarray(data, dtype=np.float64)
        if data.ndim < 2:
            data = data.reshape(1, -1)
        return h5r.create(self._dataset(data, b"double"), b".", h5r.OBJECT)

    def char(self, text: str | None) -> h5r.Reference:
        """A referenced 1 x L char array; '' or None becomes MATLAB's empty char (0 x 0)."""
        if not text:
            dsid = self._dataset(np.zeros(2, dtype=np.uint64), b"char")
            self._attr(dsid, b"MATLAB_empty", _ONE_U8)
        else:
            codes = np.frombuffer(text.encode("utf-16-le"), dtype=np.uint16).reshape(-1, 1)
            dsid = self._dataset(codes, b"char")
            self._attr(dsid, b"MATLAB_int_decode", _TWO_I32)
        return h5r.create(dsid, b".", h5r.OBJECT)


class ElementError(ValueError):
    """A referenced cell / struct element is not what the caller reads (`index`: 0-based, in the
    refs passed)."""

    def __init__(self, index: int, problem: str):
        self.index, self.problem = index, problem
        super().__init__(f"element {index}: {problem}")


class RefShapeError(ElementError):
    """A referenced element does not hold the number of values the caller expects."""

    def __init__(self, index: int, size: int, expected: int):
        self.size, self.expected = size, expected
        super().__init__(index, f"{size} values, expected {expected}")


def is_ref_dataset(ds: h5py.Dataset) -> bool:
    return h5py.check_ref_dtype(ds.dtype) is not None


def read_refs(ds: h5py.Dataset, a: int = 0, b: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Elements [a, b) of a (1, N), (N, 1) or (N,) reference dataset: the references and their
    object addresses (equal address = the same referenced dataset, decoded once)."""
    long_axis = int(np.argmax(ds.shape))
    b = ds.shape[long_axis] if b is None else b
    start, count = [0] * ds.ndim, [1] * ds.ndim
    start[long_axis], count[long_axis] = a, b - a
    index = tuple(slice(s, s + c) for s, c in zip(start, count, strict=True))
    refs = ds[index].ravel()
    addresses = np.empty(b - a, dtype=np.uint64)
    if b > a:
        space = ds.id.get_space()
        space.select_hyperslab(tuple(start), tuple(count))
        ds.id.read(h5s.create_simple((b - a,)), space, addresses, mtype=h5t.STD_REF_OBJ)
    return refs, addresses


def _deref(fid: h5py.h5f.FileID, ref: h5r.Reference | h5d.DatasetID) -> h5d.DatasetID:
    """The dataset a cell element references; a null reference or one to a group (or a named
    type) is refused (ValueError, reported with the element's index)."""
    if isinstance(ref, h5d.DatasetID):
        return ref
    if not isinstance(ref, h5r.Reference) or not ref:
        raise ValueError("null object reference")
    obj = h5r.dereference(ref, fid)
    if not isinstance(obj, h5d.DatasetID):
        kind = "a group" if isinstance(obj, h5py.h5g.GroupID) else type(obj).__name__
        raise ValueError(f"references {kind}, expected an array")
    return obj


_CLASS_TYPE = h5t.py_create(np.dtype("S32"))  # MATLAB class names are short: read padded


def _matlab_class(dsid: h5d.DatasetID) -> str | None:
    """The element's MATLAB_class attribute (None when it has none). One open and one read
    into a reused buffer: this runs once per cell element, millions of times in a large file."""
    try:
        attr = h5a.open(dsid, b"MATLAB_class")
    except KeyError:
        return None
    value = np.empty((), dtype="S32")
    try:
        attr.read(value, mtype=_CLASS_TYPE)
    except (TypeError, OSError, RuntimeError):  # not a string attribute
        return "?"
    return value.item().decode("ascii", "replace")


INTEGER_CLASSES = {f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)}
NUMERIC_CLASSES = {"double", "single", "logical", *INTEGER_CLASSES}
EMPTY_CLASS = "canonical empty"  # MATLAB's shared empty element (`#refs#/a`)


def _check_element(dsid: h5d.DatasetID, expected: str) -> None:
    """A char element must be MATLAB class char (or have no class and uint16 codes) holding
    integer codes; a numeric one a numeric class (or none) holding numbers."""
    matlab_class = _matlab_class(dsid)
    type_class = dsid.get_type().get_class()
    if matlab_class == EMPTY_CLASS and _is_matlab_empty(dsid):
        return
    if expected == "char":
        # without a class (files not written by MATLAB), uint16 codes are taken for char
        codes = type_class == h5t.INTEGER and dsid.dtype in (np.uint16, np.uint64)
        if matlab_class not in ("char", None) or (matlab_class is None and not codes):
            held = matlab_class or f"missing, HDF5 {_TYPE_NAMES.get(type_class, 'other')} data"
            raise ValueError(f"MATLAB class {held}, expected char")
        if type_class != h5t.INTEGER:
            kind = _TYPE_NAMES.get(type_class, "other")
            raise ValueError(f"HDF5 {kind} data, expected char codes")
        return
    if matlab_class is not None and matlab_class not in NUMERIC_CLASSES:
        raise ValueError(f"MATLAB class {matlab_class}, expected a number")
    if type_class not in (h5t.INTEGER, h5t.FLOAT):
        raise ValueError(f"HDF5 {_TYPE_NAMES.get(type_class, 'other')} data, expected numbers")


_TYPE_NAMES = {h5t.INTEGER: "integer", h5t.FLOAT: "float", h5t.STRING: "string",
               h5t.COMPOUND: "compound", h5t.REFERENCE: "reference", h5t.ENUM: "enum",
               h5t.VLEN: "variable-length", h5t.ARRAY: "array", h5t.OPAQUE: "opaque",
               h5t.BITFIELD: "bitfield"}


def _element(fid: h5py.h5f.FileID, ref, index: int, expected: str) -> h5d.DatasetID:
    try:
        dsid = _deref(fid, ref)
        _check_element(dsid, expected)
        return dsid
    except ValueError as exc:
        raise ElementError(index, str(exc)) from None


def _unique(
    refs: np.ndarray, addresses: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct refs, for each ref the index of its distinct one, each distinct one's index)."""
    if addresses is None:
        return refs, np.arange(len(refs)), np.arange(len(refs))
    _, first, inverse = np.unique(addresses, return_index=True, return_inverse=True)
    return refs[first], inverse, first


def _is_matlab_empty(dsid: h5d.DatasetID) -> bool:
    """MATLAB stores an empty array as its dimensions (uint64, 1-D) flagged MATLAB_empty."""
    return dsid.rank == 1 and h5a.exists(dsid, b"MATLAB_empty")


def _decode_char(dsid: h5d.DatasetID) -> str | None:
    if _is_matlab_empty(dsid):
        return None
    buf = np.empty(dsid.shape, dtype=np.uint16)
    if not buf.size:
        return None
    dsid.read(h5s.ALL, h5s.ALL, buf)
    # MATLAB is column-major: a 1 x L char is stored (L, 1); a 2-D char reads column-wise.
    return buf.T.tobytes().decode("utf-16-le")


def read_chars(
    fid: h5py.h5f.FileID, refs: np.ndarray, addresses: np.ndarray | None = None
) -> list[str | None]:
    """Decode referenced MATLAB char arrays (uint16 codes); an empty char array gives None.
    An element that is not a MATLAB char array raises ElementError."""
    unique, inverse, first = _unique(refs, addresses)
    values = []
    for i, ref in enumerate(unique):
        dsid = _element(fid, ref, int(first[i]), "char")
        try:
            values.append(_decode_char(dsid))
        except UnicodeDecodeError:
            raise ElementError(int(first[i]), "not valid UTF-16 text") from None
    return [values[i] for i in inverse]


def read_doubles(
    fid: h5py.h5f.FileID, refs: np.ndarray, size: int, addresses: np.ndarray | None = None
) -> np.ndarray:
    """Referenced numeric arrays of `size` values each, as float64 rows (n, size).

    An empty element reads as NaN when `size == 1`; any other mismatch raises RefShapeError, an
    element that is not numeric ElementError."""
    unique, inverse, first = _unique(refs, addresses)
    out = np.empty((len(unique), size), dtype=np.float64)
    for i, ref in enumerate(unique):
        dsid = _element(fid, ref, int(first[i]), "number")
        n = 0 if _is_matlab_empty(dsid) else int(np.prod(dsid.shape))
        if n == 0 and size == 1:
            out[i] = np.nan
        elif n != size:
            raise RefShapeError(int(first[i]), n, size)
        else:
            dsid.read(h5s.create_simple((n,)), h5s.ALL, out[i])
    return out[inverse]
