"""The grid's calibration axis and named backbones: a profile lists calibration methods that every
cell reports (cells are not multiplied), and stage 0 plans one in-domain backbone per size, source
and protocol, each trial resolving its own (no Ray)."""

from __future__ import annotations

import pytest
import yaml

from bpfm.errors import BpfmError
from bpfm.orchestration.backbones import backbone_jobs, backbone_key
from bpfm.orchestration.grid import plan_grid
from bpfm.orchestration.stages import TrialContext, train_config
from bpfm.profiles import PROFILE_DIR, load_profile


def _profile(tmp_path, **axes):
    raw = yaml.safe_load((PROFILE_DIR / "demo.yaml").read_text())
    raw["axes"].update(axes)
    raw["pretrain"]["checkpoint"] = str(tmp_path / "backbones" / "cerebro-{size}.ckpt")
    path = tmp_path / "calib.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_profile(str(path))


def test_calibration_axis_reaches_every_cell_without_multiplying_cells(tmp_path):
    plain = _profile(tmp_path)
    profile = _profile(tmp_path, calibration=["none", "offset", "affine", "head"])
    assert len(plan_grid(profile).cells) == len(plan_grid(plain).cells)
    assert profile.train["calibration"] == ["offset", "affine", "head"]
    cell = plan_grid(profile).cells[0]
    ctx = TrialContext(data="shards", train={**profile.train, "calib_windows": 3},
                       tracking_uri="", experiment_id="", parent_run_id="", study="s",
                       pretrained={backbone_key(cell.init, cell.size, cell.source,
                                                cell.protocol): "backbone.ckpt"})
    config = train_config({**cell.axes(), "trial": "t"}, ctx, tmp_path / "out")
    assert config.calibration == ("offset", "affine", "head") and config.calib_windows == 3
    with pytest.raises(BpfmError, match="axes.calibration: unknown value 'cuff'"):
        _profile(tmp_path, calibration=["cuff"])


def test_stage0_plans_one_in_domain_backbone_per_size_source_and_protocol(tmp_path):
    profile = _profile(tmp_path, init=["pretrained", "pretrained_ecgppg",
                                       "pretrained_eeg_then_ecgppg", "xavier"],
                       protocol=["paper", "calfree"])
    cells = plan_grid(profile).cells
    jobs = backbone_jobs(profile.pretrain, cells, "s3://b/shards", split_seed=7)
    eeg = str(tmp_path / "backbones" / "cerebro-small.ckpt")
    assert [j.key for j in jobs][0] == "small" and jobs[0].spec["out"] == eeg
    domain = {j.key: j for j in jobs[1:]}
    # 2 in-domain inits x 2 sources x 2 protocols, whatever the freeze / epochs / seed axes
    assert len(domain) == 8
    job = domain[backbone_key("pretrained_eeg_then_ecgppg", "small", "vitaldb", "calfree")]
    assert job.spec["init_checkpoint"] == eeg and job.after == ("small",)
    assert job.spec["out"].endswith("cerebro-small-eeg-then-ecgppg-vitaldb-calfree.ckpt")
    assert (job.spec["data"], job.spec["source"], job.spec["protocol"], job.spec["split_seed"]) \
        == ("s3://b/shards", "vitaldb", "calfree", 7)
    scratch = domain[backbone_key("pretrained_ecgppg", "small", "mimic", "paper")]
    assert "init_checkpoint" not in scratch.spec and not scratch.after

    ctx = TrialContext(data="shards", train=profile.train, tracking_uri="", experiment_id="",
                       parent_run_id="", study="s",
                       pretrained={j.key: j.spec["out"] for j in jobs})
    for cell in cells:
        config = train_config(cell.axes(), ctx, tmp_path / "out")
        expected = None if cell.init == "xavier" else ctx.pretrained[
            backbone_key(cell.init, cell.size, cell.source, cell.protocol)]
        assert config.checkpoint == expected
