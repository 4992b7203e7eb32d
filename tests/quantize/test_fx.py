"""The fx backend (torch.ao, as the paper) on a briefly trained small model: every variant stays
close to fp32, shrinks the model as the paper's Table IV, and survives a save/reload."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from bpfm.quant.convert import load_quantized, quantize, save_quantized, size_bytes
from bpfm.quant.measure import state_dict_bytes
from bpfm.quant.quantized import QuantConfig

# the histogram observer runs in test_run's CLI test (fx) and in test_pt2e
FX_VARIANTS = [
    QuantConfig("dynamic", weights="per_channel"),
    QuantConfig("dynamic", weights="per_tensor", quantize_input=True),
    QuantConfig("static", observer="minmax"),
    QuantConfig("static", observer="moving_average", weights="per_tensor", quantize_input=True),
]
AO_WARNING_TEXTS = ("torch.ao.quantization is deprecated", "quantized tensor creation functions",
                    "reduce_range will be deprecated")


def _mae(estimate: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.abs(estimate - target).mean(axis=0)


@pytest.fixture(scope="module")
def fp32_predictions(trained, split):
    from bpfm.training.predict import predict

    model, _, meta = trained
    return predict(model, split.test, meta)


@pytest.mark.parametrize("config", FX_VARIANTS, ids=lambda c: c.name)
def test_fx_variant_stays_close_to_fp32_and_round_trips(
    config, trained, split, calib_batches, test_windows, fp32_predictions, tmp_path
):
    from bpfm.training.predict import predict

    model, _, meta = trained
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = quantize(model, config, calib_batches)
        reloaded = load_quantized(save_quantized(quantized, tmp_path / "q"))
    leaked = [str(w.message) for w in caught if any(t in str(w.message) for t in AO_WARNING_TEXTS)]
    assert not leaked  # the backend filters exactly torch.ao's own warnings

    estimate = predict(quantized, split.test, meta).estimate
    fp32_mae = _mae(fp32_predictions.estimate, fp32_predictions.target)
    quant_mae = _mae(estimate, fp32_predictions.target)
    assert np.all(np.abs(quant_mae - fp32_mae) <= 0.05 * fp32_mae), (quant_mae, fp32_mae)
    assert not np.array_equal(estimate, fp32_predictions.estimate)  # really an int8 model

    size, kind = size_bytes(quantized)
    assert kind == "state_dict"
    assert state_dict_bytes(model) / size >= 3.5  # paper: small 13.73 -> 3.85 MB, x3.57

    modules = dict(quantized.net.named_modules())
    qkv = modules["encoder.blocks.0.attn.qkv"].weight()
    assert qkv.dtype == torch.qint8
    if config.weights == "per_channel":  # torch stores symmetric qparams as zero points 0
        assert qkv.q_per_channel_scales().numel() == qkv.shape[0]
        assert torch.all(qkv.q_per_channel_zero_points() == 0)
    else:
        assert qkv.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric)
        assert qkv.q_zero_point() == 0

    if config.mode == "static":  # the encoder's Linears only
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        encoder_linears = [n for n in linears if n.startswith("encoder.")]
        assert all(type(modules[n]) is torch.ao.nn.quantized.Linear for n in encoder_linears)
        assert type(modules["head.fc"]) is torch.nn.Linear  # outputs keep full resolution
        assert type(modules["encoder.norm"]) is torch.nn.LayerNorm  # residual stream in fp32
        assert type(modules["encoder.patch_embed.patch_embed.proj"]) is torch.nn.Conv2d

    with torch.inference_mode():
        assert torch.equal(reloaded(test_windows), quantized(test_windows))
    assert reloaded.config == config


def test_traceable_attention_computes_the_models_attention(trained, test_windows):
    import copy

    from bpfm.model.cerebro import Attention
    from bpfm.quant.fx import AttentionCore, traceable

    model, _, _ = trained
    swapped = traceable(copy.deepcopy(model))
    assert not any(isinstance(m, Attention) for m in swapped.modules())
    cores = [m for m in swapped.modules() if isinstance(m, AttentionCore)]
    assert len(cores) == sum(isinstance(m, Attention) for m in model.modules())
    assert {c.over_channels for c in cores} == {True, False}  # both attention axes covered
    with torch.inference_mode():
        torch.testing.assert_close(swapped(test_windows), model(test_windows))


def test_dynamic_fx_swaps_every_linear_and_keeps_the_model_untouched(trained):
    model, _, _ = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize(model, QuantConfig("dynamic"))
    kinds = [type(m) for m in quantized.net.modules()]
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert kinds.count(dynamic_linear) == linears
    assert torch.nn.Linear not in kinds
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mlflow_pickle_round_trip(trained, calib_batches, test_windows, tmp_path, monkeypatch):
    import mlflow
    import mlflow.pytorch

    from bpfm.tracking import log_quantized_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model, _, _ = trained
    quantized = quantize(model, QuantConfig("static", observer="minmax"), calib_batches)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("quant-test")).info.run_id
    model_uri = log_quantized_model(uri, run_id, quantized, "int8")
    loaded = mlflow.pytorch.load_model(model_uri)
    assert isinstance(loaded, type(quantized))
    with torch.inference_mode():
        assert torch.equal(loaded(test_windows), quantized(test_windows))


@pytest.mark.parametrize("name", ["Conv1d", "Conv2d"])
def test_a_torch_ao_quantized_conv_survives_plain_pickle(name):
    """bpfm.quant.fx's copyreg reducers: without them the reloaded conv fails on its first call."""
    import io

    from torch.ao.nn import quantized

    import bpfm.quant.fx  # noqa: F401  (registers the reducers)

    conv = getattr(quantized, name)(2, 4, 3)
    shape = (1, 2, 8) if name == "Conv1d" else (1, 2, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation warnings
        x = torch.quantize_per_tensor(torch.randn(shape), 0.1, 0, torch.quint8)
        buffer = io.BytesIO()
        torch.save(conv, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(loaded(x).dequantize(), conv(x).dequantize())
