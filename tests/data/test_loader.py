"""The streaming loader: values, batch shapes, sharding across workers and ranks, shuffling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bpfm.data import loader
from bpfm.data.loader import ShardDataset, view_size, view_subjects, view_target_stats
from bpfm.data.shards import open_shards
from bpfm.data.splits import View, make_split
from tests.data.conftest import read_mat


def _all(dataset) -> tuple[list[str], list[dict]]:
    batches = list(dataset)
    return [i for b in batches for i in b["segment_id"]], batches


@pytest.fixture(scope="module")
def train_view(synthetic_shards) -> View:
    shards = open_shards(synthetic_shards)
    return View(shards, "mimic", ("train",), "all")


def test_loader_round_trip_equals_the_mat_file(train_view, train_subset_file):
    expected = read_mat(train_subset_file)
    dataset = ShardDataset(train_view, batch_size=16, shuffle=False, with_meta=True)
    ids, batches = _all(dataset)
    assert len(ids) == len(set(ids)) == view_size(train_view)
    assert set(ids) == {k for k, row in expected.items() if row["source"] == "mimic"}
    for batch in batches:
        assert batch["x"].dtype == torch.float32 and batch["x"].shape[1:] == (2, 1250)
        assert batch["y"].dtype == torch.float32 and batch["y"].shape[1:] == (2,)
        for i, segment_id in enumerate(batch["segment_id"]):
            want = expected[segment_id]
            assert batch["subject"][i] == want["subject"]
            np.testing.assert_array_equal(batch["x"][i, 0].numpy(), want["ecg"].astype("f4"))
            np.testing.assert_array_equal(batch["x"][i, 1].numpy(), want["ppg"].astype("f4"))
            assert batch["y"][i].tolist() == [np.float32(want["sbp"]), np.float32(want["dbp"])]
    assert [len(b["y"]) for b in batches[:-1]] == [16] * (len(batches) - 1)


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert [b["segment_id"] for b in got] == [b["segment_id"] for b in want]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


@pytest.mark.parametrize("signals", ["list", "bytes"])
def test_schema_v1_shards_load_the_same_batches(train_subset_file, train_view, tmp_path, signals):
    from bpfm.data.shards import write_shards

    manifest = write_shards([train_subset_file], str(tmp_path / "v1"), signals=signals)
    assert manifest["schema_version"] == 1
    view = View(open_shards(str(tmp_path / "v1")), "mimic", ("train",), "all")
    for shuffle in (False, True):
        _assert_same_batches(
            _all(ShardDataset(view, batch_size=50, shuffle=shuffle, with_meta=True))[1],
            _all(ShardDataset(train_view, batch_size=50, shuffle=shuffle, with_meta=True))[1],
        )


def test_drop_last_and_normalize(train_view):
    dataset = ShardDataset(train_view, batch_size=10, shuffle=True, normalize=True, drop_last=True)
    batches = list(dataset)
    assert len(batches) == view_size(train_view) // 10
    x = torch.cat([b["x"] for b in batches])
    assert x.mean(dim=-1).abs().max() < 1e-4
    assert (x.std(dim=-1, unbiased=False) - 1).abs().max() < 1e-3


def test_shuffle_is_deterministic_per_seed_and_epoch(train_view):
    def order(seed, epoch):
        dataset = ShardDataset(
            train_view, batch_size=8, shuffle=True, seed=seed, shuffle_buffer=32, with_meta=True
        )
        dataset.set_epoch(epoch)
        return _all(dataset)[0]

    plain = _all(ShardDataset(train_view, batch_size=8, shuffle=False, with_meta=True))[0]
    first = order(1, 0)
    assert first == order(1, 0)
    assert first != order(1, 1) and first != order(2, 0) and first != plain
    assert sorted(first) == sorted(plain)


@pytest.mark.parametrize("world", [1, 3])
def test_every_row_exactly_once_across_ranks_and_workers(train_view, monkeypatch, world):
    """Real DataLoader workers; ranks simulated (torch.distributed reports rank r of `world`)."""
    seen = []
    for rank in range(world):
        monkeypatch.setattr(loader, "_distributed", lambda rank=rank: (rank, world))
        dataset = ShardDataset(train_view, batch_size=7, shuffle=True, seed=3, with_meta=True)
        dataset.set_epoch(2)
        batches = DataLoader(dataset, batch_size=None, num_workers=2)
        seen += [i for b in batches for i in b["segment_id"]]
    assert len(seen) == len(set(seen)) == view_size(train_view)


def test_a_split_view_yields_exactly_its_rows(synthetic_shards):
    split = make_split(synthetic_shards, "vitaldb", "calfree")
    for view in (split.train, split.val, split.test):
        ids, batches = _all(ShardDataset(view, batch_size=32, shuffle=False, with_meta=True))
        assert set(ids) == set(view.read(["segment_id"])["segment_id"].to_pylist())
        assert len(ids) == view_size(view)
        assert len({s for b in batches for s in b["subject"]}) == view_subjects(view)


def test_view_target_stats_match_the_rows(synthetic_shards):
    view = make_split(synthetic_shards, "mimic", "paper").train
    y = torch.cat([b["y"] for b in ShardDataset(view, batch_size=64, shuffle=False)]).double()
    mean, std = view_target_stats(view)
    np.testing.assert_allclose(mean, y.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(std, y.std(0, unbiased=False).numpy(), rtol=1e-5)
