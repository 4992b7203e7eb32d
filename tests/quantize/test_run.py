"""`run_quantization` and `bpfm quantize` end to end on the trained model dir: the result dict,
quant.json, the saved model, and the numbers against fp32."""

from __future__ import annotations

import json

import numpy as np

from bpfm.cli import main
from bpfm.quant.convert import load_quantized


def _reloaded_metrics(out, trained, split) -> dict:
    from bpfm.metrics import compute_metrics
    from bpfm.training.predict import predict

    _, _, meta = trained
    pred = predict(load_quantized(out), split.test, meta)
    return compute_metrics(pred.target, pred.estimate, pred.subject, meta.get("target_mean"))


def test_cli_static_fx_writes_result_and_model(trained_model_dir, trained, split, tmp_path,
                                               capsys):
    out = tmp_path / "static"
    code = main(["quantize", "--model", str(trained_model_dir), "--mode", "static",
                 "--observer", "histogram", "--calib-batches", "1", "--latency-runs", "1",
                 "--out", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads((out / "quant.json").read_text())
    assert result["variant"] == "fx-static-histogram-per_channel"
    assert result["engine"] in ("x86", "fbgemm", "onednn", "qnnpack")
    assert result["size_kind"] == "state_dict"
    assert result["reduction_factor"] >= 3.5
    assert result["reduction_factor"] == result["fp32"]["size_mib"] / result["size_mib"]
    for b in (1, 64):
        assert result[f"latency_ms_b{b}"] > 0 and result["fp32"][f"latency_ms_b{b}"] > 0
        assert np.isclose(result[f"speedup_b{b}"],
                          result["fp32"][f"latency_ms_b{b}"] / result[f"latency_ms_b{b}"])
    assert result["threads"] == 1
    assert result["test"]["n"] == result["fp32"]["test"]["n"] > 0
    assert np.isclose(result["delta_sbp_r2"],
                      result["test"]["sbp_r2"] - result["fp32"]["test"]["sbp_r2"])
    assert result["model_file"] == str(out / "model.pt")
    reloaded = _reloaded_metrics(out, trained, split)
    assert reloaded["sbp_mae"] == result["test"]["sbp_mae"]
    assert reloaded["dbp_r2"] == result["test"]["dbp_r2"]


def test_pt2e_dynamic_with_an_fp32_baseline(trained_model_dir, trained, split, tmp_path):
    from bpfm.quant.quantized import QuantConfig
    from bpfm.quant.study import run_quantization

    fp32 = run_quantization(trained_model_dir, QuantConfig("fp32"), out=tmp_path / "fp32",
                            latency_runs=0)
    assert fp32["variant"] == "fp32" and fp32["reduction_factor"] == 1.0
    assert fp32["test"] == fp32["fp32"]["test"] and fp32["delta_dbp_mae"] == 0.0

    config = QuantConfig("dynamic", backend="pt2e", compile=False)
    result = run_quantization(trained_model_dir, config, out=tmp_path / "pt2e",
                              latency_runs=0, baseline=fp32)
    assert result["fp32"] == fp32["fp32"]  # reused, not measured again
    assert result["size_kind"] == "int8_tensor_bytes" and result["reduction_factor"] >= 3.5
    assert result["latency_ms_b64"] is None and result["speedup_b64"] is None
    assert result["compile_s"] is None
    assert abs(result["delta_sbp_mae"]) <= 0.05 * fp32["test"]["sbp_mae"]
    assert abs(result["delta_dbp_mae"]) <= 0.05 * fp32["test"]["dbp_mae"]
    assert result["model_file"].endswith("model.pt2")
    reloaded = _reloaded_metrics(tmp_path / "pt2e", trained, split)
    assert np.isclose(reloaded["sbp_mae"], result["test"]["sbp_mae"], rtol=1e-6)
