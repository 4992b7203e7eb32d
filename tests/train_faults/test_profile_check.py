"""A profile's `train:`, `quantize:`, `resources:` and `quantize_options:` sections (and a
`--recipe` file) are checked before anything starts, by `--dry-run` too (issue 15, item 7)."""

from __future__ import annotations

import copy

import pytest
import yaml

from bpfm.cli import main
from bpfm.profiles import PROFILE_DIR
from tests.train_faults.conftest import error_line, run_bpfm

TINY = yaml.safe_load((PROFILE_DIR / "tiny.yaml").read_text())


def _profile(tmp_path, **sections) -> str:
    raw = copy.deepcopy(TINY)
    raw.update(data={**raw["data"], "uri": str(tmp_path / "shards")},
               storage=str(tmp_path / "ray-results"))
    for section, value in sections.items():
        raw[section] = value if not isinstance(value, dict) else {**raw.get(section, {}), **value}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _in_process_error(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("bpfm: error:")]
    assert len(lines) == 1, err
    return lines[0].removeprefix("bpfm: error: ")


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"train": {"lrr": 1.0e-3}}, "train.lrr: unknown key (did you mean 'lr'?)"),
        ({"quantize": {"q": {"mode": "int4"}}}, "quantize.q.mode: unknown 'int4' (valid: "),
    ],
)
def test_dry_run_of_a_bad_profile_is_one_line_from_a_real_process(tmp_path, sections, expected):
    path = _profile(tmp_path, **sections)
    line = error_line(run_bpfm("grid", "--profile", path, "--dry-run"))
    assert line.startswith(f"bpfm: error: {path}: {expected}"), line


def test_a_real_launch_of_a_bad_profile_fails_before_ray_or_stage_0(tmp_path):
    path = _profile(tmp_path, train={"batch_size": "eight"})
    result = run_bpfm("grid", "--profile", path, env={"BPFM_HOME": str(tmp_path / "home")})
    line = error_line(result)
    assert line == f"bpfm: error: {path}: train.batch_size: should be a valid integer, got 'eight'"
    # nothing started: no shards synthesized (stage 0), no Tune storage, no MLflow store, no Ray
    assert not (tmp_path / "shards").exists() and not (tmp_path / "ray-results").exists()
    assert not (tmp_path / "home").exists()
    assert "ray" not in result.stderr.lower()


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"train": {"lr": "1e-3"}}, "train.lr: should be a valid number, got '1e-3' (YAML reads "
                                    "1e-3 without a dot as text: write 1.0e-3)"),
        ({"train": {"head_hidden": [64, "x"]}}, "train.head_hidden.1: should be a valid integer"),
        ({"train": {"schedule": "cosinus"}}, "train.schedule: unknown 'cosinus'"),
        ({"train": {"lr": -1.0}}, "train.lr: must be positive and finite, got -1.0"),
        ({"train": {"size": "large"}}, "train.size: set by the grid (axes, data.uri)"),
        ({"train": ["lr"]}, "train: must be a mapping"),
        ({"quantize": {"q": {"observr": "minmax"}}},
         "quantize.q.observr: unknown key (did you mean 'observer'?)"),
        ({"quantize": {"q": {"calib_batches": 0}}}, "quantize.q.calib_batches: must be >= 1"),
        ({"resources": {"small": {"cpu": "two"}}},
         "resources.small.cpu: should be a valid number, got 'two'"),
        ({"resources": {"huge": {"cpu": 1}}}, "resources.huge: unknown size"),
        ({"resources": {"small": {"gpus": 1}}},
         "resources.small.gpus: unknown key (did you mean 'gpu'?)"),
        ({"resources": {"small": {"gpu": -0.5}}}, "resources.small.gpu: must be >= 0"),
        ({"quantize_options": {"thread": 2}},
         "quantize_options.thread: unknown key (did you mean 'threads'?)"),
        ({"quantize_options": {"latency_runs": "many"}},
         "quantize_options.latency_runs: should be a valid integer, got 'many'"),
        ({"quantize_options": {"threads": 0}}, "quantize_options.threads: must be >= 1"),
    ],
)
def test_every_section_is_checked_by_dry_run(tmp_path, capsys, sections, expected):
    path = _profile(tmp_path, **sections)
    message = _in_process_error(capsys, "grid", "--profile", path, "--dry-run")
    assert message.startswith(f"{path}: {expected}"), message


def test_a_recipe_file_is_checked_and_named(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  weight_decay: lots\n")
    message = _in_process_error(capsys, "grid", "--profile", "tiny", "--dry-run",
                                "--recipe", str(recipe))
    assert message == f"{recipe}: train.weight_decay: should be a valid number, got 'lots'"
    recipe.write_text("train:\n  optimizer: sgd\n")
    message = _in_process_error(capsys, "grid", "--profile", "tiny", "--dry-run",
                                "--recipe", str(recipe))
    assert message.startswith(f"{recipe}: train.optimizer: unknown 'sgd'")


def test_the_shipped_profiles_pass(capsys):
    for name in ("demo", "paper", "nightly", "tiny"):
        assert main(["grid", "--profile", name, "--dry-run"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ({"backend": "executorch", "mode": "int4"}, "export: mode: unsupported 'int4'"),
        ({"backend": "onnxruntime", "mode": "static", "observer": "histogram"},
         "export: observer: unknown 'histogram' for onnx"),
        ({"backend": "executorch", "calib_batchez": 4}, "calib_batchez: not an export field"),
    ],
)
def test_runtime_variants_are_checked_as_exports(tmp_path, capsys, variant, expected):
    path = _profile(tmp_path, quantize={"deploy": variant})
    line = _in_process_error(capsys, "grid", "--profile", path, "--dry-run")
    assert line.startswith(f"{path}: quantize.deploy: {expected}"), line


def test_the_paper_profile_with_its_runtime_variants_passes_the_checks(capsys):
    assert main(["grid", "--profile", "paper", "--dry-run"]) == 0
    assert "14 variants each" in capsys.readouterr().out
