"""Per-subject calibration: which windows calibrate, the fits (offset, affine, head), that no test
reference is read, determinism, and on the real challenge2015 sample that `offset` beats `none`."""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json

import numpy as np
import pytest
import torch

from bpfm.cli import main
from bpfm.model.bp_model import PaperHead
from bpfm.training.calibration import (
    affine_fit,
    calibrate,
    calibration_rows,
    head_calibrate,
    segment_order_key,
)

META = {"target_scale": [20.0, 10.0], "target_shift": [120.0, 70.0]}


def _subjects_data(seed: int = 0, per_subject: int = 12, n_subjects: int = 4):
    """Segment ids, subjects, references and estimates with a per-subject bias and slope."""
    rng = np.random.default_rng(seed)
    ids, subjects, refs, ests = [], [], [], []
    for s in range(n_subjects):
        ref = rng.normal([120 + 10 * s, 70 + 5 * s], [8, 5], size=(per_subject, 2))
        est = 0.6 * ref + rng.normal(30, 2, size=(per_subject, 2))
        for i in range(per_subject):
            ids.append(f"subset/s{s}/{i}")
            subjects.append(f"s{s}")
        refs.append(ref)
        ests.append(est)
    return ids, subjects, np.concatenate(refs), np.concatenate(ests)


def test_calibration_windows_are_each_subjects_first_k_in_segment_order():
    ids = ["x/a/10", "x/a/2", "x/b/0", "x/a/1", "x/b/1", "x/a/9"]
    subjects = ["a", "a", "b", "a", "b", "a"]
    rows = calibration_rows(ids, subjects, 2)
    assert sorted(segment_order_key(i) for i in ids)[:3] == [
        segment_order_key(v) for v in ("x/a/1", "x/a/2", "x/a/9")
    ]
    assert [ids[i] for i in np.flatnonzero(rows.calib)] == ["x/a/2", "x/b/0", "x/a/1", "x/b/1"]
    assert [ids[i] for i in np.flatnonzero(rows.test)] == ["x/a/10", "x/a/9"]  # b has none left
    assert not (rows.calib & rows.test).any()


def test_aami_cal_segments_calibrate_and_every_test_window_is_tested():
    ids = ["t/a/0", "t/a/1", "c/a/0", "c/a/1", "c/a/2", "t/b/0", "t/b/1", "t/b/2"]
    subjects = ["a", "a", "a", "a", "a", "b", "b", "b"]
    from_cal = np.array([0, 0, 1, 1, 1, 0, 0, 0], bool)
    rows = calibration_rows(ids, subjects, 2, from_cal)
    assert [ids[i] for i in np.flatnonzero(rows.calib)] == ["c/a/0", "c/a/1", "t/b/0", "t/b/1"]
    # a: both AAMI_Test windows tested; b (no Cal segment): its windows after the first K
    assert [ids[i] for i in np.flatnonzero(rows.test)] == ["t/a/0", "t/a/1", "t/b/2"]


def test_offset_removes_a_known_constant_bias_exactly():
    ids, subjects, ref, _ = _subjects_data()
    per_subject = {"s0": [7.25, -3.5], "s1": [-12.0, 4.0], "s2": [0.5, 9.0], "s3": [20.0, 0.0]}
    estimate = ref - np.array([per_subject[s] for s in subjects])  # each off by its own constant
    rows = calibration_rows(ids, subjects, 3)
    calibrated = calibrate("offset", estimate, ref, subjects, rows)
    np.testing.assert_allclose(calibrated, ref[rows.test], atol=1e-9)
    assert np.abs(estimate[rows.test] - ref[rows.test]).mean() > 5


@pytest.mark.parametrize("method", ["none", "offset", "affine", "trivial", "head"])
def test_calibration_never_reads_a_test_windows_reference(method):
    ids, subjects, ref, est = _subjects_data(1)
    rows = calibration_rows(ids, subjects, 4)
    poisoned = ref.copy()
    poisoned[rows.test] = np.nan
    wild = ref.copy()
    wild[rows.test] = 1e6
    if method == "head":
        torch.manual_seed(0)
        head = PaperHead(8)
        features = np.random.default_rng(2).normal(size=(len(ids), 8)).astype(np.float32)
        results = [head_calibrate(head, features, r, subjects, rows, META, steps=5)[5]
                   for r in (ref, poisoned, wild)]
    else:
        results = [calibrate(method, est, r, subjects, rows, strength=4.0)
                   for r in (ref, poisoned, wild)]
    assert np.isfinite(results[0]).all()
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_per_subject_fits_are_deterministic_and_do_not_depend_on_other_subjects():
    ids, subjects, ref, est = _subjects_data(3)
    rows = calibration_rows(ids, subjects, 5)
    first = calibrate("affine", est, ref, subjects, rows, strength=[2.0, 8.0])
    np.testing.assert_array_equal(first, calibrate("affine", est, ref, subjects, rows,
                                                   strength=[2.0, 8.0]))
    torch.manual_seed(0)
    head = PaperHead(8, dropout=0.5)  # dropout must not make the per-subject fit random
    features = np.random.default_rng(4).normal(size=(len(ids), 8)).astype(np.float32)
    runs = [head_calibrate(head, features, ref, subjects, rows, META, steps=(3, 10))
            for _ in range(2)]
    for steps in (3, 10):
        np.testing.assert_array_equal(runs[0][steps], runs[1][steps])
    # subject s0 alone gets the same head fit as among all four subjects
    mine = np.asarray(subjects) == "s0"
    alone_rows = calibration_rows([i for i, m in zip(ids, mine, strict=True) if m],
                                  ["s0"] * int(mine.sum()), 5)
    alone = head_calibrate(head, features[mine], ref[mine], ["s0"] * int(mine.sum()),
                           alone_rows, META, steps=10)[10]
    np.testing.assert_allclose(alone, runs[0][10][mine[rows.test]], rtol=1e-6)


def test_affine_shrinkage_goes_from_least_squares_to_offset():
    rng = np.random.default_rng(5)
    est = rng.normal(100, 10, 6)
    ref = 1.8 * est - 50 + rng.normal(0, 0.1, 6)
    slope, intercept = affine_fit(est, ref, 0.0)
    np.testing.assert_allclose([slope, intercept], np.polyfit(est, ref, 1), rtol=1e-9)
    slope_inf, intercept_inf = affine_fit(est, ref, float("inf"))
    assert slope_inf == 1.0 and intercept_inf == pytest.approx((ref - est).mean())
    slopes = [affine_fit(est, ref, s)[0] for s in (1.0, 10.0, 100.0, 1e4)]
    assert all(a > b for a, b in itertools.pairwise(slopes)) and 1.0 < slopes[-1] < slope


def test_head_calibration_leaves_the_trained_head_unchanged():
    ids, subjects, ref, _ = _subjects_data(6)
    rows = calibration_rows(ids, subjects, 5)
    head = PaperHead(8)
    for p in head.parameters():
        p.requires_grad_(False)  # a frozen model's head: the copy still trains
    before = copy.deepcopy(head.state_dict())
    features = np.random.default_rng(7).normal(size=(len(ids), 8)).astype(np.float32)
    with torch.no_grad():
        untuned = head(torch.from_numpy(features[rows.test])).numpy() * [20, 10] + [120, 70]
    tuned = head_calibrate(head, features, ref, subjects, rows, META, steps=30)[30]
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    test_ref = ref[rows.test]
    assert np.abs(tuned - test_ref).mean() < np.abs(untuned - test_ref).mean()


@pytest.fixture(scope="module")
def calfree_model(challenge2015_shards, tmp_path_factory):
    """A short small / unfrozen `bpfm train` on the real sample's subject-disjoint split,
    calibrated by every method with K = 5 while its model dir is written."""
    out = tmp_path_factory.mktemp("calfree") / "run"
    args = ["train", "--data", challenge2015_shards, "--source", "other", "--protocol", "calfree",
            "--size", "small", "--freeze", "unfrozen", "--epochs", "1", "--batch-size", "32",
            "--max-steps-per-epoch", "6", "--device", "cpu", "--out", str(out),
            "--calibration", "offset,affine,head", "--calib-windows", "5"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    return out, printed.getvalue()


def test_offset_lowers_subject_disjoint_mae_below_none_on_challenge2015(calfree_model):
    model_dir, shown = calfree_model  # shown: what `bpfm train` printed for people
    assert "calibration:" in shown and "offset:" in shown and "cal_mase" in shown
    payload = json.loads((model_dir / "metrics.json").read_text())
    result = payload["calibration"]
    metrics = result["metrics"]
    assert set(metrics) == {"none", "trivial", "offset", "affine", "head"}
    assert result["k"] == 5 and result["n_subjects"] == 3
    # every method is scored on the same windows: the test view less 5 per subject
    assert result["n_test"] == payload["test"]["n"] - 5 * 3
    assert all(m["n"] == result["n_test"] for m in metrics.values())
    for target in ("sbp", "dbp"):
        assert metrics["offset"][f"{target}_mae"] < metrics["none"][f"{target}_mae"], metrics
        assert metrics["trivial"][f"{target}_cal_mase"] == pytest.approx(1.0)
        assert metrics["offset"][f"{target}_cal_mase"] == pytest.approx(
            metrics["offset"][f"{target}_mae"] / metrics["trivial"][f"{target}_mae"]
        )


def test_evaluate_cli_calibrates_a_model_dir_and_rejects_unknown_methods(calfree_model, capsys):
    calfree_model, _ = calfree_model
    args = ["evaluate", "--model", str(calfree_model), "--calibration", "offset",
            "--calib-windows", "3", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["calibration"]
    assert result["k"] == 3 and set(result["metrics"]) == {"none", "trivial", "offset"}
    trained = json.loads((calfree_model / "metrics.json").read_text())["calibration"]
    assert result["metrics"]["none"]["n"] == trained["n_test"] + 2 * 3
    assert main(["evaluate", "--model", str(calfree_model), "--calibration", "cuff"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unknown method 'cuff'" in err


def test_aami_protocol_calibrates_on_each_subjects_aami_cal_segments(synthetic_shards):
    from collections import Counter

    from bpfm.model import create_model
    from bpfm.training.calibration import cal_view, evaluate_calibration
    from bpfm.training.evaluate import open_split

    split = open_split(synthetic_shards, "mimic", "aami")
    cal = cal_view(split)
    assert cal is not None and cal.subsets == ("aami_cal",)
    test_ids = set(split.test.read(["segment_id"])["segment_id"].to_pylist())
    cal_counts = Counter(cal.read(["subject"])["subject"].to_pylist())
    torch.manual_seed(0)
    meta = {**META, "target_mean": [120.0, 70.0], "normalize_inputs": True}
    result = evaluate_calibration(create_model("small").eval(), meta, split, ["offset"], 2,
                                  keep_estimates=True)
    assert set(result["estimates"]["segment_id"].to_pylist()) == test_ids  # all AAMI_Test
    assert result["n_calib"] == sum(min(2, n) for n in cal_counts.values())
    assert result["n_test"] == len(test_ids) and result["metrics"]["offset"]["n"] == len(test_ids)


def test_calibrating_while_training_leaves_the_trained_model_unchanged(tiny_config, tmp_path):
    from safetensors.torch import load_file

    from bpfm.training.loop import fit

    plain = tiny_config(out=str(tmp_path / "plain"), protocol="calfree", epochs=2,
                        report_epochs=(1,))
    calibrated = tiny_config(out=str(tmp_path / "calibrated"), protocol="calfree", epochs=2,
                             report_epochs=(1,), calibration=("offset", "affine", "head"),
                             calib_windows=2)
    fit(plain)
    fit(calibrated)
    too_many = tiny_config(out=str(tmp_path / "too_many"), protocol="calfree", epochs=1,
                           calibration=("offset",), calib_windows=500)
    assert "no test subject" in json.loads(
        (fit(too_many).out / "metrics.json").read_text())["calibration_error"]
    a = load_file(str(tmp_path / "plain" / "model.safetensors"))
    b = load_file(str(tmp_path / "calibrated" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for model_dir in (tmp_path / "calibrated", tmp_path / "calibrated" / "epoch-1"):
        payload = json.loads((model_dir / "metrics.json").read_text())
        assert set(payload["calibration"]["metrics"]) == {"none", "trivial", "offset", "affine",
                                                          "head"}
        assert (model_dir / "calibrated_estimates.parquet").is_file()
