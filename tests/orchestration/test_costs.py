"""The dry run's cost plan (`bpfm.orchestration.costs`): throughput table, samples from the
manifest, data read with and without the node cache, and the GPU packing it plans."""

from __future__ import annotations

import json

import pytest

from bpfm.cli import main
from bpfm.data.shards import open_shards
from bpfm.orchestration import costs


def test_throughput_table_is_seeded_by_the_measured_h100_large():
    assert costs.samples_per_s("large", "H100") == pytest.approx(17_100)
    assert costs.samples_per_s("small", "H100") > costs.samples_per_s("medium", "H100") > 17_100
    assert costs.samples_per_s("large", "A100") == pytest.approx(17_100 * 312 / 989)


def _overlaps(schedule: list[dict], at: float) -> list[dict]:
    return [p for p in schedule if p["start_h"] <= at < p["end_h"]]


def test_packing_never_overcommits_a_gpu_and_large_never_shares():
    trials = [{"trial": f"s{i}", "size": "small", "gpu": 0.25, "wall_hours": 1.0 + i / 10}
              for i in range(10)]
    trials += [{"trial": f"l{i}", "size": "large", "gpu": 1.0, "wall_hours": 2.0} for i in range(3)]
    schedule = costs.pack(trials, gpus=2)
    assert sorted(p["trial"] for p in schedule) == sorted(t["trial"] for t in trials)
    share = {t["trial"]: t["gpu"] for t in trials}
    for moment in sorted({p["start_h"] for p in schedule}):
        for gpu in (0, 1):
            here = [p for p in _overlaps(schedule, moment) if p["gpu_index"] == gpu]
            assert sum(share[p["trial"]] for p in here) <= 1.0 + 1e-9
            assert len(here) <= 4
            if any(p["trial"].startswith("l") for p in here):
                assert len(here) == 1


def test_paper_dry_run_json_has_a_cost_plan_from_the_manifest(synthetic_shards, capsys):
    args = ["grid", "--profile", "paper", "--data", synthetic_shards, "--dry-run", "--json",
            "--plan-gpus", "4", "--gpus-per-node", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    cost = json.loads(out.strip().splitlines()[-1])["cost"]
    assert "packing: large 1 per GPU, medium 2 per GPU, small 4 per GPU" in out
    assert cost["samples_from_manifest"] is True and cost["nodes"] == 2
    shards = open_shards(synthetic_shards)
    mimic = next(
        t for t in cost["trials"] if t["trial"].startswith("large") and "mimic" in t["trial"]
    )
    assert mimic["samples_per_epoch"] == int(shards.rows("mimic", "train") * 0.8)
    assert mimic["epochs"] == 200 and mimic["gpu"] == 1
    expected_h = 200 * (mimic["samples_per_epoch"] + mimic["samples_per_epoch"] / 8 / 3) / 17_100
    assert mimic["gpu_hours"] * 3600 == pytest.approx(expected_h, rel=0.05)
    total = cost["total"]
    assert total["epochs"] == 24 * 200
    assert total["read_per_node_cached_bytes"] == shards.manifest["bytes"] - sum(
        p["bytes"] for p in shards.parts("other")
    )
    assert total["read_per_node_streamed_bytes"] > 100 * total["read_per_node_cached_bytes"]
    assert len(cost["packing"]["schedule"]) == 24
    assert max(int(g) for g in cost["packing"]["trials_per_gpu"]) == 3


def test_dry_run_without_a_readable_manifest_uses_published_counts(tmp_path, capsys):
    args = ["grid", "--profile", "paper", "--data", str(tmp_path / "none"), "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "PulseDB's published counts: no manifest at" in out
    assert "GPU-hours" in out and "with the node cache" in out


def test_unknown_gpu_kind_is_one_line(capsys):
    assert main(["grid", "--profile", "paper", "--dry-run", "--gpu-kind", "TPU"]) == 2
    assert "--gpu-kind" in capsys.readouterr().err
