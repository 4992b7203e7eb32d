"""Read PulseDB Subset and Subj_Wins files (MATLAB v7.3) as validated, memory-bounded batches.

Row checks (strict by default: the first bad row raises; `drop_invalid=True` drops and counts):
an empty Subject, NaN/inf in ECG or PPG, NaN/inf SBP or DBP, SBP or DBP outside 20-300 mmHg,
SBP <= DBP. A row failing several checks is counted once, under the first reason in `REASONS`.
ABP is carried, not validated: it is neither a model input nor the label source (labels are
SBP/DBP), so NaN/inf samples in ABP pass through unchanged. Age/Height/Weight/BMI may be NaN
(unknown; MIMIC has no Height/Weight/BMI). Rows are named 0-based, in file order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bpfm.data.layouts import H5_ERRORS, WINDOW, SubjWinsLayout, SubsetLayout, one_line, open_hdf5
from bpfm.data.subsets import generate_subsets
from bpfm.errors import DataError

__all__ = [
    "SAMPLE_RATE",
    "WINDOW",
    "BP_RANGE",
    "REASONS",
    "SegmentBatch",
    "PulseDBFile",
    "open_pulsedb",
    "split_subject",
    "generate_subsets",
]

log = logging.getLogger(__name__)

SAMPLE_RATE = 125
BP_RANGE = (20.0, 300.0)
SOURCE_DIGITS = {"0": "mimic", "1": "vitaldb"}
REASONS = (
    "empty_subject",
    "nonfinite_ecg",
    "nonfinite_ppg",
    "nonfinite_sbp",
    "nonfinite_dbp",
    "sbp_out_of_range",
    "dbp_out_of_range",
    "sbp_not_above_dbp",
)


@dataclass
class SegmentBatch:
    """Consecutive valid segments of one file; arrays share the first dimension n."""

    ecg: np.ndarray
    ppg: np.ndarray
    abp: np.ndarray | None
    sbp: np.ndarray
    dbp: np.ndarray
    age: np.ndarray
    height: np.ndarray
    weight: np.ndarray
    bmi: np.ndarray
    gender: list[str | None]
    subject: list[str]
    source: list[str]
    segment_index: np.ndarray

    def __len__(self) -> int:
        return len(self.sbp)


def split_subject(name: str) -> tuple[str, str]:
    """'p0001231' -> ('p000123', 'vitaldb'); a name without a source digit is kept whole."""
    source = SOURCE_DIGITS.get(name[-1:])
    return (name[:-1], source) if source else (name, "other")


def _subj_wins_source(path: Path, layout: SubjWinsLayout) -> str:
    """Subj_Wins subject ids carry no source digit: the release folder names the source, and
    failing that the fields do (only VitalDB files have Height/Weight/BMI)."""
    folder = path.parent.name.lower()
    if folder == "pulsedb_mimic":
        return "mimic"
    if folder == "pulsedb_vital":
        return "vitaldb"
    return "vitaldb" if layout.has("Height") else "mimic"


@dataclass
class _RawRows:
    rows: np.ndarray
    ecg: np.ndarray
    ppg: np.ndarray
    abp: np.ndarray | None
    sbp: np.ndarray
    dbp: np.ndarray
    age: np.ndarray
    height: np.ndarray
    weight: np.ndarray
    bmi: np.ndarray
    gender: list[str | None]
    names: list[str | None]


def _float32(values: np.ndarray | None, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, np.nan, dtype=np.float32)
    return values.astype(np.float32)


class PulseDBFile:
    """An open PulseDB file: `kind` is 'subset' or 'subj_wins'. Use `open_pulsedb`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._h5 = open_hdf5(self.path)
        try:
            if "Subset" in self._h5:
                self.kind = "subset"
                self._layout = SubsetLayout(self._h5, self.path)
                self.n_segments = self._layout.n
            elif "Subj_Wins" in self._h5:
                self.kind = "subj_wins"
                self._layout = SubjWinsLayout(self._h5, self.path)
                self.n_segments = len(self._layout.included)
                self._source = _subj_wins_source(self.path, self._layout)
            else:
                found = ", ".join(sorted(self._h5)) or "nothing"
                raise DataError(
                    self.path,
                    "Subset",
                    f"missing group (not a PulseDB Subset or Subj_Wins file; found: {found})",
                )
        except H5_ERRORS as exc:  # corrupt metadata the checks above did not reach
            self._h5.close()
            raise _malformed(self.path, exc) from None
        except BaseException:
            self._h5.close()
            raise
        self._dropped: dict[str, int] = {}
        self._fields = (
            {
                "subject": "Subset/Subject",
                "ecg": "Subset/Signals",
                "ppg": "Subset/Signals",
                "sbp": "Subset/SBP",
                "dbp": "Subset/DBP",
            }
            if self.kind == "subset"
            else {
                "subject": "Subj_Wins/SubjectID",
                "ecg": "Subj_Wins/ECG_F",
                "ppg": "Subj_Wins/PPG_F",
                "sbp": "Subj_Wins/SegSBP",
                "dbp": "Subj_Wins/SegDBP",
            }
        )
        log.info("%s: PulseDB %s file, %d segments", self.path, self.kind, self.n_segments)

    @property
    def name(self) -> str:
        """The `subset` partition value: file name without `_Subset.mat`, lower-cased."""
        if self.kind == "subj_wins":
            return "segments"
        stem = self.path.name
        for suffix in (".mat", "_Subset", "_subset"):
            stem = stem.removesuffix(suffix)
        return stem.lower()

    @property
    def dropped(self) -> dict[str, int]:
        """Rows dropped so far by the current `iter_batches(drop_invalid=True)`, per reason."""
        return dict(self._dropped)

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> PulseDBFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def iter_batches(
        self, chunk_size: int = 1024, drop_invalid: bool = False
    ) -> Iterator[SegmentBatch]:
        """Validated batches of at most `chunk_size` segments, in file order.

        Memory is bounded by `chunk_size` whatever the file size. `segment_index` counts every
        row of the subject in this file (dropped ones too, and for Subj_Wins files excluded
        ones too: it is the 0-based Subj_Wins index), so ids stay stable under `drop_invalid`."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self._dropped = {}
        seen: dict[str, int] = {}
        chunks = self._raw_chunks(chunk_size)
        while True:
            try:
                raw = next(chunks, None)
            except H5_ERRORS as exc:  # corrupt data or metadata the layouts did not name
                raise _malformed(self.path, exc) from None
            if raw is None:
                return
            batch = self._validated(raw, seen, drop_invalid)
            if len(batch):
                yield batch

    def _raw_chunks(self, chunk_size: int) -> Iterator[_RawRows]:
        layout = self._layout
        if isinstance(layout, SubsetLayout):
            for a in range(0, layout.n, chunk_size):
                b = min(a + chunk_size, layout.n)
                ecg, ppg, abp = layout.signals(a, b)
                n = b - a
                yield _RawRows(
                    rows=np.arange(a, b),
                    ecg=ecg,
                    ppg=ppg,
                    abp=abp,
                    sbp=layout.vector("SBP", a, b),
                    dbp=layout.vector("DBP", a, b),
                    age=_float32(layout.vector("Age", a, b), n),
                    height=_float32(layout.vector("Height", a, b), n),
                    weight=_float32(layout.vector("Weight", a, b), n),
                    bmi=_float32(layout.vector("BMI", a, b), n),
                    gender=layout.chars("Gender", a, b) or [None] * n,
                    names=layout.chars("Subject", a, b),
                )
            return
        for a in range(0, len(layout.included), chunk_size):
            rows = layout.included[a : a + chunk_size]
            n = len(rows)
            names = layout.chars("SubjectID", rows) or [self.path.stem] * n
            yield _RawRows(
                rows=rows,
                ecg=layout.waveforms("ECG_F", rows).astype(np.float32),
                ppg=layout.waveforms("PPG_F", rows).astype(np.float32),
                abp=layout.waveforms("ABP_Raw", rows).astype(np.float32),
                sbp=layout.scalars("SegSBP", rows),
                dbp=layout.scalars("SegDBP", rows),
                age=_float32(layout.scalars("Age", rows), n),
                height=_float32(layout.scalars("Height", rows), n),
                weight=_float32(layout.scalars("Weight", rows), n),
                bmi=_float32(layout.scalars("BMI", rows), n),
                gender=layout.chars("Gender", rows) or [None] * n,
                names=names,
            )

    def _row_reasons(self, raw: _RawRows) -> np.ndarray:
        """Per row the index into REASONS of its first problem, or -1."""
        low, high = BP_RANGE
        with np.errstate(invalid="ignore"):
            checks = (
                np.array([not name for name in raw.names]),
                ~np.isfinite(raw.ecg).all(axis=1),
                ~np.isfinite(raw.ppg).all(axis=1),
                ~np.isfinite(raw.sbp),
                ~np.isfinite(raw.dbp),
                np.isfinite(raw.sbp) & ((raw.sbp < low) | (raw.sbp > high)),
                np.isfinite(raw.dbp) & ((raw.dbp < low) | (raw.dbp > high)),
                raw.sbp <= raw.dbp,
            )
        reasons = np.full(len(raw.rows), -1, dtype=np.int64)
        for code in range(len(checks) - 1, -1, -1):
            reasons[checks[code]] = code
        return reasons

    def _problem(self, raw: _RawRows, i: int, code: int) -> DataError:
        row, sbp, dbp = int(raw.rows[i]), float(raw.sbp[i]), float(raw.dbp[i])
        low, high = BP_RANGE
        reason = REASONS[code]
        key, problem = {
            "empty_subject": ("subject", "empty subject id"),
            "nonfinite_ecg": ("ecg", "ECG has NaN/inf samples"),
            "nonfinite_ppg": ("ppg", "PPG has NaN/inf samples"),
            "nonfinite_sbp": ("sbp", f"SBP is {sbp}"),
            "nonfinite_dbp": ("dbp", f"DBP is {dbp}"),
            "sbp_out_of_range": ("sbp", f"SBP {sbp:.1f} mmHg outside {low:g}-{high:g}"),
            "dbp_out_of_range": ("dbp", f"DBP {dbp:.1f} mmHg outside {low:g}-{high:g}"),
            "sbp_not_above_dbp": ("sbp", f"SBP {sbp:.1f} mmHg <= DBP {dbp:.1f} mmHg"),
        }[reason]
        return DataError(self.path, self._fields[key], f"row {row}: {problem}")

    def _validated(self, raw: _RawRows, seen: dict[str, int], drop_invalid: bool) -> SegmentBatch:
        reasons = self._row_reasons(raw)
        bad = np.flatnonzero(reasons >= 0)
        if len(bad) and not drop_invalid:
            raise self._problem(raw, int(bad[0]), int(reasons[bad[0]]))
        for code in reasons[bad]:
            self._dropped[REASONS[code]] = self._dropped.get(REASONS[code], 0) + 1
        index = np.empty(len(raw.rows), dtype=np.int64)
        if self.kind == "subj_wins":
            index[:] = raw.rows
        else:
            for i, name in enumerate(raw.names):
                index[i] = seen.get(name, 0)
                seen[name] = index[i] + 1
        # All rows valid (the usual case): a slice is a view, fancy indexing would copy.
        keep = slice(None) if not len(bad) else np.flatnonzero(reasons < 0)
        names = raw.names[keep] if isinstance(keep, slice) else [raw.names[i] for i in keep]
        gender = raw.gender[keep] if isinstance(keep, slice) else [raw.gender[i] for i in keep]
        if self.kind == "subset":
            pairs = [split_subject(name) for name in names]
            subject, source = [p[0] for p in pairs], [p[1] for p in pairs]
        else:
            subject, source = names, [self._source] * len(names)
        return SegmentBatch(
            ecg=raw.ecg[keep],
            ppg=raw.ppg[keep],
            abp=None if raw.abp is None else raw.abp[keep],
            sbp=raw.sbp[keep].astype(np.float32),
            dbp=raw.dbp[keep].astype(np.float32),
            age=raw.age[keep],
            height=raw.height[keep],
            weight=raw.weight[keep],
            bmi=raw.bmi[keep],
            gender=gender,
            subject=subject,
            source=source,
            segment_index=index[keep],
        )


def _malformed(path: Path, exc: BaseException) -> DataError:
    return DataError(path, "file", f"malformed HDF5 structure ({one_line(exc)[:200]})")


def open_pulsedb(path: str | Path) -> PulseDBFile:
    """Open a PulseDB Subset file (`/Subset`) or a `Subj_Wins` segment file, checked for shape.

    Raises DataError (file, field, problem) for anything that is not a readable PulseDB file."""
    return PulseDBFile(path)
