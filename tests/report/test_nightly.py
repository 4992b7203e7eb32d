"""The nightly run end to end on local Ray (synthetic data plus the real challenge2015 sample), its
comparison with a baseline, and the leaderboard compiled from the MLflow store the grid filled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from bpfm.cli import main
from bpfm.orchestration.nightly import NightlyConfig, run_nightly
from bpfm.regression import baseline_document
from bpfm.report.leaderboard import LeaderboardConfig, build_leaderboard
from tests.report.conftest import write_profile

pytestmark = pytest.mark.slow
STUDY = "report-nightly-test"
NOISY_TIMINGS = {"latency_ms_*": {"direction": "ignore"}, "speedup_*": {"direction": "ignore"}}


@pytest.fixture(scope="module")
def nightly(tmp_path_factory, mlflow_db_template, challenge2015_file, local_ray) -> dict:
    """One nightly launch of a two-cell profile (mimic from synthetic data, `other` from the
    challenge2015 sample) that writes the baseline."""
    root = tmp_path_factory.mktemp("nightly")
    shutil.copyfile(mlflow_db_template, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    data = {"uri": str(root / "unused"), "inputs": [str(challenge2015_file)],
            "synthesize": {"subjects": 10, "segments_per_subject": 8, "seed": 7}}
    profile = write_profile(
        root / "nightly.yaml", data=data, storage=root / "unused-ray", study=STUDY,
        axes={"size": ["small"], "freeze": ["unfrozen"], "epochs": [2], "init": ["xavier"],
              "source": ["mimic", "other"], "protocol": ["paper"], "seed": [42]},
        tune={"max_failures": 0, "max_concurrent_trials": 2},
        quantize={"dynamic_per_channel": {"mode": "dynamic", "weights": "per_channel"}},
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("BPFM_HOME", str(root / "home"))
        env.setenv("RAY_AUTH_MODE", "disabled")
        baseline = root / "baseline.json"
        # Latency from one timed run on a shared 2-core machine is noise: the baseline says so,
        # as a team running the nightly on shared CI runners would.
        baseline.write_text(json.dumps(baseline_document(
            {}, profile="test", created="", previous={"tolerances": NOISY_TIMINGS})))
        result = run_nightly(NightlyConfig(profile=str(profile), baseline=baseline,
                                           update_baseline=True, out=root / "first"))
        yield {"uri": uri, "root": root, "profile": profile, "baseline": baseline,
               "result": result}


def _nightly_cli(nightly: dict, baseline: Path, out: Path) -> int:
    return main(["nightly", "--profile", str(nightly["profile"]), "--baseline", str(baseline),
                 "--grid-run", nightly["result"]["grid_run_id"], "--out", str(out)])


def test_first_run_writes_a_baseline_of_every_cell_and_variant(nightly):
    assert nightly["result"]["status"] == "baseline-updated"
    entries = json.loads(nightly["baseline"].read_text())["entries"]
    assert sorted(entries) == [
        "quant/small-unfrozen-e2-xavier-mimic-paper-s42/dynamic_per_channel",
        "quant/small-unfrozen-e2-xavier-other-paper-s42/dynamic_per_channel",
        "train/small-unfrozen-e2-xavier-mimic-paper-s42",
        "train/small-unfrozen-e2-xavier-other-paper-s42",
    ]
    assert json.loads(nightly["baseline"].read_text())["tolerances"] == NOISY_TIMINGS  # kept
    cell = entries["train/small-unfrozen-e2-xavier-other-paper-s42"]
    assert cell["sbp_bhs_grade"] in "ABCD" and cell["sbp_mae"] > 0 and "val_mae" in cell
    assert entries["quant/small-unfrozen-e2-xavier-mimic-paper-s42/dynamic_per_channel"]["size_mib"]
    work = nightly["root"] / "first" / "work"  # without --keep-work: only the shards stay
    assert sorted(p.name for p in work.iterdir()) == ["shards"]


def test_an_unchanged_run_passes(nightly, tmp_path):
    code = _nightly_cli(nightly, nightly["baseline"], tmp_path)
    assert code == 0
    assert "**PASS**" in (tmp_path / "regression.md").read_text()
    report = json.loads((tmp_path / "regression.json").read_text())
    assert report["passed"] is True
    assert report["counts"]["ok"] > 100  # every metric of every cell and variant was compared
    markdown = (tmp_path / "regression.md").read_text()
    assert "| metric | baseline | now | tolerance | verdict |" in markdown
    assert "### train/small-unfrozen-e2-xavier-mimic-paper-s42" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| sbp_mae |"))
    _, _, baseline, now, tolerance, verdict, _ = (c.strip() for c in row.split("|"))
    assert baseline == now and tolerance.startswith("+") and verdict == "ok"


def test_a_planted_regression_fails_with_a_report(nightly, tmp_path):
    document = json.loads(nightly["baseline"].read_text())
    cell = document["entries"]["train/small-unfrozen-e2-xavier-mimic-paper-s42"]
    cell["sbp_mae"] -= 5.0  # the baseline was 5 mmHg better: today's run regressed
    planted = tmp_path / "baseline.json"
    planted.write_text(json.dumps(document))
    code = _nightly_cli(nightly, planted, tmp_path / "out")
    assert code == 1
    report = json.loads((tmp_path / "out" / "regression.json").read_text())
    regressed = [(f["entry"], f["metric"]) for f in report["findings"] if f["status"] != "ok"]
    assert regressed == [("train/small-unfrozen-e2-xavier-mimic-paper-s42", "sbp_mae")]
    client = MlflowClient(nightly["uri"])
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id], "tags.`bpfm.nightly.status` = 'fail'")
    assert runs and runs[0].data.tags["bpfm.kind"] == "nightly"
    names = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"regression.md", "regression.json"} <= names


def test_leaderboard_from_the_grid_store(nightly, tmp_path):
    result = build_leaderboard(LeaderboardConfig([STUDY], tmp_path, tracking_uri=nightly["uri"]))
    table2 = pd.read_csv(tmp_path / "table2.csv")
    assert sorted(table2["source"]) == ["mimic", "other"]
    client = MlflowClient(nightly["uri"])
    for best in result["best"]:
        run = client.get_run(best["run_id"])
        row = table2[table2["source"] == best["source"]].iloc[0]
        tags = run.data.tags
        assert row["bhs"] == f"{tags['dbp_bhs_grade']}/{tags['sbp_bhs_grade']}"
        assert row["sbp_mae"] == pytest.approx(run.data.metrics["sbp_mae"])
    assert len(pd.read_csv(tmp_path / "table3.csv")) == 2
    table4 = pd.read_csv(tmp_path / "table4.csv").set_index("variant")
    assert table4.loc["fp32", "size_mib"] == pytest.approx(13.7, abs=0.3)  # from the artifact
    dynamic = [v for v in table4.index if v.startswith("dynamic (per_channel")]
    assert len(dynamic) == 1 and table4.loc[dynamic[0], "reduction_factor"] > 2
    groups = pd.read_csv(tmp_path / "subgroups.csv", keep_default_na=False)
    mimic_ages = set(groups[(groups["source"] == "mimic") & (groups["group"] == "age band")]
                     ["subgroup"])
    assert mimic_ages and "unknown" not in mimic_ages  # joined from the synthetic shards
    other_ages = set(groups[(groups["source"] == "other") & (groups["group"] == "age band")]
                     ["subgroup"])
    assert other_ages == {"unknown"}  # challenge2015 records carry no age


def test_an_unknown_grid_run_or_missing_baseline_is_a_one_line_error(nightly, tmp_path, capsys):
    assert _nightly_cli({**nightly, "result": {"grid_run_id": "nosuchrun"}}, nightly["baseline"],
                        tmp_path) == 2
    assert _nightly_cli(nightly, tmp_path / "none.json", tmp_path) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "nosuchrun" in errors[0] and "--update-baseline" in errors[1]
