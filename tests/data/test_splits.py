"""Protocols as views: subject-disjointness where promised, determinism, fractions, and the
whole-dataset rule."""

from __future__ import annotations

import numpy as np
import pytest

from bpfm.data.shards import open_shards, write_shards
from bpfm.data.splits import PROTOCOLS, make_split, unit_hash
from bpfm.errors import BpfmError


def _ids(view) -> set[str]:
    return set(view.read(["segment_id"])["segment_id"].to_pylist())


def _subjects(view) -> set[str]:
    return set(view.read(["subject"])["subject"].to_pylist())


@pytest.fixture(scope="module")
def challenge_shards(challenge2015_file, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("challenge") / "s")
    write_shards([challenge2015_file], out)
    return out


def test_unit_hash_is_uniform_and_seeded():
    keys = [f"train/p{i:06d}/{i % 7}" for i in range(20000)]
    u = unit_hash(42, keys)
    assert ((u >= 0) & (u < 1)).all()
    assert abs((u < 0.8).mean() - 0.8) < 0.015 and abs((u >= 0.9).mean() - 0.1) < 0.015
    np.testing.assert_array_equal(u[::-1], unit_hash(42, keys[::-1]))  # order-free
    assert not np.array_equal(u, unit_hash(43, keys))


@pytest.mark.parametrize("source", ["mimic", "vitaldb"])
def test_pulsedb_protocols_per_source(synthetic_shards, source):
    shards = open_shards(synthetic_shards)
    train_subjects = _subjects(make_split(shards, source, "calbased").train) | _subjects(
        make_split(shards, source, "calbased").val
    )
    for protocol in PROTOCOLS:
        split = make_split(shards, source, protocol)
        parts = {split.train.source, split.val.source, split.test.source}
        assert parts == {source}
        train, val, test = (_ids(v) for v in (split.train, split.val, split.test))
        assert not (train & val) and not (train & test) and not (val & test)
        if protocol == "paper":
            assert "subjects leak" in split.label and split.train.subsets == ("train",)
            n = len(train | val | test)
            assert n == shards.rows(source, "train")
            assert abs(len(train) / n - 0.8) < 0.1
            continue
        s_train, s_val, s_test = (_subjects(v) for v in (split.train, split.val, split.test))
        assert not (s_train & s_val) and s_val
        assert len(s_val) == round(0.1 * len(train_subjects)) or len(s_val) == 1
        if protocol == "calbased":
            assert s_test <= train_subjects and "calibration-based" in split.label
            assert split.test.subsets == ("calbased_test",)
        else:
            assert not (s_test & (s_train | s_val)) and split.subject_disjoint
            assert split.test.subsets == (f"{protocol}_test",)


def test_splits_are_deterministic_and_depend_on_the_seed(synthetic_shards):
    a = make_split(synthetic_shards, "mimic", "paper", seed=42)
    b = make_split(synthetic_shards, "mimic", "paper", seed=42)
    c = make_split(synthetic_shards, "mimic", "paper", seed=7)
    assert _ids(a.test) == _ids(b.test) != _ids(c.test)
    d = make_split(synthetic_shards, "vitaldb", "calfree", seed=42)
    e = make_split(synthetic_shards, "vitaldb", "calfree", seed=42)
    assert d.val.subjects == e.val.subjects


def test_splits_do_not_depend_on_input_order(synthetic_subset_files, synthetic_shards, tmp_path):
    reordered = str(tmp_path / "r")
    write_shards(list(reversed(synthetic_subset_files)), reordered, workers=1)
    for protocol in ("paper", "calfree"):
        a = make_split(synthetic_shards, "mimic", protocol)
        b = make_split(reordered, "mimic", protocol)
        assert _ids(a.train) == _ids(b.train) and _ids(a.val) == _ids(b.val)


def test_a_non_pulsedb_file_is_a_whole_dataset(challenge_shards):
    paper = make_split(challenge_shards, "other", "paper")
    train, val, test = (_ids(v) for v in (paper.train, paper.val, paper.test))
    assert len(train | val | test) == len(train) + len(val) + len(test) == 689
    assert 0.72 < len(train) / 689 < 0.88 and val and test
    assert "whole dataset" in paper.label and "subjects leak" in paper.label
    for protocol in ("calbased", "calfree", "aami"):
        split = make_split(challenge_shards, "other", protocol)
        s = [_subjects(v) for v in (split.train, split.val, split.test)]
        assert [len(x) for x in s] == [20, 3, 3]
        assert not (s[0] & s[1]) and not (s[0] & s[2]) and not (s[1] & s[2])
        assert split.subject_disjoint and "subject-disjoint" in split.label


def test_an_absent_test_subset_falls_back_to_the_whole_train_subset(train_subset_file, tmp_path):
    out = str(tmp_path / "s")
    write_shards([train_subset_file], out)
    split = make_split(out, "vitaldb", "calfree")
    assert "calfree_test absent" in split.label and split.test.subsets == ("train",)
    s_train, s_test = _subjects(split.train), _subjects(split.test)
    assert s_test and not (s_train & s_test)


def test_unknown_protocol_or_source_is_a_user_error(synthetic_shards):
    with pytest.raises(BpfmError, match="protocol"):
        make_split(synthetic_shards, "mimic", "random")
    with pytest.raises(BpfmError, match="source 'other'"):
        make_split(synthetic_shards, "other", "paper")
