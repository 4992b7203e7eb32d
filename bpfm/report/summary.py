"""The grid's summary as the paper's Table II: per cell DBP and SBP SD / MAE / R² / MASE, the test
set's size, BHS grade and AAMI verdict; then one line that reads the table and says where to look
next. Pure functions of the summary rows `bpfm.orchestration.stages.summarize` returns."""

from __future__ import annotations

import math
import statistics
from typing import Any

from bpfm.metrics import AAMI_MIN_SUBJECTS

# The BHS protocol grades a device on 85 subjects (255 readings), as AAMI validates on 85: a grade
# from a handful of test subjects says nothing, so below that it is shown as not assessable.
BHS_MIN_SUBJECTS = 85
# FT-ECG: fine-tuned from an in-domain backbone (SimMIM on the train view's ECG + PPG windows)
METHOD = {"pretrained": "FT", "pretrained_ecgppg": "FT-ECG",
          "pretrained_eeg_then_ecgppg": "FT-EEG-ECG", "xavier": "TFS"}
LEARNED_MASE = 0.8
COLUMNS = ("source", "method", "frozen", "epochs",
           "dbp_sd", "dbp_mae", "dbp_r2", "dbp_mase",
           "sbp_sd", "sbp_mae", "sbp_r2", "sbp_mase", "n", "subj", "bhs", "aami")
HEADER = ("source", "method", "frozen", "epochs", "DBP SD", "MAE", "R²", "MASE",
          "SBP SD", "MAE", "R²", "MASE", "n", "subj.", "BHS", "AAMI")


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _subjects(row: dict[str, Any]) -> int | None:
    n = _number(row.get("n_subjects"))
    return None if math.isnan(n) else int(n)


def table2_row(row: dict[str, Any]) -> dict[str, Any]:
    """One summary row in Table II's columns; grades and verdicts below their sample sizes are
    `n/a`."""
    subjects = _subjects(row)
    out = {
        "source": row.get("source"), "method": METHOD.get(row.get("init"), row.get("init")),
        "frozen": "yes" if row.get("freeze") == "frozen" else "no", "epochs": row.get("epochs"),
        **{k: _number(row.get(k)) for k in COLUMNS[4:12]},
        "n": int(_number(row.get("n"))) if not math.isnan(_number(row.get("n"))) else None,
        "subj": subjects,
    }
    if subjects is not None and subjects < BHS_MIN_SUBJECTS:
        out["bhs"] = "n/a"
    else:
        out["bhs"] = f"{row.get('dbp_bhs_grade') or '?'}/{row.get('sbp_bhs_grade') or '?'}"
    aami = row.get("aami")
    out["aami"] = "n/a" if aami == "not_assessable" else (aami or "?")
    return out


def _show(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.2f}"
    return "-" if value is None else str(value)


def format_table2(cells: list[dict[str, Any]]) -> str:
    rows = sorted((table2_row(c) for c in cells),
                  key=lambda r: (str(r["source"]), r["method"], r["frozen"],
                                 _number(r["epochs"])))
    text = [[_show(r[c]) for c in COLUMNS] for r in rows]
    widths = [max([len(h)] + [len(t[i]) for t in text]) for i, h in enumerate(HEADER)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)) for t in text]
    notes = []
    if any(r["bhs"] == "n/a" for r in rows):
        notes.append(f"BHS n/a: fewer than {BHS_MIN_SUBJECTS} test subjects")
    if any(r["aami"] == "n/a" for r in rows):
        notes.append(f"AAMI n/a: fewer than {AAMI_MIN_SUBJECTS} test subjects")
    lines.append("MAE, SD in mmHg; MASE < 1 beats predicting the training mean; n = test "
                 "windows, subj. = test subjects" + ("; " + "; ".join(notes) if notes else ""))
    return "\n".join(lines)


def reading(cells: list[dict[str, Any]], study: str) -> str:
    """One line: does anything learn (best MASE), what frozen cells do, and where to look next."""
    rows = [table2_row(c) for c in cells]
    scored = [r for r in rows if not math.isnan(_number(r["dbp_mase"]) + _number(r["sbp_mase"]))]
    if not scored:
        return f"No finished cell to read. Next: MLflow experiment {study}."
    mean = lambda r: (r["dbp_mase"] + r["sbp_mase"]) / 2  # noqa: E731
    best = min(scored, key=mean)
    # MASE a little under 1 is noise on a few test windows; below LEARNED on both targets is not
    learned = [r for r in scored if max(r["dbp_mase"], r["sbp_mase"]) < LEARNED_MASE]
    verdict = (f"{len(learned)} of {len(scored)} cells clearly beat predicting the training mean "
               f"(MASE < {LEARNED_MASE:g} for DBP and SBP); " if learned
               else "no cell clearly beats predicting the training mean yet; ")
    return (
        f"Reading: {verdict}best {best['source']} {best['method']} frozen={best['frozen']} "
        f"{best['epochs']} ep (MASE DBP {best['dbp_mase']:.2f}, SBP {best['sbp_mase']:.2f}). "
        f"Next: bpfm leaderboard --experiment {study} --out report/ (Tables II-V, plots), "
        f"or make ui (MLflow; see docs/mlflow-ui.md)."
    )


def format_quantized(quantized: list[dict[str, Any]]) -> str:
    """Per variant, medians over the models: size, latency at batch 1, and the MAE change against
    each model's fp32 test MAE (the full table: `-v`, or `bpfm leaderboard`)."""
    lines = []
    for variant in sorted({q["variant"] for q in quantized}):
        rows = [q for q in quantized if q["variant"] == variant]

        def median(key: str, rows: list[dict[str, Any]] = rows) -> float:
            values = [_number(r.get(key)) for r in rows]
            values = [v for v in values if not math.isnan(v)]
            return statistics.median(values) if values else math.nan

        lines.append(f"{variant}: {len(rows)} models, median {median('size_mib'):.2f} MiB, "
                     f"{median('latency_ms_b1'):.1f} ms at batch 1, "
                     f"SBP/DBP MAE {median('sbp_mae'):.2f}/{median('dbp_mae'):.2f}")
    return "\n".join(lines)
