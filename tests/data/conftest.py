"""Fixtures for the data tests: small Subset files to edit, and readers of the ground truth."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def train_subset_file(synthetic_subset_files) -> Path:
    """The synthetic Train_Subset.mat (MIMIC and VitalDB subjects mixed)."""
    return next(p for p in synthetic_subset_files if p.name == "Train_Subset.mat")


@pytest.fixture
def editable_subset(tmp_path: Path, synthetic_subset_files) -> Path:
    """A private copy of the smallest synthetic Subset file, named like a PulseDB subset."""
    source = next(p for p in synthetic_subset_files if p.name == "AAMI_Test_Subset.mat")
    target = tmp_path / "in" / "AAMI_Test_Subset.mat"
    target.parent.mkdir()
    shutil.copyfile(source, target)
    return target


def read_mat(path: Path) -> dict[str, dict]:
    """segment_id -> row, read straight from the HDF5 with h5py (independent of bpfm's reader):
    signals float64 as stored, the subject without its source digit, k counted per subject."""
    import h5py

    rows: dict[str, dict] = {}
    subset = path.name.removesuffix(".mat").removesuffix("_Subset").lower()
    with h5py.File(path, "r") as f:
        group = f["Subset"]
        signals = group["Signals"][()].transpose(2, 1, 0)
        sbp, dbp = group["SBP"][()].reshape(-1), group["DBP"][()].reshape(-1)
        names = ["".join(map(chr, f[ref][()].reshape(-1))) for ref in group["Subject"][()][0]]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        k = seen.get(name, 0)
        seen[name] = k + 1
        digit = name[-1]
        subject, source = (
            (name[:-1], {"0": "mimic", "1": "vitaldb"}[digit]) if digit in "01" else (name, "other")
        )
        rows[f"{subset}/{subject}/{k}"] = {
            "subject": subject,
            "source": source,
            "ecg": signals[i, 0],
            "ppg": signals[i, 1],
            "abp": signals[i, 2],
            "sbp": sbp[i],
            "dbp": dbp[i],
        }
    return rows
