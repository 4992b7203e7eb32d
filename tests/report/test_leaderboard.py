"""The leaderboard from an MLflow store with planted runs: rows, grades, verdicts, outputs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from bpfm.cli import main
from bpfm.io.redact import redact
from bpfm.report.leaderboard import LeaderboardConfig, build_leaderboard


@pytest.fixture(scope="module")
def report(planted_store, tmp_path_factory) -> tuple[dict, Path]:
    uri, _ = planted_store
    out = tmp_path_factory.mktemp("leaderboard")
    result = build_leaderboard(LeaderboardConfig(["planted"], out, tracking_uri=uri))
    return result, out


def _row(table: pd.DataFrame, **where) -> pd.Series:
    match = table
    for column, value in where.items():
        match = match[match[column] == value]
    assert len(match) == 1, f"{where}: {len(match)} rows"
    return match.iloc[0]


def test_table2_has_one_row_per_cell_with_planted_grades_and_verdicts(report):
    _, out = report
    table = pd.read_csv(out / "table2.csv")
    assert len(table) == 5
    ft = _row(table, source="mimic", method="FT", frozen="no")
    assert (ft["bhs"], ft["aami"]) == ("A/A", "pass")
    frozen = _row(table, source="mimic", method="FT", frozen="yes")
    assert (frozen["bhs"], frozen["aami"]) == ("A/D", "pass/fail")  # DBP passes, SBP fails
    assert frozen["sbp_mae"] == pytest.approx(12.0)
    tfs = _row(table, source="mimic", method="TFS")  # logged without tags: recomputed
    assert (tfs["bhs"], tfs["aami"]) == ("B/B", "fail")
    vital = _row(table, source="vitaldb", protocol="calfree")
    assert vital["aami"] == "n/a (<85 subj.)"


def test_table5_puts_literature_with_citations_next_to_best_per_source_and_protocol(report):
    _, out = report
    table = pd.read_csv(out / "table5.csv")
    literature = table[~table["reference"].str.startswith("this study")]
    assert len(literature) == 10 and literature["reference"].str.len().min() > 10
    ours = table[table["reference"].str.startswith("this study")]
    assert sorted(zip(ours["source"], ours["protocol"].str.split(":").str[0], strict=True)) == [
        ("MIMIC-III", "paper"), ("VitalDB", "calbased"), ("VitalDB", "calfree"),
    ]
    best_mimic = _row(ours, source="MIMIC-III")
    assert best_mimic["sbp_mae"] == pytest.approx(2.0) and "subjects leak" in best_mimic["protocol"]


def test_quantization_tables_compare_with_fp32(report):
    _, out = report
    table3 = pd.read_csv(out / "table3.csv")
    assert set(table3["variant"]) == {
        "dynamic (per_channel, fx)", "static/histogram (per_channel, fx)",
    }
    dynamic = _row(table3, variant="dynamic (per_channel, fx)")
    assert dynamic["delta_sbp_r2"] == pytest.approx(-0.001)
    table4 = pd.read_csv(out / "table4.csv")
    assert _row(table4, variant="dynamic (per_channel, fx)")["reduction_factor"] == pytest.approx(
        13.73 / 3.85
    )
    assert _row(table4, variant="fp32")["reduction_factor"] == pytest.approx(1.0)


def test_calibration_gap_pairs_calbased_with_calfree(report):
    _, out = report
    gap = pd.read_csv(out / "calibration_gap.csv")
    assert len(gap) == 1
    assert gap.loc[0, "sbp_mae_gap"] == pytest.approx(3.0)
    assert gap.loc[0, "dbp_mae_gap"] == pytest.approx(2.0)


def test_subgroups_use_planted_demographics_or_say_unknown(report):
    _, out = report
    groups = pd.read_csv(out / "subgroups.csv", keep_default_na=False)
    mimic = groups[groups["source"] == "mimic"]
    assert set(mimic[mimic["group"] == "age band"]["subgroup"]) == {"<40", "60-79"}
    assert set(mimic[mimic["group"] == "gender"]["subgroup"]) == {"F", "M"}
    assert set(mimic[mimic["group"] == "BP range"]["subgroup"]) == {
        "SBP <90", "SBP 90-139", "SBP >=140",
    }
    vital = groups[(groups["protocol"] == "calfree") & (groups["group"] == "gender")]
    assert list(vital["subgroup"]) == ["unknown"]  # its data URI does not exist
    everyone = _row(mimic, group="all")
    assert everyone["sbp_mae_ci_low"] <= everyone["sbp_mae"] <= everyone["sbp_mae_ci_high"]


def test_outputs_are_self_contained_and_logged_as_a_leaderboard_run(report, planted_store):
    result, out = report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 9  # 3 plots x 3 best models
    assert "src=\"plots/" not in html
    markdown = (out / "report.md").read_text()
    assert "Table V" in markdown and "](plots/" in markdown
    client = MlflowClient(planted_store[0])
    run = client.get_run(result["leaderboard_run_id"])
    assert run.data.tags["bpfm.kind"] == "leaderboard"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "report.md", "table2.csv"} <= names


def test_experiment_without_finished_runs_is_a_one_line_error(planted_store, tmp_path, capsys):
    uri, _ = planted_store
    for name in ("empty", "missing"):
        code = main(["leaderboard", "--experiment", name, "--out", str(tmp_path),
                     "--tracking-uri", uri])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and err[0].startswith("bpfm: error:") and name in err[0]


def test_redact_hides_a_database_password():
    assert redact("postgresql://bp:s3cret@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
