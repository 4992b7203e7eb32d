"""The grid driver's AWS credentials leave its environment while Tune runs (Tune would copy them
into every trial's runtime_env) and live in a private file that boto3 reads, and that a killed
driver does not leave behind."""

import os
import signal
import subprocess
import sys
import textwrap

import botocore.session

from bpfm.orchestration.ray_grid import credentials_kept_from_trials

KEYS = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "kept-secret-42"}


def test_credentials_move_from_the_environment_to_a_file_boto3_reads(monkeypatch):
    for key, value in KEYS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SHARED_CREDENTIALS_FILE", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with credentials_kept_from_trials():
        assert not set(KEYS) & set(os.environ)
        path = os.environ["AWS_SHARED_CREDENTIALS_FILE"]
        credentials = botocore.session.Session().get_credentials()
        assert (credentials.access_key, credentials.secret_key) == tuple(KEYS.values())
        assert credentials.method == "shared-credentials-file"
    assert {k: os.environ[k] for k in KEYS} == KEYS
    assert "AWS_SHARED_CREDENTIALS_FILE" not in os.environ
    assert not os.path.exists(path)


def test_a_killed_driver_leaves_no_credentials_on_disk(tmp_path):
    driver = textwrap.dedent("""
        import os, sys, time
        from bpfm.orchestration.ray_grid import credentials_kept_from_trials
        with credentials_kept_from_trials():
            path = os.environ["AWS_SHARED_CREDENTIALS_FILE"]
            print(path, open(path).read().count("kept-secret-42"), flush=True)
            time.sleep(60)
    """)
    env = {**os.environ, **KEYS, "TMPDIR": str(tmp_path)}
    env.pop("AWS_SHARED_CREDENTIALS_FILE", None)
    process = subprocess.Popen([sys.executable, "-c", driver], env=env, stdout=subprocess.PIPE,
                               text=True)
    try:
        path, copies = process.stdout.readline().split()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert copies == "1"
    assert not os.path.exists(path)
    assert list(tmp_path.iterdir()) == []
