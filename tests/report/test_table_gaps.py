"""The report tables' columns a reader needs: Table III says frozen or not, Table IV's fp32 row has
a latency (so every variant a speed-up), Table V picks best by validation MAE and leaves the
synthetic demo out."""

from __future__ import annotations

import pandas as pd
import pytest

from bpfm.report import tables


def _train(run_id: str, freeze: str, sbp_mae: float, val_mae: float, profile: str = "paper"):
    return {"experiment": "e", "run_id": run_id, "source": "mimic", "protocol": "paper",
            "size": "small", "freeze": freeze, "init": "pretrained", "epochs": "100",
            "seed": "42", "sbp_mae": sbp_mae, "dbp_mae": sbp_mae / 2, "val_mae": val_mae,
            "sbp_r2": 0.5, "dbp_r2": 0.4, "size_mib": 13.7, "profile": profile}


def _quant(parent: str, r2: float, latency: float, speedup: float):
    return {"parent_run_id": parent, "mode": "dynamic", "observer": "none",
            "weights": "per_channel", "backend": "fx", "size_mib": 3.8, "dbp_r2": r2,
            "sbp_r2": r2, "latency_ms_b1": latency, "speedup_b1": speedup,
            "latency_ms_b64": 10 * latency, "speedup_b64": speedup, "source": "mimic",
            "protocol": "paper", "size": "small", "init": "pretrained",
            "epochs": "100", "seed": "42"}


TRAIN = pd.DataFrame([_train("frozen-run", "frozen", 9.0, 3.0),
                      _train("unfrozen-run", "unfrozen", 8.0, 4.0)])
QUANT = pd.DataFrame([_quant("frozen-run", 0.30, 2.0, 2.0), _quant("unfrozen-run", 0.35, 3.0, 2.0)])
QUANT = QUANT.merge(TRAIN[["run_id", "freeze"]].rename(columns={"run_id": "parent_run_id"}))


def test_table3_tells_the_frozen_model_from_the_unfrozen_one():
    table = tables.table3(QUANT, TRAIN)
    assert list(table["frozen"]) == ["no", "yes"]
    assert table.set_index("frozen").loc["yes", "dbp_r2"] == pytest.approx(0.30)


def test_table4_fp32_row_has_latency_and_variants_a_speedup():
    table = tables.table4(QUANT, TRAIN).set_index("variant")
    assert table.loc["fp32", "latency_ms_b1"] == pytest.approx(5.0)  # median of 4.0 and 6.0
    assert table.loc["fp32", "speedup_b1"] == pytest.approx(1.0)
    assert table.loc["dynamic (per_channel, fx)", "speedup_b1"] == pytest.approx(2.0)
    assert table.loc["fp32", "latency_ms_b64"] == pytest.approx(50.0)


def test_table5_picks_best_by_validation_mae_and_leaves_the_demo_out():
    ours = tables.table5(TRAIN)
    ours = ours[ours["reference"].str.startswith("this study")]
    assert len(ours) == 1 and "frozen-run" in ours.iloc[0]["reference"]  # val 3.0, not test 8.0
    demo = TRAIN.assign(profile="demo")
    assert not tables.table5(demo)["reference"].str.startswith("this study").any()
