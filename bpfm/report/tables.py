"""The leaderboard's tables, as pure functions of the run frames (`bpfm.report.runs`).

Table II compares fine-tuning with training from scratch, Table III the R^2 of each quantized
variant against fp32, Table IV the saved sizes and latencies, Table V the best model per source
(by validation MAE) next to the literature; the calibration gap pairs calbased and calfree runs
of the same cell."""

from __future__ import annotations

import math

import pandas as pd

from bpfm.metrics import AAMI_MIN_SUBJECTS, aami_verdict, bhs_grade
from bpfm.report.literature import LITERATURE, SOURCE_NAMES, protocol_label

TARGETS_AS_THE_PAPER = ("dbp", "sbp")  # Tables II-V list DBP before SBP
GRADE_ORDER = "ABCD"
SIZE_ORDER = {"small": 0, "medium": 1, "base": 1, "large": 2}
CELL = ["source", "protocol", "method", "frozen", "epochs", "size"]
RUNTIMES = ("executorch", "onnxruntime")  # the grid's export backends (bpfm.export.BACKENDS)
RUNTIME_COLUMNS = ("peak_rss_mib_b1", "macs_per_window", "delta_dbp_r2", "delta_sbp_r2",
                   "delta_dbp_mae", "delta_sbp_mae")


def method_of(init: str | None) -> str:
    """FT (fine-tuned from a pretrained backbone; FT-ECG from an in-domain one) or TFS (trained
    from scratch, Xavier init): the grid summary's labels."""
    from bpfm.report.summary import METHOD

    return METHOD.get(str(init), str(init))


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def run_grade(row: pd.Series, target: str) -> str:
    """The run's BHS grade tag, else the grade recomputed from its logged BHS percentages."""
    tag = row.get(f"{target}_bhs_grade")
    if isinstance(tag, str) and tag:
        return tag
    n = _number(row.get("n"))
    shares = [_number(row.get(f"{target}_bhs{k}")) for k in (5, 10, 15)]
    if math.isnan(n) or any(math.isnan(s) for s in shares):
        return "?"
    return bhs_grade([round(s * n / 100.0) for s in shares], int(n))


def run_aami(row: pd.Series, target: str) -> str:
    """The run's per-target AAMI verdict: the tag if logged, else from ME, SD and n_subjects."""
    tag = row.get(f"{target}_aami")
    if isinstance(tag, str) and tag:
        return tag
    me, sd = _number(row.get(f"{target}_me")), _number(row.get(f"{target}_sd"))
    n_subjects = _number(row.get("n_subjects"))
    if math.isnan(me) or math.isnan(sd) or math.isnan(n_subjects):
        return "?"
    return aami_verdict(me, sd, int(n_subjects))


def aami_label(dbp: str, sbp: str) -> str:
    """One AAMI cell as the paper writes it: `pass`, or `pass/fail` when DBP passes, SBP fails."""
    short = {"not_assessable": f"n/a (<{AAMI_MIN_SUBJECTS} subj.)"}
    dbp, sbp = short.get(dbp, dbp), short.get(sbp, sbp)
    return dbp if dbp == sbp else f"{dbp}/{sbp}"


def _joined(values: pd.Series) -> str:
    """Seeds may disagree on a grade or verdict: list the distinct ones, best first."""
    distinct = sorted(set(values), key=lambda v: (GRADE_ORDER.find(v) if len(v) == 1 else 9, v))
    return ",".join(distinct)


def with_cell_columns(train: pd.DataFrame) -> pd.DataFrame:
    """Adds method, frozen, per-target grades and AAMI verdicts to the per-run frame."""
    frame = train.copy()
    frame["method"] = frame["init"].map(method_of)
    frame["frozen"] = frame["freeze"].map(lambda f: "yes" if f == "frozen" else "no")
    for target in TARGETS_AS_THE_PAPER:
        frame[f"{target}_grade"] = frame.apply(run_grade, axis=1, target=target)
        frame[f"{target}_aami_verdict"] = frame.apply(run_aami, axis=1, target=target)
    return frame


def _sort(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    def key(column: pd.Series) -> pd.Series:
        if column.name == "size":
            return column.map(lambda s: SIZE_ORDER.get(s, 9))
        if column.name == "epochs":
            return column.map(_number)
        return column.astype(str)

    present = [c for c in columns if c in frame.columns]
    return frame.sort_values(present, key=key).reset_index(drop=True)


def table2(train: pd.DataFrame) -> pd.DataFrame:
    """Table II-like: one row per cell (seeds averaged), DBP then SBP SD / MAE / R^2, BHS, AAMI."""
    frame = with_cell_columns(train)
    group = (["experiment"] if frame["experiment"].nunique() > 1 else []) + CELL
    rows = []
    for key, cell in frame.groupby(group, dropna=False, sort=False):
        row = dict(zip(group, key, strict=True))
        row["seeds"] = len(cell)
        for target in TARGETS_AS_THE_PAPER:
            for metric in ("sd", "mae", "r2"):
                row[f"{target}_{metric}"] = cell[f"{target}_{metric}"].map(_number).mean()
        row["bhs"] = "/".join(_joined(cell[f"{t}_grade"]) for t in TARGETS_AS_THE_PAPER)
        verdicts = [_joined(cell[f"{t}_aami_verdict"]) for t in TARGETS_AS_THE_PAPER]
        row["aami"] = aami_label(*verdicts)
        rows.append(row)
    return _sort(pd.DataFrame(rows), group)


def _variant(row: pd.Series) -> str:
    mode = str(row.get("mode"))
    if mode == "static":
        name = f"static/{row.get('observer')}"
    else:
        name = mode
    extras = [str(row.get(k)) for k in ("weights", "backend") if row.get(k) not in (None, "")]
    if mode == "fp32" and row.get("backend") in RUNTIMES:  # a runtime's fp32 file is a variant
        return f"fp32 ({row.get('backend')})"
    return f"{name} ({', '.join(extras)})" if extras and mode != "fp32" else name


def _is_runtime(quant: pd.DataFrame) -> pd.Series:
    """Rows of variants run by an on-device runtime (`bpfm export`), not by torch."""
    backend = quant["backend"] if "backend" in quant.columns else pd.Series("", quant.index)
    return backend.isin(RUNTIMES)


def _fp32_reference(quant: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """fp32 R^2 and size per trial: its torch fp32 quant run when logged, else the trial's own
    metrics (a runtime's fp32 export is a variant like the others)."""
    columns = ["dbp_r2", "sbp_r2", "size_mib"]
    base = train.set_index("run_id").reindex(columns=columns)
    if not quant.empty:
        fp32 = quant[(quant["mode"] == "fp32") & ~_is_runtime(quant)]
        fp32 = fp32.drop_duplicates("parent_run_id").set_index("parent_run_id")
        base = fp32.reindex(columns=columns).combine_first(base)
    return base.rename(columns=lambda c: f"fp32_{c}")


def table3(quant: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """Table III-like: test R^2 of every quantized variant against its fp32 model."""
    if quant.empty:
        return pd.DataFrame()
    frame = quant[(quant["mode"] != "fp32") | _is_runtime(quant)].copy()
    frame = frame.join(_fp32_reference(quant, train), on="parent_run_id")
    frame["variant"] = frame.apply(_variant, axis=1)
    frame["method"] = frame["init"].map(method_of)
    # a frozen and an unfrozen model of the same cell are two rows: say which is which
    frame["frozen"] = frame["freeze"].map(lambda f: "yes" if f == "frozen" else "no")
    out = frame[
        ["source", "protocol", "size", "method", "frozen", "epochs", "variant",
         "fp32_dbp_r2", "fp32_sbp_r2", "dbp_r2", "sbp_r2"]
    ].copy()
    out["delta_dbp_r2"] = out["dbp_r2"] - out["fp32_dbp_r2"]
    out["delta_sbp_r2"] = out["sbp_r2"] - out["fp32_sbp_r2"]
    return _sort(out, ["source", "protocol", "size", "method", "frozen", "epochs", "variant"])


def table4(quant: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """Table IV-like: saved size in MiB per model size and variant, reduction factor against fp32,
    CPU latency at batch 1 and 64 (medians over the trials of that size). Without an fp32 variant
    run, the fp32 row comes from the trial's own size.

    A row per runtime variant (`backend` executorch / onnxruntime) adds the file's peak RSS at
    batch 1, the MACs per window and R^2 / MAE changes against fp32; its reduction factor is
    against the same runtime's fp32 file of the trial when that variant ran, else against the
    torch fp32 model."""
    if quant.empty:
        return pd.DataFrame()
    frame = quant.join(_fp32_reference(quant, train), on="parent_run_id")
    frame["variant"] = frame.apply(_variant, axis=1)
    runtime = _is_runtime(frame)
    if not ((frame["mode"] == "fp32") & ~runtime).any():
        trials = train[train["run_id"].isin(frame["parent_run_id"])]
        fp32 = trials.reindex(columns=["run_id", "size", "size_mib"]).assign(variant="fp32")
        # each variant was timed against its fp32 model in the same task: speed-up = fp32 / int8
        for batch in (1, 64):
            timed = frame.reindex(columns=["parent_run_id", f"latency_ms_b{batch}",
                                           f"speedup_b{batch}"]).dropna()
            base = timed[f"latency_ms_b{batch}"] * timed[f"speedup_b{batch}"]
            per_trial = base.groupby(timed["parent_run_id"]).median()
            fp32[f"latency_ms_b{batch}"] = fp32["run_id"].map(per_trial)
        fp32 = fp32.drop(columns="run_id")
        frame = pd.concat([fp32.assign(fp32_size_mib=fp32["size_mib"]), frame], ignore_index=True)
        runtime = _is_runtime(frame)
    if runtime.any():
        own = frame[runtime & (frame["mode"] == "fp32")].drop_duplicates(["parent_run_id",
                                                                           "backend"])
        own = own.set_index(["parent_run_id", "backend"])["size_mib"]
        keys = pd.MultiIndex.from_frame(frame[["parent_run_id", "backend"]])
        same = pd.Series(own.reindex(keys).to_numpy(), index=frame.index)
        frame.loc[runtime, "fp32_size_mib"] = same[runtime].fillna(frame["fp32_size_mib"])
    frame["reduction_factor"] = frame["fp32_size_mib"] / frame["size_mib"]
    latencies = ["latency_ms_b1", "latency_ms_b64"]
    frame[latencies] = frame.reindex(columns=latencies)
    fp32_latency = frame[frame["variant"] == "fp32"].groupby("size")[latencies].median()
    for batch in (1, 64):
        # the speed-up a task measured against its own fp32 model, else against the size's fp32
        logged = frame.reindex(columns=[f"speedup_b{batch}"])[f"speedup_b{batch}"]
        base = frame["size"].map(fp32_latency[f"latency_ms_b{batch}"])
        speedup = logged.fillna(base / frame[f"latency_ms_b{batch}"])
        frame[f"speedup_b{batch}"] = speedup.mask(frame["variant"] == "fp32", 1.0)
    metrics = ["size_mib", "reduction_factor", "latency_ms_b1", "latency_ms_b64", "speedup_b1",
               "speedup_b64"]
    if runtime.any():
        metrics += [m for m in RUNTIME_COLUMNS if m in frame.columns]
    frame = frame.reindex(columns=["size", "variant", *metrics])
    out = frame.groupby(["size", "variant"], sort=False)[metrics].median().reset_index()
    return _sort(out, ["size", "variant"])


def best_per_source(train: pd.DataFrame) -> pd.DataFrame:
    """Per source and protocol, the run with the lowest final validation MAE (as the grid
    registers its best model): choosing by test MAE would report an optimistic test number."""
    frame = with_cell_columns(train)
    frame["mean_mae"] = (frame["sbp_mae"].map(_number) + frame["dbp_mae"].map(_number)) / 2
    frame["val_mae"] = frame.reindex(columns=["val_mae"])["val_mae"].map(_number)
    frame = frame.dropna(subset=["mean_mae", "val_mae"]).sort_values("val_mae", kind="stable")
    best = frame.drop_duplicates(subset=["source", "protocol"], keep="first")
    return _sort(best, ["source", "protocol"])


# Profiles that run on synthetic data: their numbers say the pipeline works, not how well a model
# estimates blood pressure, so they never stand next to published results.
SYNTHETIC_PROFILES = ("demo", "tiny")


def study_rows(train: pd.DataFrame) -> pd.DataFrame:
    """The runs of real studies (not of the synthetic demo / tiny profiles)."""
    profile = train.reindex(columns=["profile"])["profile"].fillna("")
    return train[~profile.isin(SYNTHETIC_PROFILES)]


def table5(train: pd.DataFrame) -> pd.DataFrame:
    """Table V-like: the literature's MAE rows with citations, and this study's best per source,
    every row labelled with the protocol its numbers come from."""
    rows = [
        {
            "source": SOURCE_NAMES.get(r.source, r.source), "method": r.method,
            "dbp_mae": r.dbp_mae, "sbp_mae": r.sbp_mae, "protocol": r.protocol,
            "reference": r.reference,
        }
        for r in LITERATURE
    ]
    for _, run in best_per_source(study_rows(train)).iterrows():
        rows.append(
            {
                "source": SOURCE_NAMES.get(run["source"], run["source"]),
                "method": (
                    f"bpfm {run['method']} {run['size']}, {run['freeze']}, {run['epochs']} ep"
                ),
                "dbp_mae": _number(run["dbp_mae"]),
                "sbp_mae": _number(run["sbp_mae"]),
                "protocol": protocol_label(run["protocol"]),
                "reference": f"this study: run {run['run_id']} ({run['experiment']})",
            }
        )
    order = {name: i for i, name in enumerate(("VitalDB", "MIMIC-III"))}
    frame = pd.DataFrame(rows)
    frame["_order"] = frame["source"].map(lambda s: order.get(s, 9))
    return frame.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def calibration_gap(train: pd.DataFrame) -> pd.DataFrame:
    """MAE on unseen subjects (calfree) against seen subjects (calbased), for each cell run under
    both protocols: the honest cost of not calibrating per patient."""
    frame = with_cell_columns(train)
    keys = ["experiment", "source", "method", "frozen", "epochs", "size", "seed"]
    based = frame[frame["protocol"] == "calbased"]
    free = frame[frame["protocol"] == "calfree"]
    if based.empty or free.empty:
        return pd.DataFrame()
    pairs = based.merge(free, on=keys, suffixes=("_calbased", "_calfree"))
    out = pairs[keys].copy()
    for target in TARGETS_AS_THE_PAPER:
        low = pairs[f"{target}_mae_calbased"].map(_number)
        high = pairs[f"{target}_mae_calfree"].map(_number)
        out[f"{target}_mae_calbased"] = low
        out[f"{target}_mae_calfree"] = high
        out[f"{target}_mae_gap"] = high - low
    return _sort(out, keys)
