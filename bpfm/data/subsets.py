"""Python replacement for PulseDB's `Generate_Subsets.m`: Subj_Wins files + an Info file ->
a Subset file in the v7.3 layout MATLAB's `save(..., 'Subset', '-v7.3')` writes.

Same semantics as the MATLAB script: subjects in sorted order, each subject's segments in the
Info file's order, `Subj_SegIDX` 1-based into the subject's full `Subj_Wins` array (IncludeFlag is
not consulted), Height/Weight/BMI only for VitalDB subjects (source digit 1), NaN otherwise.
Streams subject by subject in blocks, so memory stays bounded whatever the subset's size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np

from bpfm.data.layouts import WINDOW, SubjWinsLayout, open_hdf5, read_error
from bpfm.data.matfile import (
    RefShapeError,
    RefWriter,
    create_matfile,
    is_ref_dataset,
    read_chars,
    read_doubles,
    read_refs,
    ref_array,
    set_matlab_class,
    set_struct,
)
from bpfm.errors import DataError

log = logging.getLogger(__name__)

BLOCK = 256
SEGMENT_FOLDERS = {"0": "PulseDB_MIMIC", "1": "PulseDB_Vital"}
NUMERIC_FIELDS = ("SBP", "DBP", "Age", "Height", "Weight", "BMI")


def read_info(path: Path) -> tuple[list[str], np.ndarray]:
    """An Info file's (Subj_Name per segment, 0-based Subj_SegIDX per segment)."""
    with open_hdf5(path) as h5:
        keys = [k for k in h5 if not k.startswith("#")]
        if len(keys) != 1 or not isinstance(h5[keys[0]], h5py.Group):
            raise DataError(path, "Info", f"expected one struct variable, found {keys or 'none'}")
        var = keys[0]
        group = h5[var]
        columns = []
        for field, reader, args in (
            ("Subj_Name", read_chars, ()),
            ("Subj_SegIDX", read_doubles, (1,)),
        ):
            if field not in group:
                raise DataError(path, f"{var}/{field}", "missing field")
            ds = group[field]
            try:
                refs, addresses = (
                    read_refs(ds) if is_ref_dataset(ds) else (np.array([ds.id], dtype=object), None)
                )
                columns.append(reader(h5.id, refs, *args, addresses=addresses))
            except (RefShapeError, OSError, RuntimeError, ValueError) as exc:
                raise read_error(path, f"{var}/{field}", exc) from exc
    names, idx = columns[0], columns[1][:, 0]
    if len(names) != len(idx):
        raise DataError(
            path, f"{var}/Subj_SegIDX", f"{len(idx)} values, Subj_Name has {len(names)}"
        )
    for row, name in enumerate(names):
        if not name or len(name) < 8:
            raise DataError(
                path, f"{var}/Subj_Name", f"row {row}: {name!r} is not pXXXXXX + source digit"
            )
    bad = np.flatnonzero(~np.isfinite(idx) | (idx < 1) | (idx != np.round(idx)))
    if len(bad):
        raise DataError(
            path, f"{var}/Subj_SegIDX", f"row {bad[0]}: {idx[bad[0]]} is not a 1-based index"
        )
    return names, idx.astype(np.int64) - 1


def find_segment_file(segment_dir: Path, subj_name: str) -> Path | None:
    """`<segment_dir>/[PulseDB_MIMIC|PulseDB_Vital/]<Subj_Name[:7]>.mat`, the source's folder
    first."""
    file = f"{subj_name[:7]}.mat"
    preferred = SEGMENT_FOLDERS.get(subj_name[-1])
    folders = [preferred] if preferred else []
    folders += [f for f in (*SEGMENT_FOLDERS.values(), "") if f != preferred]
    for folder in folders:
        candidate = segment_dir / folder / file
        if candidate.is_file():
            return candidate
    return None


class SubsetWriter:
    """Appends rows, subject by subject, to the `/Subset` of a file open in `create_matfile`.

    Equal strings of one subject share one referenced char array: MATLAB reads them like
    distinct ones, and it saves an HDF5 dataset per row (the slow part of writing)."""

    def __init__(self, f: h5py.File, n: int, compression: str | None = None):
        group = f.create_group("Subset")
        set_struct(
            group, ("Subject", "Signals", "SBP", "DBP", "Age", "Gender", "Height", "Weight", "BMI")
        )
        self._out = {
            "Signals": group.create_dataset(
                "Signals",
                shape=(WINDOW, 3, n),
                dtype=np.float64,
                chunks=(WINDOW, 3, max(1, min(n, 64))),
                compression=compression,
            )
        }
        for name in NUMERIC_FIELDS:
            self._out[name] = group.create_dataset(name, shape=(1, n), dtype=np.float64)
        for name in ("Subject", "Gender"):
            self._out[name] = group.create_dataset(name, shape=(1, n), dtype=h5py.ref_dtype)
        for name, ds in self._out.items():
            set_matlab_class(ds, "cell" if name in ("Subject", "Gender") else "double")
        self._refs = RefWriter(f)
        self._texts: dict[str | None, object] = {}
        self._subject: str | None = None
        self.n = n
        self.pos = 0

    def append(
        self,
        subj_name: str,
        signals: np.ndarray,
        values: dict[str, np.ndarray | None],
        gender: list[str | None],
    ) -> None:
        """Rows of one subject: signals (n, 3, 1250) [ECG_F, PPG_F, ABP_Raw]; values by Subset
        field name (SBP, DBP, Age, Height, Weight, BMI; None = NaN). Height/Weight/BMI are kept
        for VitalDB subjects only (source digit 1), as Generate_Subsets.m does."""
        n, pos = len(signals), self.pos
        if pos + n > self.n:
            raise ValueError(f"SubsetWriter: {pos + n} rows for a subset of {self.n}")
        if subj_name != self._subject:
            self._subject, self._texts = subj_name, {subj_name: self._refs.char(subj_name)}
        out = self._out
        out["Signals"][:, :, pos : pos + n] = np.asarray(signals, dtype=np.float64).transpose(
            2, 1, 0
        )
        vital = subj_name.endswith("1")
        for name in NUMERIC_FIELDS:
            column = values.get(name)
            if column is None or (name in ("Height", "Weight", "BMI") and not vital):
                column = np.full(n, np.nan)
            out[name][0, pos : pos + n] = column
        for text in set(gender) - set(self._texts):
            self._texts[text] = self._refs.char(text)
        out["Gender"][0, pos : pos + n] = ref_array([self._texts[g] for g in gender])
        out["Subject"][0, pos : pos + n] = ref_array([self._texts[subj_name]] * n)
        self.pos += n


def _copy_block(
    layout: SubjWinsLayout, rows: np.ndarray, subj_name: str, writer: SubsetWriter
) -> None:
    signals = np.stack(
        [layout.waveforms(name, rows) for name in ("ECG_F", "PPG_F", "ABP_Raw")], axis=1
    )
    values = {
        field: layout.scalars(source, rows)
        for field, source in (
            ("SBP", "SegSBP"),
            ("DBP", "SegDBP"),
            ("Age", "Age"),
            ("Height", "Height"),
            ("Weight", "Weight"),
            ("BMI", "BMI"),
        )
    }
    writer.append(subj_name, signals, values, layout.chars("Gender", rows) or [None] * len(rows))


def generate_subsets(
    segment_dir: str | Path,
    info_file: str | Path,
    out_file: str | Path,
    *,
    compression: str | None = None,
) -> Path:
    """Build one Subset file from Subj_Wins files under `segment_dir` and an Info file.

    `compression` ('gzip' as MATLAB does, or None, faster) applies to Signals. The file appears
    at `out_file` only when complete."""
    segment_dir, info_file, out_file = Path(segment_dir), Path(info_file), Path(out_file)
    names, seg_idx = read_info(info_file)
    if not names:
        raise DataError(info_file, "Info", "empty (0 segments)")
    by_subject: dict[str, list[int]] = {}
    for name, k in zip(names, seg_idx, strict=True):
        by_subject.setdefault(name, []).append(int(k))
    subjects = sorted(by_subject)
    log.info(
        "%s: %d segments of %d subjects from %s",
        out_file.name,
        len(names),
        len(subjects),
        info_file.name,
    )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with create_matfile(out_file) as f:
        writer = SubsetWriter(f, len(names), compression)
        for i, subj_name in enumerate(subjects):
            path = find_segment_file(segment_dir, subj_name)
            if path is None:
                raise DataError(
                    info_file,
                    "Subj_Name",
                    f"no segment file {subj_name[:7]}.mat "
                    f"for subject {subj_name} under {segment_dir}",
                )
            with open_hdf5(path) as h5:
                if "Subj_Wins" not in h5:
                    raise DataError(path, "Subj_Wins", "missing group")
                layout = SubjWinsLayout(h5, path)
                wanted = np.asarray(by_subject[subj_name], dtype=np.int64)
                if wanted.max() >= layout.n:
                    raise DataError(
                        path,
                        "Subj_Wins",
                        f"Subj_SegIDX {wanted.max() + 1} of "
                        f"{info_file.name} beyond its {layout.n} segments",
                    )
                for a in range(0, len(wanted), BLOCK):
                    _copy_block(layout, wanted[a : a + BLOCK], subj_name, writer)
            if (i + 1) % max(1, len(subjects) // 10) == 0:
                log.info("%s: %d/%d subjects", out_file.name, i + 1, len(subjects))
    return out_file
