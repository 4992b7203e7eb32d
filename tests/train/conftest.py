"""Fixtures for the training tests: shard sets to learn from, a tiny-run config factory, and
torch.compile through aot_eager."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def learnable_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Synthetic MIMIC-like Train subset large enough to learn from (~350 paper-train segments):
    the shared `synthetic_shards` fixture has ~70, too few to beat the mean predictor reliably."""
    from bpfm.data.shards import write_shards
    from bpfm.data.synth import SynthConfig, write_synthetic_pulsedb

    root = tmp_path_factory.mktemp("learnable")
    result = write_synthetic_pulsedb(
        root / "pulsedb",
        SynthConfig(subjects=40, segments_per_subject=24, seed=3, sources=("mimic",)),
    )
    train_files = [p for p in result.subset_files if p.name.startswith("Train")]
    out = root / "shards"
    write_shards(train_files, str(out))
    return str(out)


@pytest.fixture(scope="session")
def challenge2015_shards(tmp_path_factory: pytest.TempPathFactory, challenge2015_file: Path) -> str:
    """The real challenge2015 sample as shards (source `other`, one subset)."""
    from bpfm.data.shards import write_shards

    out = tmp_path_factory.mktemp("challenge2015") / "shards"
    write_shards([challenge2015_file], str(out))
    return str(out)


@pytest.fixture
def tiny_config(synthetic_shards: str, tmp_path: Path):
    """TrainConfig factory for runs of a few steps on the shared synthetic shards."""
    from bpfm.training.config import TrainConfig

    def make(**overrides) -> TrainConfig:
        values = dict(
            data=synthetic_shards,
            source="mimic",
            protocol="paper",
            size="small",
            epochs=3,
            batch_size=8,
            max_steps_per_epoch=2,
            eval_batch_size=64,
            out=str(tmp_path / "run"),
            device="cpu",
        )
        values.update(overrides)
        return TrainConfig(**values)

    return make


@pytest.fixture
def aot_eager_compile(monkeypatch):
    """torch.compile with the aot_eager backend (dynamo and AOT autograd, no codegen: inductor's
    C++ build takes minutes on two cores; the GPU speed-up is a benchmark's job). Yields
    dynamo's counters, cleared."""
    import torch
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compile_(m, backend="aot_eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    return counters
