"""Calibrated results through a real MLflow store: what a cell logs
(bpfm.orchestration.stages.log_calibration)
and the leaderboard's calibration table and Bland-Altman plot built from it."""

from __future__ import annotations

import numpy as np
from mlflow.tracking import MlflowClient

from bpfm import tracking
from bpfm.orchestration.stages import log_calibration
from bpfm.report.calibration import calibration_sections
from bpfm.report.runs import load_study
from bpfm.training.calibration import (
    ESTIMATES_FILE,
    calibrate,
    calibration_metrics,
    calibration_rows,
    estimates_table,
    write_calibrated_estimates,
)


def _calibrated_result(seed: int, k: int = 5) -> tuple[dict, object]:
    """A calibration result as `evaluate_calibration` returns it, from 30 subjects each off by
    its own bias (offset removes it; `none` keeps it)."""
    rng = np.random.default_rng(seed)
    subjects = [f"s{i // 10:02d}" for i in range(300)]
    ids = [f"x/{s}/{i % 10}" for i, s in enumerate(subjects)]
    ref = rng.normal([120, 70], [15, 8], size=(300, 2))
    bias = np.repeat(rng.normal(0, 12, size=(30, 2)), 10, axis=0)
    est = ref - bias + rng.normal(0, 2, size=(300, 2))
    rows = calibration_rows(ids, subjects, k)
    estimates = {m: calibrate(m, est, ref, subjects, rows) for m in ("none", "trivial", "offset")}
    tested = [s for s, t in zip(subjects, rows.test, strict=True) if t]
    target = ref[rows.test]
    metrics = {m: calibration_metrics(target, e, estimates["trivial"], tested, [120, 70])
               for m, e in estimates.items()}
    result = {"methods": ["offset"], "k": k, "n_calib": rows.n_calib, "n_test": rows.n_test,
              "n_subjects": 30, "metrics": metrics}
    test_ids = [i for i, t in zip(ids, rows.test, strict=True) if t]
    return result, estimates_table(test_ids, tested, target, estimates)


def test_leaderboard_tables_calibrated_cells_and_plots_the_best(tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("calib")
    run_ids = []
    for val_mae, seed in ((9.0, 1), (7.0, 2)):
        result, table = _calibrated_result(seed)
        model_dir = tmp_path / f"model-{seed}"
        write_calibrated_estimates(model_dir, table)
        run = client.create_run(experiment, tags={"bpfm.kind": "train"})
        run_id = run.info.run_id
        params = {"source": "other", "protocol": "calfree", "size": "small", "freeze": "unfrozen",
                  "init": "xavier", "epochs": "3", "seed": str(seed), "calibration": "offset",
                  "calib_windows": "5"}
        for key, value in params.items():
            client.log_param(run_id, key, value)
        client.log_metric(run_id, "val_mae", val_mae)
        log_calibration(client, run_id, result, model_dir)
        tracking.finish(client, run_id)
        run_ids.append(run_id)

    logged = client.get_run(run_ids[1]).data
    assert logged.metrics["calib_k"] == 5
    assert logged.metrics["cal_offset_sbp_mae"] < logged.metrics["cal_none_sbp_mae"]
    assert logged.tags["cal_offset_sbp_bhs_grade"] in "ABCD"
    assert [a.path for a in client.list_artifacts(run_ids[1], "calibration")] == [
        f"calibration/{ESTIMATES_FILE}"
    ]

    train = load_study(client, ["calib"]).train
    sections = calibration_sections(client, train, tmp_path / "report")
    table = sections[0].table
    assert list(table["method"]) == ["none", "trivial", "offset"]  # the lower-val_mae cell
    assert set(table["cell"]) == {"small-unfrozen-e3-xavier"} and set(table["k"]) == {5}
    assert table.set_index("method").loc["trivial", "sbp_cal_mase"] == 1.0
    offset = table.set_index("method").loc["offset"]
    assert offset["sbp_cal_mase"] < 1.0 and offset["bhs"] != "?" and "n/a" in offset["aami"]
    assert offset["sbp_mae"] < table.set_index("method").loc["none", "sbp_mae"]
    images = sections[1].images
    assert len(images) == 1 and images[0].is_file() and images[0].stat().st_size > 1000
    assert run_ids[1][:8] in sections[1].note


def test_leaderboard_without_calibrated_cells_says_so(tracking_uri, tmp_path):
    import pandas as pd

    sections = calibration_sections(MlflowClient(tracking_uri), pd.DataFrame(), tmp_path)
    assert len(sections) == 1 and sections[0].table.empty and "No cell" in sections[0].note
