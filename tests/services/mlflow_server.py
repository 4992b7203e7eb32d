"""A real `mlflow server` for tests, started through the project's own launcher (`mlflow/serve.sh`):
sqlite backend, artifacts proxied to the SeaweedFS S3 server, loopback on a free port, stopped by
its process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.services.s3 import free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 120.0  # ~4 s alone; a busy 2-core machine is much slower


@dataclass
class MLflowServer:
    uri: str
    backend_uri: str
    artifacts_destination: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server's process group (the one we started, by its PID)."""
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if self.process.poll() is not None:
                return
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_mlflow_server(workdir: str | Path, s3_server=None, prefix: str = "mlflow"
                        ) -> MLflowServer:
    """Start the tracking server; with an S3 server, artifacts go to s3://<bucket>/<prefix>."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    backend = f"sqlite:///{workdir / 'mlflow.db'}"
    artifacts = (
        f"s3://{s3_server.bucket}/{prefix}" if s3_server is not None else str(workdir / "artifacts")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    if s3_server is not None:
        env.update(s3_server.env())
    env.update({
        "MLFLOW": str(Path(sys.executable).parent / "mlflow"),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_BACKEND_STORE_URI": backend,
        "MLFLOW_ARTIFACTS_DESTINATION": artifacts,
    })
    log_path = workdir / "mlflow-server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["bash", str(REPO_ROOT / "mlflow" / "serve.sh")],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    server = MLflowServer(f"http://127.0.0.1:{port}", backend, artifacts, process, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({process.returncode}):\n{server.log_tail()}")
        if _healthy(server.uri):
            return server
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(
        f"mlflow server not ready after {READY_TIMEOUT_S:.0f} s:\n{server.log_tail()}"
    )
