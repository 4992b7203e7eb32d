"""The fuzz suite's base file: a few windows of the real challenge2015 sample, written as a
small PulseDB Subset file (MATLAB v7.3: chunked Signals, cells of char arrays in #refs#)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from bpfm.data.matfile import create_matfile
from bpfm.data.subsets import SubsetWriter

ROWS = 6


def _chars(f: h5py.File, refs) -> list[str | None]:
    out = []
    for ref in refs:
        ds = f[ref]
        out.append(None if "MATLAB_empty" in ds.attrs else ds[()].T.tobytes().decode("utf-16-le"))
    return out


@pytest.fixture(scope="session")
def fuzz_base(challenge2015_file, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "Fuzz_Subset.mat"
    with h5py.File(challenge2015_file, "r") as f:
        group = f["Subset"]
        signals = group["Signals"][:, :, :ROWS].transpose(2, 1, 0)
        values = {k: group[k][0, :ROWS] for k in ("SBP", "DBP", "Age", "Height", "Weight", "BMI")}
        subjects = _chars(f, group["Subject"][0, :ROWS])
        gender = _chars(f, group["Gender"][0, :ROWS])
    with create_matfile(path) as out:
        writer = SubsetWriter(out, ROWS)
        start = 0
        for end in [*np.flatnonzero(np.diff([hash(s) for s in subjects])) + 1, ROWS]:
            rows = slice(start, int(end))
            writer.append(subjects[start], signals[rows],
                          {k: v[rows] for k, v in values.items()}, gender[rows])
            start = int(end)
    return path
