"""Helpers of the orchestration tests: a test profile written on the fly, a local Ray instance per
module (short temp dir, token auth with a token of its own), and reading Tune's saved state."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import yaml

# The smallest grid that still exercises every stage: the real `small` model, one optimizer step
# per epoch on the session's synthetic shards.
BASE_PROFILE = {
    "study": "test",
    "data": {"uri": ""},
    "storage": "",
    "axes": {"size": ["small"], "freeze": ["frozen", "unfrozen"], "epochs": [1, 2],
             "init": ["xavier"], "source": ["mimic"], "protocol": ["paper"], "seed": [42]},
    "train": {"lr": 1.0e-3, "batch_size": 8, "eval_batch_size": 64, "max_steps_per_epoch": 1,
              "keep_checkpoints": 1},
    "resources": {"small": {"cpu": 1}},
    "tune": {"max_failures": 1},
    "quantize": {},
    "quantize_options": {"latency_runs": 1},
}


def write_profile(folder: Path, name: str, **overrides) -> Path:
    """A profile YAML built from BASE_PROFILE; nested dicts in `overrides` replace whole keys."""
    profile = {**json.loads(json.dumps(BASE_PROFILE)), **overrides}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


@contextlib.contextmanager
def local_ray(env: dict[str, str], num_cpus: int = 2) -> Iterator[str]:
    """In-process local Ray with `env` set first (workers inherit the environment of the node
    they start on); restores the environment afterwards. Yields the GCS address.

    Token auth is on with a token of its own. Ray reads RAY_AUTH_MODE when it is imported and
    caches the token, so both are reset (Ray's own test helper) after the environment changes."""
    import ray
    from ray._private.authentication_test_utils import reset_auth_token_state

    temp_dir = Path(f"/tmp/ray-{secrets.token_hex(3)}")
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), **env}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    reset_auth_token_state()
    try:
        context = ray.init(num_cpus=num_cpus, num_gpus=0, include_dashboard=False,
                           _temp_dir=str(temp_dir), log_to_driver=False)
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_auth_token_state()
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def two_node_ray(env: dict[str, str], num_cpus: int = 1, num_gpus: int = 0) -> Iterator[list[str]]:
    """A head and a worker node (`num_cpus` CPUs and `num_gpus` logical GPUs each) on this
    host, the driver connected to the head. Yields the two node ids."""
    import ray
    from ray._common.utils import get_default_ray_temp_dir
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.cluster_utils import Cluster

    from tests.services.s3 import free_ports

    temp_dir = Path(f"/tmp/ray-{secrets.token_hex(3)}")
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), **env}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    reset_auth_token_state()
    cluster = None
    # Cluster.add_node writes the head's address into Ray's default temp folder (/tmp/ray)
    # whatever temp_dir says, and fails on a host where no Ray has run yet
    Path(get_default_ray_temp_dir()).mkdir(parents=True, exist_ok=True)
    try:
        node_args = {"num_cpus": num_cpus, "num_gpus": num_gpus, "temp_dir": str(temp_dir)}
        cluster = Cluster(initialize_head=True, head_node_args={
            **node_args, "include_dashboard": False,
            "dashboard_agent_listen_port": free_ports(1)[0]})
        cluster.add_node(**node_args)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_auth_token_state()
        shutil.rmtree(temp_dir, ignore_errors=True)


def trial_states(experiment_uri: str) -> dict[str, str]:
    """Trial id -> status in the latest experiment state Tune saved (folder or s3://). A running
    driver replaces that object every few seconds: `read_bytes` returns whole versions only."""
    from bpfm.io.storage import join, list_dir, read_bytes

    states = [name for name in list_dir(experiment_uri) if name.startswith("experiment_state-")]
    if not states:
        return {}
    data = json.loads(read_bytes(join(experiment_uri, states[-1])))
    trials = (json.loads(entry[0]) for entry in data["trial_data"])
    return {t["trial_id"]: t["status"] for t in trials}


def result_lines(experiment_uri: str, trial_id: str) -> int:
    """How many results a trial has reported (its result.json lines)."""
    from bpfm.io.storage import exists, read_bytes

    uri = f"{experiment_uri}/trial_{trial_id}/result.json"
    return len(read_bytes(uri).splitlines()) if exists(uri) else 0
