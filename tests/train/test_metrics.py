"""Metrics against hand-computed values and at the exact BHS / AAMI bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bpfm.errors import BpfmError
from bpfm.metrics import (
    PER_TARGET_KEYS,
    aami_verdict,
    bhs_grade,
    combine_aami,
    compute_metrics,
    numeric_metrics,
)


def _pairs(sbp_target, sbp_hat, dbp_target, dbp_hat):
    return np.column_stack([sbp_target, dbp_target]), np.column_stack([sbp_hat, dbp_hat])


def test_hand_computed_values():
    target, estimate = _pairs(
        [120, 130, 140, 150], [118, 133, 140, 145], [70, 80, 90, 100], [80, 80, 80, 80]
    )
    m = compute_metrics(target, estimate, ["a", "b", "c", "d"], np.array([130.0, 85.0]))
    # SBP: err = [2, -3, 0, 5]
    assert m["sbp_mae"] == pytest.approx(2.5)
    assert m["sbp_me"] == pytest.approx(1.0)
    assert m["sbp_sd"] == pytest.approx(math.sqrt(34 / 3))
    assert m["sbp_rmse"] == pytest.approx(math.sqrt(38 / 4))
    assert m["sbp_r2"] == pytest.approx(1 - 38 / 500)
    assert m["sbp_mase"] == pytest.approx(2.5 / 10)  # |t - 130| = [10, 0, 10, 20]
    assert (m["sbp_bhs5"], m["sbp_bhs10"], m["sbp_bhs15"]) == (100.0, 100.0, 100.0)
    assert m["sbp_bhs_grade"] == "A"
    # DBP: err = [-10, 0, 10, 20]
    assert m["dbp_mae"] == pytest.approx(10.0)
    assert m["dbp_me"] == pytest.approx(5.0)
    assert m["dbp_sd"] == pytest.approx(math.sqrt(500 / 3))
    assert m["dbp_r2"] == pytest.approx(1 - 600 / 500)
    assert m["dbp_mase"] == pytest.approx(10.0 / 10.0)  # |t - 85| = [15, 5, 5, 15]
    assert (m["dbp_bhs5"], m["dbp_bhs10"], m["dbp_bhs15"]) == (25.0, 75.0, 75.0)
    assert m["dbp_bhs_grade"] == "D"
    assert (m["n"], m["n_subjects"]) == (4, 4)
    assert m["aami"] == "not_assessable"


def test_key_names_match_the_contract():
    target, estimate = _pairs([120, 130], [121, 129], [80, 70], [79, 72])
    m = compute_metrics(target, estimate, ["a", "a"], None)
    for t in ("sbp", "dbp"):
        for k in PER_TARGET_KEYS:
            assert isinstance(m[f"{t}_{k}"], str if k in ("bhs_grade", "aami") else float)
        assert m[f"{t}_bhs_grade"] in "ABCD"
        assert m[f"{t}_aami"] == "not_assessable"
    assert set(numeric_metrics(m)) == {k for k, v in m.items() if not isinstance(v, str)}


def test_error_of_exactly_five_counts_as_within_five():
    target, estimate = _pairs([125.0, 120.1], [120.0, 115.1], [85.0, 80.0], [80.0, 95.1])
    m = compute_metrics(target, estimate, ["a", "b"], None)
    assert m["sbp_bhs5"] == 100.0  # 125-120 and 120.1-115.1 (= 5.000000000000014 in binary)
    assert (m["dbp_bhs5"], m["dbp_bhs10"], m["dbp_bhs15"]) == (50.0, 50.0, 50.0)


def _sbp_errors(errors):
    errors = np.asarray(errors, dtype=np.float64)
    target = np.column_stack([120.0 + errors, np.full(errors.size, 80.0)])
    estimate = np.column_stack([np.full(errors.size, 120.0), np.full(errors.size, 80.0)])
    return target, estimate, [f"s{i}" for i in range(errors.size)]


@pytest.mark.parametrize(
    ("n5", "n10", "n15", "grade"),
    [
        (12, 5, 2, "A"),  # exactly 60 / 85 / 95 %
        (11, 6, 2, "B"),  # 55 % within 5
        (12, 4, 3, "B"),  # 80 % within 10
        (10, 5, 3, "B"),  # exactly 50 / 75 / 90 %
        (8, 5, 4, "C"),  # exactly 40 / 65 / 85 %
        (8, 5, 3, "D"),  # 80 % within 15
        (7, 6, 4, "D"),  # 35 % within 5
    ],
)
def test_bhs_grade_at_the_exact_bounds(n5, n10, n15, grade):
    errors = [5.0] * n5 + [-10.0] * n10 + [15.0] * n15
    errors += [20.0] * (20 - len(errors))
    m = compute_metrics(*_sbp_errors(errors))
    assert m["sbp_bhs5"] == pytest.approx(100 * n5 / 20)
    assert m["sbp_bhs_grade"] == grade


def test_bhs_grade_from_counts():
    assert bhs_grade([3, 5, 5], 5) == "A"  # 60 / 100 / 100 %
    assert bhs_grade([599, 850, 950], 1000) == "B"
    assert bhs_grade([0, 0, 0], 7) == "D"


def test_aami_needs_85_subjects():
    errors = np.full(85, 5.0)  # |ME| = 5 exactly, SD = 0
    target, estimate, subjects = _sbp_errors(errors)
    assert compute_metrics(target, estimate, subjects)["aami"] == "pass"
    m84 = compute_metrics(target[:84], estimate[:84], subjects[:84])
    assert (m84["sbp_aami"], m84["dbp_aami"], m84["aami"]) == ("not_assessable",) * 3
    # 85 segments from 84 subjects is still not assessable
    two_from_one = subjects[:84] + ["s0"]
    assert compute_metrics(target, estimate, two_from_one)["aami"] == "not_assessable"


def test_aami_bounds_and_combination():
    assert aami_verdict(5.0, 8.0, 85) == "pass"
    assert aami_verdict(-5.0, 8.0, 85) == "pass"
    assert aami_verdict(5.001, 1.0, 85) == "fail"
    assert aami_verdict(0.0, 8.001, 85) == "fail"
    assert aami_verdict(0.0, 0.0, 84) == "not_assessable"
    assert combine_aami(["pass", "pass"]) == "pass"
    assert combine_aami(["pass", "fail"]) == "fail"
    assert combine_aami(["fail", "not_assessable"]) == "not_assessable"


def test_aami_fails_on_spread():
    errors = np.tile([-10.0, 10.0], 50)  # ME 0, SD ~10
    m = compute_metrics(*_sbp_errors(errors))
    assert (m["sbp_aami"], m["dbp_aami"], m["aami"]) == ("fail", "pass", "fail")


def test_bootstrap_ci_resamples_subjects_and_is_seeded():
    rng = np.random.default_rng(1)
    errors = rng.normal(0, 8, size=200)
    target, estimate, _ = _sbp_errors(errors)
    subjects = [f"s{i // 10}" for i in range(200)]
    m = compute_metrics(target, estimate, subjects, seed=3)
    assert m["sbp_mae_ci_low"] < m["sbp_mae"] < m["sbp_mae_ci_high"]
    again = compute_metrics(target, estimate, subjects, seed=3)
    other_seed = compute_metrics(target, estimate, subjects, seed=4)
    assert again["sbp_mae_ci_low"] == m["sbp_mae_ci_low"]
    assert other_seed["sbp_mae_ci_low"] != m["sbp_mae_ci_low"]
    # one subject: every resample is the same subject, so the interval collapses to the MAE
    single = compute_metrics(target, estimate, ["s"] * 200)
    assert single["sbp_mae_ci_low"] == pytest.approx(single["sbp_mae"])
    assert single["sbp_mae_ci_high"] == pytest.approx(single["sbp_mae"])


@pytest.mark.parametrize(
    ("target", "estimate", "subjects", "problem"),
    [
        (np.zeros((3, 2)), np.zeros((3, 3)), ["a"] * 3, "expected two"),
        (np.zeros((0, 2)), np.zeros((0, 2)), [], "no rows"),
        (np.zeros((3, 2)), np.zeros((3, 2)), ["a"] * 2, "2 entries for 3 rows"),
        (np.zeros((2, 2)), np.array([[0.0, np.nan], [0, 0]]), ["a"] * 2, "NaN"),
    ],
)
def test_bad_input_is_one_line_error(target, estimate, subjects, problem):
    with pytest.raises(BpfmError, match=problem):
        compute_metrics(target, estimate, subjects)
