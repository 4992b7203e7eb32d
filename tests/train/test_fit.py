"""fit: learning, resume, epoch-prefix model dirs, predictions, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from bpfm.errors import BpfmError
from bpfm.training.config import TrainConfig
from bpfm.training.evaluate import evaluate
from bpfm.training.loop import fit
from bpfm.training.model_dir import load_trained
from bpfm.training.predict import predict_arrays


class Interrupt(Exception):
    pass


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_small_beats_the_mean_predictor_on_synthetic(learnable_shards, tmp_path):
    config = TrainConfig(
        data=learnable_shards, source="mimic", protocol="paper", size="small", epochs=3,
        batch_size=32, drop_path=0.0, out=str(tmp_path / "run"),
        device="cpu",
    )
    result = fit(config)
    assert result.test["sbp_mase"] < 0.8, result.test
    assert result.test["dbp_mase"] < 0.8, result.test


def test_training_loss_falls_on_challenge2015(challenge2015_shards, tmp_path):
    config = TrainConfig(
        data=challenge2015_shards, source="other", protocol="paper", size="small", epochs=3,
        batch_size=32, max_steps_per_epoch=6, drop_path=0.0,
        out=str(tmp_path / "run"), device="cpu",
    )
    losses = [h["train_loss"] for h in fit(config).history]
    assert losses[-1] < losses[0], losses


def test_resume_equals_uninterrupted_and_prefix_dir_is_the_shorter_run(tiny_config, tmp_path):
    straight = fit(tiny_config(out=str(tmp_path / "a"), report_epochs=(2,)))

    seen_at_2: dict[str, torch.Tensor] = {}

    def stop_after_2(report):
        if report.epoch == 2:
            state = torch.load(report.checkpoint_dir / "state.pt", weights_only=True)
            seen_at_2.update(state["model"])
            raise Interrupt

    interrupted = tiny_config(out=str(tmp_path / "b"), report_epochs=(2,))
    with pytest.raises(Interrupt):
        fit(interrupted, callbacks=[stop_after_2])
    assert not (tmp_path / "b" / "metrics.json").exists()
    epochs_run = []
    resumed = fit(interrupted, callbacks=[lambda r: epochs_run.append(r.epoch)])
    assert epochs_run == [3]

    a, b = (
        _weights(tmp_path / "a" / "model.safetensors"),
        _weights(tmp_path / "b" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.test == straight.test
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    # the epoch-2 model dir of the 3-epoch run is the model after epoch 2
    prefix = _weights(tmp_path / "a" / "epoch-2" / "model.safetensors")
    assert all(torch.equal(prefix[k], seen_at_2[k]) for k in prefix)
    assert not all(torch.equal(prefix[k], a[k]) for k in prefix)


def test_compiled_training_equals_eager_and_saves_the_eager_keys(
    tiny_config, tmp_path, aot_eager_compile
):
    """`compile=True` trains through torch.compile (aot_eager here)."""
    counters = aot_eager_compile
    eager = fit(tiny_config(out=str(tmp_path / "eager")))
    assert not counters["stats"]["unique_graphs"]
    compiled = fit(tiny_config(out=str(tmp_path / "compiled"), compile=True))
    assert counters["stats"]["unique_graphs"] >= 1  # the steps went through dynamo

    a = _weights(tmp_path / "eager" / "model.safetensors")
    b = _weights(tmp_path / "compiled" / "model.safetensors")
    assert a.keys() == b.keys()  # no `_orig_mod.` prefixes
    # Same draws; the eager CPU drop path sums over fewer rows, so gradients differ in the last
    # bits. Adam moves a weight by about lr a step whatever its gradient's size: a gradient near
    # zero whose sign flips on those bits moves it by up to 2 lr a step (seen: one weight in 576
    # off by 1.2e-5). Every weight is held to that bound, and all but 1 % to the tight one.
    config = tiny_config()
    bound = 2 * config.lr * config.epochs * config.max_steps_per_epoch
    for key in a:
        diff = (a[key] - b[key]).abs()
        assert float(diff.max()) <= bound, key
        close = diff <= 1e-5 + 1e-4 * b[key].abs()
        assert float(close.float().mean()) >= 0.99, (key, float(diff.max()))
    assert [h["train_loss"] for h in compiled.history] == pytest.approx(
        [h["train_loss"] for h in eager.history], rel=1e-5
    )


def test_model_dirs_predictions_and_evaluate(tiny_config, tmp_path):
    out = tmp_path / "run"
    result = fit(tiny_config(out=str(out), epochs=2, report_epochs=(1,)))
    for model_dir, epochs in ((out, 2), (out / "epoch-1", 1)):
        for name in ("model.safetensors", "config.json", "metrics.json", "predictions.parquet"):
            assert (model_dir / name).is_file(), model_dir / name
        assert json.loads((model_dir / "config.json").read_text())["epochs"] == epochs
        assert json.loads((model_dir / "metrics.json").read_text())["epoch"] == epochs
    table = pq.read_table(out / "predictions.parquet")
    assert table.column_names == ["segment_id", "subject", "sbp", "dbp", "sbp_hat", "dbp_hat"]
    assert table.num_rows == result.split["n_test"] == result.test["n"]
    assert set(result.report_dirs) == {1}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]

    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["split"]["label"].startswith("paper")
    again = evaluate(out, device="cpu")
    assert again["sbp_mae"] == pytest.approx(metrics["test"]["sbp_mae"], rel=1e-5)
    assert again["split"] == metrics["split"]["label"]

    model, config, meta = load_trained(out)
    assert (config.epochs, config.size) == (2, "small")
    rows = table.slice(0, 1).to_pylist()[0]
    assert meta["target_mean"][0] > 50  # mmHg, the MASE baseline
    assert rows["sbp_hat"] > 0


def test_rerun_of_a_finished_run_trains_nothing(tiny_config):
    config = tiny_config(epochs=1)
    first = fit(config)
    calls = []
    second = fit(config, callbacks=[calls.append])
    assert calls == [] and second.test == first.test


def test_resume_refuses_another_configuration(tiny_config):
    fit(tiny_config(epochs=1))
    with pytest.raises(BpfmError, match="config.lr"):
        fit(tiny_config(epochs=2, lr=1e-3))


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (dict(schedule="cosine", report_epochs=(1,)), "depends on the total epochs"),
        (dict(init="pretrained"), "needs --checkpoint"),
        (dict(size="huge"), "size: unknown 'huge'"),
        (dict(head="conv"), "head: unknown"),
        (dict(protocol="random"), "protocol: unknown"),
        (dict(source="eicu"), "source: unknown"),
        (dict(report_epochs=(4,)), r"report_epochs: \[4\] outside 1..3"),
    ],
)
def test_bad_configs_are_refused_before_training(tiny_config, overrides, problem):
    with pytest.raises(BpfmError, match=problem):
        tiny_config(**overrides).validate()


def test_cosine_schedule_without_prefix_reports_is_accepted(tiny_config):
    assert tiny_config(schedule="cosine", report_epochs=(3,)).validate().schedule == "cosine"


def test_predict_arrays_checks_shape_and_nan(tiny_config):
    from bpfm.model import create_model

    model = create_model("small")
    meta = {"target_scale": [20.0, 10.0], "target_shift": [120.0, 70.0]}
    out = predict_arrays(model, np.zeros((3, 2, 1250), np.float32), meta)
    assert out.shape == (3, 2)
    with pytest.raises(BpfmError, match=r"expected \[batch, 2, 1250\]"):
        predict_arrays(model, np.zeros((3, 2, 1000), np.float32), meta)
    bad = np.zeros((3, 2, 1250), np.float32)
    bad[1, 0, 5] = np.nan
    with pytest.raises(BpfmError, match="NaN"):
        predict_arrays(model, bad, meta)


class _NanAfter(torch.nn.Module):
    """A real linear model whose output turns NaN from its `bad_call`-th forward on."""

    def __init__(self, bad_call: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2 * 1250, 2)
        self.calls, self.bad_call = 0, bad_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.linear(x.flatten(1))
        return out * float("nan") if self.calls >= self.bad_call else out


@pytest.mark.parametrize("bad_step, steps, expected", [(3, 5, "1-5"), (7, 12, "6-10")])
def test_a_non_finite_loss_is_caught_within_its_check_window(
    tiny_config, monkeypatch, bad_step, steps, expected
):
    from bpfm.training import loop as train_module
    from bpfm.training.evaluate import open_split

    monkeypatch.setattr(train_module, "FINITE_CHECK_STEPS", 5)
    config = tiny_config(max_steps_per_epoch=steps, batch_size=2).validate()
    split = open_split(config.data, config.source, config.protocol, config.split_seed)
    model = _NanAfter(bad_step)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    meta = {"target_scale": [1.0, 1.0], "target_shift": [0.0, 0.0]}
    with pytest.raises(BpfmError, match=f"loss: not finite at epoch 1 in steps {expected} "):
        train_module._train_epoch(config, model, split.train, 1, optimizer, scheduler, meta,
                                  torch.device("cpu"))
    assert model.calls >= bad_step
