"""Bad input: each case is one DataError whose one-line message names file, field and problem."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

from bpfm.data.matfile import RefWriter, create_matfile
from bpfm.data.pulsedb import open_pulsedb
from bpfm.data.subsets import generate_subsets
from bpfm.errors import DataError


def _read(path, **kwargs) -> int:
    with open_pulsedb(path) as pulse:
        return sum(len(batch) for batch in pulse.iter_batches(chunk_size=7, **kwargs))


def _error(path, field: str, problem: str, **kwargs) -> DataError:
    with pytest.raises(DataError) as caught:
        _read(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {field}: "), message
    assert problem in message, message
    return caught.value


def _patch(path, name: str, rows, value) -> None:
    with h5py.File(path, "r+") as f:
        ds = f[name]
        data = ds[()]
        data[..., rows] = value
        ds[...] = data


def _replace(path, name: str, data) -> None:
    with h5py.File(path, "r+") as f:
        del f[name]
        f[name] = data


def test_not_hdf5(tmp_path):
    path = tmp_path / "Train_Subset.mat"
    path.write_text("MATLAB 5.0 MAT-file, not HDF5\n")
    _error(path, "file", "not an HDF5 file")


def test_missing_file(tmp_path):
    _error(tmp_path / "Nope_Subset.mat", "file", "not found")


def test_truncated_file(subset_copy):
    os.truncate(subset_copy, subset_copy.stat().st_size * 2 // 3)
    _error(subset_copy, "file", "truncated")


def test_missing_subset_group(tmp_path):
    path = tmp_path / "Other.mat"
    with h5py.File(path, "w") as f:
        f["Data/x"] = np.zeros(3)
    _error(path, "Subset", "missing group")


@pytest.mark.parametrize("field", ["Signals", "SBP", "DBP", "Subject"])
def test_missing_field(subset_copy, field):
    with h5py.File(subset_copy, "r+") as f:
        del f[f"Subset/{field}"]
    _error(subset_copy, f"Subset/{field}", "missing field")


@pytest.mark.parametrize("shape", [(1250, 2), (3, 1250), (1000, 3)])
def test_signals_of_wrong_shape(subset_copy, shape):
    with h5py.File(subset_copy, "r") as f:
        n = f["Subset/Signals"].shape[2]
    _replace(subset_copy, "Subset/Signals", np.zeros((*shape, n)))
    _error(subset_copy, "Subset/Signals", f"shape {(*shape, n)}, expected (1250, 3, N)")


@pytest.mark.parametrize("field", ["SBP", "Age", "Gender"])
def test_field_length_mismatch(subset_copy, field):
    with h5py.File(subset_copy, "r") as f:
        data = f[f"Subset/{field}"][()]
        n = data.shape[1]
    _replace(subset_copy, f"Subset/{field}", data[:, :-1])
    _error(subset_copy, f"Subset/{field}", f"{n - 1} values, Signals has {n} segments")


def test_empty_subset(tmp_path):
    path = tmp_path / "Empty_Subset.mat"
    with create_matfile(path) as f:
        group = f.create_group("Subset")
        group["Signals"] = np.zeros((1250, 3, 0))
        for name in ("SBP", "DBP"):
            group[name] = np.zeros((1, 0))
        group.create_dataset("Subject", shape=(1, 0), dtype=h5py.ref_dtype)
    _error(path, "Subset/Signals", "empty subset (0 segments)")


@pytest.mark.parametrize("channel,value,what", [(0, np.nan, "ECG"), (1, np.inf, "PPG"),
                                                (0, -np.inf, "ECG")])
def test_nonfinite_signal(subset_copy, channel, value, what):
    with h5py.File(subset_copy, "r+") as f:
        f["Subset/Signals"][100, channel, 4] = value
    _error(subset_copy, "Subset/Signals", f"row 4: {what} has NaN/inf samples")


@pytest.mark.parametrize("field,value", [("SBP", np.nan), ("DBP", np.inf)])
def test_nonfinite_label(subset_copy, field, value):
    _patch(subset_copy, f"Subset/{field}", 6, value)
    _error(subset_copy, f"Subset/{field}", f"row 6: {field} is {value}")


def test_sbp_not_above_dbp(subset_copy):
    _patch(subset_copy, "Subset/SBP", 3, 80.0)
    _patch(subset_copy, "Subset/DBP", 3, 90.0)
    _error(subset_copy, "Subset/SBP", "row 3: SBP 80.0 mmHg <= DBP 90.0 mmHg")


@pytest.mark.parametrize("field,value", [("SBP", 12.0), ("SBP", 320.0), ("DBP", 19.5)])
def test_bp_outside_range(subset_copy, field, value):
    _patch(subset_copy, f"Subset/{field}", 2, value)
    _error(subset_copy, f"Subset/{field}", f"row 2: {field} {value:.1f} mmHg outside 20-300")


def test_empty_subject(subset_copy):
    with h5py.File(subset_copy, "r+") as f:
        f["Subset/Subject"][0, 5] = RefWriter(f).char("")
    _error(subset_copy, "Subset/Subject", "row 5: empty subject id")


def test_abp_nan_is_carried_not_rejected(subset_copy):
    with h5py.File(subset_copy, "r+") as f:
        f["Subset/Signals"][10:20, 2, 1] = np.nan
    with open_pulsedb(subset_copy) as pulse:
        batch = next(pulse.iter_batches())
    assert np.isnan(batch.abp[1, 10:20]).all() and np.isfinite(batch.abp[0]).all()


def test_drop_invalid_counts_each_reason_and_keeps_ids(subset_copy):
    with open_pulsedb(subset_copy) as pulse:
        n = pulse.n_segments
        clean = [b for b in pulse.iter_batches()]
    ids = np.concatenate([b.segment_index for b in clean])
    _patch(subset_copy, "Subset/SBP", [1, 2], 5.0)
    _patch(subset_copy, "Subset/DBP", 4, np.nan)
    with h5py.File(subset_copy, "r+") as f:
        f["Subset/Signals"][0, 1, 7] = np.nan
        f["Subset/Signals"][0, 0, 2] = np.inf  # row 2 fails twice: counted once, first reason
    with open_pulsedb(subset_copy) as pulse:
        batches = list(pulse.iter_batches(chunk_size=3, drop_invalid=True))
        assert pulse.dropped == {"sbp_out_of_range": 1, "nonfinite_ecg": 1, "nonfinite_dbp": 1,
                                 "nonfinite_ppg": 1}
    kept = np.concatenate([b.segment_index for b in batches])
    assert len(kept) == n - 4
    np.testing.assert_array_equal(kept, np.delete(ids, [1, 2, 4, 7]))


def test_subj_wins_missing_field(subj_wins_copy):
    with h5py.File(subj_wins_copy, "r+") as f:
        del f["Subj_Wins/PPG_F"]
    _error(subj_wins_copy, "Subj_Wins/PPG_F", "missing field")


def test_subj_wins_waveform_of_wrong_length(subj_wins_copy):
    with h5py.File(subj_wins_copy, "r+") as f:
        f["Subj_Wins/ECG_F"][0, 2] = RefWriter(f).double(np.zeros(1000))
    _error(subj_wins_copy, "Subj_Wins/ECG_F", "row 2: 1000 values, expected 1250")


def test_subj_wins_bad_label(subj_wins_copy):
    with h5py.File(subj_wins_copy, "r+") as f:
        f["Subj_Wins/SegSBP"][0, 1] = RefWriter(f).double(400.0)
    _error(subj_wins_copy, "Subj_Wins/SegSBP", "row 1: SBP 400.0 mmHg outside 20-300")


def test_generate_subsets_missing_segment_file(tmp_path, small_release):
    info = small_release.info_files[0]
    segments = tmp_path / "Segment_Files"
    shutil.copytree(small_release.segment_files[0].parents[1], segments)
    victim = next(segments.rglob("*.mat"))
    victim.unlink()
    out = tmp_path / "Train_Subset.mat"
    with pytest.raises(DataError, match=rf"{info}: Subj_Name: no segment file {victim.name}"):
        generate_subsets(segments, info, out)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_generate_subsets_index_beyond_segments(tmp_path, small_release):
    info = tmp_path / "Train_Info.mat"
    segment = small_release.segment_files[0]
    name = segment.stem + ("1" if segment.parent.name == "PulseDB_Vital" else "0")
    with create_matfile(info) as f:
        refs = RefWriter(f)
        group = f.create_group("Train_Info")
        group["Subj_Name"] = np.array([[refs.char(name)]], dtype=h5py.ref_dtype)
        group["Subj_SegIDX"] = np.array([[refs.double(999.0)]], dtype=h5py.ref_dtype)
    segments = small_release.segment_files[0].parents[1]
    with pytest.raises(DataError, match="Subj_Wins: Subj_SegIDX 999 of Train_Info.mat beyond"):
        generate_subsets(segments, info, tmp_path / "Train_Subset.mat")
