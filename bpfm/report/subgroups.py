"""Errors per subgroup (age band, gender, blood-pressure range), each with the full clinical
metrics and a bootstrap CI of MAE that resamples subjects (`bpfm.metrics.compute_metrics`).

The paper names demographic fairness as future work; PulseDB reports age and gender, and
hypotension / hypertension are where cuffless estimators usually fail."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from bpfm.metrics import compute_metrics

AGE_BANDS = (
    (0.0, 40.0, "<40"), (40.0, 60.0, "40-59"), (60.0, 80.0, "60-79"), (80.0, math.inf, ">=80"),
)
UNKNOWN = "unknown"


def age_band(age: Any) -> str:
    try:
        value = float(age)
    except (TypeError, ValueError):
        return UNKNOWN
    for low, high, label in AGE_BANDS:
        if low <= value < high:
            return label
    return UNKNOWN


def gender_group(gender: Any) -> str:
    return gender if gender in ("M", "F") else UNKNOWN


def sbp_band(sbp: float) -> str:
    """Reference SBP range: hypotensive (< 90), normal to high-normal (90-139), hypertensive."""
    if sbp < 90:
        return "SBP <90"
    return "SBP 90-139" if sbp < 140 else "SBP >=140"


def _group_row(group: str, label: str, rows: pd.DataFrame, seed: int) -> dict:
    target = rows[["sbp", "dbp"]].to_numpy(np.float64)
    estimate = rows[["sbp_hat", "dbp_hat"]].to_numpy(np.float64)
    metrics = compute_metrics(target, estimate, rows["subject"].astype(str).tolist(), seed=seed)
    row = {"group": group, "subgroup": label}
    row.update(n=metrics["n"], n_subjects=metrics["n_subjects"])
    for name in ("sbp", "dbp"):
        for key in ("mae", "mae_ci_low", "mae_ci_high", "me", "sd", "bhs_grade", "aami"):
            row[f"{name}_{key}"] = metrics[f"{name}_{key}"]
    return row


def subgroup_table(predictions: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """One row for all rows and one per subgroup present; predictions need `sbp, dbp, sbp_hat,
    dbp_hat, subject` and may have `age`, `gender` (missing values form the `unknown` group)."""
    frame = predictions.copy()
    frame["age band"] = frame["age"].map(age_band) if "age" in frame else UNKNOWN
    frame["gender"] = frame["gender"].map(gender_group) if "gender" in frame else UNKNOWN
    frame["BP range"] = frame["sbp"].map(sbp_band)
    orders = {
        "age band": [label for _, _, label in AGE_BANDS] + [UNKNOWN],
        "gender": ["F", "M", UNKNOWN],
        "BP range": ["SBP <90", "SBP 90-139", "SBP >=140"],
    }
    rows = [_group_row("all", "all", frame, seed)]
    for group, order in orders.items():
        for label in order:
            members = frame[frame[group] == label]
            if len(members):
                rows.append(_group_row(group, label, members, seed))
    return pd.DataFrame(rows)
