"""`bpfm data synth | subsets | shard | inspect` end to end, with the --json contract."""

from __future__ import annotations

import json

from bpfm.cli import main


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_synth_subsets_shard_inspect(capsys, tmp_path):
    release = tmp_path / "pulsedb"
    assert (
        main(
            [
                "data",
                "synth",
                "--out",
                str(release),
                "--subjects",
                "3",
                "--segments-per-subject",
                "4",
                "--seed",
                "5",
                "--json",
            ]
        )
        == 0
    )
    synth = _json(capsys)
    assert len(synth["subset_files"]) == 5

    rebuilt = tmp_path / "again" / "Train_Subset.mat"
    assert (
        main(
            [
                "data",
                "subsets",
                "--segments",
                str(release / "Segment_Files"),
                "--info",
                str(release / "Info_Files" / "Train_Info.mat"),
                "--out",
                str(rebuilt),
                "--json",
            ]
        )
        == 0
    )
    assert _json(capsys)["out"] == str(rebuilt)

    out = tmp_path / "shards"
    assert main(["data", "shard", str(release), "--out", str(out), "--json"]) == 0
    shard = _json(capsys)
    assert shard["up_to_date"] is False and shard["rows"] == sum(synth["segments"].values())
    assert main(["data", "shard", str(release), "--out", str(out), "--json"]) == 0
    assert _json(capsys)["up_to_date"] is True

    assert main(["data", "inspect", str(out), "--json"]) == 0
    info = _json(capsys)
    assert info["rows"] == shard["rows"] and info["schema_version"] == 2
    train = {k: v for k, v in info["partitions"].items() if k.endswith("/train")}
    assert sum(p["rows"] for p in train.values()) == synth["segments"]["Train"]

    again = tmp_path / "again-shards"
    assert main(["data", "shard", str(rebuilt), "--out", str(again), "--json"]) == 0
    assert _json(capsys)["partitions"] == {k: v["rows"] for k, v in train.items()}

    v1 = tmp_path / "v1-shards"
    assert main(["data", "shard", str(rebuilt), "--out", str(v1), "--signals", "list"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(v1), "--json"]) == 0
    assert _json(capsys)["schema_version"] == 1

    assert main(["data", "inspect", str(out)]) == 0
    human = capsys.readouterr().out
    assert "partitions:" in human and "subjects, SBP" in human
