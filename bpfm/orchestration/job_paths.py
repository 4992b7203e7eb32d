"""Where a launch may keep its state when it runs on a Ray cluster.

`ray job submit --working-dir .` runs the driver in an unpacked copy of the submitter's folder on
the head node, with the head's environment, not the submitter's. A relative `.bpfm/` then lands in
that copy (deleted with the job, unseen by other nodes) and an exported MLFLOW_TRACKING_URI stays
behind on the submitter's machine: runs, shards, backbones and Tune state vanish silently. A job
refuses such a launch up front, in one line naming what to set."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from bpfm.errors import BpfmError

if TYPE_CHECKING:
    from bpfm.profiles import Profile

# A Ray job's working dir is unpacked under `<session>/runtime_resources/working_dir_files/`.
RAY_JOB_COPY_PART = "runtime_resources"
# Set on a cluster whose nodes all mount the same folders (NFS, EFS...): local paths are shared.
SHARED_FS_ENV = "BPFM_SHARED_FS"

HINT = (
    "set MLFLOW_TRACKING_URI to an MLflow server and --storage/--data (or BPFM_HOME) to s3:// or "
    "a folder every node mounts, e.g. ray job submit --runtime-env-json "
    "'{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"http://HOST:5000\"}}' ... --storage s3://BUCKET/ray"
)


def job_copy(cwd: str | Path | None = None) -> Path | None:
    """The unpacked working dir this process runs in when it is a Ray job's driver, else None."""
    cwd = Path(cwd or os.getcwd()).absolute()
    return cwd if RAY_JOB_COPY_PART in cwd.parts else None


def local_path(uri: str) -> Path | None:
    """The local folder or file a URI names (sqlite stores included), None for remote ones."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).absolute()
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://")).absolute()
    if "://" in uri:
        return None
    return Path(uri).expanduser().absolute()


def check_job_paths(
    paths: Mapping[str, str],
    *,
    on_cluster: bool,
    nodes: int,
    cwd: str | Path | None = None,
    shared_fs: bool | None = None,
) -> None:
    """Refuse `paths` (what -> URI) that a job on a cluster would lose: any local path inside the
    job's temporary copy of its working dir, and on a cluster of several nodes any local path at
    all (unless BPFM_SHARED_FS=1 says every node mounts it). A launch on its own local Ray
    (`on_cluster` False) may keep everything local."""
    if not on_cluster:
        return
    copy = job_copy(cwd)
    shared = os.environ.get(SHARED_FS_ENV) == "1" if shared_fs is None else shared_fs
    for what, uri in paths.items():
        path = local_path(uri)
        if path is None:
            continue
        if copy is not None and path.is_relative_to(copy):
            raise BpfmError(
                f"{what} {path} is inside this Ray job's temporary copy of its working dir "
                f"(deleted when the job ends): {HINT}"
            )
        if nodes > 1 and not shared:
            raise BpfmError(
                f"{what} {path} is a local path on a {nodes}-node Ray cluster (other nodes cannot "
                f"see it; {SHARED_FS_ENV}=1 if every node mounts it): {HINT}"
            )


def launch_paths(profile: Profile, tracking_uri: str) -> dict[str, str]:
    """What a grid launch keeps where: the MLflow store, Tune storage, shards and backbones."""
    paths = {"MLflow store (MLFLOW_TRACKING_URI)": tracking_uri,
             "Tune storage (--storage)": profile.storage, "data (--data)": profile.data.uri}
    if profile.pretrain is not None and "pretrained" in profile.axes.get("init", ()):
        for size in profile.axes["size"]:
            paths[f"{size} backbone (pretrain.checkpoint)"] = profile.pretrain.checkpoint_for(size)
    return paths
