"""Profiles, cell expansion, epoch-prefix sharing and `bpfm grid --dry-run` (no Ray)."""

from __future__ import annotations

import json

import pytest

from bpfm.cli import main
from bpfm.errors import BpfmError
from bpfm.orchestration.grid import dry_run, expand_cells, plan_grid, plan_trials
from bpfm.profiles import load_profile, load_recipe


def test_paper_profile_dry_run_lists_48_cells_in_24_trials(capsys):
    assert main(["grid", "--profile", "paper", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["n_cells"] == 48
    assert plan["n_trials"] == 24  # 100 and 200 epochs of one configuration are one trial
    assert plan["epochs_trained"] == 24 * 200
    assert plan["epochs_without_sharing"] == 24 * 100 + 24 * 200
    cells = [cell for trial in plan["trials"] for cell in trial["cells"]]
    assert len(set(cells)) == 48
    assert {t["resources"]["gpu"] for t in plan["trials"]} == {0.25, 0.5, 1}


def test_dry_run_prints_every_cell_for_people(capsys):
    assert main(["grid", "--profile", "demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("    cell ") == 16
    assert "16 cells in 8 trials" in out


def test_cosine_recipe_turns_prefix_sharing_off(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("schedule: cosine\nwarmup_epochs: 1\nsize: large\n")
    train = {**load_profile("paper").train, **load_recipe(recipe)}
    assert "size" not in load_recipe(recipe)  # axes stay the grid's
    plan = plan_grid(load_profile("paper"), train)
    assert len(plan.trials) == 48
    assert plan.epochs_trained == plan.epochs_without_sharing


def test_trials_group_cells_that_differ_only_in_epochs():
    axes = {"size": ("small",), "freeze": ("frozen", "unfrozen"), "epochs": (10, 20, 5),
            "init": ("xavier",), "source": ("mimic",), "protocol": ("paper",), "seed": (1, 2)}
    cells = expand_cells(axes)
    trials = plan_trials(cells, share_prefix=True)
    assert len(cells) == 12 and len(trials) == 4
    assert all(t.report_epochs == (5, 10, 20) and t.epochs == 20 for t in trials)
    assert sorted(c.id for t in trials for c in t.cells()) == sorted(c.id for c in cells)


def test_profile_strings_expand_home_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BPFM_HOME", str(tmp_path))
    monkeypatch.setenv("BPFM_STORAGE", "s3://bucket/results")
    monkeypatch.delenv("BPFM_DATA", raising=False)
    profile = load_profile("demo")
    assert profile.data.uri == str(tmp_path / "demo" / "shards")
    assert profile.storage == "s3://bucket/results"
    expected = tmp_path / "backbones" / "cerebro-small.ckpt"
    assert profile.pretrain.checkpoint_for("small") == str(expected)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("size: [small]", "size: [tiny]"), "axes.size: unknown value 'tiny'"),
        (("epochs: [5, 10]", "epochs: [0]"), "axes.epochs: must be >= 1"),
        (("storage:", "storag:"), "storag: unknown key"),
    ],
)
def test_profile_mistakes_are_one_line_naming_the_key(tmp_path, edit, message):
    text = load_profile("demo").path.read_text().replace(*edit)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(BpfmError, match=message) as err:
        load_profile(str(bad))
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_cli_reports_unknown_profile_without_traceback(capsys):
    assert main(["grid", "--profile", "nope", "--dry-run"]) == 2
    assert "bpfm: error:" in capsys.readouterr().err


def test_dry_run_drops_gpus_on_a_cluster_without_them():
    plan = dry_run(load_profile("paper"), load_profile("paper").train, cluster_gpus=0)
    assert all("gpu" not in t["resources"] for t in plan["trials"])
