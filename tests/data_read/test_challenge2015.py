"""The real ICU sample (PulseDB Subset layout) reads in full, with the file's own labels."""

from __future__ import annotations

import h5py
import numpy as np

from bpfm.data.pulsedb import open_pulsedb


def test_challenge2015_reads_689_windows_of_26_subjects(challenge2015_file):
    with open_pulsedb(challenge2015_file) as pulse:
        assert (pulse.kind, pulse.name, pulse.n_segments) == ("subset", "challenge2015_sample", 689)
        batches = list(pulse.iter_batches(chunk_size=256))
        assert pulse.dropped == {}
    sbp = np.concatenate([b.sbp for b in batches])
    dbp = np.concatenate([b.dbp for b in batches])
    ecg = np.concatenate([b.ecg for b in batches])
    subjects = [s for b in batches for s in b.subject]
    with h5py.File(challenge2015_file, "r") as f:
        group = f["Subset"]
        want_sbp, want_dbp = group["SBP"][0], group["DBP"][0]
        want_ecg = group["Signals"][:, 0, :].T
        names = ["".join(map(chr, f[ref][()].ravel())) for ref in group["Subject"][0]]
    assert len(sbp) == 689 and len(set(subjects)) == 26
    np.testing.assert_array_equal(sbp, want_sbp.astype(np.float32))
    np.testing.assert_array_equal(dbp, want_dbp.astype(np.float32))
    np.testing.assert_array_equal(ecg, want_ecg.astype(np.float32))
    # Record names such as 'a225l' carry no source digit: kept whole, source 'other'.
    assert subjects == names
    assert {s for b in batches for s in b.source} == {"other"}
    assert {g for b in batches for g in b.gender} == {None}
    assert all(np.isnan(b.age).all() and np.isnan(b.bmi).all() for b in batches)
    first = [b for b in batches][0]
    k = [i for i, s in enumerate(subjects) if s == subjects[0]]
    np.testing.assert_array_equal(first.segment_index[:len(k)], np.arange(len(k)))
