"""cluster/, mlflow/ and the Dockerfile, checked without a cloud, Kubernetes or Docker engine."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def test_aws_cluster_file_passes_rays_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    gpu = config["available_node_types"]["gpu_spot"]
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert gpu["min_workers"] == 0 < gpu["max_workers"]
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert all("RAY_AUTH_MODE=token" in " ".join(config[k])
               for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_spot"]["min_wokers"] = 1
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(broken))


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and _containers(head["template"])[0]["image"]
    groups = spec["workerGroupSpecs"]
    assert groups, "no worker group"
    for group in groups:
        required = {"groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"}
        assert required <= set(group)
        limits = _containers(group["template"])[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def test_kuberay_raycluster_has_required_fields_and_token_auth():
    doc = yaml.safe_load((REPO / "cluster/kuberay/raycluster.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])


def test_kuberay_rayjob_runs_the_grid_and_cleans_up():
    doc = yaml.safe_load((REPO / "cluster/kuberay/rayjob-grid.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "/app/pipelines/grid.py"] and "--profile" in argv
    assert (REPO / "pipelines/profiles" / f"{argv[argv.index('--profile') + 1]}.yaml").is_file()
    assert spec["shutdownAfterJobFinishes"] is True
    yaml.safe_load(spec["runtimeEnvYAML"])
    _check_cluster_spec(spec["rayClusterSpec"])


def test_nightly_schedule_submits_the_nightly_pipeline_with_the_token():
    doc = yaml.safe_load((REPO / "cluster/kuberay/nightly-cronjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    assert len(doc["spec"]["schedule"].split()) == 5
    container = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["ray", "job", "submit"]
    entry = container["command"].index("--")
    assert container["command"][entry + 1:] == [
        "python", "pipelines/nightly.py", "--gpus", "never"]  # the baseline was made on CPU
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in joined.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_stages_parse_and_every_copied_path_exists():
    instructions = _dockerfile_instructions((REPO / "Dockerfile").read_text())
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "EXPOSE", "CMD"}
    assert {op for op, _ in instructions} <= known
    stages, args = [], {"PYTHON_VERSION"}
    for op, rest in instructions:
        if op == "FROM":
            image, _, name = rest.partition(" AS ")
            assert re.fullmatch(r"[\w.${}/:-]+", image.strip()), image
            stages.append(name.strip())
        elif op == "ARG":
            args.add(rest.split("=")[0])
        elif op == "COPY":
            parts = rest.split()
            if parts[0].startswith("--from="):
                assert parts[0].removeprefix("--from=") in stages[:-1]
                continue
            for source in parts[:-1]:
                assert (REPO / source).exists(), f"COPY source {source} missing"
    assert stages == ["build", "runtime"]
    used = set(re.findall(r"\$\{(\w+)\}", (REPO / "Dockerfile").read_text()))
    assert used <= args, f"undeclared build args {used - args}"
    assert "TORCH_INDEX" in args


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".bpfm", ".git"} <= set(ignored)


def test_mlflow_launcher_is_valid_bash_bound_to_localhost():
    script = REPO / "mlflow/serve.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert 'MLFLOW_HOST:-127.0.0.1' in script.read_text()
