"""Clinical-standard metrics for blood-pressure estimates (pure numpy).

Definitions (DESIGN section 5), per target, with `err = target - estimate` in mmHg:
MAE, ME (mean err), SD (ddof=1), RMSE, R^2 (around the test mean), MASE (MAE over the MAE of
always predicting the train mean), a bootstrap 95% CI of MAE that resamples subjects, BHS shares
within <= 5/10/15 mmHg with grades A-D (inclusive bounds) and AAMI (|ME| <= 5, SD <= 8, >= 85
subjects; fewer subjects are `not_assessable`).

Boundaries: errors are computed in float64, and `|err| <= k` is tested with a tolerance of 1e-9
mmHg, so that an error that is 5 mmHg in decimal (e.g. 120.1 - 115.1, which is 5.000000000000014
in binary) counts as within 5. Grades compare counts in integers (`within * 100 >= pct * n`), so
exactly 60 % is exactly 60 %.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bpfm.errors import BpfmError

TARGETS = ("sbp", "dbp")
BHS_THRESHOLDS_MMHG = (5, 10, 15)
# Grade -> minimum cumulative percentages within 5 / 10 / 15 mmHg (O'Brien et al., BMJ 2001).
BHS_GRADES = (("A", (60, 85, 95)), ("B", (50, 75, 90)), ("C", (40, 65, 85)))
AAMI_MAX_ABS_ME = 5.0
AAMI_MAX_SD = 8.0
AAMI_MIN_SUBJECTS = 85
WITHIN_TOLERANCE_MMHG = 1e-9

PER_TARGET_KEYS = (
    "mae", "me", "sd", "rmse", "r2", "mase", "bhs5", "bhs10", "bhs15",
    "mae_ci_low", "mae_ci_high", "bhs_grade", "aami",
)


def bhs_grade(within_counts: Sequence[int], n: int) -> str:
    """BHS grade from the counts of |err| within 5, 10 and 15 mmHg among n estimates."""
    for grade, minimum_pct in BHS_GRADES:
        if all(
            count * 100 >= pct * n for count, pct in zip(within_counts, minimum_pct, strict=True)
        ):
            return grade
    return "D"


def aami_verdict(me: float, sd: float, n_subjects: int) -> str:
    """AAMI / ISO 81060-2 criterion 1 for one target: 'pass', 'fail' or 'not_assessable'."""
    if n_subjects < AAMI_MIN_SUBJECTS:
        return "not_assessable"
    if abs(me) <= AAMI_MAX_ABS_ME and sd <= AAMI_MAX_SD:
        return "pass"
    return "fail"


def combine_aami(verdicts: Sequence[str]) -> str:
    """Overall AAMI: pass only if every target passes; not_assessable if any target is."""
    if "not_assessable" in verdicts:
        return "not_assessable"
    return "pass" if all(v == "pass" for v in verdicts) else "fail"


def bootstrap_mae_ci(
    abs_err: np.ndarray,
    subjects: Sequence[str],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile CI of MAE, resampling whole subjects with replacement (segments of one subject
    are correlated, so resampling segments would give a too-narrow interval)."""
    _, subject_index = np.unique(
        np.asarray(subjects, dtype=object).astype(str), return_inverse=True
    )
    n_subjects = int(subject_index.max()) + 1
    sums = np.bincount(subject_index, weights=abs_err, minlength=n_subjects)
    counts = np.bincount(subject_index, minlength=n_subjects).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_subjects, size=(n_boot, n_subjects))
    maes = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(maes, [tail, 100.0 - tail])
    return float(low), float(high)


def _target_metrics(
    target: np.ndarray,
    estimate: np.ndarray,
    subjects: Sequence[str],
    n_subjects: int,
    train_mean: float,
    seed: int,
) -> dict[str, float | str]:
    err = target - estimate
    abs_err = np.abs(err)
    n = err.size
    mae = float(abs_err.mean())
    me = float(err.mean())
    sd = float(err.std(ddof=1)) if n > 1 else float("nan")
    ss_tot = float(((target - target.mean()) ** 2).sum())
    r2 = 1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    naive_mae = float(np.abs(target - train_mean).mean())
    within = [int((abs_err <= k + WITHIN_TOLERANCE_MMHG).sum()) for k in BHS_THRESHOLDS_MMHG]
    ci_low, ci_high = bootstrap_mae_ci(abs_err, subjects, seed=seed)
    return {
        "mae": mae,
        "me": me,
        "sd": sd,
        "rmse": float(np.sqrt((err**2).mean())),
        "r2": r2,
        "mase": mae / naive_mae if naive_mae > 0 else float("nan"),
        "bhs5": 100.0 * within[0] / n,
        "bhs10": 100.0 * within[1] / n,
        "bhs15": 100.0 * within[2] / n,
        "mae_ci_low": ci_low,
        "mae_ci_high": ci_high,
        "bhs_grade": bhs_grade(within, n),
        "aami": aami_verdict(me, sd, n_subjects),
    }


def compute_metrics(
    target: np.ndarray,
    estimate: np.ndarray,
    subjects: Sequence[str],
    train_mean: np.ndarray | None = None,
    *,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """All metrics for [N, 2] arrays ordered [SBP, DBP], in mmHg.

    `subjects` (length N) drives n_subjects (AAMI) and the bootstrap. `train_mean` is the train
    view's [SBP, DBP] mean, the baseline of MASE; without it the test mean stands in (an in-sample
    baseline, slightly easier to beat). `seed` seeds the bootstrap."""
    target = np.asarray(target, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    if target.ndim != 2 or target.shape[1] != 2 or target.shape != estimate.shape:
        raise BpfmError(
            f"metrics: target/estimate: expected two [N, 2] arrays, got {target.shape} and "
            f"{estimate.shape}"
        )
    n = target.shape[0]
    if n == 0:
        raise BpfmError("metrics: target: no rows to evaluate")
    if len(subjects) != n:
        raise BpfmError(f"metrics: subjects: {len(subjects)} entries for {n} rows")
    if not (np.isfinite(target).all() and np.isfinite(estimate).all()):
        raise BpfmError("metrics: target/estimate: contains NaN or infinite values")
    baseline = target.mean(axis=0) if train_mean is None else np.asarray(train_mean, np.float64)
    n_subjects = len(set(subjects))
    result: dict[str, float | int | str] = {"n": int(n), "n_subjects": int(n_subjects)}
    verdicts = []
    for column, name in enumerate(TARGETS):
        per_target = _target_metrics(
            target[:, column], estimate[:, column], subjects, n_subjects, baseline[column], seed
        )
        verdicts.append(per_target["aami"])
        result.update({f"{name}_{key}": value for key, value in per_target.items()})
    result["aami"] = combine_aami(verdicts)
    return result


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The numeric entries of a metrics dict (what MLflow logs as metrics; the rest are tags)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float | np.number) and not isinstance(value, bool)
    }
