"""User mistakes that ended in tracebacks or unclear messages (issue 15, items 10 and 11): each is
exit 2 with one short line, before any training, and nothing already there is lost."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from bpfm.cli import main
from tests.train_faults.conftest import error_line, run_bpfm


class _RunsCode:
    def __reduce__(self):
        # exec, not print: Ray's tqdm replaces builtins.print in a process that imported it
        return (exec, ("print('this must never run')",))


def _in_process_error(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "weights_only" not in err
    lines = [line for line in err.splitlines() if line.startswith("bpfm: error: ")]
    assert len(lines) == 1, err
    return lines[0].removeprefix("bpfm: error: ")


def _train_args(data: str, out, *extra: str) -> list[str]:
    return ["train", "--data", data, "--epochs", "1", "--batch-size", "8",
            "--max-steps-per-epoch", "1", "--device", "cpu", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def model_dir(synthetic_shards, tmp_path_factory):
    """A finished one-epoch model dir (with its checkpoint) to damage copies of."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(_train_args(synthetic_shards, out)) == 0
    return out


def _copy(model_dir, tmp_path):
    return shutil.copytree(model_dir, tmp_path / "copy")


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ item 10


def test_negative_num_workers_is_one_line_from_a_real_process(synthetic_shards, tmp_path):
    result = run_bpfm(*_train_args(synthetic_shards, tmp_path / "run", "--num-workers", "-1"))
    assert error_line(result) == "bpfm: error: train: num_workers: must be >= 0, got -1"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda values: [1, 2], "not a mapping of TrainConfig fields (holds a list"),
        (lambda values: {**values, "head_hidden": "abc"},
         "head_hidden: should be a valid array, got 'abc'"),
        (lambda values: {**values, "epochs": "many"}, "epochs: should be a valid integer"),
    ],
    ids=["list", "head_hidden", "epochs"],
)
def test_a_hand_edited_config_json_is_one_line(model_dir, tmp_path, capsys, edit, problem):
    copy = _copy(model_dir, tmp_path)
    config = copy / "config.json"
    config.write_text(json.dumps(edit(json.loads(config.read_text()))))
    before = _files(copy)
    message = _in_process_error(capsys, "evaluate", "--model", str(copy))
    assert message.startswith(f"{config}: {problem}"), message
    message = _in_process_error(capsys, "quantize", "--model", str(copy), "--mode", "dynamic",
                                "--out", str(tmp_path / "q"))
    assert message.startswith(f"{config}: {problem}"), message
    assert _files(copy) == before and not (tmp_path / "q").exists()


def test_a_state_pt_without_its_config_is_one_line_and_stays(model_dir, synthetic_shards,
                                                             tmp_path, capsys):
    copy = _copy(model_dir, tmp_path)
    state_file = copy / "checkpoints" / "epoch-0001" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["config"]
    torch.save(state, state_file)
    before = _files(copy)
    message = _in_process_error(capsys, *_train_args(synthetic_shards, copy, "--epochs", "2"))
    assert message == f"{state_file}: config: missing (not a complete bpfm training checkpoint)"
    assert _files(copy) == before


# ------------------------------------------------------------------ item 11


@pytest.fixture(scope="module")
def shards_with_an_empty_test_view(tmp_path_factory):
    """A Train subset so small that the paper protocol's test band is empty for some split seed
    (train and validation are not); returns (URI, split seed)."""
    from bpfm.data.shards import write_shards
    from bpfm.data.synth import SynthConfig, write_synthetic_pulsedb
    from bpfm.training.evaluate import open_split, split_summary

    root = tmp_path_factory.mktemp("tiny-train")
    synth = write_synthetic_pulsedb(
        root / "pulsedb", SynthConfig(subjects=4, segments_per_subject=6, seed=1,
                                      sources=("mimic",))
    )
    uri = str(root / "shards")
    write_shards([p for p in synth.subset_files if p.name.startswith("Train")], uri)
    for seed in range(100):
        summary = split_summary(open_split(uri, "mimic", "paper", seed))
        if summary["n_test"] == 0 and summary["n_val"] and summary["n_train"]:
            return uri, seed
    raise AssertionError("no split seed leaves the test view empty")


def test_an_empty_test_view_fails_before_training_naming_uri_protocol_and_view(
    shards_with_an_empty_test_view, tmp_path
):
    uri, seed = shards_with_an_empty_test_view
    out = tmp_path / "run"
    result = run_bpfm(*_train_args(uri, out, "--split-seed", str(seed)))
    line = error_line(result)
    assert line.startswith(
        f"bpfm: error: {uri}: protocol paper, source mimic: the test view holds no segments ("
    ), line
    assert "epoch 1" not in result.stderr and not out.exists()  # no epoch was trained


@pytest.mark.parametrize("lr", ["inf", "nan", "0", "-1e-3"])
def test_a_learning_rate_that_is_not_positive_and_finite_is_refused(lr, synthetic_shards,
                                                                     tmp_path, capsys):
    message = _in_process_error(capsys, *_train_args(synthetic_shards, tmp_path, f"--lr={lr}"))
    assert message.startswith("train: lr: must be positive and finite, got ")
    assert not (tmp_path / "config.json").exists()


def test_a_checkpoint_holding_code_is_one_short_line_from_a_real_process(synthetic_shards,
                                                                         tmp_path):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": _RunsCode()}}, evil)
    result = run_bpfm(*_train_args(synthetic_shards, tmp_path / "run", "--init", "pretrained",
                                   "--checkpoint", str(evil)))
    line = error_line(result)
    assert line == (f"bpfm: error: {evil}: not a checkpoint: it holds Python code "
                    "(exec) that a safe load refuses to run")
    assert "this must never run" not in result.stdout + result.stderr
    assert "weights_only" not in result.stderr and "UserWarning" not in result.stderr


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda data: data[: len(data) // 2], "corrupt checkpoint: truncated or damaged"),
        (lambda data: b"\0garbage" * 64, "corrupt or not a checkpoint (UnpicklingError)"),
        (lambda data: pickle.dumps({"x": 1}, protocol=4)[:-1] + b"\x95",
         "corrupt or not a checkpoint"),
    ],
    ids=["truncated", "garbage", "bad-pickle"],
)
def test_a_corrupt_checkpoint_is_one_short_line(model_dir, synthetic_shards, tmp_path, capsys,
                                                damage, problem):
    backbone = tmp_path / "backbone.ckpt"
    good = (model_dir / "checkpoints" / "epoch-0001" / "state.pt").read_bytes()
    backbone.write_bytes(damage(good))
    args = _train_args(synthetic_shards, tmp_path / "a", "--init", "pretrained",
                       "--checkpoint", str(backbone))
    message = _in_process_error(capsys, *args)
    assert message.startswith(f"{backbone}: {problem}") and len(message) < len(str(backbone)) + 80
    # the same file as the state.pt a run resumes from
    copy = _copy(model_dir, tmp_path)
    state_file = copy / "checkpoints" / "epoch-0001" / "state.pt"
    shutil.copyfile(backbone, state_file)
    message = _in_process_error(capsys, *_train_args(synthetic_shards, copy, "--epochs", "2"))
    assert message.startswith(f"{state_file}: {problem}")
