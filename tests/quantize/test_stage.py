"""The grid's stage 2 for one trained model (`bpfm.orchestration.stages.quantize_model`): its
fp32 reference is evaluated and timed once per cell, not once per variant."""

from __future__ import annotations

import numpy as np


def test_stage_2_measures_the_fp32_reference_once_per_cell(logged_cell, synthetic_shards,
                                                          monkeypatch):
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

    variants = {"dynamic": {"mode": "dynamic", "weights": "per_channel"},
                "static": {"mode": "static", "observer": "minmax", "calib_batches": 1}}
    results = quantize_model(**logged_cell, variants=variants, data=synthetic_shards,
                             settings={"latency_runs": 1, "threads": 1})
    client = tracking.client(logged_cell["tracking_uri"])

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
