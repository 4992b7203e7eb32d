"""`bpfm train` / `bpfm evaluate`: results on stdout (`--json` last line), bad input as one line
on stderr with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bpfm.cli import main


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("bpfm: error:")]


def _train_args(data: str, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        data,
        "--source",
        "mimic",
        "--protocol",
        "paper",
        "--size",
        "small",
        "--freeze",
        "unfrozen",
        "--init",
        "xavier",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-steps-per-epoch",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def test_train_and_evaluate_json(synthetic_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(synthetic_shards, out, "--json")) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["out"] == str(out) and result["epochs"] == 1
    assert {"sbp_mae", "dbp_mase", "aami", "sbp_bhs_grade"} <= set(result["test"])

    assert main(["evaluate", "--model", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["sbp_mae"] == pytest.approx(result["test"]["sbp_mae"], rel=1e-5)
    assert metrics["protocol"] == "paper" and metrics["n"] == result["test"]["n"]

    assert main(["evaluate", "--model", str(out), "--protocol", "calfree"]) == 0
    assert "calfree" in capsys.readouterr().out


def test_train_compile_flag(synthetic_shards, tmp_path, aot_eager_compile):
    """`--compile` reaches the training steps."""
    out = tmp_path / "run"
    assert main(_train_args(synthetic_shards, out, "--compile")) == 0
    assert aot_eager_compile["stats"]["unique_graphs"] >= 1
    assert json.loads((out / "config.json").read_text())["compile"] is True


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["--size", "huge"], "size: unknown 'huge'"),
        (["--head", "conv"], "head: unknown 'conv'"),
        (["--init", "random"], "init: unknown 'random'"),
        (["--protocol", "loso"], "protocol: unknown 'loso'"),
        (["--source", "eicu"], "source: unknown 'eicu'"),
        (["--freeze", "half"], "freeze: unknown 'half'"),
        (["--init", "pretrained"], "needs --checkpoint"),
        (["--schedule", "cosine", "--epochs", "2", "--report-epochs", "1"], "total epochs"),
    ],
)
def test_train_bad_names_are_one_line(synthetic_shards, tmp_path, capsys, extra, problem):
    assert main(_train_args(synthetic_shards, tmp_path / "run", *extra)) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and problem in lines[0], lines


def test_train_missing_data_is_one_line(tmp_path, capsys):
    assert main(_train_args(str(tmp_path / "nowhere"), tmp_path / "run")) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "nowhere" in lines[0], lines
    assert main(["train", "--size", "small"]) == 2
    assert "data" in _error_lines(capsys)[0]


def test_checkpoint_of_another_size_or_corrupt_is_one_line(synthetic_shards, tmp_path, capsys):
    from bpfm.model import create_model, save_model

    small = tmp_path / "small.safetensors"
    save_model(small, create_model("small"))
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 not really a checkpoint" * 10)
    for size, checkpoint, problem in (("medium", small, "shape"), ("small", corrupt, "corrupt")):
        args = _train_args(
            synthetic_shards,
            tmp_path / "run",
            "--init",
            "pretrained",
            "--checkpoint",
            str(checkpoint),
            "--size",
            size,
        )
        assert main(args) == 2
        lines = _error_lines(capsys)
        assert len(lines) == 1 and problem in lines[0] and str(checkpoint) in lines[0], lines


def test_evaluate_bad_inputs_are_one_line(synthetic_shards, tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path / "missing")]) == 2
    assert "missing" in _error_lines(capsys)[0]
    assert main(["evaluate", "--data", synthetic_shards]) == 2
    assert "--model" in _error_lines(capsys)[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert main(["evaluate", "--model", str(broken), "--data", synthetic_shards]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "model.safetensors" in lines[0], lines
