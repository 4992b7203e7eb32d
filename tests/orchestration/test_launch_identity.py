"""A launch's identity (bpfm.orchestration.launch) holds what decides its results: turning the node
cache off or the grid pinning the generation it reads starts no new experiment; a recipe change
does."""

from __future__ import annotations

from bpfm.orchestration import launch


def test_cache_and_the_pinned_generation_are_not_part_of_a_launch():
    base = launch.identity({"lr": 1.0e-3}, "key-a", "sqlite:///m.db")
    same = launch.identity({"lr": 1.0e-3, "cache": False, "data_generation": "gen-key-a"},
                           "key-a", "sqlite:///m.db")
    assert same == base and not launch.differences(base, same)
    changed = launch.identity({"lr": 1.0e-4, "cache": True}, "key-a", "sqlite:///m.db")
    assert launch.differences(base, changed)
