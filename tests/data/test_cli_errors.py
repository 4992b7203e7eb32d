"""`bpfm data shard` on bad input: exit 2, one stderr line naming file, field and problem, no
traceback, and no visible shard set left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from bpfm.cli import main
from bpfm.data.shards import MANIFEST


def _shard_fails(capsys, path: Path, out: Path, field: str) -> str:
    code = main(["data", "shard", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("bpfm: error:")]
    assert code == 2
    assert len(errors) == 1 and "Traceback" not in err
    assert str(path) in errors[0] and field in errors[0]
    assert not (out / MANIFEST).exists()
    assert not list(out.rglob("*.parquet"))
    return errors[0]


def _replace(f: h5py.File, name: str, data: np.ndarray) -> None:
    del f[name]
    f.create_dataset(name, data=data).attrs["MATLAB_class"] = np.bytes_(b"double")


def test_not_hdf5(capsys, tmp_path):
    path = tmp_path / "Train_Subset.mat"
    path.write_text("MATLAB 5.0 MAT-file, this is not HDF5\n" * 20)
    line = _shard_fails(capsys, path, tmp_path / "out", "file")
    assert "HDF5" in line


def test_truncated_file(capsys, editable_subset, tmp_path):
    data = editable_subset.read_bytes()
    editable_subset.write_bytes(data[: len(data) // 2])
    _shard_fails(capsys, editable_subset, tmp_path / "out", "")


def test_missing_subset_group(capsys, tmp_path):
    path = tmp_path / "Train_Subset.mat"
    with h5py.File(path, "w") as f:
        f.create_dataset("Other", data=np.zeros(3))
    _shard_fails(capsys, path, tmp_path / "out", "Subset")


@pytest.mark.parametrize("name", ["SBP", "Subject", "Signals"])
def test_missing_field(capsys, editable_subset, tmp_path, name):
    with h5py.File(editable_subset, "r+") as f:
        del f[f"Subset/{name}"]
    _shard_fails(capsys, editable_subset, tmp_path / "out", f"Subset/{name}")


def test_signals_of_the_wrong_shape(capsys, editable_subset, tmp_path):
    with h5py.File(editable_subset, "r+") as f:
        n = f["Subset/SBP"].shape[1]
        _replace(f, "Subset/Signals", np.zeros((1000, 3, n)))
    _shard_fails(capsys, editable_subset, tmp_path / "out", "Subset/Signals")


@pytest.mark.parametrize(
    ("name", "value"), [("Signals", np.nan), ("Signals", np.inf), ("SBP", np.nan), ("DBP", -np.inf)]
)
def test_nan_or_inf(capsys, editable_subset, tmp_path, name, value):
    with h5py.File(editable_subset, "r+") as f:
        if name == "Signals":
            f["Subset/Signals"][100, 1, 4] = value
        else:
            f[f"Subset/{name}"][0, 4] = value
    line = _shard_fails(capsys, editable_subset, tmp_path / "out", f"Subset/{name}")
    assert "row 4" in line


@pytest.mark.parametrize(("sbp", "dbp"), [(80.0, 90.0), (310.0, 80.0), (120.0, 10.0)])
def test_bp_not_plausible(capsys, editable_subset, tmp_path, sbp, dbp):
    with h5py.File(editable_subset, "r+") as f:
        f["Subset/SBP"][0, 2] = sbp
        f["Subset/DBP"][0, 2] = dbp
    line = _shard_fails(capsys, editable_subset, tmp_path / "out", "Subset/")
    assert "row 2" in line


def test_empty_subset(capsys, editable_subset, tmp_path):
    with h5py.File(editable_subset, "r+") as f:
        for name in ("SBP", "DBP", "Age", "Height", "Weight", "BMI"):
            _replace(f, f"Subset/{name}", np.zeros((1, 0)))
        _replace(f, "Subset/Signals", np.zeros((1250, 3, 0)))
        for name in ("Subject", "Gender"):
            del f[f"Subset/{name}"]
            f.create_dataset(f"Subset/{name}", shape=(1, 0), dtype=h5py.ref_dtype)
            f[f"Subset/{name}"].attrs["MATLAB_class"] = np.bytes_(b"cell")
    line = _shard_fails(capsys, editable_subset, tmp_path / "out", "Subset")
    assert "empty" in line or "0 segments" in line or "no segments" in line


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    path = tmp_path / "Train_Subset.mat"
    path.write_bytes(b"\x00" * 4096)
    bpfm = Path(sys.executable).with_name("bpfm")
    done = subprocess.run(
        [str(bpfm), "data", "shard", str(path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("bpfm: error:") == 1 and "Traceback" not in done.stderr
    assert str(path) in done.stderr and not (tmp_path / "o" / MANIFEST).exists()


def test_inspect_of_a_folder_without_manifest(capsys, tmp_path):
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "no _manifest.json" in capsys.readouterr().err
