"""Per-subject calibration: a few cuff readings of a new patient correct the model's estimates.

Cuffless devices are calibrated per person; PulseDB ships `AAMI_Cal` for exactly that. For each
test subject, K calibration windows carry their reference BP; the subject's other windows are the
test set of *every* method, `none` included, so all methods are compared on the same windows:

- calibration windows: with the `aami` protocol, the subject's first K `AAMI_Cal` segments (its
  AAMI_Test windows are all test windows); otherwise, and for a subject without Cal segments, its
  first K windows in `segment_id` order (numeric parts compared as numbers), so calibration
  precedes the test windows as in a real device. A subject with no window left after its K
  adds nothing to the calibrated test set.
- `offset`: estimate + the subject's mean calibration error, per target.
- `affine`: reference ~ a * estimate + b per subject and target, by least squares with a ridge
  penalty `strength * K * (a - 1)^2` on the slope and the intercept free (so the fit goes through
  the calibration means): strength 0 is plain least squares, infinity is `offset`. `strength`
  (mmHg^2, against the within-subject variance of the estimates) is chosen on the validation
  view (its subjects calibrated the same way) from AFFINE_STRENGTHS; with K = 3 the plain fit
  follows noise, the penalty keeps slopes near 1 unless the estimates vary far more than that.
- `head`: a copy of the model's head is fine-tuned (Adam, full batch, MSE in the training units)
  on the subject's calibration windows for a few steps, over encoder features computed once; the
  trained model is never changed. Steps are chosen on the validation view from HEAD_STEPS.
- `trivial`: each subject's mean reference over its calibration windows, the honest baseline of
  a calibrated model; `cal_mase` = MAE / that baseline's MAE (a calibrated model earns its place
  only where `cal_mase` < 1).

The fits read references of calibration rows only (`reference[rows.calib]`), never of a test row.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from bpfm.data.splits import Split, View
from bpfm.devices import model_device
from bpfm.errors import BpfmError
from bpfm.io.atomic import publish_file as _publish
from bpfm.metrics import TARGETS, compute_metrics
from bpfm.training.predict import Predictions, _view_loader, check_batch, target_scaling

METHODS = ("none", "offset", "affine", "head")
DEFAULT_WINDOWS = 5
ESTIMATES_FILE = "calibrated_estimates.parquet"  # in a model dir (no "prediction" in the name:
# the leaderboard finds a run's predictions artifact by that word)
AFFINE_STRENGTHS = (0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, float("inf"))
HEAD_STEPS = (5, 20, 50)
HEAD_LR = 1e-3
_DIGITS = re.compile(r"(\d+)")


def parse_methods(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """`"offset,affine"` or a list -> a tuple of method names; `none` alone means no calibrated
    evaluation (it is always reported beside the others)."""
    if not value:
        return ()
    parts = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return tuple(dict.fromkeys(p.strip() for p in parts if p.strip() and p.strip() != "none"))


def check_methods(methods: Sequence[str], k: int, where: str = "calibration") -> tuple[str, ...]:
    """Validated, de-duplicated methods (one-line errors naming the bad value)."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise BpfmError(f"{where}: unknown method {bad[0]!r} (valid: {', '.join(METHODS)})")
    if k < 1:
        raise BpfmError(f"{where}: calib_windows: must be >= 1, got {k}")
    return tuple(dict.fromkeys(methods))


def segment_order_key(segment_id: str) -> tuple:
    """Sort key of a segment id with its digit runs compared as numbers ('s/9' < 's/10')."""
    return tuple(int(p) if p.isdigit() else p for p in _DIGITS.split(segment_id))


@dataclass(frozen=True)
class CalibrationRows:
    """Which rows calibrate (`calib`) and which are tested (`test`); the two never overlap."""

    calib: np.ndarray  # bool [N]
    test: np.ndarray  # bool [N]

    @property
    def n_calib(self) -> int:
        return int(self.calib.sum())

    @property
    def n_test(self) -> int:
        return int(self.test.sum())


def calibration_rows(
    segment_ids: Sequence[str],
    subjects: Sequence[str],
    k: int,
    from_cal: np.ndarray | None = None,
) -> CalibrationRows:
    """Per subject: its first `k` calibration-subset rows (`from_cal`) in segment order and all
    its other rows as test, or, without such rows, its first `k` rows and the rest as test."""
    n = len(segment_ids)
    from_cal = np.zeros(n, bool) if from_cal is None else np.asarray(from_cal, bool)
    calib, test = np.zeros(n, bool), np.zeros(n, bool)
    by_subject: dict[str, list[int]] = {}
    for i, subject in enumerate(subjects):
        by_subject.setdefault(str(subject), []).append(i)
    for rows in by_subject.values():
        rows.sort(key=lambda i: segment_order_key(str(segment_ids[i])))
        cal_rows = [i for i in rows if from_cal[i]]
        if cal_rows:
            calib[cal_rows[:k]] = True
            test[[i for i in rows if not from_cal[i]]] = True
        else:
            calib[rows[:k]] = True
            test[rows[k:]] = True
    return CalibrationRows(calib, test)


def _subject_groups(subjects: Sequence[str], rows: CalibrationRows):
    """(subject, calibration row indices, test row indices) per tested subject, in sorted
    subject order, rows ascending."""
    names, index = np.unique(np.asarray(subjects, dtype=object).astype(str), return_inverse=True)
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(len(names) + 1))
    for j, name in enumerate(names):
        members = order[bounds[j] : bounds[j + 1]]
        tested = members[rows.test[members]]
        if len(tested):
            yield str(name), members[rows.calib[members]], tested


def affine_fit(estimate: np.ndarray, reference: np.ndarray, strength: float) -> tuple[float, float]:
    """(slope, intercept) of reference ~ slope * estimate + intercept over one subject's
    calibration windows, the slope shrunk towards 1 by `strength` (see the module doc)."""
    e_mean, r_mean = float(estimate.mean()), float(reference.mean())
    de, dr = estimate - e_mean, reference - r_mean
    if np.isinf(strength):
        slope = 1.0
    else:
        penalty = strength * len(estimate)
        denominator = float(de @ de) + penalty
        slope = (float(de @ dr) + penalty) / denominator if denominator > 0 else 1.0
    return slope, r_mean - slope * e_mean


def calibrate(
    method: str,
    estimate: np.ndarray,
    reference: np.ndarray,
    subjects: Sequence[str],
    rows: CalibrationRows,
    *,
    strength: float | Sequence[float] = 16.0,
) -> np.ndarray:
    """Calibrated estimates [n_test, 2] of the test rows (in row order) by `offset`, `affine` or
    `none`; `trivial` gives the subject's calibration mean. `strength` (affine): one value or one
    per target. Only `reference[rows.calib]` is read."""
    estimate = np.asarray(estimate, np.float64)
    strengths = np.broadcast_to(np.asarray(strength, np.float64), (len(TARGETS),))
    out = np.array(estimate, copy=True)
    for _, cal, tst in _subject_groups(subjects, rows):
        ref_cal = np.asarray(reference[cal], np.float64)
        if method == "offset":
            out[tst] = estimate[tst] + (ref_cal - estimate[cal]).mean(axis=0)
        elif method == "affine":
            for t in range(len(TARGETS)):
                slope, intercept = affine_fit(estimate[cal, t], ref_cal[:, t], strengths[t])
                out[tst, t] = slope * estimate[tst, t] + intercept
        elif method == "trivial":
            out[tst] = ref_cal.mean(axis=0)
        elif method != "none":
            raise BpfmError(f"calibration: method {method!r} is not an array method")
    return out[rows.test]


# ---------------------------------------------------------------- head


def head_calibrate(
    head: nn.Module,
    features: np.ndarray,
    reference: np.ndarray,
    subjects: Sequence[str],
    rows: CalibrationRows,
    meta: dict[str, Any],
    *,
    steps: int | Sequence[int] = 20,
    lr: float = HEAD_LR,
) -> dict[int, np.ndarray]:
    """{steps: calibrated test estimates [n_test, 2] mmHg} from per-subject copies of `head`
    fine-tuned on the subject's calibration features (`features` [N, D], encoder output pooled
    as the model pools it). `head` itself is never changed. Nothing is random (a copy in eval
    mode, so no dropout; full-batch Adam), so a fit depends on its subject alone and leaves the
    caller's RNG state (e.g. a training run's) untouched."""
    scale, shift = (torch.tensor(v, dtype=torch.float32) for v in target_scaling(meta))
    checkpoints = sorted({int(s) for s in np.atleast_1d(steps)})
    device = next(head.parameters()).device
    feats = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    test_index = np.flatnonzero(rows.test)
    where = {row: i for i, row in enumerate(test_index)}
    out = {s: np.zeros((len(test_index), len(TARGETS))) for s in checkpoints}
    for _, cal, tst in _subject_groups(subjects, rows):
        local = copy.deepcopy(head).to(device).eval()
        for p in local.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(local.parameters(), lr=lr)
        x_cal = feats[cal].to(device)
        y_cal = ((torch.as_tensor(reference[cal], dtype=torch.float32) - shift) / scale).to(device)
        x_test = feats[tst].to(device)
        positions = [where[r] for r in tst]
        done = 0
        for target_steps in checkpoints:
            for _ in range(target_steps - done):
                loss = nn.functional.mse_loss(local(x_cal).float(), y_cal)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            done = target_steps
            with torch.no_grad():
                pred = local(x_test).float().cpu() * scale + shift
            out[target_steps][positions] = pred.numpy().astype(np.float64)
    return out


@torch.inference_mode()
def encode_view(
    model: nn.Module, view: View, meta: dict[str, Any], *, batch_size: int = 256
) -> tuple[Predictions, np.ndarray]:
    """(Predictions, pooled encoder features [N, D]) of a `BPModel` over a view in view order:
    one pass gives both the model's estimates and what its head sees."""
    device = model_device(model)
    scale, shift = target_scaling(meta)
    model.eval()
    ids: list[str] = []
    subjects: list[str] = []
    targets, estimates, features = [], [], []
    for batch in _view_loader(view, batch_size, bool(meta.get("normalize_inputs"))):
        check_batch(batch["x"])
        pooled = model.encoder(batch["x"].to(device)).mean(dim=1)
        out = model.head(pooled).float().cpu().numpy().astype(np.float64)
        estimates.append(out * scale + shift)
        features.append(pooled.float().cpu().numpy())
        targets.append(batch["y"].numpy().astype(np.float64))
        ids.extend(batch["segment_id"])
        subjects.extend(batch["subject"])
    if not targets:
        raise BpfmError(f"calibration: {view.describe()}: the view holds no segments")
    predictions = Predictions(ids, subjects, np.concatenate(targets), np.concatenate(estimates))
    return predictions, np.concatenate(features)


# ---------------------------------------------------------------- metrics and the split


def calibration_metrics(
    target: np.ndarray,
    estimate: np.ndarray,
    trivial: np.ndarray,
    subjects: Sequence[str],
    train_mean: Sequence[float] | None,
) -> dict[str, Any]:
    """`compute_metrics` of calibrated test estimates plus `{sbp,dbp}_cal_mase` (MAE over the
    trivial calibrated predictor's MAE on the same windows)."""
    metrics = compute_metrics(target, estimate, subjects, train_mean)
    for t, name in enumerate(TARGETS):
        baseline = float(np.abs(target[:, t] - trivial[:, t]).mean())
        metrics[f"{name}_cal_mase"] = metrics[f"{name}_mae"] / baseline if baseline > 0 else np.nan
    return metrics


def _mean_mae(target: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    return np.abs(target - estimate).mean(axis=0)


def _rows_of(predictions, k: int, from_cal: np.ndarray | None = None) -> CalibrationRows:
    return calibration_rows(predictions.segment_id, predictions.subject, k, from_cal)


def choose_strength(predictions: Predictions, k: int) -> list[float]:
    """Per target, the affine strength with the lowest validation MAE (ties: the stronger)."""
    rows = _rows_of(predictions, k)
    if rows.n_test == 0:
        return [float("inf")] * len(TARGETS)
    target = predictions.target[rows.test]
    maes = [
        _mean_mae(target, calibrate("affine", predictions.estimate, predictions.target,
                                    predictions.subject, rows, strength=s))
        for s in AFFINE_STRENGTHS
    ]
    best = []
    for t in range(len(TARGETS)):
        values = [m[t] for m in maes]
        low = min(values)
        best.append(max(s for s, v in zip(AFFINE_STRENGTHS, values, strict=True) if v <= low))
    return best


def cal_view(split: Split) -> View | None:
    """The `AAMI_Cal` view of an `aami` split's source, or None (other protocols, or a shard
    set without that subset)."""
    if split.protocol != "aami":
        return None
    test_subset = split.test.subsets[0]
    cal_subset = test_subset.removesuffix("aami_test") + "aami_cal"
    if cal_subset not in split.test.shards.subsets(split.source):
        return None
    return View(split.test.shards, split.source, (cal_subset,), "cal", split.test.seed)


def _concat(a, b):
    return Predictions(a.segment_id + b.segment_id, a.subject + b.subject,
                       np.concatenate([a.target, b.target]),
                       np.concatenate([a.estimate, b.estimate]))


@dataclass
class EncodedSplit:
    """A model's estimates and pooled features over a split's test rows (with `AAMI_Cal` rows
    marked by `from_cal`) and validation rows: computed once, calibrated for any K."""

    test: Any  # bpfm.training.predict.Predictions
    test_features: np.ndarray
    from_cal: np.ndarray | None
    val: Any
    val_features: np.ndarray
    where: str


def encode_split(
    model: nn.Module, meta: dict[str, Any], split: Split, *, batch_size: int = 256
) -> EncodedSplit:
    """`EncodedSplit` of a `BPModel` over `split` (test, the source's AAMI_Cal for `aami`, val)."""
    test, test_features = encode_view(model, split.test, meta, batch_size=batch_size)
    from_cal = None
    cal = cal_view(split)
    if cal is not None:
        cal_pred, cal_features = encode_view(model, cal, meta, batch_size=batch_size)
        from_cal = np.r_[np.zeros(len(test.subject), bool), np.ones(len(cal_pred.subject), bool)]
        test, test_features = _concat(test, cal_pred), np.concatenate([test_features, cal_features])
    val, val_features = encode_view(model, split.val, meta, batch_size=batch_size)
    return EncodedSplit(test, test_features, from_cal, val, val_features, split.test.describe())


def evaluate_calibration(
    model: nn.Module,
    meta: dict[str, Any],
    split: Split,
    methods: Sequence[str],
    k: int = DEFAULT_WINDOWS,
    *,
    batch_size: int = 256,
    encoded: EncodedSplit | None = None,
    keep_estimates: bool = False,
) -> dict[str, Any]:
    """Every method in `methods`, plus `none` and `trivial`, on the test windows left after each
    test subject's K calibration windows. Strength (affine) and steps (head) are chosen on the
    validation view. Returns {methods, k, counts, chosen settings, metrics: {name: metrics}}.
    `encoded` (from `encode_split`) saves re-running the model for another K; `keep_estimates`
    adds `estimates`, a table of the test windows with every method's estimates."""
    methods = check_methods(methods, k)
    # DataLoaders draw their base seed from torch's global RNG: forked, so that calibrating
    # between epochs leaves a training run's dropout and shuffles as they would have been.
    with torch.random.fork_rng(devices=[]):
        enc = encoded or encode_split(model, meta, split, batch_size=batch_size)
    train_mean = meta.get("target_mean")
    test_pred = enc.test
    rows = _rows_of(test_pred, k, enc.from_cal)
    if rows.n_test == 0:
        raise BpfmError(
            f"calibration: {enc.where}: no test subject has windows left after its "
            f"{k} calibration windows"
        )
    subjects = test_pred.subject
    test_subjects = [s for s, keep in zip(subjects, rows.test, strict=True) if keep]
    target = test_pred.target[rows.test]
    estimates = {m: calibrate(m, test_pred.estimate, test_pred.target, subjects, rows)
                 for m in ("none", "trivial", *(set(methods) & {"offset"}))}
    result: dict[str, Any] = {
        "methods": list(methods), "k": k, "n_calib": rows.n_calib, "n_test": rows.n_test,
        "n_subjects": len(set(test_subjects)),
    }
    if "affine" in methods:
        strength = choose_strength(enc.val, k)
        result["affine_strength"] = strength
        estimates["affine"] = calibrate("affine", test_pred.estimate, test_pred.target,
                                        subjects, rows, strength=strength)
    if "head" in methods:
        steps = _choose_head_steps(model.head, enc.val, enc.val_features, meta, k)
        result["head_steps"] = steps
        by_steps = head_calibrate(model.head, enc.test_features, test_pred.target, subjects,
                                  rows, meta, steps=steps)
        estimates["head"] = by_steps[steps]
    result["metrics"] = {
        name: calibration_metrics(target, est, estimates["trivial"], test_subjects, train_mean)
        for name, est in estimates.items()
    }
    if keep_estimates:
        ids = [i for i, keep in zip(test_pred.segment_id, rows.test, strict=True) if keep]
        result["estimates"] = estimates_table(ids, test_subjects, target, estimates)
    return result


def estimates_table(
    segment_ids: Sequence[str],
    subjects: Sequence[str],
    target: np.ndarray,
    estimates: dict[str, np.ndarray],
) -> pa.Table:
    """A pyarrow table of calibrated test windows: ids, references and `<method>_<t>_hat`."""
    columns = {"segment_id": pa.array(segment_ids, pa.string()),
               "subject": pa.array(subjects, pa.string())}
    for t, name in enumerate(TARGETS):
        columns[name] = pa.array(target[:, t], pa.float32())
    for method, est in estimates.items():
        for t, name in enumerate(TARGETS):
            columns[f"{method}_{name}_hat"] = pa.array(est[:, t], pa.float32())
    return pa.table(columns)


def _choose_head_steps(head, val_pred, val_feats, meta, k: int) -> int:
    rows = _rows_of(val_pred, k)
    if rows.n_test == 0:
        return HEAD_STEPS[0]
    by_steps = head_calibrate(head, val_feats, val_pred.target, val_pred.subject, rows, meta,
                              steps=HEAD_STEPS)
    target = val_pred.target[rows.test]
    scores = {s: float(_mean_mae(target, est).mean()) for s, est in by_steps.items()}
    return min(scores, key=lambda s: (scores[s], s))


def flat_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """`cal_<name>_<metric>` for every method's metrics (what MLflow records), plus `calib_k`."""
    flat: dict[str, Any] = {"calib_k": result["k"]}
    for name, metrics in result["metrics"].items():
        flat.update({f"cal_{name}_{key}": value for key, value in metrics.items()})
    return flat


def write_calibrated_estimates(model_dir: str | Path, table: pa.Table) -> None:
    """Publish `ESTIMATES_FILE` in a model dir (atomically, as every model-dir file)."""
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    _publish(Path(model_dir) / ESTIMATES_FILE, lambda tmp: pq.write_table(table, tmp))
