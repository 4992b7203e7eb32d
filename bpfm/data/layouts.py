"""Raw, structurally checked access to PulseDB's two file layouts (no row validation here).

- Subset file: group `/Subset`; `Signals` stored (1250, 3, N) float64 (MATLAB N x 3 x 1250,
  channels ECG_F, PPG_F, ABP_Raw); `SBP`, `DBP`, `Age`, `Height`, `Weight`, `BMI` (1, N);
  `Subject`, `Gender` (1, N) object references to uint16 char arrays in `/#refs#`.
- Subj_Wins file: group `/Subj_Wins` (a 1 x n struct array): every field (1, n) object references,
  waveforms (1, 1250) or (1250, 1), scalars (1, 1), strings uint16 chars.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from bpfm.data.matfile import (
    ElementError,
    is_ref_dataset,
    read_chars,
    read_doubles,
    read_refs,
)
from bpfm.errors import DataError

WINDOW = 1250
SUBSET_REQUIRED = ("Signals", "SBP", "DBP", "Subject")
SUBSET_OPTIONAL_NUMERIC = ("Age", "Height", "Weight", "BMI")
SUBJ_WINS_REQUIRED = ("ECG_F", "PPG_F", "ABP_Raw", "SegSBP", "SegDBP")
SUBJ_WINS_USED = (
    *SUBJ_WINS_REQUIRED,
    "SubjectID",
    "Gender",
    "Age",
    "Height",
    "Weight",
    "BMI",
    "IncludeFlag",
)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def open_hdf5(path: Path) -> h5py.File:
    """Open read-only, turning HDF5's failures into one-line DataErrors."""
    if not path.exists():
        raise DataError(path, "file", "not found")
    if path.is_dir():
        raise DataError(path, "file", "is a folder, expected a .mat file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        message = one_line(exc)
        if "signature" in message:
            problem = "not an HDF5 file (PulseDB needs MATLAB v7.3 MAT-files)"
        elif "truncated" in message or "eof" in message.lower():
            problem = f"truncated HDF5 file ({message})"
        else:
            problem = f"cannot open as HDF5 ({message})"
        raise DataError(path, "file", problem) from exc


def read_error(path: Path, field: str, exc: Exception) -> DataError:
    """A low-level read failure (truncated or corrupt data) as a DataError."""
    return DataError(path, field, f"cannot read, truncated or corrupt file? ({one_line(exc)})")


H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)  # what h5py raises


def member(
    group: h5py.Group, name: str, path: Path, field: str, *, dataset: bool = True
) -> h5py.Dataset | h5py.Group | None:
    """`group[name]` (None when there is no such link), checked to be a dataset (or, with
    `dataset=False`, a group); a link that does not resolve is a DataError, not a KeyError."""
    try:
        if group.get(name, getlink=True) is None:
            return None
        obj = group[name]
    except H5_ERRORS as exc:
        message = one_line(exc)
        dangling = "component not found" in message or "can't open file" in message
        problem = "link does not resolve" if dangling else "cannot open, corrupt HDF5 metadata?"
        raise DataError(path, field, f"{problem} ({message[:200]})") from None
    if dataset and not isinstance(obj, h5py.Dataset):
        raise DataError(path, field, "is a group, expected an array")
    if not dataset and not isinstance(obj, h5py.Group):
        raise DataError(path, field, "is an array, expected a struct (HDF5 group)")
    return obj


def _vector_length(path: Path, field: str, ds: h5py.Dataset) -> int:
    if ds.ndim == 1 or (ds.ndim == 2 and 1 in ds.shape):
        return int(np.prod(ds.shape))
    raise DataError(path, field, f"shape {ds.shape}, expected (1, N)")


def _slice_vector(ds: h5py.Dataset, a: int, b: int) -> np.ndarray:
    if ds.ndim == 1:
        return ds[a:b]
    return ds[0, a:b] if ds.shape[0] == 1 else ds[a:b, 0]


class SubsetLayout:
    """`/Subset` of a PulseDB Subset file; rows are read as slices [a, b)."""

    def __init__(self, h5: h5py.File, path: Path):
        self.path = path
        self._h5 = h5
        group = member(h5, "Subset", path, "Subset", dataset=False)
        fields = ("Signals", "SBP", "DBP", "Subject", "Gender", *SUBSET_OPTIONAL_NUMERIC)
        found = {name: member(group, name, path, f"Subset/{name}") for name in fields}
        self._fields = {name: ds for name, ds in found.items() if ds is not None}
        for name in SUBSET_REQUIRED:
            if name not in self._fields:
                raise DataError(path, f"Subset/{name}", "missing field")
        signals = self._fields["Signals"]
        if signals.ndim != 3 or signals.shape[:2] != (WINDOW, 3):
            raise DataError(
                path,
                "Subset/Signals",
                f"shape {signals.shape}, expected (1250, 3, N) (MATLAB N x 3 x 1250)",
            )
        if signals.dtype.kind not in "fiu":
            raise DataError(path, "Subset/Signals", f"dtype {signals.dtype}, expected double")
        self.n = int(signals.shape[2])
        if self.n == 0:
            raise DataError(path, "Subset/Signals", "empty subset (0 segments)")
        self._signals = signals
        for name, ds in self._fields.items():
            if name == "Signals":
                continue
            field = f"Subset/{name}"
            length = _vector_length(path, field, ds)
            if length != self.n:
                raise DataError(path, field, f"{length} values, Signals has {self.n} segments")
            is_cell = name in ("Subject", "Gender")
            if is_cell and not is_ref_dataset(ds):
                raise DataError(path, field, f"dtype {ds.dtype}, expected a cell array of char")
            if not is_cell and ds.dtype.kind not in "fiu":
                raise DataError(path, field, f"dtype {ds.dtype}, expected double")

    def has(self, name: str) -> bool:
        return name in self._fields

    def signals(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [a, b) as three C-contiguous (n, 1250) float32 arrays: ECG_F, PPG_F, ABP_Raw.

        One HDF5 read of the slab [:, :, a:b], converted to float32 by HDF5 (half the bytes to
        transpose); a value beyond float32's range becomes inf and fails validation."""
        block = np.empty((WINDOW, 3, b - a), dtype=np.float32)
        try:
            self._signals.read_direct(block, np.s_[:, :, a:b])
        except H5_ERRORS as exc:
            raise read_error(self.path, "Subset/Signals", exc) from exc
        return tuple(np.ascontiguousarray(block[:, c, :].T) for c in range(3))

    def vector(self, name: str, a: int, b: int) -> np.ndarray | None:
        if name not in self._fields:
            return None
        try:
            return _slice_vector(self._fields[name], a, b).astype(np.float64)
        except H5_ERRORS as exc:
            raise read_error(self.path, f"Subset/{name}", exc) from exc

    def chars(self, name: str, a: int, b: int) -> list[str | None] | None:
        if name not in self._fields:
            return None
        try:
            return read_chars(self._h5.id, *read_refs(self._fields[name], a, b))
        except ElementError as exc:
            problem = f"row {a + exc.index}: {exc.problem}"
            raise DataError(self.path, f"Subset/{name}", problem) from None
        except H5_ERRORS as exc:
            raise read_error(self.path, f"Subset/{name}", exc) from exc


class SubjWinsLayout:
    """`/Subj_Wins` of a PulseDB segment file; rows are raw (0-based) struct-array indices."""

    def __init__(self, h5: h5py.File, path: Path):
        self.path = path
        self._h5 = h5
        group = member(h5, "Subj_Wins", path, "Subj_Wins", dataset=False)
        found = {n: member(group, n, path, f"Subj_Wins/{n}") for n in SUBJ_WINS_USED}
        self._fields = {name: ds for name, ds in found.items() if ds is not None}
        for name in SUBJ_WINS_REQUIRED:
            if name not in self._fields:
                raise DataError(path, f"Subj_Wins/{name}", "missing field")
        self._elements: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        first = self._fields[SUBJ_WINS_REQUIRED[0]]
        # A 1 x 1 struct (a subject with one segment) stores its fields inline, not as refs.
        self._inline = not is_ref_dataset(first)
        self.n = 1 if self._inline else _vector_length(path, "Subj_Wins/ECG_F", first)
        if self.n == 0:
            raise DataError(path, "Subj_Wins", "empty (0 segments)")
        for name in self._fields:
            self._field_elements(name)
        self._included: np.ndarray | None = None

    @property
    def included(self) -> np.ndarray:
        """Raw indices of the segments PulseDB marks usable (IncludeFlag == 1; all without it)."""
        if self._included is None:
            rows = np.arange(self.n, dtype=np.int64)
            flags = self.scalars("IncludeFlag", rows)
            self._included = rows if flags is None else np.flatnonzero(flags == 1)
        return self._included

    def has(self, name: str) -> bool:
        return name in self._fields

    def _field_elements(self, name: str) -> np.ndarray:
        """The per-segment elements of a field: refs, or the inline dataset of a 1 x 1 struct."""
        if name not in self._elements:
            ds = self._fields[name]
            field = f"Subj_Wins/{name}"
            if self._inline:
                elements = (np.array([ds.id], dtype=object), None)
            else:
                if not is_ref_dataset(ds):
                    raise DataError(self.path, field, f"dtype {ds.dtype}, expected references")
                length = _vector_length(self.path, field, ds)
                if length != self.n:
                    raise DataError(
                        self.path, field, f"{length} values, ECG_F has {self.n} segments"
                    )
                try:
                    elements = read_refs(ds)
                except H5_ERRORS as exc:
                    raise read_error(self.path, field, exc) from exc
            self._elements[name] = elements
        return self._elements[name]

    def _read(self, name: str, rows: np.ndarray, reader, *args):
        field = f"Subj_Wins/{name}"
        refs, addresses = self._field_elements(name)
        try:
            return reader(
                self._h5.id,
                refs[rows],
                *args,
                addresses=None if addresses is None else addresses[rows],
            )
        except ElementError as exc:
            row = int(rows[exc.index])
            raise DataError(self.path, field, f"row {row}: {exc.problem}") from None
        except H5_ERRORS as exc:
            raise read_error(self.path, field, exc) from exc

    def waveforms(self, name: str, rows: np.ndarray) -> np.ndarray:
        return self._read(name, rows, read_doubles, WINDOW)

    def scalars(self, name: str, rows: np.ndarray) -> np.ndarray | None:
        if name not in self._fields:
            return None
        return self._read(name, rows, read_doubles, 1)[:, 0]

    def chars(self, name: str, rows: np.ndarray) -> list[str | None] | None:
        if name not in self._fields:
            return None
        return self._read(name, rows, read_chars)
