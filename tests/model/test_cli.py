"""`bpfm model info`: numbers as JSON; bad names give one-line errors and exit 2."""

from __future__ import annotations

import json

import pytest

from bpfm.cli import main


@pytest.mark.parametrize(
    ("size", "freeze", "total", "trainable", "mib"),
    [
        ("small", "frozen", 3_588_290, 12_866, 13.72),
        ("base", "unfrozen", 39_976_130, 39_976_130, 152.54),
        ("large", "frozen", 85_171_970, 51_458, 324.96),
    ],
)
def test_model_info_json(capsys, size, freeze, total, trainable, mib):
    assert main(["model", "info", "--size", size, "--freeze", freeze, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["total_params"], result["trainable_params"]) == (total, trainable)
    assert result["state_dict_mib"] == pytest.approx(mib, abs=0.02)  # paper: 13.73/152.55/324.96


def test_model_info_mlp_head(capsys):
    assert (
        main(["model", "info", "--size", "small", "--head", "mlp", "--head-hidden", "64", "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["total_params"] == 3_588_290 - (2 * 192 + 2) + (192 * 64 + 64) + (64 * 2 + 2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "huge"], "size: unknown model size 'huge'"),
        (["--size", "small", "--head", "cnn"], "head: unknown head 'cnn'"),
        (["--size", "small", "--freeze", "half"], "freeze: unknown policy 'half'"),
        (["--size", "small", "--head", "mlp", "--head-hidden", "a,b"], "--head-hidden:"),
    ],
)
def test_bad_names_exit_2_with_one_line(capsys, argv, message):
    assert main(["model", "info", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"bpfm: error: {message}")


def test_pretrain_bad_size_exits_2(capsys, tmp_path):
    assert main(["pretrain", "--out", str(tmp_path / "x.ckpt"), "--size", "xl"]) == 2
    assert "unknown model size 'xl'" in capsys.readouterr().err
