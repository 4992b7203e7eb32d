"""The synthetic signals encode BP as physiology does: simple features predict unseen subjects."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import find_peaks

from bpfm.data.pulsedb import SAMPLE_RATE, open_pulsedb
from bpfm.data.synth import SynthConfig, write_synthetic_pulsedb


def _features(ecg: np.ndarray, ppg: np.ndarray) -> np.ndarray:
    """Per segment: pulse arrival time (ECG R-peak to the steepest PPG upstroke, s), heart
    rate (bpm) and PPG pulse amplitude (of the [0, 1]-scaled window)."""
    rows = []
    for e, p in zip(ecg, ppg, strict=True):
        r_peaks, _ = find_peaks(e, height=0.6, distance=int(0.3 * SAMPLE_RATE))
        slope = np.gradient(p)
        arrival = [(np.argmax(slope[q + 5:q + 75]) + 5) / SAMPLE_RATE
                   for q in r_peaks if q + 75 <= len(p)]
        peaks, _ = find_peaks(p, distance=37, prominence=0.2)
        feet, _ = find_peaks(-p, distance=37, prominence=0.2)
        rows.append((np.mean(arrival), 60 * SAMPLE_RATE / np.median(np.diff(r_peaks)),
                     p[peaks].mean() - p[feet].mean()))
    return np.array(rows)


def _load(path):
    with open_pulsedb(path) as pulse:
        batches = list(pulse.iter_batches())
    ecg = np.concatenate([b.ecg for b in batches])
    ppg = np.concatenate([b.ppg for b in batches])
    return _features(ecg, ppg), np.concatenate([b.sbp for b in batches]), \
        [s for b in batches for s in b.subject]


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    config = SynthConfig(subjects=30, segments_per_subject=6, seed=21, segment_files=False,
                         calfree_fraction=0.3)
    result = write_synthetic_pulsedb(tmp_path_factory.mktemp("physio"), config)
    files = {p.name.removesuffix("_Subset.mat"): p for p in result.subset_files}
    return _load(files["Train"]), _load(files["CalFree_Test"])


def test_features_beat_the_mean_on_unseen_subjects(features):
    (x_train, y_train, subjects_train), (x_test, y_test, subjects_test) = features
    assert not set(subjects_train) & set(subjects_test)
    design = np.c_[x_train, np.ones(len(x_train))]
    weights, *_ = np.linalg.lstsq(design, y_train, rcond=None)
    predicted = np.c_[x_test, np.ones(len(x_test))] @ weights
    model_mae = np.abs(predicted - y_test).mean()
    mean_mae = np.abs(y_train.mean() - y_test).mean()
    assert model_mae < 0.75 * mean_mae, (model_mae, mean_mae)


def test_pulse_arrival_time_falls_as_sbp_rises(features):
    (x_train, y_train, subjects), _ = features
    assert np.corrcoef(x_train[:, 0], y_train)[0, 1] < -0.5
    # Within subjects too (beat-to-beat BP changes move the transit time).
    names = np.array(subjects)
    centred_x = x_train[:, 0].copy()
    centred_y = y_train.astype(np.float64)
    for name in set(subjects):
        rows = names == name
        centred_x[rows] -= centred_x[rows].mean()
        centred_y[rows] -= centred_y[rows].mean()
    assert np.corrcoef(centred_x, centred_y)[0, 1] < -0.3
