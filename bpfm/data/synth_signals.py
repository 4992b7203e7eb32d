"""Render 10 s ECG / PPG / ABP segments whose shapes carry blood pressure as physiology does.

Per beat: BP varies with respiration and at random around the segment's target; pulse wave
velocity rises with mean arterial pressure (PWV = pwv0 * exp(0.02 * (MAP - 90))), so the transit
time from the ECG R-peak to the ABP and PPG feet (pre-ejection period + path / PWV) falls as BP
rises; the PPG systolic rise time shortens and the dicrotic notch fades with SBP; the PPG pulse
amplitude grows with pulse pressure and falls with MAP (arterial compliance). ECG and PPG get
baseline wander and noise, are band-passed like PulseDB (ECG 0.5-40 Hz Butterworth, PPG 0.5-8 Hz
Chebyshev-II) and min-max scaled to [0, 1] per window. ABP stays raw, in mmHg, and the labels
are the segment means of its beats' systolic peaks and diastolic feet (PulseDB's SegSBP/SegDBP).
Everything is vectorised over segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import signal

from bpfm.data.layouts import WINDOW

FS = 125
PAD = 3 * FS // 2  # rendered on both sides, so filters and beats settle outside the window
SPAN = WINDOW + 2 * PAD
_ECG_SOS = signal.butter(2, [0.5, 40.0], btype="bandpass", fs=FS, output="sos")
_PPG_SOS = signal.cheby2(4, 20, [0.5, 8.0], btype="bandpass", fs=FS, output="sos")
# ECG P-QRS complex around the R-peak, tabulated per ms over +-0.3 s (T moves with sqrt(RR)).
_QRS_MS = 300
_QRS = sum(
    amp * np.exp(-(((np.arange(-_QRS_MS, _QRS_MS + 1) / 1000 - offset) / width) ** 2))
    for offset, amp, width in (
        (-0.16, 0.12, 0.025),
        (-0.03, -0.10, 0.010),
        (0.0, 1.0, 0.011),
        (0.03, -0.22, 0.012),
    )
).astype(np.float32)
_QRS[[0, -1]] = 0.0


@dataclass
class SegmentParams:
    """One row per segment: its target BP and heart rate, and its subject's physiology."""

    sbp: np.ndarray  # mmHg, segment target
    dbp: np.ndarray  # mmHg
    hr: np.ndarray  # beats / min
    pwv0: np.ndarray  # m/s at MAP 90 mmHg (arterial stiffness)
    path_abp: np.ndarray  # m, heart to arterial line
    path_ppg: np.ndarray  # m, heart to finger
    pep0: np.ndarray  # s, pre-ejection period at 70 bpm
    ppg_rise0: np.ndarray  # s, PPG foot-to-peak time at SBP 120
    notch0: np.ndarray  # dicrotic wave height (fraction of pulse) at SBP 120
    ppg_gain: np.ndarray  # PPG pulse amplitude per mmHg of pulse pressure
    resp_hz: np.ndarray  # respiration rate
    resp_mmhg: np.ndarray  # respiratory SBP swing
    ecg_noise: np.ndarray  # ECG noise sd (R-peak = 1)
    ppg_noise: np.ndarray  # PPG noise sd (PPG pulse of 40 mmHg PP * gain)
    wander: np.ndarray  # baseline wander amplitude, same units


@dataclass
class Rendered:
    ecg_f: np.ndarray  # (n, 1250) in [0, 1]
    ppg_f: np.ndarray  # (n, 1250) in [0, 1]
    abp_raw: np.ndarray  # (n, 1250) mmHg
    sbp: np.ndarray  # (n,) mean of in-window systolic peaks
    dbp: np.ndarray  # (n,) mean of in-window diastolic feet


def _last_event(events: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Per row, the index of the last event at or before each time (events sorted per row)."""
    n, beats = events.shape
    offset = (np.arange(n) * 100.0)[:, None]  # rows never span 100 s: one sorted search
    flat = (events + offset).ravel()
    idx = np.searchsorted(flat, (times[None, :] + offset).ravel(), side="right") - 1
    return idx.reshape(n, -1) - (np.arange(n) * beats)[:, None]


def _pulse(
    tau: np.ndarray,
    rise: np.ndarray,
    period: np.ndarray,
    notch_t: np.ndarray,
    notch: np.ndarray,
    decay: float,
    sharpness: float,
) -> np.ndarray:
    """A beat's normalised pressure/volume pulse: 0 at the foot, 1 at `rise`, back to 0 at
    `period`, with a dicrotic wave of height `notch` at `notch_t`. float32 throughout."""
    up = 0.5 * (1.0 - np.cos(np.float32(np.pi) * np.minimum(tau / rise, 1.0)))
    env = np.clip((period - tau) / (period - rise), 0.0, 1.0)
    fall = env**sharpness * (0.6 + 0.4 * np.exp(np.minimum(rise - tau, 0.0) / decay))
    fall += notch * env * np.exp(-np.square((tau - notch_t) / np.float32(0.03)))
    return np.where(tau < rise, up, fall)


def _wander(
    rng: np.random.Generator, n: int, t: np.ndarray, amplitude: np.ndarray, low: float, high: float
) -> np.ndarray:
    out = np.zeros((n, len(t)), dtype=np.float32)
    for _ in range(2):
        freq = rng.uniform(low, high, (n, 1)).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, (n, 1)).astype(np.float32)
        out += np.sin(np.float32(2 * np.pi) * freq * t + phase)
    return out * (amplitude[:, None] / 2).astype(np.float32)


def _minmax(x: np.ndarray) -> np.ndarray:
    low, high = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    return (x - low) / np.maximum(high - low, 1e-12)


@dataclass
class _Beats:
    """Per-beat timing (s) and pressures (mmHg) of every segment, [segments, beats], float64."""

    r_peaks: np.ndarray
    rr: np.ndarray
    sbp: np.ndarray
    dbp: np.ndarray
    map: np.ndarray  # mean arterial pressure
    foot_abp: np.ndarray
    foot_ppg: np.ndarray
    lvet: np.ndarray  # left-ventricular ejection time: where the dicrotic notch falls


def _take(per_beat: np.ndarray, i: np.ndarray) -> np.ndarray:
    """Each sample's value of its beat (`i`: index of the beat the sample belongs to)."""
    return np.take_along_axis(per_beat.astype(np.float32), i, axis=1)


def _draw_beats(p: SegmentParams, rng: np.random.Generator, t: np.ndarray) -> _Beats:
    """R-peaks with respiratory and random RR variation, each beat's SBP / DBP, and the pulse
    transit to the ABP and PPG feet (faster at higher MAP)."""
    n = len(p.sbp)
    rr_mean = 60.0 / p.hr
    beats = int(np.ceil((SPAN / FS + 3.0) / (0.9 * rr_mean.min()))) + 2
    k = np.arange(beats)
    resp_phase = rng.uniform(0, 2 * np.pi, (n, 1))
    approx = k[None, :] * rr_mean[:, None]
    rr = rr_mean[:, None] * (
        1
        + 0.03 * np.sin(2 * np.pi * p.resp_hz[:, None] * approx + resp_phase)
        + 0.015 * rng.standard_normal((n, beats))
    )
    start = t[0] - 1.5 - rr_mean * rng.uniform(0, 1, n)
    r_peaks = start[:, None] + np.cumsum(rr, axis=1) - rr[:, :1]

    resp = np.sin(2 * np.pi * p.resp_hz[:, None] * r_peaks + resp_phase)
    sbp_k = p.sbp[:, None] + p.resp_mmhg[:, None] * resp + 1.5 * rng.standard_normal((n, beats))
    dbp_k = (
        p.dbp[:, None] + 0.4 * p.resp_mmhg[:, None] * resp + 1.0 * rng.standard_normal((n, beats))
    )
    dbp_k = np.minimum(dbp_k, sbp_k - 10.0)
    map_k = dbp_k + (sbp_k - dbp_k) / 3
    pwv = p.pwv0[:, None] * np.exp(0.02 * (map_k - 90.0))
    pep = (p.pep0 - 0.0005 * (p.hr - 70.0))[:, None] - 0.0002 * (sbp_k - p.sbp[:, None])
    return _Beats(
        r_peaks=r_peaks,
        rr=rr,
        sbp=sbp_k,
        dbp=dbp_k,
        map=map_k,
        foot_abp=r_peaks + pep + p.path_abp[:, None] / pwv,
        foot_ppg=r_peaks + pep + p.path_ppg[:, None] / pwv,
        lvet=np.clip(0.37 - 0.0016 * (60.0 / rr - 70.0), 0.2, 0.45),
    )


def _render_abp(
    b: _Beats, t: np.ndarray, t32: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ABP rising from each beat's diastolic to its systolic value and decaying to the next
    diastole, and the labels: segment means of the peaks and feet inside the window."""
    i = _last_event(b.foot_abp, t)
    period_abp = np.diff(b.foot_abp, axis=1, append=b.foot_abp[:, -1:] + b.rr[:, -1:])
    rise_abp = np.clip(0.11 - 0.0004 * (b.map - 90.0), 0.07, 0.16)
    notch_t = np.minimum(b.lvet, 0.8 * period_abp)
    tau = t32 - _take(b.foot_abp, i)
    rise = _take(rise_abp, i)
    shape = _pulse(
        tau, rise, _take(period_abp, i), _take(notch_t, i), np.float32(0.12), 0.10, 1.3
    )
    dbp_next = np.concatenate([b.dbp[:, 1:], b.dbp[:, -1:]], axis=1)
    base = np.where(tau < rise, _take(b.dbp, i), _take(dbp_next, i))
    abp = base + (_take(b.sbp, i) - base) * shape
    peak_t = b.foot_abp + rise_abp
    in_peak = (peak_t >= 0) & (peak_t < WINDOW / FS)
    in_foot = (b.foot_abp >= 0) & (b.foot_abp < WINDOW / FS)
    sbp = (b.sbp * in_peak).sum(axis=1) / np.maximum(in_peak.sum(axis=1), 1)
    dbp = (b.dbp * in_foot).sum(axis=1) / np.maximum(in_foot.sum(axis=1), 1)
    return abp, sbp, dbp


def _render_ppg(
    p: SegmentParams, b: _Beats, rng: np.random.Generator, t: np.ndarray, t32: np.ndarray
) -> np.ndarray:
    """PPG: same beat, later foot; stiffer (higher-pressure) arteries: faster rise, fainter
    notch; plus baseline wander and noise."""
    i = _last_event(b.foot_ppg, t)
    period_ppg = np.diff(b.foot_ppg, axis=1, append=b.foot_ppg[:, -1:] + b.rr[:, -1:])
    rise_ppg = np.clip(p.ppg_rise0[:, None] * (1 - 0.004 * (b.sbp - 120.0)), 0.07, 0.32)
    notch_ppg = np.clip(p.notch0[:, None] * (1 - 0.008 * (b.sbp - 120.0)), 0.0, 0.3)
    notch_t_ppg = np.minimum(b.lvet + 0.06, 0.85 * period_ppg)
    amplitude = p.ppg_gain[:, None] * (b.sbp - b.dbp) / (1 + 0.015 * (b.map - 90.0))
    ppg = _take(amplitude, i) * _pulse(
        t32 - _take(b.foot_ppg, i),
        _take(rise_ppg, i),
        _take(period_ppg, i),
        _take(notch_t_ppg, i),
        _take(notch_ppg, i),
        0.15,
        1.1,
    )
    n = len(p.sbp)
    ppg_scale = 40.0 * p.ppg_gain
    ppg += _wander(rng, n, t32, p.wander * ppg_scale, 0.05, 0.35)
    ppg += (p.ppg_noise * ppg_scale).astype(np.float32)[:, None] * rng.standard_normal(
        (n, SPAN), dtype=np.float32
    )
    return ppg


def _render_ecg(
    p: SegmentParams, b: _Beats, rng: np.random.Generator, t: np.ndarray, t32: np.ndarray
) -> np.ndarray:
    """ECG: the P-QRS complexes of the previous and next R-peaks (they overlap), the previous T;
    plus baseline wander and noise."""
    i = _last_event(b.r_peaks, t)
    tau = t32 - _take(b.r_peaks, i)
    tau_next = t32 - np.take_along_axis(
        b.r_peaks.astype(np.float32), np.minimum(i + 1, b.r_peaks.shape[1] - 1), axis=1
    )
    # The table is zero at both ends, so clipping the index silences times outside it.
    ecg = _QRS[np.clip(np.rint(tau * 1000).astype(np.int32) + _QRS_MS, 0, 2 * _QRS_MS)]
    ecg += _QRS[np.clip(np.rint(tau_next * 1000).astype(np.int32) + _QRS_MS, 0, 2 * _QRS_MS)]
    ecg += 0.3 * np.exp(-np.square((tau - _take(0.28 * np.sqrt(b.rr), i)) / np.float32(0.05)))
    n = len(p.sbp)
    ecg += _wander(rng, n, t32, p.wander, 0.1, 0.4)
    ecg += p.ecg_noise.astype(np.float32)[:, None] * rng.standard_normal(
        (n, SPAN), dtype=np.float32
    )
    return ecg


def render_segments(p: SegmentParams, rng: np.random.Generator) -> Rendered:
    """Render one segment per row of `p`: the beats first, then ABP, PPG and ECG over them (in
    this order: each draws from `rng`), then PulseDB's filtering and scaling over the window."""
    t = (np.arange(SPAN) - PAD) / FS
    # Sample-level work in float32 (half the memory traffic); per-beat values stay float64.
    t32 = t.astype(np.float32)
    beats = _draw_beats(p, rng, t)
    abp, sbp, dbp = _render_abp(beats, t, t32)
    ppg = _render_ppg(p, beats, rng, t, t32)
    ecg = _render_ecg(p, beats, rng, t, t32)

    window = slice(PAD, PAD + WINDOW)
    ecg_f = _minmax(signal.sosfiltfilt(_ECG_SOS, ecg, axis=1)[:, window])
    ppg_f = _minmax(signal.sosfiltfilt(_PPG_SOS, ppg, axis=1)[:, window])
    abp_raw = abp[:, window].astype(np.float64) + 0.3 * rng.standard_normal((len(p.sbp), WINDOW))
    return Rendered(ecg_f=ecg_f, ppg_f=ppg_f, abp_raw=abp_raw, sbp=sbp, dbp=dbp)
