"""Fine-tuning from a pretrained backbone: the model starts from every encoder tensor of the
backbone, and the demo's pretrained cells learn from the backbone the demo builds (in-domain
SimMIM on the train view, with the demo profile's own pretraining and training settings).

A backbone pretrained on synthetic EEG left the demo's unfrozen cells at MASE 0.9-1.1, where
xavier reached 0.5-0.6: this test fails if a backbone that loads hurts the fine-tune that way."""

from __future__ import annotations

import pytest
import torch

from bpfm.data.shards import write_shards
from bpfm.data.synth import SynthConfig, write_synthetic_pulsedb
from bpfm.profiles import load_profile
from bpfm.training.config import TrainConfig
from bpfm.training.loop import build_model, fit
from bpfm.training.pretrain import PretrainConfig, pretrain

# a backbone pretrained with the demo's settings, then 10 epochs x 8 steps of fine-tuning
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo's own synthetic PulseDB (its profile's `data.synthesize`), sharded."""
    root = tmp_path_factory.mktemp("demo-data")
    spec = load_profile("demo").data.synthesize
    result = write_synthetic_pulsedb(root / "pulsedb", SynthConfig(**spec))
    write_shards(result.subset_files, str(root / "shards"))
    return str(root / "shards")


def test_the_demos_pretrained_unfrozen_cell_starts_from_its_backbone_and_learns(
    demo_shards, tmp_path
):
    demo = load_profile("demo")
    assert "pretrained_ecgppg" in demo.axes["init"]
    backbone = tmp_path / "backbone.ckpt"
    pretrain(PretrainConfig(out=str(backbone), size="small", data=demo_shards, source="mimic",
                            protocol="paper", device="cpu", steps=demo.pretrain.steps,
                            **demo.pretrain.options))
    recipe = {k: v for k, v in demo.train.items() if k != "calibration"}
    config = TrainConfig(**recipe, data=demo_shards, source="mimic", protocol="paper",
                         size="small", freeze="unfrozen", init="pretrained_ecgppg",
                         checkpoint=str(backbone), epochs=max(demo.axes["epochs"]),
                         device="cpu", out=str(tmp_path / "run"))

    saved = torch.load(backbone, weights_only=True)["state_dict"]
    encoder = build_model(config).encoder.state_dict()
    assert len(encoder) == len([k for k in saved if k.startswith("model.")]) > 100
    assert all(torch.equal(value, saved[f"model.{key}"]) for key, value in encoder.items())

    test = fit(config).test
    assert test["sbp_mase"] < 0.8 and test["dbp_mase"] < 0.8, test
