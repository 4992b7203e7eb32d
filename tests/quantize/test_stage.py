"""The grid's stage 2 for one trained model (`bpfm.orchestration.stages.quantize_model`): its
fp32 reference is evaluated and timed once per cell, not once per variant."""

from __future__ import annotations

import numpy as np


def test_stage_2_measures_the_fp32_reference_once_per_cell(trained_model_dir, synthetic_shards,
                                                          tmp_path, monkeypatch):
    from bpfm import tracking
    from bpfm.orchestration.stages import quantize_model
    from bpfm.quant import study

    timed: list[tuple[str, ...]] = []
    evaluated: list[str] = []
    latency_ms, test_metrics = study.latency_ms, study._test_metrics

    def counting_latency(models, *args, **kwargs):
        timed.append(tuple(models))
        return latency_ms(models, *args, **kwargs)

    def counting_metrics(model, *args, **kwargs):
        evaluated.append(type(model).__name__)
        return test_metrics(model, *args, **kwargs)

    monkeypatch.setattr(study, "latency_ms", counting_latency)
    monkeypatch.setattr(study, "_test_metrics", counting_metrics)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment(client, "bpfm-stage-2-test")
    grid = client.create_run(experiment, run_name="grid").info.run_id
    cell, _ = tracking.child_run(client, experiment, grid, key="cell", name="cell",
                                 tags={tracking.KIND: "train"}, params={})
    tracking.log_model_dir(client, cell, trained_model_dir)
    variants = {"dynamic": {"mode": "dynamic", "weights": "per_channel"},
                "static": {"mode": "static", "observer": "minmax", "calib_batches": 1}}
    results = quantize_model(tracking_uri=uri, experiment_id=experiment, grid_run_id=grid,
                             study="bpfm-stage-2-test", cell="cell", cell_run_id=cell,
                             variants=variants, data=synthetic_shards,
                             settings={"latency_runs": 1, "threads": 1})

    assert [r.get("error") for r in results] == [None, None]
    # fp32 timed beside the first variant only, and evaluated once: 2 quantized + 1 fp32
    assert timed == [("quantized", "fp32"), ("quantized",)]
    assert len(evaluated) == 3
    # both variants compare against the same fp32 numbers
    metrics = [client.get_run(r["run_id"]).data.metrics for r in results]
    for b in (1, 64):
        fp32_ms = [m[f"speedup_b{b}"] * m[f"latency_ms_b{b}"] for m in metrics]
        assert np.isclose(fp32_ms[0], fp32_ms[1], rtol=1e-9)
    fp32_mae = [m["sbp_mae"] - m["delta_sbp_mae"] for m in metrics]
    assert np.isclose(fp32_mae[0], fp32_mae[1], rtol=1e-12)
