"""SimMIM pretraining: masking, loss, inputs (synthetic, EDF, npz) and the checkpoint it writes."""

from __future__ import annotations

import json

import edfio
import numpy as np
import pytest
import torch

from bpfm.cli import main
from bpfm.errors import BpfmError, DataError
from bpfm.model import create_model, load_pretrained_backbone
from bpfm.training.pretrain import PretrainConfig, load_windows, random_mask, read_edf, simmim_loss


def write_edf(path, signals: np.ndarray, rate: int, labels: list[str]) -> None:
    """A plain EDF (edfio): int16 samples, physical range +-500 uV."""
    edfio.Edf(
        [
            edfio.EdfSignal(
                x, rate, label=label, physical_dimension="uV", physical_range=(-500, 500)
            )
            for x, label in zip(signals, labels, strict=True)
        ]
    ).write(path)


def test_random_mask_hides_three_quarters_per_sample():
    mask = random_mask((5, 2, 19), 0.75, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 2, 19)
    assert mask.view(5, -1).sum(dim=1).tolist() == [28] * 5  # round(0.75 * 38)
    assert not torch.equal(mask[0], mask[1])


def test_loss_weights_visible_tokens_by_alpha():
    x = torch.zeros(1, 1, 128)
    mask = torch.tensor([[[True, False]]])
    pred = torch.zeros(1, 1, 2, 64)
    pred[0, 0, 0] = 2.0  # masked token error: smooth-L1 of 2 = 1.5
    pred[0, 0, 1] = 3.0  # visible token error: 2.5
    assert simmim_loss(pred, x, mask, 0.1).item() == pytest.approx(1.5 + 0.25)


def test_edf_reader_returns_physical_values_and_pretraining_uses_them(tmp_path):
    rate = 250
    t = np.arange(8 * rate) / rate
    signals = np.stack([100 * np.sin(2 * np.pi * f * t) for f in (6, 10, 20)])
    write_edf(tmp_path / "rec.edf", signals, rate, ["Fp1", "Fp2", "Cz"])
    read = read_edf((tmp_path / "rec.edf").read_bytes(), "rec.edf")
    assert [label for label, _, _ in read] == ["Fp1", "Fp2", "Cz"]
    assert read[1][1] == 250.0
    np.testing.assert_allclose(read[1][2], signals[1], atol=0.02)
    windows = load_windows(PretrainConfig(out="-", eeg=str(tmp_path), channels=2, window=256))
    assert windows.shape == (3, 2, 256)  # 8 s resampled to 125 Hz: 1000 samples -> 3 windows
    np.testing.assert_allclose(windows.std(axis=-1), 1.0, rtol=1e-4)


def test_npz_and_parquet_windows_and_bad_inputs(tmp_path):
    np.savez(tmp_path / "w.npz", x=np.random.default_rng(0).normal(size=(6, 4, 512)))
    assert load_windows(
        PretrainConfig(out="-", eeg=str(tmp_path / "w.npz"), channels=3, window=448)
    ).shape == (6, 3, 448)
    with pytest.raises(DataError, match="need"):
        load_windows(PretrainConfig(out="-", eeg=str(tmp_path / "w.npz"), channels=5, window=64))
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = np.random.default_rng(1).normal(size=(5, 2, 128)).tolist()
    pq.write_table(pa.table({"x": rows}), tmp_path / "w.parquet")
    assert load_windows(
        PretrainConfig(out="-", eeg=str(tmp_path / "w.parquet"), channels=2, window=128)
    ).shape == (5, 2, 128)
    (tmp_path / "junk.edf").write_bytes(b"garbage" * 50)
    with pytest.raises(DataError, match="not an EDF file"):
        load_windows(PretrainConfig(out="-", eeg=str(tmp_path / "junk.edf"), window=64))


def test_pretraining_loss_falls_and_checkpoint_loads_as_backbone(tmp_path, capsys):
    out = tmp_path / "pre.ckpt"
    code = main(
        [
            "pretrain",
            "--out",
            str(out),
            "--size",
            "small",
            "--synthetic",
            "--steps",
            "30",
            "--channels",
            "3",
            "--window",
            "384",
            "--batch-size",
            "4",
            "--lr",
            "2e-3",
            "--log-every",
            "10",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["last_loss"] < 0.8 * result["first_loss"]
    raw = torch.load(out, weights_only=True)
    assert raw["state_dict"]["model_head.decoder_pred.weight"].shape == (64, 192)
    assert raw["state_dict"]["model.patch_embed.patch_embed.proj.weight"].shape == (192, 1, 1, 64)
    model = create_model("small")
    report = load_pretrained_backbone(model, out)
    assert report.skipped == ["model_head.decoder_pred.weight", "model_head.decoder_pred.bias"]
    assert report.missing == ["head.fc.bias", "head.fc.weight"] and report.unexpected == []
    assert torch.equal(model.encoder.mask_token, raw["state_dict"]["model.mask_token"])


def test_pretrain_rejects_impossible_settings(tmp_path):
    with pytest.raises(BpfmError, match="1..100 patches"):
        from bpfm.training.pretrain import pretrain

        pretrain(PretrainConfig(out=str(tmp_path / "x.ckpt"), window=32, steps=1))


def test_pretrain_on_shards_reads_only_the_train_views_ecg_ppg_windows(synthetic_shards, tmp_path):
    from bpfm.data.loader import view_size
    from bpfm.training.evaluate import open_split
    from bpfm.training.pretrain import pretrain

    split = open_split(synthetic_shards, "mimic", "calfree")
    subjects = {name: set(getattr(split, name).read(["subject"])["subject"].to_pylist())
                for name in ("train", "val", "test")}
    n_train = view_size(split.train)
    out = tmp_path / "ecgppg.ckpt"
    result = pretrain(PretrainConfig(
        out=str(out), data=synthetic_shards, source="mimic", protocol="calfree",
        steps=n_train // 16 + 2, batch_size=16, device="cpu", log_every=100,
    ))  # more than one pass over the train view
    assert result.windows == n_train
    assert set(result.subjects) == subjects["train"]
    assert not set(result.subjects) & (subjects["val"] | subjects["test"])
    saved = torch.load(out, weights_only=True)
    assert saved["hyper_parameters"]["channels"] == 2
    assert saved["hyper_parameters"]["window"] == 1250
    model = create_model("small")
    assert load_pretrained_backbone(model, out).loaded  # usable as --init pretrained_ecgppg


def test_pretrain_continues_an_eeg_backbone_on_ecg_ppg(synthetic_shards, tmp_path, capsys):
    from bpfm.training.pretrain import pretrain

    eeg = tmp_path / "eeg.ckpt"
    pretrain(PretrainConfig(out=str(eeg), steps=1, batch_size=2, synthetic_windows=4,
                            device="cpu"))
    out = tmp_path / "eeg_then_ecgppg.ckpt"
    args = ["pretrain", "--out", str(out), "--data", synthetic_shards, "--source", "mimic",
            "--protocol", "calfree", "--init-checkpoint", str(eeg), "--steps", "1",
            "--batch-size", "2", "--lr", "1e-12", "--device", "cpu", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 1
    before = torch.load(eeg, weights_only=True)["state_dict"]
    after = torch.load(out, weights_only=True)["state_dict"]
    encoder = [k for k in before if k.startswith("model.")]
    assert encoder and all(torch.allclose(before[k], after[k], atol=1e-6) for k in encoder)
    assert main([*args[:-1], "--init-checkpoint", str(tmp_path / "absent.ckpt")]) == 2
