"""The leaderboard's calibration table and the Bland-Altman plot of the best calibrated model.

Cells trained with `calibration` methods log `cal_<method>_<metric>`
(bpfm.orchestration.stages.log_calibration): every method, `none` and the trivial calibrated
predictor on the same windows (each test subject's windows after its K calibration windows). Per
source, protocol and K the table lists the methods of the cell with the lowest validation MAE
(chosen without looking at test numbers)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from bpfm.metrics import TARGETS
from bpfm.report.plots import bland_altman
from bpfm.report.render import Section
from bpfm.report.tables import _number, aami_label, run_aami, run_grade

METHOD_ORDER = ("none", "trivial", "offset", "affine", "head")
CALIBRATED = ("offset", "affine", "head")
ARTIFACT = "calibration/calibrated_estimates.parquet"
NOTE = (
    "Per-subject calibration: K windows of each test subject (aami: its AAMI_Cal segments) "
    "calibrate, its other windows are the test set of every method. trivial = the subject's mean "
    "reference over its K windows; cal_mase = MAE / trivial's MAE (a calibrated model earns its "
    "place only below 1). Per source / protocol / K: the cell with the lowest validation MAE."
)


def method_rows(train: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, calibration method) with that method's metrics under plain names."""
    rows = []
    if train.empty or "calib_k" not in train.columns:
        return pd.DataFrame()
    for _, run in train.iterrows():
        k = _number(run.get("calib_k"))
        if math.isnan(k):
            continue
        for method in METHOD_ORDER:
            prefix = f"cal_{method}_"
            values = {c.removeprefix(prefix): run[c] for c in run.index if c.startswith(prefix)}
            if math.isnan(_number(values.get("sbp_mae"))):
                continue
            base = {c: run.get(c) for c in ("source", "protocol", "size", "freeze", "init",
                                            "epochs", "seed", "run_id", "val_mae")}
            rows.append({**base, "k": int(k), "method": method, **values})
    return pd.DataFrame(rows)


def calibration_table(train: pd.DataFrame) -> pd.DataFrame:
    """Method x protocol (per source and K): MAE, SD, BHS, AAMI, MASE, cal_mase."""
    rows = method_rows(train)
    if rows.empty:
        return rows
    rows["_val"] = rows["val_mae"].map(_number)
    best_runs = (rows.sort_values("_val").drop_duplicates(["source", "protocol", "k"])
                 .set_index(["source", "protocol", "k"])["run_id"])
    out = []
    for (source, protocol, k), run_id in best_runs.items():
        picked = rows[rows["run_id"] == run_id]
        for method in METHOD_ORDER:
            mine = picked[picked["method"] == method]
            if mine.empty:
                continue
            row = mine.iloc[0]
            entry = {"source": source, "protocol": protocol, "k": k, "method": method,
                     "cell": f"{row['size']}-{row['freeze']}-e{row['epochs']}-{row['init']}",
                     "n": _number(row.get("n")),
                     "n_subjects": _number(row.get("n_subjects"))}
            for target in TARGETS:
                for metric in ("mae", "sd", "mase", "cal_mase"):
                    entry[f"{target}_{metric}"] = _number(row.get(f"{target}_{metric}"))
            entry["bhs"] = "/".join(run_grade(row, t) for t in ("dbp", "sbp"))
            entry["aami"] = aami_label(run_aami(row, "dbp"), run_aami(row, "sbp"))
            entry["run_id"] = run_id
            out.append(entry)
    return pd.DataFrame(out)


def best_calibrated(table: pd.DataFrame) -> pd.Series | None:
    """The calibrated method row with the lowest mean cal_mase (SBP, DBP), or None."""
    if table.empty:
        return None
    rows = table[table["method"].isin(CALIBRATED)].copy()
    if rows.empty:
        return None
    rows["_score"] = (rows["sbp_cal_mase"] + rows["dbp_cal_mase"]) / 2
    return rows.sort_values("_score").iloc[0]


def calibration_sections(client: MlflowClient, train: pd.DataFrame, out: Path) -> list[Section]:
    """The calibration table and, when its estimates were logged, the best calibrated model's
    Bland-Altman plot (under out/plots)."""
    table = calibration_table(train)
    if table.empty:
        return [Section("Per-subject calibration", table,
                        "No cell was trained with calibration methods.")]
    sections = [Section("Per-subject calibration", table.drop(columns="run_id"), NOTE,
                        "calibration.csv")]
    best = best_calibrated(table)
    if best is None:
        return sections
    label = (f"{best['method']}, K={best['k']}: {best['source']} / {best['protocol']}, "
             f"{best['cell']} (run {best['run_id'][:8]})")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(best["run_id"], ARTIFACT, tmp)
        except Exception:  # an older run without the artifact: the table still stands
            sections.append(Section("Best calibrated model", note=f"{label}: no estimates logged"))
            return sections
        frame = pd.read_parquet(local)
    method = best["method"]
    hats = {f"{t}_hat": frame[f"{method}_{t}_hat"] for t in TARGETS}
    predictions = pd.DataFrame({t: frame[t] for t in TARGETS} | hats)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    image = bland_altman(predictions, plots / "bland_altman_calibrated.png", label)
    note = f"Bland-Altman of the lowest mean cal_mase: {label} (picked on test numbers)."
    sections.append(Section("Best calibrated model", note=note, images=[image]))
    return sections
