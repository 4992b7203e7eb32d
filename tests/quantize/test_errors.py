"""Mistakes a user can make give one-line errors (exit 2 through the CLI), and the per-channel
input quantizer rounds each channel on its own scale."""

from __future__ import annotations

import pytest
import torch

from bpfm.cli import main
from bpfm.errors import BpfmError
from bpfm.quant.convert import load_quantized, quantize
from bpfm.quant.quantized import InputQuantizer, QuantConfig


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"observer": "kmeans"}, "observer: unknown 'kmeans'"),
        ({"backend": "tensorrt"}, "backend: unknown 'tensorrt'"),
        ({"mode": "int4"}, "mode: unknown 'int4'"),
        ({"weights": "per_row"}, "weights: unknown 'per_row'"),
        ({"calib_batches": 0}, "calib_batches: must be >= 1"),
    ],
)
def test_bad_config_names_the_field(fields, message):
    with pytest.raises(BpfmError, match=message) as err:
        QuantConfig(**fields).validate()
    assert "\n" not in str(err.value)


def test_unknown_config_field_is_one_line():
    with pytest.raises(BpfmError, match="bits: unknown field"):
        QuantConfig.from_dict({"mode": "dynamic", "bits": 4})


def test_static_without_calibration_data():
    model = torch.nn.Linear(4, 2)  # never reached: the check comes first
    for batches in (None, []):
        with pytest.raises(BpfmError, match="static quantization needs calibration data"):
            quantize(model, QuantConfig("static"), batches)


def test_a_file_that_is_not_a_model(tmp_path):
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"definitely not a pickle")
    with pytest.raises(BpfmError, match="not a bpfm quantized model") as err:
        load_quantized(junk)
    assert "\n" not in str(err.value)
    other = tmp_path / "tensor" / "model.pt"
    other.parent.mkdir()
    torch.save(torch.zeros(3), other)
    with pytest.raises(BpfmError, match="holds a Tensor, not a bpfm quantized model"):
        load_quantized(other.parent)
    (tmp_path / "bad.pt2").write_bytes(b"PK not a zip")
    with pytest.raises(BpfmError, match="not a bpfm quantized model"):
        load_quantized(tmp_path / "bad.pt2")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BpfmError, match="no model.pt2 or model.pt"):
        load_quantized(empty)


def test_pt2e_model_is_not_logged_as_a_pickle():
    from bpfm.quant.quantized import QuantizedModel
    from bpfm.tracking import log_quantized_model

    exported = QuantizedModel(torch.nn.Identity(), QuantConfig(backend="pt2e"), None)
    with pytest.raises(BpfmError, match="log its model.pt2"):
        log_quantized_model("sqlite:///unused.db", "no-run", exported)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--observer", "kmeans"], "observer: unknown 'kmeans'"),
        (["--backend", "tensorrt"], "backend: unknown 'tensorrt'"),
        (["--mode", "static", "--calib-batches", "0"], "calib_batches: must be >= 1"),
    ],
)
def test_cli_bad_names_exit_2(extra, message, tmp_path, capsys):
    code = main(["quantize", "--model", str(tmp_path), "--out", str(tmp_path / "q"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("bpfm: error: ") and message in err and err.count("\n") == 1


def test_cli_model_dir_that_holds_no_model(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"data": "x", "size": "small"}')
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    code = main(["quantize", "--model", str(model_dir), "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("bpfm: error: ") and err.count("\n") == 1
    assert "model.safetensors" in err
    code = main(["quantize", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "q")])
    assert code == 2 and "no such folder" in capsys.readouterr().err


def test_input_quantizer_rounds_each_channel_on_its_own_scale():
    ecg = torch.linspace(-1.0, 2.0, 1250)
    ppg = torch.linspace(0.0, 400.0, 1250)  # a very different range, e.g. raw PPG counts
    x = torch.stack([ecg, ppg]).unsqueeze(0)
    static = InputQuantizer(2)
    static.observe(x)
    rounded = static(x)
    steps = torch.tensor([3.0 / 255, 400.0 / 255]).view(1, 2, 1)
    assert torch.all((rounded - x).abs() <= steps / 2 + 1e-5)
    assert torch.all((rounded - x).abs().amax(dim=-1) > 0.2 * steps.view(1, 2))  # really rounded
    assert torch.unique(rounded[0, 0]).numel() <= 256
    dynamic = InputQuantizer(2, dynamic=True)
    assert torch.allclose(dynamic(x), rounded, atol=1e-5)  # same range, same grid
    assert torch.equal(InputQuantizer.from_description(static.describe())(x), rounded)
