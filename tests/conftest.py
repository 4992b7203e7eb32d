"""Fixtures shared across the suite: the real challenge2015 file, synthetic PulseDB and its shards,
and the real services (SeaweedFS S3, MLflow server) that integration tests run against."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHALLENGE2015_DEFAULT = (
    REPO_ROOT.parent / "shared" / "data" / "challenge2015" / "Challenge2015_Sample_Subset.mat"
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session", autouse=True)
def node_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Remote shard sets that tests read are cached in the session's temp folder (Ray workers
    inherit it), never in the user's ~/.cache."""
    saved = os.environ.get("BPFM_CACHE_DIR")
    os.environ["BPFM_CACHE_DIR"] = str(tmp_path_factory.mktemp("node-cache"))
    yield Path(os.environ["BPFM_CACHE_DIR"])
    if saved is None:
        os.environ.pop("BPFM_CACHE_DIR", None)
    else:
        os.environ["BPFM_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def challenge2015_file() -> Path:
    """The real ICU sample in PulseDB Subset layout (`BPFM_CHALLENGE2015` overrides the path).

    Under CI it must exist: a missing file fails instead of skipping."""
    path = Path(os.environ.get("BPFM_CHALLENGE2015", CHALLENGE2015_DEFAULT))
    if not path.is_file():
        message = f"real challenge2015 sample not found at {path} (set BPFM_CHALLENGE2015)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def synthetic_pulsedb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic PulseDB release (Subset, Subj_Wins and Info files), written once."""
    from bpfm.data.synth import SynthConfig, write_synthetic_pulsedb

    out = tmp_path_factory.mktemp("pulsedb")
    write_synthetic_pulsedb(out, SynthConfig(subjects=16, segments_per_subject=12, seed=7))
    return out


@pytest.fixture(scope="session")
def synthetic_subset_files(synthetic_pulsedb: Path) -> list[Path]:
    return sorted(synthetic_pulsedb.rglob("*_Subset.mat"))


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory, synthetic_subset_files) -> str:
    """Parquet shards of the synthetic Subset files in a local folder; returns the URI."""
    from bpfm.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards") / "pulsedb"
    write_shards(synthetic_subset_files, str(out))
    return str(out)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real SeaweedFS S3 server on free loopback ports, with credentials; stopped by PID."""
    from tests.services.s3 import start_seaweed_s3

    server = start_seaweed_s3(tmp_path_factory.mktemp("seaweed"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch):
    """Point boto3, pyarrow, Ray and MLflow at the test S3 server for one test."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, s3_server):
    """A real `mlflow server` on a free port: sqlite backend, artifacts proxied to the S3 server."""
    from tests.services.mlflow_server import start_mlflow_server

    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), s3_server)
    try:
        yield server
    finally:
        server.stop()
