"""The clinical-standard leaderboard: MLflow experiments in, report.md / report.html / CSVs out,
the same files logged as artifacts of a `bpfm.kind=leaderboard` run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from bpfm import tracking
from bpfm.io.redact import redact
from bpfm.report import tables
from bpfm.report.calibration import calibration_sections
from bpfm.report.plots import plot_all
from bpfm.report.predictions import attach_demographics, load_predictions
from bpfm.report.render import Report, Section, write_report
from bpfm.report.runs import KIND_TAG, StudyRuns, load_study
from bpfm.report.subgroups import subgroup_table

log = logging.getLogger(__name__)

TABLE2_NOTE = (
    "FT = fine-tuned from the pretrained (EEG) backbone, FT-ECG from one pretrained on the train "
    "view's ECG + PPG, TFS = trained from scratch (Xavier). Metrics in "
    "mmHg, averaged over seeds (the latest finished run of each cell). BHS and AAMI read DBP/SBP "
    "when they differ (pass/fail: DBP passes, SBP fails); AAMI needs >= 85 subjects, n/a below."
)
TABLE5_NOTE = (
    "Published numbers come from different splits; the protocol column says which split each "
    "number is from. bpfm rows: per source and protocol, the run with the lowest validation MAE "
    "(chosen without looking at test numbers, as the grid registers its best model); its test "
    "MAE is reported. Runs of the synthetic demo and tiny profiles are left out."
)


@dataclass
class LeaderboardConfig:
    experiments: list[str]
    out: Path
    tracking_uri: str | None = None
    log_run: bool = True  # also log the report as a bpfm.kind=leaderboard run
    bootstrap_seed: int = 0


def _model_details(
    client: MlflowClient, best: pd.DataFrame, out: Path, seed: int
) -> tuple[Section, Section]:
    """Subgroup metrics and plots for the best model per source and protocol."""
    frames, images, notes = [], [], []
    for _, run in best.iterrows():
        label = f"{run['source']} / {run['protocol']} (run {run['run_id'][:8]})"
        predictions = load_predictions(client, run["run_id"])
        if predictions is None:
            notes.append(f"{label}: no predictions artifact")
            continue
        predictions, origin = attach_demographics(predictions, run.get("data"))
        notes.append(f"{label}: demographics from {origin}")
        groups = subgroup_table(predictions, seed=seed)
        groups.insert(0, "protocol", run["protocol"])
        groups.insert(0, "source", run["source"])
        frames.append(groups)
        stem = f"{run['source']}-{run['protocol']}-{run['run_id'][:8]}"
        images += list(plot_all(predictions, out / "plots", stem, label).values())
    subgroups = pd.concat(frames, ignore_index=True) if frames else None
    note = "Best model per source and protocol; MAE CI: bootstrap 95 %, resampling subjects. "
    return (
        Section("Subgroups", subgroups, note + "; ".join(notes), csv="subgroups.csv"),
        Section("Plots: Bland-Altman, estimate vs reference, error histogram", images=images),
    )


def with_model_sizes(client: MlflowClient, study: StudyRuns) -> StudyRuns:
    """fp32 size of each quantized trial whose grid logged no fp32 variant: the size of its
    `model/*.safetensors` artifact (the state_dict's tensors, as the paper measured, in MiB)."""
    if study.quant.empty:
        return study
    train = study.train.copy()
    if "size_mib" not in train.columns:
        train["size_mib"] = float("nan")
    quantized = set(study.quant["parent_run_id"])
    for index, run in train.iterrows():
        if run["run_id"] not in quantized or pd.notna(run["size_mib"]):
            continue
        files = [f for f in client.list_artifacts(run["run_id"], "model")
                 if f.path.endswith(".safetensors") and f.file_size]
        if files:
            train.loc[index, "size_mib"] = files[0].file_size / 2**20
    return StudyRuns(train=train, quant=study.quant)


def _empty_note(frame: pd.DataFrame, what: str) -> str:
    return f"No {what} in these experiments." if frame.empty else ""


def compile_report(
    client: MlflowClient, study: StudyRuns, config: LeaderboardConfig
) -> tuple[Report, dict[str, pd.DataFrame]]:
    """Every table and plot of the leaderboard (plots are written under config.out/plots)."""
    frames = {
        "table2": tables.table2(study.train),
        "table3": tables.table3(study.quant, study.train),
        "table4": tables.table4(study.quant, study.train),
        "table5": tables.table5(study.train),
        "calibration_gap": tables.calibration_gap(study.train),
    }
    calibration = calibration_sections(client, study.train, config.out)
    frames["calibration"] = calibration[0].table
    best = tables.best_per_source(study.train)
    subgroups, plots = _model_details(client, best, config.out, config.bootstrap_seed)
    frames["subgroups"] = subgroups.table if subgroups.table is not None else pd.DataFrame()
    sections = [
        Section("Table II: fine-tuning vs training from scratch", frames["table2"], TABLE2_NOTE,
                "table2.csv"),
        Section("Table III: test R^2, fp32 against INT8 variants", frames["table3"],
                _empty_note(frames["table3"], "quantization runs"), "table3.csv"),
        Section("Table IV: model size (MiB = 2^20 bytes), reduction factor, CPU latency and "
                "speed-up against fp32", frames["table4"],
                _empty_note(frames["table4"], "quantization runs"), "table4.csv"),
        Section("Table V: MAE (mmHg) against the literature", frames["table5"], TABLE5_NOTE,
                "table5.csv"),
        Section("Calibration-based vs calibration-free gap", frames["calibration_gap"],
                _empty_note(frames["calibration_gap"], "cell run under both calbased and calfree")
                or "gap = calfree MAE - calbased MAE (mmHg), same cell and seed.",
                "calibration_gap.csv"),
        *calibration,
        subgroups,
        plots,
    ]
    preamble = (
        f"Experiments: {', '.join(config.experiments)} at "
        f"{redact(client.tracking_uri)}; {len(study.train)} model runs, "
        f"{len(study.quant)} quantization runs."
    )
    return Report("bpfm leaderboard", preamble, sections), frames


def _log_leaderboard_run(client: MlflowClient, config: LeaderboardConfig, out: Path) -> str:
    experiment = client.get_experiment_by_name(config.experiments[0])
    run = client.create_run(
        experiment.experiment_id,
        run_name="leaderboard",
        tags={KIND_TAG: "leaderboard", "bpfm.experiments": ",".join(config.experiments)},
    )
    client.log_artifacts(run.info.run_id, str(out))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def build_leaderboard(config: LeaderboardConfig) -> dict:
    """Compile, write and (optionally) log the leaderboard; returns a summary for the CLI."""
    client = tracking.client(config.tracking_uri)
    study = with_model_sizes(client, load_study(client, config.experiments))
    out = Path(config.out)
    report, frames = compile_report(client, study, config)
    written = write_report(report, out)
    result = {
        "out": str(out),
        "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
        "rows": {name: int(len(frame)) for name, frame in frames.items()},
        "best": [
            {
                "source": r["source"],
                "protocol": r["protocol"],
                "run_id": r["run_id"],
                "sbp_mae": float(r["sbp_mae"]),
                "dbp_mae": float(r["dbp_mae"]),
            }
            for _, r in tables.best_per_source(study.train).iterrows()
        ],
        "report": str(written["report.html"]),
    }
    if config.log_run:
        result["leaderboard_run_id"] = _log_leaderboard_run(client, config, out)
    log.info("leaderboard written to %s", out)
    return result
