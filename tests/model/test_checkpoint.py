"""Checkpoints: official Lightning layout, bpfm files, corrupt and mismatched files, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bpfm.errors import BpfmError
from bpfm.model import create_model, init_xavier, load_model, load_pretrained_backbone, save_model
from tests.model.conftest import official_state_dict, write_lightning_ckpt

X = torch.randn(3, 2, 1250, generator=torch.Generator().manual_seed(1))


def test_official_ckpt_loads_and_head_is_reordered_to_sbp_dbp(small_model, official_small_ckpt):
    report = load_pretrained_backbone(small_model, official_small_ckpt)
    assert report.missing == [] and report.unexpected == [] and report.skipped == []
    assert report.head_reordered and len(report.loaded) == 6 + 8 * 12 + 2 + 2
    state = official_state_dict(192, 8)
    assert torch.equal(
        small_model.encoder.blocks[7].mlp.fc2.weight, state["model.blocks.7.mlp.fc2.weight"]
    )
    with torch.no_grad():
        pooled = small_model.encoder(X).mean(dim=1)
        official = F.gelu(
            F.linear(pooled, state["model_head.mlp.0.fc.weight"], state["model_head.mlp.0.fc.bias"])
        )  # [DBP, SBP]
        out = small_model(X)
    torch.testing.assert_close(out, official[:, [1, 0]])
    assert (out[:, 0] > out[:, 1]).all()  # SBP ~120 first, DBP ~70 second


def test_pretraining_decoder_is_skipped_and_missing_head_reported(small_model, tmp_path):
    path = write_lightning_ckpt(
        tmp_path / "pre.ckpt", official_state_dict(192, 8, head=False, decoder=True)
    )
    report = load_pretrained_backbone(small_model, str(path))
    assert report.skipped == ["model_head.decoder_pred.weight", "model_head.decoder_pred.bias"]
    assert report.missing == ["head.fc.bias", "head.fc.weight"]
    assert not report.head_reordered


def test_unexpected_keys_and_data_parallel_prefix(small_model, tmp_path):
    state = {"module." + k: v for k, v in official_state_dict(192, 8).items()}
    state["module.model.extra_thing"] = torch.zeros(3)
    report = load_pretrained_backbone(
        small_model, write_lightning_ckpt(tmp_path / "dp.ckpt", state)
    )
    assert report.unexpected == ["encoder.extra_thing"] and report.missing == []


def test_head_of_another_kind_is_skipped_not_failed(official_small_ckpt):
    model = create_model("small", head="mlp", head_hidden=(32,))
    report = load_pretrained_backbone(model, official_small_ckpt)
    assert report.skipped == ["head.fc.weight", "head.fc.bias"]
    assert "head.fc.weight" in report.missing and "encoder.norm.weight" in report.loaded


def test_checkpoint_of_another_size_fails_before_loading(tmp_path):
    model = create_model("small")
    before = model.encoder.norm.weight.clone()
    path = write_lightning_ckpt(tmp_path / "medium.ckpt", official_state_dict(576, 2))
    with pytest.raises(BpfmError, match=r"checkpoint shape \[1, 1, 576\] != model shape") as err:
        load_pretrained_backbone(model, path)
    assert "\n" not in str(err.value)
    assert torch.equal(model.encoder.norm.weight, before)  # nothing half-loaded


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken zip"])
def test_corrupt_file_fails_with_one_line(small_model, tmp_path, content):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(BpfmError, match="corrupt (or not a )?checkpoint") as err:
        load_pretrained_backbone(small_model, path)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


def test_truncated_official_ckpt_fails(small_model, official_small_ckpt):
    data = official_small_ckpt.read_bytes()
    official_small_ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(BpfmError, match="corrupt"):
        load_pretrained_backbone(small_model, official_small_ckpt)


def test_missing_file_and_file_without_encoder(small_model, tmp_path):
    with pytest.raises(BpfmError, match="cannot read"):
        load_pretrained_backbone(small_model, tmp_path / "nope.ckpt")
    torch.save({"state_dict": {"other.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(BpfmError, match="no CEReBrO encoder weights"):
        load_pretrained_backbone(small_model, tmp_path / "other.ckpt")


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_save_load_round_trip_gives_equal_outputs(tmp_path, name):
    model = create_model("small", head="mlp", head_hidden=(16,)).eval()
    model.set_output_bias([0.0, 0.0])
    save_model(tmp_path / name, model, {"target_mean": [120.0, 70.0]})
    loaded, meta = load_model(tmp_path / name)
    assert meta["target_mean"] == [120.0, 70.0] and meta["model"]["head_hidden"] == [16]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(X), model(X))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


def test_bpfm_file_loads_as_backbone_and_folder_resolves(tmp_path):
    model = create_model("small")
    save_model(tmp_path, model)  # a folder gets model.safetensors
    fresh = create_model("small")
    report = load_pretrained_backbone(fresh, tmp_path)
    assert report.format == "safetensors" and report.missing == [] and not report.head_reordered
    assert torch.equal(fresh.encoder.patch_encoding, model.encoder.patch_encoding)


def test_load_model_of_other_size_file_fails_cleanly(tmp_path):
    save_model(tmp_path / "m.safetensors", create_model("small"))
    data = (tmp_path / "m.safetensors").read_bytes().replace(b'\\"small', b'\\"large')
    (tmp_path / "m.safetensors").write_bytes(data)
    with pytest.raises(BpfmError, match="another model size"):
        load_model(tmp_path / "m.safetensors")


def test_paper_head_output_bias_reaches_below_mean_with_standardised_targets(small_model):
    small_model.head.fc.weight.data.zero_()
    small_model.set_output_bias([0.0, 0.0])
    with torch.no_grad():
        assert small_model(X).abs().max() < 1e-3  # starts at the mean despite the GELU
        small_model.head.fc.bias.sub_(2.0)  # two std below the mean is reachable
        assert (small_model(X) < -1.9).all()
    small_model.set_output_bias([120.0, 70.0])  # raw mmHg: exactly the paper's head
    assert small_model.head.offset.tolist() == [0.0, 0.0]


def test_init_xavier_follows_the_paper_scheme():
    model = init_xavier(create_model("small"))
    enc = model.encoder
    assert enc.mask_token.abs().max() <= 0.02 and enc.patch_encoding.abs().max() <= 0.02
    assert enc.patch_encoding.std() > 0.005
    assert torch.equal(enc.blocks[0].norm1.weight, torch.ones(192))
    assert torch.equal(enc.blocks[3].attn.qkv.bias, torch.zeros(576))
    bound = math.sqrt(6 / (192 + 768))
    ratio = enc.blocks[7].mlp.fc2.weight.abs().max() / bound
    assert 0.95 / math.sqrt(16) < ratio <= 1 / math.sqrt(16)  # sqrt(2 * layer_id), layer_id 8
    assert model.head.fc.weight.std() < 0.025 and torch.equal(model.head.fc.bias, torch.zeros(2))


def test_s3_round_trip_and_backbone_from_s3(s3_env):
    uri = f"s3://{s3_env.bucket}/models/small/model.safetensors"
    model = create_model("small").eval()
    save_model(uri, model, {"note": "s3"})
    loaded, meta = load_model(uri)
    assert meta["note"] == "s3"
    with torch.no_grad():
        assert torch.equal(loaded.eval()(X), model(X))
    fresh = create_model("small")
    assert load_pretrained_backbone(fresh, uri).missing == []
    assert torch.equal(fresh.encoder.mask_token, model.encoder.mask_token)
    with pytest.raises(BpfmError, match="not found"):
        load_pretrained_backbone(fresh, f"s3://{s3_env.bucket}/models/none.ckpt")
