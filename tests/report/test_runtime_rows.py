"""Table IV gains a row per on-device runtime variant: its reduction factor is against the same
runtime's fp32 file, and it carries peak RSS, MACs and the changes against fp32."""

from __future__ import annotations

import pandas as pd
import pytest

from bpfm.report import tables


def _frames():
    train = pd.DataFrame([{"run_id": "t1", "size": "small", "freeze": "unfrozen", "size_mib": 13.7,
                           "dbp_r2": 0.5, "sbp_r2": 0.6}])
    common = {"parent_run_id": "t1", "size": "small", "freeze": "unfrozen", "source": "mimic",
              "protocol": "paper",
              "init": "xavier", "epochs": 1, "weights": "per_channel",
              "latency_ms_b1": 5.0, "latency_ms_b64": 100.0, "dbp_r2": 0.5, "sbp_r2": 0.6}
    quant = pd.DataFrame([
        {**common, "mode": "fp32", "backend": "fx", "size_mib": 13.7},
        {**common, "mode": "dynamic", "backend": "fx", "size_mib": 4.0},
        {**common, "mode": "fp32", "backend": "onnxruntime", "size_mib": 14.0,
         "peak_rss_mib_b1": 30.0, "macs_per_window": 1.0e8, "delta_sbp_mae": 0.0},
        {**common, "mode": "static", "observer": "entropy", "backend": "onnxruntime",
         "size_mib": 3.5, "peak_rss_mib_b1": 20.0, "macs_per_window": 1.0e8,
         "delta_sbp_mae": 0.05, "sbp_r2": 0.58},
        {**common, "mode": "static", "observer": "minmax", "backend": "executorch",
         "size_mib": 3.6, "peak_rss_mib_b1": 25.0, "macs_per_window": 1.0e8,
         "delta_sbp_mae": 0.04},
    ])
    return quant, train


def test_runtime_rows_in_table4():
    quant, train = _frames()
    table = tables.table4(quant, train).set_index("variant")
    assert table.loc["fp32", "reduction_factor"] == pytest.approx(1.0)
    onnx = table.loc["static/entropy (per_channel, onnxruntime)"]
    assert onnx["reduction_factor"] == pytest.approx(14.0 / 3.5)  # the runtime's own fp32 file
    assert onnx["peak_rss_mib_b1"] == 20.0 and onnx["macs_per_window"] == 1.0e8
    assert onnx["delta_sbp_mae"] == pytest.approx(0.05)
    # no fp32 .pte in this trial: against the torch fp32 model
    pte = table.loc["static/minmax (per_channel, executorch)"]
    assert pte["reduction_factor"] == pytest.approx(13.7 / 3.6)
    assert table.loc["fp32 (onnxruntime)", "reduction_factor"] == pytest.approx(1.0)
    assert pd.isna(table.loc["dynamic (per_channel, fx)", "peak_rss_mib_b1"])


def test_runtime_fp32_is_not_the_torch_reference():
    quant, train = _frames()
    table = tables.table3(quant, train).set_index("variant")
    assert table.loc["static/entropy (per_channel, onnxruntime)", "delta_sbp_r2"] == \
        pytest.approx(-0.02)
    assert "fp32 (onnxruntime)" in table.index
