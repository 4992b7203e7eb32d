"""The demo profile's own cells learn. `make demo` trains 16 cells (about 5 minutes on 2 cores);
this test runs the same profile (its synthetic PulseDB, recipe, 10 epochs x 8 steps) reduced to
its unfrozen cells trained from scratch, the ones the demo promises learn: no backbone to pretrain
and no quantization. Then the summary as the demo prints it: the paper's Table II layout with
MASE and n, grades and AAMI not assessable on so few subjects, a one-line reading."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from bpfm import tracking
from bpfm.cli import main
from bpfm.profiles import load_profile
from bpfm.report import summary
from bpfm.report.runs import load_study
from bpfm.report.tables import table5
from tests.orchestration.conftest import local_ray

pytestmark = pytest.mark.slow


def test_the_demos_unfrozen_cells_beat_predicting_the_mean(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("BPFM_HOME", str(tmp_path / "home"))
    for name in ("BPFM_DATA", "BPFM_STORAGE", "BPFM_BACKBONES", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")  # restored after the CLI sets its own
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    demo = yaml.safe_load(load_profile("demo").path.read_text())
    demo["axes"].update(freeze=["unfrozen"], init=["xavier"], epochs=[10])
    demo["quantize"] = {}
    profile = tmp_path / "demo.yaml"  # still profile `demo` (its runs are tagged so)
    profile.write_text(yaml.safe_dump(demo))
    levels = {name: logging.getLogger(name).level for name in ("", "mlflow", "ray")}
    try:
        with local_ray({"MLFLOW_TRACKING_URI": uri}):
            code = main(["grid", "--profile", str(profile), "--json"])
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    printed = out.strip().splitlines()[:-1]
    assert result["errors"] == [] and len(result["cells"]) == 2  # mimic, vitaldb
    for cell in result["cells"]:
        assert cell["sbp_mase"] < 0.8 and cell["dbp_mase"] < 0.8, cell
    # the demo's output: a progress bar per stage, then the summary; the rest is behind -v
    assert "Configuration for experiment" not in out + err and "Trial status" not in out + err
    lines = err.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("stage 0")):]
    assert [line for line in lines if line.strip() and not line.startswith("stage ")] == []
    assert printed[-1].startswith("Reading: ")

    table = summary.format_table2(result["cells"])
    header = table.splitlines()[0].split()
    assert header[:5] == ["source", "method", "frozen", "epochs", "DBP"] and "MASE" in header
    rows = [summary.table2_row(c) for c in result["cells"]]
    assert all(r["n"] and r["subj"] < summary.BHS_MIN_SUBJECTS for r in rows)
    assert all(r["bhs"] == "n/a" and r["aami"] == "n/a" for r in rows)
    assert "fewer than 85 test subjects" in table
    reading = summary.reading(result["cells"], result["study"])
    assert reading.startswith("Reading: 2 of 2 cells clearly beat predicting the training mean")
    assert printed[-1] == reading
    assert "bpfm leaderboard --experiment bpfm-demo" in reading

    study = load_study(tracking.client(uri), ["bpfm-demo"])
    assert set(study.train["profile"]) == {"demo"}
    assert not table5(study.train)["reference"].str.startswith("this study").any()
