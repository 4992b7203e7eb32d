"""The nightly comparison itself: direction-aware tolerances, grades, verdicts, missing entries."""

from __future__ import annotations

import json

import pytest

from bpfm.errors import BpfmError
from bpfm.regression import (
    DEFAULT_TOLERANCES,
    Tolerance,
    baseline_document,
    compare,
    compare_value,
    load_baseline,
    parse_tolerances,
    render_markdown,
    tolerance_for,
)

BASE = {
    "train/cell": {
        "sbp_mae": 10.0, "dbp_r2": 0.50, "sbp_me": -1.0, "sbp_bhs_grade": "B", "aami": "pass",
        "n": 120, "size_mib": 13.7, "latency_ms_b1": 5.0, "sbp_bhs10": 70.0,
        "delta_sbp_mae": 0.05, "speedup_b64": 1.5,
    },
    "quant/cell/dynamic": {"size_mib": 3.85, "sbp_r2": 0.4},
}


def _current(**changes) -> dict:
    current = {key: dict(values) for key, values in BASE.items()}
    current["train/cell"].update(changes)
    return current


def _status(comparison, metric: str) -> str:
    return next(
        f.status for f in comparison.findings if f.entry == "train/cell" and f.metric == metric
    )


def test_an_unchanged_run_passes():
    comparison = compare(BASE, _current())
    assert comparison.passed and comparison.counts() == {"ok": 13}


@pytest.mark.parametrize(
    ("metric", "value", "status"),
    [
        ("sbp_mae", 10.49, "ok"),  # lower is better: +0.49 within max(0.5, 5 %)
        ("sbp_mae", 10.6, "regressed"),
        ("sbp_mae", 9.0, "improved"),
        ("dbp_r2", 0.47, "regressed"),  # higher is better
        ("dbp_r2", 0.60, "improved"),
        ("sbp_me", 1.5, "ok"),  # closer to zero is better: |1.5| vs |-1.0|
        ("sbp_me", -2.5, "regressed"),
        ("sbp_bhs_grade", "C", "regressed"),  # ordinal
        ("sbp_bhs_grade", "A", "improved"),
        ("aami", "fail", "regressed"),
        ("n", 121, "regressed"),  # counts must not change: the data moved
        ("size_mib", 14.5, "regressed"),  # relative 2 %
        ("latency_ms_b1", 9.0, "ok"),  # relative 100 %: shared CI machines are noisy
        ("latency_ms_b1", 11.0, "regressed"),
        ("sbp_bhs10", 67.0, "regressed"),
        ("sbp_mae", float("nan"), "regressed"),
        ("delta_sbp_mae", 0.6, "regressed"),  # the INT8 model lost more against fp32
        ("delta_sbp_mae", -0.6, "regressed"),  # or strayed from fp32 the other way
        ("delta_sbp_mae", -0.05, "ok"),
        ("speedup_b64", 0.5, "ok"),  # 1.5 -> 0.5 is noise on a shared machine
    ],
)
def test_each_metric_is_judged_in_its_own_direction(metric, value, status):
    assert _status(compare(BASE, _current(**{metric: value})), metric) == status


def test_a_planted_regression_fails_and_is_reported():
    comparison = compare(BASE, _current(sbp_mae=14.0, sbp_bhs_grade="D"))
    assert not comparison.passed
    assert {f.metric for f in comparison.regressions} == {"sbp_mae", "sbp_bhs_grade"}
    report = render_markdown(comparison)
    assert "**FAIL**" in report and "| train/cell | sbp_mae | 10 | 14 |" in report
    assert json.dumps(comparison.to_dict())  # the JSON report is plain JSON


def test_missing_entries_and_metrics_regress_new_ones_do_not():
    current = _current()
    del current["quant/cell/dynamic"]
    del current["train/cell"]["aami"]
    current["train/other"] = {"sbp_mae": 1.0}
    current["train/cell"]["new_metric"] = 1.0
    comparison = compare(BASE, current)
    missing = {(f.entry, f.metric) for f in comparison.regressions}
    assert missing == {("quant/cell/dynamic", "*"), ("train/cell", "aami")}
    assert {(f.entry, f.metric) for f in comparison.findings if f.status == "new"} == {
        ("train/other", "*"), ("train/cell", "new_metric"),
    }


def test_unknown_metrics_may_not_move_either_way():
    tolerance = tolerance_for("something_new")
    assert tolerance.direction == "either"
    assert compare_value(1.0, 1.05, tolerance)[0] == "ok"
    assert compare_value(1.0, 0.8, tolerance)[0] == "regressed"


def test_baseline_overrides_come_before_the_defaults(tmp_path):
    previous = {"tolerances": {"latency_ms_*": {"direction": "ignore"}}}
    document = baseline_document(BASE, profile="nightly", created="now", previous=previous)
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(document))
    loaded = load_baseline(path)
    tolerances = parse_tolerances(loaded["tolerances"], str(path))
    assert tolerance_for("latency_ms_b1", tolerances).direction == "ignore"
    assert tolerance_for("latency_ms_b1", DEFAULT_TOLERANCES).direction == "lower"
    assert compare(loaded["entries"], _current(latency_ms_b1=50.0), tolerances).passed


def test_bad_baselines_are_one_line_errors(tmp_path):
    with pytest.raises(BpfmError, match="not found"):
        load_baseline(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(BpfmError, match="format"):
        load_baseline(tmp_path / "bad.json")
    with pytest.raises(BpfmError, match="direction"):
        Tolerance("sideways")
