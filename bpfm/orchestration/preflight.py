"""Preflight of a grid launch: the MLflow tracking server, the shard set and Tune's storage
answer, checked before Ray or stage 0 start, each within seconds.

Without it an unreachable server surfaces late and slowly: MLflow's client retries a refused or
silent server for about 5 minutes (7 retries with backoff, 120 s timeouts), and pyarrow's S3
client waits about 100 s on an endpoint that accepts connections but never answers. Here every
request gets one try and TIMEOUT_S seconds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow.fs as pafs
import requests

from bpfm import tracking
from bpfm.data.shards import MANIFEST
from bpfm.errors import BpfmError
from bpfm.io import storage

if TYPE_CHECKING:
    from bpfm.profiles import Profile

TIMEOUT_S = 5
# requests' failures -> what went wrong (its own text is a page of urllib3's repr)
_TRACKING_HINTS = (
    (("Failed to resolve", "Name or service not known", "nodename nor servname"),
     "host name does not resolve"),
    (("Connection refused",), "connection refused"),
    (("No route to host",), "no route to host"),
    (("timed out", "Timeout"), f"no answer within {TIMEOUT_S} s"),
)


def check_launch(profile: Profile) -> None:
    """Every URI a launch of `profile` needs, before anything starts: one line for the first
    that fails."""
    check_tracking(tracking.configure())
    data = profile.data.uri
    found = _answers(storage.join(data, MANIFEST), f"{profile.path}: data.uri")
    if not found and profile.data.synthesize is None:  # else stage 0 makes it
        raise BpfmError(f"{profile.path}: data.uri: {data} has no {MANIFEST} (shard PulseDB "
                        "first: pipelines/shard.py or `bpfm data shard`)")
    check_writable(profile.storage, f"{profile.path}: storage")


def check_tracking(uri: str) -> None:
    """An http(s) tracking server answers MLflow's API; a sqlite store's folder can be made."""
    if uri.startswith(("http://", "https://")):
        _check_tracking_server(uri)
    elif uri.startswith("sqlite:///"):
        check_writable(str(Path(uri.removeprefix("sqlite:///")).parent), f"tracking {uri}")


def _check_tracking_server(uri: str) -> None:
    """Any answer of MLflow's REST API shows the server is there (its client checks the
    credentials later); plain `requests`, as MLflow's client, without importing MLflow (4 s)."""
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search"
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
    try:
        answer = requests.get(url, params={"max_results": 1}, timeout=(TIMEOUT_S, TIMEOUT_S),
                              verify=not insecure)
    except requests.RequestException as err:
        text = " ".join(str(err).split())
        hint = next((h for needles, h in _TRACKING_HINTS if any(n in text for n in needles)),
                    f"unreachable ({type(err).__name__})")
        raise BpfmError(f"{uri}: MLflow tracking server: {hint} (check MLFLOW_TRACKING_URI and "
                        "that the server runs)") from None
    if answer.status_code == 404 or answer.status_code >= 500:
        raise BpfmError(f"{uri}: MLflow tracking server: answers HTTP {answer.status_code} to "
                        "MLflow's API (not an MLflow server, or a broken one?)")


def check_writable(uri: str, what: str) -> None:
    """A local folder that exists (or can be made) and takes files; an S3 bucket that answers."""
    if not storage.is_local(uri):
        _answers(uri, what)
        return
    folder = Path(uri.removeprefix("file://")).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BpfmError(f"{what}: {folder}: cannot create ({err.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BpfmError(f"{what}: {folder}: not writable")


def _answers(uri: str, what: str) -> bool:
    """Whether `uri` exists; a storage that does not answer within TIMEOUT_S is an error."""
    if storage.is_local(uri) or not uri.startswith("s3://"):
        return storage.exists(uri)
    fs, path = _quick_s3(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as err:
        problem = storage.describe_error(uri, err)
        raise BpfmError(f"{what}: {problem}" if what else problem) from None


def _quick_s3(uri: str):
    """An S3 file system for `uri` (credentials and options as `pyarrow.fs.FileSystem.from_uri`
    reads them, or from the AWS_* environment) whose requests get one try and TIMEOUT_S."""
    parts = urlsplit(uri)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    endpoint = query.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3") \
        or os.environ.get("AWS_ENDPOINT_URL")
    options = {"region": query.get("region"), "endpoint_override": endpoint,
               "access_key": unquote(parts.username) if parts.username else None,
               "secret_key": unquote(parts.password) if parts.password else None}
    if "scheme" in query:
        options["scheme"] = query["scheme"]
    fs = pafs.S3FileSystem(
        **{k: v for k, v in options.items() if v is not None},
        connect_timeout=TIMEOUT_S, request_timeout=TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    return fs, f"{parts.hostname}{parts.path}".rstrip("/")
