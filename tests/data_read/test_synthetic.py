"""Synthetic PulseDB: the files hold what synth rendered, in PulseDB's exact v7.3 layout."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest

from bpfm.data.pulsedb import open_pulsedb
from bpfm.data.synth import SUBSET_NAMES, SynthConfig, write_synthetic_pulsedb
from bpfm.errors import BpfmError


def _read_all(path, chunk_size=1024, **kwargs):
    with open_pulsedb(path) as pulse:
        batches = list(pulse.iter_batches(chunk_size=chunk_size, **kwargs))
        kind, name, n = pulse.kind, pulse.name, pulse.n_segments
    cat = {key: np.concatenate([getattr(b, key) for b in batches])
           for key in ("ecg", "ppg", "abp", "sbp", "dbp", "age", "height", "weight", "bmi",
                       "segment_index")}
    for key in ("gender", "subject", "source"):
        cat[key] = [v for b in batches for v in getattr(b, key)]
    return kind, name, n, cat


def _expected(truth, subset):
    rows = {key: [] for key in ("ecg", "ppg", "abp", "sbp", "dbp", "subject", "source",
                                "height", "age", "gender", "segment_index")}
    for subject in truth:
        idx = subject.parts.get(subset)
        if idx is None:
            continue
        r = subject.rendered
        rows["ecg"].append(r.ecg_f[idx])
        rows["ppg"].append(r.ppg_f[idx])
        rows["abp"].append(r.abp_raw[idx])
        rows["sbp"].append(r.sbp[idx])
        rows["dbp"].append(r.dbp[idx])
        vital = subject.source == "vitaldb"
        rows["height"].append(np.full(len(idx), subject.traits["height"] if vital else np.nan))
        rows["age"].append(np.full(len(idx), subject.traits["age"]))
        rows["segment_index"].append(np.arange(len(idx)))
        rows["subject"] += [subject.name[:-1]] * len(idx)
        rows["source"] += [subject.source] * len(idx)
        rows["gender"] += [str(subject.traits["gender"])] * len(idx)
    return {k: (np.concatenate(v) if isinstance(v[0], np.ndarray) else v) for k, v in rows.items()}


@pytest.mark.parametrize("subset", SUBSET_NAMES)
def test_subset_file_holds_what_synth_rendered(small_subsets, small_truth, subset):
    kind, name, n, got = _read_all(small_subsets[subset])
    want = _expected(small_truth, subset)
    assert (kind, name, n) == ("subset", subset.lower(), len(want["sbp"]))
    for key in ("ecg", "ppg", "abp", "sbp", "dbp", "height", "age"):
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], want[key].astype(np.float32), err_msg=key)
    for key in ("subject", "source", "gender"):
        assert got[key] == want[key], key
    np.testing.assert_array_equal(got["segment_index"], want["segment_index"])


def test_subj_wins_file_reads_included_segments_with_raw_index(small_release, small_truth):
    subject = small_truth[0]
    path = next(p for p in small_release.segment_files if p.stem == subject.name[:7])
    kind, name, n, got = _read_all(path, chunk_size=4)
    raw = np.flatnonzero(subject.include)
    assert (kind, name, n) == ("subj_wins", "segments", len(raw))
    assert len(raw) < len(subject.include)  # some IncludeFlag == 0 segments were skipped
    np.testing.assert_array_equal(got["segment_index"], raw)
    np.testing.assert_array_equal(got["ecg"], subject.rendered.ecg_f[raw].astype(np.float32))
    np.testing.assert_array_equal(got["abp"], subject.rendered.abp_raw[raw].astype(np.float32))
    np.testing.assert_array_equal(got["sbp"], subject.rendered.sbp[raw].astype(np.float32))
    assert set(got["subject"]) == {subject.name[:7]}
    assert set(got["source"]) == {subject.source}


def test_generate_subsets_equals_direct_write(tmp_path, small_config, small_subsets):
    direct = write_synthetic_pulsedb(
        tmp_path, dataclasses.replace(small_config, segment_files=False))
    assert not (tmp_path / "Segment_Files").exists()
    for path in direct.subset_files:
        via_info = small_subsets[path.name.removesuffix("_Subset.mat")]
        for a, b in zip(_read_all(path)[3].items(), _read_all(via_info)[3].items(), strict=True):
            assert a[0] == b[0]
            if isinstance(a[1], list):
                assert a[1] == b[1]
            else:
                np.testing.assert_array_equal(a[1], b[1], err_msg=a[0])


@pytest.mark.parametrize("chunk_size", [1, 5, 13, 4096])
def test_chunk_size_does_not_change_what_is_read(small_subsets, chunk_size):
    reference = _read_all(small_subsets["Train"], chunk_size=1024)[3]
    got = _read_all(small_subsets["Train"], chunk_size=chunk_size)[3]
    for key, value in reference.items():
        if isinstance(value, list):
            assert got[key] == value
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_files_have_matlab_v73_layout(small_release):
    train = small_release.subset_files[0]
    with open(train, "rb") as raw:
        header = raw.read(128)
    assert header.startswith(b"MATLAB 7.3 MAT-file, Platform: ")
    assert b"HDF5 schema 1.00 ." in header[:116]
    assert header[124:128] == b"\x00\x02IM"
    with h5py.File(train, "r") as f:
        assert f.userblock_size == 512
        group = f["Subset"]
        assert group.attrs["MATLAB_class"] == b"struct"
        fields = [b"".join(name).decode() for name in group.attrs["MATLAB_fields"]]
        assert sorted(fields) == sorted(group)
        n = group["SBP"].shape[1]
        assert group["Signals"].shape == (1250, 3, n) and group["Signals"].dtype == np.float64
        assert group["Signals"].attrs["MATLAB_class"] == b"double"
        assert group["Subject"].attrs["MATLAB_class"] == b"cell"
        char = f[group["Subject"][0, 0]]
        assert char.name.startswith("/#refs#/")
        assert char.dtype == np.uint16 and char.shape[1] == 1
        assert char.attrs["MATLAB_class"] == b"char" and char.attrs["MATLAB_int_decode"] == 2
    segment = small_release.segment_files[0]
    with h5py.File(segment, "r") as f:
        wins = f["Subj_Wins"]
        assert wins.attrs["MATLAB_class"] == b"struct"
        ecg = f[wins["ECG_F"][0, 0]]
        assert ecg.shape == (1, 1250) and ecg.attrs["MATLAB_class"] == b"double"
    with h5py.File(small_release.info_files[0], "r") as f:
        assert set(f["Train_Info"]) == {"Subj_Name", "Subj_SegIDX"}


def test_pulsedb_subject_structure(small_subsets):
    subjects = {}
    for name, path in small_subsets.items():
        _, _, _, got = _read_all(path)
        subjects[name] = set(zip(got["subject"], got["source"], strict=True))
        assert {"mimic", "vitaldb"} <= set(got["source"]), name
        if name == "Train":
            train_sbp_sd = got["sbp"].std()
        if name == "AAMI_Test":
            aami_sbp_sd = got["sbp"].std()
    assert subjects["Train"] == subjects["CalBased_Test"]
    assert subjects["AAMI_Test"] == subjects["AAMI_Cal"]
    assert not subjects["Train"] & subjects["CalFree_Test"]
    assert not subjects["AAMI_Test"] & (subjects["Train"] | subjects["CalFree_Test"])
    assert aami_sbp_sd > train_sbp_sd


def test_mimic_subjects_have_no_body_size(small_subsets):
    _, _, _, got = _read_all(small_subsets["Train"])
    mimic = np.array([s == "mimic" for s in got["source"]])
    assert np.isnan(got["height"][mimic]).all() and np.isnan(got["bmi"][mimic]).all()
    assert np.isfinite(got["height"][~mimic]).all() and np.isfinite(got["weight"][~mimic]).all()
    assert np.isfinite(got["age"]).all()


def test_same_seed_same_files_other_seed_other_signals(tmp_path, small_config, small_subsets):
    again = write_synthetic_pulsedb(tmp_path / "a", small_config)
    other = write_synthetic_pulsedb(
        tmp_path / "b", dataclasses.replace(small_config, seed=6, segment_files=False))
    first = _read_all(small_subsets["Train"])[3]
    assert _read_all(again.subset_files[0])[3]["subject"] == first["subject"]
    np.testing.assert_array_equal(_read_all(again.subset_files[0])[3]["ecg"], first["ecg"])
    np.testing.assert_array_equal(_read_all(again.subset_files[0])[3]["sbp"], first["sbp"])
    assert _read_all(other.subset_files[0])[3]["subject"] != first["subject"]


def test_signals_are_scaled_and_labels_match_abp(small_subsets):
    _, _, _, got = _read_all(small_subsets["CalFree_Test"])
    for key in ("ecg", "ppg"):
        np.testing.assert_allclose(got[key].min(axis=1), 0.0, atol=1e-6)
        np.testing.assert_allclose(got[key].max(axis=1), 1.0, atol=1e-6)
    assert (got["sbp"] > got["dbp"]).all()
    # ABP_Raw in mmHg: its systolic maxima and diastolic minima bracket the segment labels.
    assert np.abs(got["abp"].max(axis=1) - got["sbp"]).max() < 15
    assert np.abs(got["abp"].min(axis=1) - got["dbp"]).max() < 10


def test_bad_config_is_a_user_error(tmp_path):
    with pytest.raises(BpfmError, match="subjects must be >= 3"):
        write_synthetic_pulsedb(tmp_path, SynthConfig(subjects=2))


def test_column_and_row_waveforms_read_alike(subj_wins_copy):
    with open_pulsedb(subj_wins_copy) as pulse:
        before = next(pulse.iter_batches())
    raw = int(before.segment_index[0])
    with h5py.File(subj_wins_copy, "r+") as f:
        column = f[f["Subj_Wins/ECG_F"][0, raw]][()].reshape(1250, 1)
        f["Subj_Wins/ECG_F"][0, raw] = _column_ref(f, column)
        assert f[f["Subj_Wins/ECG_F"][0, raw]].shape == (1250, 1)
    with open_pulsedb(subj_wins_copy) as pulse:
        after = next(pulse.iter_batches())
    np.testing.assert_array_equal(after.ecg, before.ecg)


def _column_ref(f, column):
    """A (1250, 1)-shaped referenced waveform (MATLAB 1 x 1250 row), as some files store it."""
    ds = f["#refs#"].create_dataset("column_ecg", data=column)
    ds.attrs["MATLAB_class"] = np.bytes_("double")
    return ds.ref


def test_one_segment_subj_wins_stores_fields_inline(tmp_path):
    path = tmp_path / "p000042.mat"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        group = f.create_group("Subj_Wins")
        for name in ("ECG_F", "PPG_F"):
            group[name] = rng.random((1, 1250))
        group["ABP_Raw"] = 80 + 40 * rng.random((1, 1250))
        group["SegSBP"], group["SegDBP"] = np.array([[121.0]]), np.array([[79.0]])
        group["SubjectID"] = np.frombuffer("p000042".encode("utf-16-le"), np.uint16)[:, None]
    with open_pulsedb(path) as pulse:
        batch = next(pulse.iter_batches())
    assert pulse.n_segments == 1 and batch.subject == ["p000042"] and batch.source == ["mimic"]
    assert (batch.sbp[0], batch.dbp[0]) == (121.0, 79.0)
    assert batch.ecg.shape == (1, 1250)
