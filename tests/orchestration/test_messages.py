"""What bpfm tells a user before and after a launch: the dry run's stage 0 / stage 2 / --gpus
notes, the profile list in --help, the search summary, Ray's restore hint, the docs pointer."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from bpfm.cli import main
from bpfm.cli.search import search_summary

REPO = Path(__file__).resolve().parents[2]


def test_paper_dry_run_says_what_stage_0_2_and_gpus_auto_would_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BPFM_HOME", str(tmp_path))
    monkeypatch.setenv("BPFM_BACKBONES", str(tmp_path / "backbones"))  # none there yet
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["grid", "--profile", "paper", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"stage 0: would pretrain 3 backbones \(large, medium, small\) for 20,000 "
                     r"SimMIM steps each", out)
    assert ("stage 2: 48 Ray tasks (one per trained model, 14 variants each), 1 CPU and no GPU"
            in out)
    assert re.search(r"--gpus auto: this machine has (no GPU|\d+ GPUs?) now", out)
    assert main(["grid", "--profile", "paper", "--dry-run", "--gpus", "never"]) == 0
    assert "--gpus never: every trial on CPUs" in capsys.readouterr().out


def test_profile_help_lists_every_shipped_profile(capsys):
    try:
        main(["grid", "--help"])
    except SystemExit:
        pass
    help_text = " ".join(capsys.readouterr().out.split())
    assert "profile name (demo, nightly, paper, tiny) or a YAML file" in help_text


def test_search_summary_says_what_ran_and_what_the_study_holds():
    line = search_summary({"study": "s", "trials": 3, "complete": 2, "pruned": 1, "ran": 4,
                           "best_trial": 1, "best_val_mae": 7.25})
    assert line == ("study s: this launch ran 4 trials; the study holds 3 (2 trained to the end, "
                    "1 stopped early by ASHA); best: trial #1, validation MAE 7.250 mmHg")


def test_tunes_restore_hint_becomes_rerun_the_command(caplog):
    from bpfm.orchestration import ray_logs as ray_hints

    ray_hints.install()
    ray_hints.install()  # once, however often a process joins Ray
    logger = logging.getLogger(ray_hints.TUNE_LOGGER)
    with caplog.at_level(logging.WARNING, logger=ray_hints.TUNE_LOGGER):
        logger.warning("Experiment has been interrupted, but the most recent state was saved.\n"
                       'Resume experiment with: Tuner.restore(path="/x", trainable=...)')
    message = caplog.records[-1].getMessage()
    assert "Tuner.restore(" not in message
    assert message.count("run the same bpfm command again") == 1


def test_the_readme_points_to_docs_that_exist():
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(((?:docs/)[^)#]+)\)", readme):
        assert (REPO / target).is_file(), target
    assert "(docs/DESIGN.md)" in readme
    for target in re.findall(r"\]\(([^)#:]+)\)", (REPO / "docs" / "README.md").read_text()):
        assert (REPO / "docs" / target).resolve().is_file(), target
