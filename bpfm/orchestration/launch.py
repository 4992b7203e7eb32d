"""Which Tune experiment a grid launch resumes. A launch is identified by what decides its
results: the recipe, the data generation and the MLflow store. Beside its Tune experiment
(`<storage>/<name>.launch.json`) each experiment records those; a launch that differs from the
stored one would otherwise "resume" finished trials and print the old table (or, against a new
MLflow store, an empty one). It becomes a new experiment, named after a short hash of what
changed, or, when the user named the experiment, an error naming the difference."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from bpfm.data.shardset import read_manifest
from bpfm.errors import BpfmError
from bpfm.io import storage
from bpfm.tracking import redact

log = logging.getLogger(__name__)

SUFFIX = ".launch.json"


# Recipe fields that do not decide results: where parts are read from (the node cache) and the
# generation the grid pins, which `data_generation` below already stands for.
NOT_RESULTS = ("cache", "data_generation")


def identity(train: dict[str, Any], data_generation: str | None, tracking_uri: str) -> dict:
    """What a launch's results depend on (the tracking URI redacted: it is written to storage)."""
    kept = {key: value for key, value in train.items() if key not in NOT_RESULTS}
    recipe = json.loads(json.dumps(kept, sort_keys=True, default=str))
    return {"recipe": recipe, "data_generation": data_generation, "tracking": redact(tracking_uri)}


def data_generation(data_uri: str) -> str | None:
    """The shard set's conversion key (a re-sharded input is new data)."""
    manifest = read_manifest(data_uri) or {}
    return manifest.get("key")


def differences(stored: dict, wanted: dict) -> list[str]:
    """Human-readable `what: old -> new` for every field that differs."""
    found = []
    old_recipe, new_recipe = stored.get("recipe", {}), wanted.get("recipe", {})
    for key in sorted(set(old_recipe) | set(new_recipe)):
        if old_recipe.get(key) != new_recipe.get(key):
            found.append(f"recipe {key}: {old_recipe.get(key)} -> {new_recipe.get(key)}")
    if stored.get("data_generation") != wanted.get("data_generation"):
        found.append(f"data generation: {stored.get('data_generation')} -> "
                     f"{wanted.get('data_generation')}")
    if stored.get("tracking") != wanted.get("tracking"):
        found.append(f"MLflow store: {stored.get('tracking')} -> {wanted.get('tracking')}")
    return found


def _stored(storage_uri: str, name: str) -> dict | None:
    uri = storage.join(storage_uri, name + SUFFIX)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def _short_hash(stored: dict, wanted: dict) -> str:
    changed = {k: v for k, v in wanted.items() if stored.get(k) != v}
    text = json.dumps(changed, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def experiment_name(storage_uri: str, name: str, wanted: dict, *, explicit: bool) -> str:
    """The Tune experiment this launch runs in: `name` when it is new or the same launch, else
    (default name) `name-<hash of what changed>`, else (`--name` given) a BpfmError."""
    stored = _stored(storage_uri, name)
    if stored is None or stored == wanted:
        return name
    changed = differences(stored, wanted)
    if explicit:
        raise BpfmError(
            f"{storage.join(storage_uri, name)}: this launch differs from the experiment's "
            f"({'; '.join(changed)}): drop --name for a new experiment, or give another name"
        )
    derived = f"{name}-{_short_hash(stored, wanted)}"
    log.warning("launch differs from experiment %s (%s): running as experiment %s",
                name, "; ".join(changed), derived)
    other = _stored(storage_uri, derived)
    if other is not None and other != wanted:  # a hash collision of different launches
        raise BpfmError(f"{storage.join(storage_uri, derived)}: differs from this launch too "
                        f"({'; '.join(differences(other, wanted))}): give --name")
    return derived


def record(storage_uri: str, name: str, wanted: dict) -> None:
    """Write the launch's identity beside its Tune experiment (once: an existing one matched)."""
    if _stored(storage_uri, name) is None:
        storage.publish_bytes(storage.join(storage_uri, name + SUFFIX),
                              json.dumps(wanted, sort_keys=True, indent=1).encode())
