"""Fixtures for the reader tests: small synthetic releases and the ground truth behind them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bpfm.data.synth import SynthConfig, iter_subjects, write_synthetic_pulsedb

SMALL = SynthConfig(subjects=4, segments_per_subject=6, seed=5)


@pytest.fixture(scope="session")
def small_config() -> SynthConfig:
    return SMALL


@pytest.fixture(scope="session")
def small_release(tmp_path_factory: pytest.TempPathFactory):
    """Subj_Wins + Info files, and Subset files built from them by generate_subsets."""
    return write_synthetic_pulsedb(tmp_path_factory.mktemp("release"), SMALL)


@pytest.fixture(scope="session")
def small_truth() -> list:
    """What synth rendered for SMALL, subject by subject (sorted by name)."""
    return list(iter_subjects(SMALL))


@pytest.fixture(scope="session")
def small_subsets(small_release) -> dict[str, Path]:
    return {p.name.removesuffix("_Subset.mat"): p for p in small_release.subset_files}


@pytest.fixture
def subset_copy(tmp_path: Path, small_subsets) -> Path:
    """A private, editable copy of the synthetic AAMI_Cal Subset file."""
    target = tmp_path / "AAMI_Cal_Subset.mat"
    shutil.copyfile(small_subsets["AAMI_Cal"], target)
    return target


@pytest.fixture
def subj_wins_copy(tmp_path: Path, small_release) -> Path:
    """A private, editable copy of one synthetic Subj_Wins file (a VitalDB subject)."""
    source = next(p for p in small_release.segment_files if p.parent.name == "PulseDB_Vital")
    target = tmp_path / "PulseDB_Vital" / source.name
    target.parent.mkdir()
    shutil.copyfile(source, target)
    return target
