"""`bpfm export`: a briefly trained small model through ExecuTorch and ONNX Runtime on the
synthetic shards, evaluated from the runtimes' own outputs and checked against the torch model;
broken inputs end with one line and exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bpfm.cli import main

pytest.importorskip("onnxruntime", reason="the .[edge] extra (CI installs it)")


def _check_out_dir(out, result, suffix):
    from bpfm.export import load_export
    from bpfm.metrics import compute_metrics

    file = out / f"model{suffix}"
    assert file.is_file() and result["model_file"] == str(file)
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    parity = json.loads((out / "parity.json").read_text())
    assert metrics["n"] == parity["n"] > 0
    assert {"sbp_mae", "dbp_r2", "sbp_bhs_grade", "aami", "sbp_mae_ci_low"} <= set(metrics)
    # metrics.json comes from the runtime's outputs: re-running the file gives the same numbers
    from bpfm.training.evaluate import open_split
    from bpfm.training.model_dir import load_trained
    from bpfm.training.predict import predict

    _, config, meta = load_trained(result["model_dir"])
    split = open_split(config.data, config.source, config.protocol, config.split_seed)
    pred = predict(load_export(file), split.test, meta)
    again = compute_metrics(pred.target, pred.estimate, pred.subject, meta["target_mean"])
    assert again["sbp_mae"] == pytest.approx(metrics["sbp_mae"], abs=1e-9)
    return metrics, parity


@pytest.mark.slow
def test_onnx_runtime_fp32_and_static_int8(trained_model_dir, tmp_path):
    from bpfm.export import ExportConfig
    from bpfm.export.run import run_export

    fp32 = run_export(trained_model_dir, ExportConfig("onnx", "fp32"), out=tmp_path / "fp32",
                      latency_runs=2, rss=False)
    _, parity = _check_out_dir(tmp_path / "fp32", fp32, ".onnx")
    assert parity["torch_fp32"]["max_abs_output"] < 1e-4
    import onnx

    # only the positional rows a [2, 1250] window reads travel, not the 64 / 100-row tables
    shapes = {tuple(t.dims) for t in onnx.load(fp32["model_file"]).graph.initializer}
    assert not {(1, 64, 96), (1, 100, 96)} & shapes
    assert parity["torch_int8"] is None
    fp32_mmhg = parity["torch_fp32"]["max_abs_mmhg"]

    static = run_export(trained_model_dir, ExportConfig("onnx", "static", "percentile", 2),
                        out=tmp_path / "static", latency_runs=2)
    metrics, parity = _check_out_dir(tmp_path / "static", static, ".onnx")
    # int8: outputs move, but by a fraction of a mmHg on this model
    assert 0 < parity["torch_fp32"]["max_abs_output"] < 0.5
    assert abs(parity["torch_int8"]["mae_diff_mmhg"]["mean"]) < 1.0
    assert "pt2e" in parity["torch_int8_model"]
    assert static["runtime_reduction_factor"] > 3.5  # int8 MatMul weights of a 13.7 MiB model
    assert static["latency_ms_b1"] > 0 and static["latency_ms_b64"] > static["latency_ms_b1"]
    assert 0 < static["rss_above_baseline_mib_b1"] < static["peak_rss_mib_b1"]
    assert static["macs_per_window"] == fp32["macs_per_window"] > 1e7
    # the delta is against torch's fp32 MAE, which the fp32 ONNX file's matches to within the
    # largest difference of their outputs (1e-6 mmHg and more: float32 rounding)
    assert static["delta_sbp_mae"] == pytest.approx(
        metrics["sbp_mae"] - fp32["test"]["sbp_mae"], abs=fp32_mmhg
    )



@pytest.mark.slow
def test_onnx_files_hold_weights_not_debug_records(trained, tmp_path):
    import numpy as np
    import onnx

    from bpfm.export import ExportConfig, export_model, load_export
    from bpfm.export.onnx import fp32_matrices, size_breakdown

    model, _, _ = trained
    files = {}
    for mode in ("fp32", "dynamic"):
        files[mode] = tmp_path / f"{mode}.onnx"
        export_model(model.eval(), ExportConfig("onnx", mode), [], files[mode])
    fp32, int8 = size_breakdown(files["fp32"]), size_breakdown(files["dynamic"])
    for parts, file in ((fp32, files["fp32"]), (int8, files["dynamic"])):
        assert parts["file"] == file.stat().st_size == sum(parts.values()) - parts["file"]
        # the kinds name the file's bytes: what is left is framing, not a missed tensor
        assert 0 < parts["rest"] < 4e3
        # torch.onnx.export's stack traces and shape inference's value_info do not travel
        assert parts["metadata"] == parts["value_info"] == 0
        graph = onnx.load(str(file)).graph
        assert not any(n.metadata_props or n.doc_string for n in graph.node)
    # every fp32 matrix of the fp32 file but the positional table is an int8 one now
    positional = 2 * 19 * 192 * 4
    assert int8["weights"] * 4 == fp32["fp32_matrices"] - positional
    # no fp32 matrix left bigger than that table (the smallest quantized weight, the Conv's
    # 192 x 64, is 49 KB in fp32); scales and zero points are per channel, ~1.6 % of weights
    assert [size for *_, size in fp32_matrices(files["dynamic"])] == [positional]
    assert int8["scales"] + int8["zero_points"] < 0.02 * int8["weights"]
    assert fp32["file"] / int8["file"] >= 3.8
    # the slimmed files still run, and equal outputs for equal windows of a batch
    x = np.random.default_rng(0).standard_normal((3, 2, 1250)).astype(np.float32)
    for file in files.values():
        out = load_export(file).run(np.concatenate([x, x[:1]]))
        assert out.shape == (4, 2) and np.allclose(out[0], out[3], atol=1e-5)
    with torch.no_grad():
        torch_out = model(torch.from_numpy(x)).numpy()
    assert np.abs(load_export(files["fp32"]).run(x) - torch_out).max() < 1e-4


def test_slim_shares_equal_initializers_and_keeps_the_graph_io():
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from bpfm.export.onnx import slim

    ones, twos = np.ones((1, 2), np.float32), np.full((1, 2), 2, np.float32)
    io = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "first_ones"], ["hidden_value"], name="add_first",
                          doc_string="a trace"),
         helper.make_node("Add", ["hidden_value", "second_ones"], ["hidden_value_2"]),
         helper.make_node("Mul", ["hidden_value_2", "twos"], ["y"])],
        "g", [io("x", onnx.TensorProto.FLOAT, [1, 2])], [io("y", onnx.TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(ones, "first_ones"), numpy_helper.from_array(ones, "second_ones"),
         numpy_helper.from_array(twos, "twos")],
        value_info=[io("hidden_value", onnx.TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, {"note": "dropped"})
    x = np.array([[1.0, -3.0]], np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    g = slim(model).graph
    onnx.checker.check_model(model)
    assert sorted(numpy_helper.to_array(t).tolist()[0][0] for t in g.initializer) == [1.0, 2.0]
    assert [g.input[0].name, g.output[0].name] == ["x", "y"]
    assert all(not n.name and not n.doc_string for n in g.node) and not g.value_info
    assert max(len(t.name) for t in g.initializer) == 1 and not model.metadata_props
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert after.tolist() == before.tolist() == [[6.0, -2.0]]


@pytest.mark.slow
def test_executorch_static_int8_through_the_cli(trained_model_dir, tmp_path, capsys):
    pytest.importorskip("executorch", reason="the .[edge] extra (CI installs it)")
    out = tmp_path / "pte"
    code = main(["export", "--model", str(trained_model_dir), "--format", "executorch",
                 "--mode", "static", "--observer", "histogram", "--calib-batches", "2",
                 "--latency-runs", "2", "--out", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics, parity = _check_out_dir(out, result, ".pte")
    # the .pte runs the very graph it was lowered from: XNNPACK's int8 kernels round alike
    assert abs(parity["torch_int8"]["mae_diff_mmhg"]["mean"]) < 0.1
    assert "XNNPACK" in parity["torch_int8_model"]
    # the XNNPACK rewrite (for_xnnpack) lowers to one partition; the training graph took 74
    assert result["delegated"]["xnnpack_partitions"] == 1
    assert result["delegated"]["portable_ops"] <= 10
    assert result["reduction_factor"] > 3.5
    from bpfm.export.executorch import size_breakdown

    parts = size_breakdown(out / "model.pte")
    # every byte accounted for: int8 weights, one scale set per static Linear (the biases are
    # int8 adds after them), graphs
    assert 0 <= parts["padding"] < 16_384 and parts["file"] == (out / "model.pte").stat().st_size
    assert parts["scales"] > 0 and parts["weights"] > 0.9 * parts["file"]
    assert 0 < result["rss_above_baseline_mib_b1"] < 64


def _one_line_exit_2(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bpfm: error:"), err
    for needle in needles:
        assert needle in err, err


def test_corrupt_and_foreign_export_files(trained_model_dir, tmp_path, capsys):
    base = ["export", "--model", str(trained_model_dir), "--out", str(tmp_path / "out"),
            "--no-rss", "--latency-runs", "0"]
    corrupt = tmp_path / "corrupt.pte"
    corrupt.write_bytes(b"\x1c\x00\x00\x00ET12" + bytes(range(256)) * 4)
    _one_line_exit_2([*base, "--file", str(corrupt)], capsys, "corrupt.pte",
                     "not a valid ExecuTorch program")
    foreign = tmp_path / "zip.pte"  # a torch archive renamed
    torch.save({"w": torch.zeros(3)}, foreign)
    _one_line_exit_2([*base, "--file", str(foreign)], capsys, "zip.pte", "not an ExecuTorch")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all" * 10)
    _one_line_exit_2([*base, "--file", str(junk)], capsys, "junk.onnx", "not a valid ONNX model")
    other = tmp_path / "other.onnx"  # a valid ONNX model of something else
    torch.onnx.export(torch.nn.Linear(4, 3), (torch.zeros(1, 4),), str(other), dynamo=False)
    _one_line_exit_2([*base, "--file", str(other)], capsys, "other.onnx", "not a bpfm BP model")
    _one_line_exit_2([*base, "--file", str(tmp_path / "model.tflite")], capsys, "unknown suffix")
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--format", "onnx", "--mode", "int4"], "mode: unsupported 'int4' for onnx"),
        (["--format", "executorch", "--mode", "float16"], "mode: unsupported 'float16'"),
        (["--format", "onnx", "--observer", "histogram"], "observer: unknown 'histogram' for onnx"),
        (["--format", "tflite"], "format: unknown 'tflite'"),
        (["--format", "onnx", "--calib-batches", "0"], "calib_batches: must be >= 1"),
    ],
)
def test_unsupported_settings(trained_model_dir, tmp_path, capsys, flags, needle):
    _one_line_exit_2(["export", "--model", str(trained_model_dir), "--out", str(tmp_path),
                      *flags], capsys, needle)


def test_model_whose_size_does_not_match_its_config(trained_model_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model_dir, model_dir, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((model_dir / "config.json").read_text())
    config["size"] = "medium"
    (model_dir / "config.json").write_text(json.dumps(config))
    _one_line_exit_2(["export", "--model", str(model_dir), "--format", "onnx", "--out",
                      str(tmp_path / "out")], capsys, "config.json: size: 'medium'",
                     "holds a 'small' model")


def test_grid_variants_name_a_runtime():
    from bpfm.errors import BpfmError
    from bpfm.export import ExportConfig, is_export_variant

    variant = {"backend": "onnxruntime", "mode": "static", "observer": "entropy",
               "weights": "per_channel", "calib_batches": 32}
    assert is_export_variant(variant) and not is_export_variant({"backend": "pt2e"})
    assert ExportConfig.from_variant(variant) == ExportConfig("onnx", "static", "entropy", 32)
    assert ExportConfig.from_variant({"backend": "executorch", "mode": "dynamic"}).name == \
        "executorch-dynamic"
    with pytest.raises(BpfmError, match="threads: not an export field"):
        ExportConfig.from_variant({"backend": "executorch", "threads": 2})


@pytest.mark.slow
def test_grid_stage_logs_a_runtime_variant_to_mlflow(logged_cell, synthetic_shards):
    from bpfm import tracking
    from bpfm.orchestration.stages import quantize_model

    client = tracking.client(logged_cell["tracking_uri"])
    variants = {"onnx_dynamic": {"backend": "onnxruntime", "mode": "dynamic"}}
    results = quantize_model(**logged_cell, variants=variants, data=synthetic_shards,
                             settings={"latency_runs": 2, "threads": 1})
    assert [r.get("error") for r in results] == [None]
    run = client.get_run(results[0]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["backend"] == "onnxruntime" and run.data.params["mode"] == "dynamic"
    metrics = run.data.metrics
    assert metrics["size_mib"] < 5 and metrics["peak_rss_mib_b1"] > 0
    assert metrics["macs_per_window"] > 1e7 and "sbp_mae" in metrics and "latency_ms_b64" in metrics
    files = {f.path for f in client.list_artifacts(run.info.run_id, "exported")}
    assert {"exported/model.onnx", "exported/parity.json", "exported/metrics.json"} <= files


def test_export_copy_keeps_only_the_positional_rows_a_window_reads():
    from bpfm.export import for_window
    from bpfm.model import create_model

    torch.manual_seed(0)
    model = create_model("small").eval()
    with torch.no_grad():  # rows past the window's must not matter; make them loud
        model.encoder.channel_encoding.normal_()
        model.encoder.patch_encoding.normal_()
    trimmed = for_window(model)
    assert tuple(trimmed.encoder.channel_encoding.shape) == (1, 2, 96)
    assert tuple(trimmed.encoder.patch_encoding.shape) == (1, 19, 96)
    assert model.encoder.patch_encoding.shape[1] == 100  # the caller's model is left whole
    x = torch.randn(3, 2, 1250)
    with torch.no_grad():
        assert torch.equal(trimmed(x), model(x))
    # 62 + 81 rows of 96 fp32: 55 KB less in every export file of the small model
    dropped = sum(p.numel() for p in model.parameters()) - \
        sum(p.numel() for p in trimmed.parameters())
    assert dropped * 4 == (62 + 81) * 96 * 4
