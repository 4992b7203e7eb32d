"""A real Ray head for tests: `ray start --head --block` from the project's environment, every port
chosen free on loopback, token authentication on with a token of its own, a short temp dir (Ray's
socket paths must stay under 108 characters), stopped by its process group (never `ray stop`,
which stops every Ray on the host)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.services.s3 import free_ports

READY_TIMEOUT_S = 180.0


@dataclass
class RayHead:
    gcs_address: str
    dashboard_url: str
    token: str
    temp_dir: Path
    process: subprocess.Popen
    log_path: Path

    def client_env(self) -> dict[str, str]:
        """What a driver or the `ray job` CLI needs to talk to this head (token auth)."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
        }

    def session_logs(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to the head's own process group (GCS, raylet, workers)."""
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        try:  # stragglers that left the group (none expected) still share it: one more sweep
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _ready(url: str, token: str) -> bool:
    headers = {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(f"{url}/api/jobs/", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return response.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def start_ray_head(workdir: str | Path, *, num_cpus: int = 2,
                   env: dict[str, str] | None = None) -> RayHead:
    """Start the head; `env` is added to its environment (and so to every job it runs)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = ("gcs", "dashboard", "client", "node_manager", "object_manager", "agent_listen",
             "agent_grpc", "runtime_env_agent", "metrics")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    temp_dir = Path(f"/tmp/ray-{secrets.token_hex(3)}")
    token = secrets.token_hex(16)
    bin_dir = Path(sys.executable).parent
    head_env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    head_env.pop("RAY_ADDRESS", None)
    command = [
        str(bin_dir / "ray"), "start", "--head", "--block",
        f"--num-cpus={num_cpus}", "--num-gpus=0",
        "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client']}",
        f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
        f"--dashboard-agent-listen-port={ports['agent_listen']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env_agent']}",
        f"--metrics-export-port={ports['metrics']}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    log_path = workdir / "ray-head.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=workdir, env=head_env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    head = RayHead(f"127.0.0.1:{ports['gcs']}", f"http://127.0.0.1:{ports['dashboard']}", token,
                   temp_dir, process, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            head.stop()
            raise RuntimeError(f"ray head exited ({process.returncode}):\n{head.log_tail()}")
        if _ready(head.dashboard_url, token):
            return head
        time.sleep(1.0)
    head.stop()
    raise RuntimeError(f"ray head not ready after {READY_TIMEOUT_S:.0f} s:\n{head.log_tail()}")
