"""Issue 15 item 1: a run pins the shard generation it started on. Republishing keeps previous
generations readable (a running `bpfm train` finishes on its own rows), the checkpoint records
the generation, resuming on another one is refused naming both unless `--allow-new-data`, and
`bpfm data gc` drops old generations explicitly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

from bpfm.cli import main
from bpfm.data.generations import KEEP
from bpfm.data.shards import MANIFEST, open_shards, write_shards
from bpfm.errors import BpfmError
from bpfm.training.config import TrainConfig
from bpfm.training.loop import fit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def editable_set(tmp_path, synthetic_subset_files):
    """(input Train_Subset.mat copy, shard set URI, function that republishes a changed input)."""
    source = tmp_path / "in" / "Train_Subset.mat"
    source.parent.mkdir()
    shutil.copyfile(next(p for p in synthetic_subset_files if p.name == "Train_Subset.mat"), source)
    out = str(tmp_path / "shards")
    write_shards([source], out)
    values = iter(range(150, 190))

    def republish() -> dict:
        with h5py.File(source, "r+") as f:
            f["Subset/SBP"][0, 0] = float(next(values))
        return write_shards([source], out)

    return source, out, republish


def _config(data: str, out: Path, **overrides) -> TrainConfig:
    values = dict(data=data, source="mimic", protocol="paper", size="small", freeze="frozen",
                  epochs=1, batch_size=4, max_steps_per_epoch=1, eval_batch_size=64,
                  out=str(out), device="cpu")
    return TrainConfig(**{**values, **overrides})


def _state_generation(out: Path, epoch: int) -> str:
    state = torch.load(out / "checkpoints" / f"epoch-{epoch:04d}" / "state.pt", weights_only=True)
    return state["config"]["data_generation"]


@pytest.mark.slow
def test_republishing_under_a_running_train_lets_it_finish_on_its_generation(
    editable_set, tmp_path
):
    _, data, republish = editable_set
    old = open_shards(data).generation
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "bpfm.cli", "train", "--data", data, "--epochs", "3",
               "--freeze", "frozen", "--batch-size", "4", "--max-steps-per-epoch", "1",
               "--device", "cpu", "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "epoch-0001").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.05)
    new = republish()["generation"]
    assert proc.poll() is None, "the republish came after the run ended: nothing was tested"
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr  # before: `<uri>: not found` mid-epoch
    assert new != old and open_shards(data).generation == new
    assert _state_generation(out, 3) == old
    assert json.loads((out / "config.json").read_text())["data_generation"] == old
    assert (Path(data) / old / MANIFEST).is_file()  # kept, readable by the pinned run


def test_resuming_on_a_republished_set_is_refused_naming_both_generations(
    editable_set, tmp_path, capsys
):
    _, data, republish = editable_set
    out = tmp_path / "run"
    fit(_config(data, out))
    old = _state_generation(out, 1)
    new = republish()["generation"]
    with pytest.raises(BpfmError) as caught:
        fit(_config(data, out, epochs=2))
    message = str(caught.value)
    assert old in message and new in message and "--allow-new-data" in message
    assert "\n" not in message
    args = ["train", "--data", data, "--epochs", "2", "--freeze", "frozen", "--batch-size", "4",
            "--max-steps-per-epoch", "1", "--device", "cpu", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bpfm: error: ") and old in err[-1] and new in err[-1]
    assert not (out / "checkpoints" / "epoch-0002").exists()  # nothing trained on other rows
    assert main([*args, "--allow-new-data"]) == 0
    assert _state_generation(out, 2) == new


def test_a_pinned_run_reads_its_generation_after_republishing(editable_set, tmp_path):
    _, data, republish = editable_set
    old = open_shards(data).generation
    republish()
    result = fit(_config(data, tmp_path / "run", data_generation=old))
    assert result.epochs == 1 and _state_generation(tmp_path / "run", 1) == old
    pinned = open_shards(data, old).dataset().to_table(columns=["sbp"])["sbp"].to_pylist()
    current = open_shards(data).dataset().to_table(columns=["sbp"])["sbp"].to_pylist()
    assert 150.0 in current and 150.0 not in pinned


def test_publishing_keeps_the_previous_two_generations_and_gc_drops_them(
    editable_set, capsys
):
    _, data, republish = editable_set
    generations = [open_shards(data).generation] + [republish()["generation"] for _ in range(3)]
    folders = sorted(p.name for p in Path(data).iterdir() if p.name.startswith("gen-"))
    assert folders == sorted(generations[-1 - KEEP:])  # the oldest was deleted
    assert open_shards(data).manifest["previous"] == generations[-2:-4:-1]
    assert open_shards(data, generations[-3]).generation == generations[-3]
    with pytest.raises(BpfmError, match=f"generation {generations[0]} is no longer kept"):
        open_shards(data, generations[0])
    assert main(["data", "gc", data, "--keep", "0", "--json"]) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["kept"] == [generations[-1]]
    assert sorted(done["deleted"]) == sorted(generations[-3:-1])
    assert [p.name for p in Path(data).iterdir() if p.name.startswith("gen-")] == [generations[-1]]
    assert open_shards(data).manifest["rows"] > 0


def test_evaluate_and_quantize_read_the_generation_the_model_trained_on(editable_set, tmp_path):
    """A model evaluated (or quantized, as stage 2 does) on its own shard set after a republish
    sees the rows it trained and was tested on, not the republished ones."""
    from bpfm.quant.quantized import QuantConfig
    from bpfm.quant.study import run_quantization
    from bpfm.training.evaluate import evaluate

    source, data, republish = editable_set
    out = tmp_path / "run"
    fit(_config(data, out))
    trained = json.loads((out / "metrics.json").read_text())["test"]
    with h5py.File(source, "r+") as f:  # every reference 30 mmHg higher: any test MAE moves
        f["Subset/SBP"][...] = f["Subset/SBP"][...] + 30.0
    write_shards([source], data)
    assert evaluate(out, device="cpu")["sbp_mae"] == pytest.approx(trained["sbp_mae"])
    result = run_quantization(out, QuantConfig(mode="fp32"), out=str(tmp_path / "q"),
                              latency_runs=0)
    assert result["test"]["sbp_mae"] == pytest.approx(trained["sbp_mae"])
    for _ in range(KEEP):  # the trained generation is dropped: an error, never other rows
        republish()
    with pytest.raises(BpfmError, match="is no longer kept"):
        evaluate(out, device="cpu")
