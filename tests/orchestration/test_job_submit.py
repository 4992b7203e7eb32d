"""The cluster path end to end: `ray start --head` (project environment, free ports, token auth),
`ray job submit --working-dir . -- python pipelines/grid.py --profile tiny`, the MLflow server and
S3; then no secret (S3 secret key, Ray token) may appear in the job's logs, Ray's logs, the MLflow
store or the objects written to S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services.ray_head import start_ray_head

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _last_json_line(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in the job's output:\n{text[-3000:]}")


def _read_tree(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_job_submit_runs_the_grid_and_no_secret_leaks(tmp_path, s3_server, mlflow_server):
    """The README's recipe: the head has the S3 keys, the submitter's MLflow server and state
    folder travel with the job (`--runtime-env-json` env_vars). Submitted without them, the job
    refuses in one line instead of writing into its temporary copy of the working dir."""
    head = start_ray_head(tmp_path / "head", env=s3_server.env())
    job_env = {
        "MLFLOW_TRACKING_URI": mlflow_server.uri,
        "BPFM_HOME": str(tmp_path / "home"),
        "BPFM_STORAGE": f"s3://{s3_server.bucket}/jobs",
        "BPFM_STUDY": "orch-job",
    }
    try:
        cli_env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "BPFM_"))}
        cli_env.update(head.client_env())
        ray_cli = str(Path(sys.executable).parent / "ray")
        job = ["--", "python", "pipelines/grid.py", "--profile", "tiny", "--json"]
        refused = subprocess.run([ray_cli, "job", "submit", "--working-dir", ".", *job],
                                 cwd=REPO, env=cli_env, capture_output=True, text=True,
                                 timeout=600)
        submit = subprocess.run(
            [ray_cli, "job", "submit", "--working-dir", ".",
             "--runtime-env-json", json.dumps({"env_vars": job_env}), *job],
            cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=900,
        )
        ray_logs = _read_tree(head.session_logs())
    finally:
        head.stop()
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0, said[-3000:]
    error = [line for line in said.splitlines() if line.startswith("bpfm: error:")]
    assert len(set(error)) == 1 and "temporary copy of its working dir" in error[0], said[-3000:]
    assert "MLFLOW_TRACKING_URI" in error[0] and "--runtime-env-json" in error[0]
    assert "Traceback" not in said
    output = submit.stdout + submit.stderr
    (tmp_path / "job-output.log").write_text(output)
    assert submit.returncode == 0, output[-4000:]
    result = _last_json_line(submit.stdout)
    assert result["errors"] == [] and result["n_cells"] == 2
    assert result["tune_path"] == f"s3://{s3_server.bucket}/jobs/orch-job"
    assert len(result["quantized"]) == 2

    s3 = s3_server.client()
    objects = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=s3_server.bucket) for o in page.get("Contents", [])]
    assert any(k.startswith("jobs/orch-job/") for k in objects)
    stored = b"".join(s3.get_object(Bucket=s3_server.bucket, Key=k)["Body"].read()
                      for k in objects if k.startswith(("mlflow/", "jobs/")))
    mlflow_db = Path(mlflow_server.backend_uri.removeprefix("sqlite:///")).read_bytes()
    for secret in (s3_server.secret_key, head.token):
        encoded = secret.encode()
        assert encoded not in output.encode(), "secret in the job's output"
        leaking = [name for name, data in ray_logs.items() if encoded in data]
        assert not leaking, f"secret in Ray's session logs: {leaking}"
        assert encoded not in mlflow_db, "secret in the MLflow store"
        assert encoded not in stored, "secret in an S3 object"
