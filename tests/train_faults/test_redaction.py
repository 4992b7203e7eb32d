"""One redaction (`bpfm.io.redact`) wherever a URI is printed or logged: credentials written inside
a URI never reach an error line, a log line, a result or MLflow (issue 15, item 9)."""

from __future__ import annotations

import logging

import pytest

from bpfm import tracking
from bpfm.errors import BpfmError, DataError
from bpfm.io import storage
from bpfm.io.redact import RedactingFormatter, redact
from tests.services.s3 import free_ports
from tests.train_faults.conftest import error_line, run_bpfm

KEY, SECRET = "AKIAFAKEKEY0042", "wJalr/XUtnF+EMI-K7MDENG"  # AWS secrets may hold '/' and '+'
URI = f"s3://{KEY}:{SECRET}@bpfm-redact/shards"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (URI, "s3://***@bpfm-redact/shards"),
        ("http://user:pass@host:5000/x", "http://***@host:5000/x"),
        ("postgresql://bp@db/mlflow and s3://k:s@b/p", "postgresql://***@db/mlflow and s3://***@b/p"),
        ("s3://bucket/a@b/c", "s3://bucket/a@b/c"),  # an '@' in a key is no credential
        ("https://h/x?token=abc&region=eu", "https://h/x?token=***&region=eu"),
        ("/local/path: not found", "/local/path: not found"),
    ],
)
def test_redact_masks_credentials_inside_uris(text, expected):
    assert redact(text) == expected


def test_errors_log_lines_and_secrets_from_the_environment_are_redacted(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value-77")
    assert str(BpfmError(f"{URI}: bad")) == "s3://***@bpfm-redact/shards: bad"
    error = DataError(URI, "ecg", "env-secret-value-77")
    assert str(error) == "s3://***@bpfm-redact/shards: ecg: ***"
    record = logging.LogRecord("bpfm", logging.INFO, __file__, 1, "reading %s", (URI,), None)
    assert RedactingFormatter("%(message)s").format(record) == "reading s3://***@bpfm-redact/shards"
    # any process that imports bpfm (a Ray trial, a worker pool): bpfm's records come redacted
    made = logging.getLogger("bpfm.tests").makeRecord(
        "bpfm.tests", logging.INFO, __file__, 1, "reading %s", (URI,), None
    )
    assert made.getMessage() == "reading s3://***@bpfm-redact/shards"
    error = storage.describe_error(URI, OSError("AWS Error ACCESS_DENIED"))
    assert SECRET not in error and KEY not in error


PLAIN_SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCY"  # URL-safe: pyarrow parses it and goes to the network
PLAIN_URI = f"s3://{KEY}:{PLAIN_SECRET}@bpfm-redact/shards"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "secret", "problem"),
    [
        (("data", "inspect", PLAIN_URI), PLAIN_SECRET, "cannot reach the S3 endpoint"),
        (("train", "--data", PLAIN_URI, "--epochs", "1", "--device", "cpu", "--out", "{out}"),
         PLAIN_SECRET, "cannot reach the S3 endpoint"),
        (("data", "shard", "{input}", "--out", URI), SECRET, "Cannot parse URI"),
    ],
    ids=["inspect", "train", "shard"],
)
def test_error_lines_of_real_commands_hold_no_inline_credentials(
    args, secret, problem, synthetic_pulsedb, tmp_path
):
    (port,) = free_ports(1)  # nothing listens: every S3 request is refused
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "unused", "AWS_SECRET_ACCESS_KEY": "unused-too"}
    args = [a.format(input=synthetic_pulsedb, out=tmp_path / "run") for a in args]
    result = run_bpfm(*args, env=env, timeout=180)
    line = error_line(result)
    assert "s3://***@bpfm-redact/shards" in line and problem in line, line
    assert secret not in result.stderr + result.stdout
    assert KEY not in result.stderr + result.stdout


def test_mlflow_params_and_tags_of_a_grid_and_its_cells_hold_no_inline_credentials(tmp_path):
    from bpfm.orchestration.grid import TrialPlan
    from bpfm.orchestration.stages import CellLogger, TrialContext, train_config

    client = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracking.ensure_experiment(client, "redaction")
    storage_uri = f"s3://{KEY}:{SECRET}@bpfm-redact/ray-results"
    grid_run = tracking.start_grid_run(
        client, experiment, name="grid", resume=False,
        tags={tracking.KIND: "grid", tracking.TUNE_PATH: storage_uri},
        params={"data": URI, "storage": storage_uri},
    )
    trial = TrialPlan("small", "unfrozen", "xavier", "mimic", "paper", 42, (1,))
    ctx = TrialContext(data=URI, train={}, tracking_uri=client.tracking_uri,
                       experiment_id=experiment, parent_run_id=grid_run,
                       study="redaction")
    train = train_config(trial.tune_config(), ctx, tmp_path / "out").to_dict()
    CellLogger(ctx, trial, train, "trial-1", "node-1")
    runs = client.search_runs([experiment])
    assert len(runs) == 2
    recorded = " ".join(v for r in runs for v in (*r.data.params.values(), *r.data.tags.values()))
    assert SECRET not in recorded and KEY not in recorded
    assert {r.data.params["data"] for r in runs} == {"s3://***@bpfm-redact/shards"}
