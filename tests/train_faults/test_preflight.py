"""`bpfm grid` checks the tracking server, the shard set and Tune's storage before Ray or stage 0
start: an unreachable one is one line within seconds (issue 15, item 8; it used to hang ~5 min
after Ray and stage 0 ran, then end in an MlflowException traceback)."""

from __future__ import annotations

import socket

import pytest
import yaml

from bpfm.profiles import PROFILE_DIR
from tests.services.s3 import free_ports
from tests.train_faults.conftest import error_line, run_bpfm

pytestmark = pytest.mark.slow

HINT = "(check MLFLOW_TRACKING_URI and that the server runs)"


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def _launch(tmp_path, env: dict[str, str], data: str | None = None):
    raw = yaml.safe_load((PROFILE_DIR / "tiny.yaml").read_text())
    raw["data"]["uri"] = data or str(tmp_path / "shards")
    raw["storage"] = str(tmp_path / "ray-results")
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump(raw))
    result = run_bpfm("grid", "--profile", str(profile), timeout=120,
                      env={"BPFM_HOME": str(tmp_path / "home"), **env})
    # nothing ran: no shards synthesized, no Tune experiment, no Ray
    assert not (tmp_path / "shards").exists() and not (tmp_path / "ray-results").exists()
    assert "ray" not in result.stderr.lower()
    return profile, result


def test_a_silent_tracking_server_fails_in_seconds(tmp_path, silent_server):
    _, result = _launch(tmp_path, {"MLFLOW_TRACKING_URI": silent_server})
    line = error_line(result)
    expected = f"{silent_server}: MLflow tracking server: no answer within 5 s {HINT}"
    assert line == f"bpfm: error: {expected}"
    assert result.seconds < 60  # 5 s of waiting plus the imports of a loaded machine


def test_a_refused_tracking_server_and_its_credentials_in_one_redacted_line(tmp_path):
    (port,) = free_ports(1)
    uri = f"http://alice:pw-s3cret-42@127.0.0.1:{port}"
    _, result = _launch(tmp_path, {"MLFLOW_TRACKING_URI": uri})
    line = error_line(result)
    assert line == (
        f"bpfm: error: http://***@127.0.0.1:{port}: MLflow tracking server: connection refused "
        f"{HINT}"
    )
    assert "pw-s3cret-42" not in result.stderr + result.stdout


def test_an_s3_endpoint_that_never_answers_fails_the_data_check_in_seconds(tmp_path, silent_server):
    env = {"AWS_ENDPOINT_URL_S3": silent_server, "AWS_ACCESS_KEY_ID": "preflight",
           "AWS_SECRET_ACCESS_KEY": "preflight-secret", "AWS_REGION": "us-east-1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"}
    profile, result = _launch(tmp_path, env, data="s3://bpfm-preflight/shards")
    line = error_line(result)
    assert line == (
        f"bpfm: error: {profile}: data.uri: s3://bpfm-preflight/shards/_manifest.json: cannot "
        "reach the S3 endpoint (check AWS_ENDPOINT_URL_S3 and the network)"
    )
    assert result.seconds < 60  # pyarrow's own client waits ~100 s here
