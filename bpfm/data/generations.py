"""Shard-set generations over time: publishing one while keeping the previous ones readable,
dropping older ones (`bpfm data gc`), and pinning a run to the generation it started on.

A run (`bpfm train`, a grid trial) reads the generation published when it started and records
it in its checkpoints and MLflow params (`TrainConfig.data_generation`). Republishing must not
pull that generation from under it, so a publish keeps the previous `KEEP` generations: each
generation folder holds a copy of its own manifest (`gen-<key>/_manifest.json`), through which a
pinned run opens it, and the published manifest lists them, newest first, under `previous`.
A resumed run whose checkpoint names another generation than the one it would read is refused,
naming both, unless the user allows the new data (`--allow-new-data`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from bpfm.data.published import open_shards
from bpfm.data.shardset import MANIFEST, ShardSet, read_manifest
from bpfm.errors import BpfmError
from bpfm.io import storage

log = logging.getLogger(__name__)

KEEP = 2  # previous generations a publish keeps readable (beside the published one)


def published_manifest(out_uri: str) -> dict | None:
    """The published manifest; None when there is none or it cannot be read (a writer then
    publishes again, which is the recovery `bpfm data shard` documents)."""
    try:
        return read_manifest(out_uri)
    except BpfmError as err:
        log.warning("%s; publishing a new one", err)
        return None


def kept_generations(out_uri: str) -> list[str]:
    """Generation folders holding a readable copy of their manifest, newest first."""
    found = []
    for name in storage.list_dir(out_uri):
        if not name.startswith("gen-"):
            continue
        try:
            copy = read_manifest(out_uri, name)
        except BpfmError:
            continue
        if copy is not None and copy["generation"] == name:
            found.append((copy.get("created") or "", name))
    return [name for _, name in sorted(found, reverse=True)]


def _history(out_uri: str, current: dict | None, generation: str) -> list[str]:
    """Previous generations of the one being published, newest first (only those still kept)."""
    readable = kept_generations(out_uri)
    if current is None:  # no readable published manifest: the folders' own copies tell
        listed = readable
    elif current["generation"] == generation:  # a repair republishes the same generation
        listed = list(current.get("previous", []))
    else:
        listed = [current["generation"], *current.get("previous", [])]
    return [g for g in dict.fromkeys(listed) if g != generation and g in readable]


def delete_generations(out_uri: str, keep: Iterable[str]) -> list[str]:
    """Delete every generation folder not in `keep` (older sets, killed conversions); best
    effort. Returns the names deleted."""
    keep = set(keep)
    deleted = []
    for name in storage.list_dir(out_uri):
        if name.startswith("gen-") and name not in keep:
            try:
                storage.delete_dir(storage.join(out_uri, name))
                deleted.append(name)
            except BpfmError as err:
                log.warning("could not delete stale %s: %s", name, err)
    return deleted


def publish_manifest(
    out_uri: str, manifest: dict, current: dict | None, *, keep: int = KEEP
) -> dict:
    """Make `manifest` the published set: its generation's copy first, then `_manifest.json`
    (atomic), then generations beyond the `keep` previous ones are deleted. `current` is the
    manifest published until now (None if absent or unreadable). Returns what was published."""
    generation = manifest["generation"]
    if current is not None and current["generation"] != generation:
        old = storage.join(out_uri, current["generation"])
        if storage.exists(old) and read_manifest(out_uri, current["generation"]) is None:
            # published before generations kept copies: give it one, so pinned runs find it
            _write(storage.join(old, MANIFEST), current)
    previous = _history(out_uri, current, generation)[:keep]
    manifest = {**manifest, "previous": previous}
    _write(storage.join(out_uri, generation, MANIFEST), manifest)
    _write(storage.join(out_uri, MANIFEST), manifest)
    delete_generations(out_uri, {generation, *previous})
    return manifest


def _write(uri: str, manifest: dict) -> None:
    storage.publish_bytes(uri, json.dumps(manifest, indent=1).encode())


def collect(out_uri: str, keep: int = KEEP) -> dict:
    """`bpfm data gc`: keep the published generation and the `keep` newest previous ones."""
    if keep < 0:
        raise BpfmError(f"--keep: must be >= 0, got {keep}")
    shards = open_shards(out_uri)
    previous = [g for g in shards.manifest.get("previous", []) if g != shards.generation]
    kept = [shards.generation, *[g for g in previous if g in kept_generations(out_uri)][:keep]]
    deleted = delete_generations(out_uri, kept)
    return {"uri": out_uri, "published": shards.generation, "kept": kept, "deleted": deleted}


def pinned_shards(uri: str, generation: str | None, *, cache: bool = False) -> ShardSet:
    """The set a run reads: its pinned generation, else the one published now; `cache`: a
    remote set's parts through this node's cache."""
    return open_shards(uri, generation or None, cache=cache)


def check_same_generation(
    saved: str | None, current: str, checkpoint: object, *, allow_new_data: bool
) -> None:
    """Refuse to resume a run that read `saved` on generation `current` (a republished set),
    unless allowed. Checkpoints written before runs recorded a generation carry none."""
    if not saved or saved == current or allow_new_data:
        return
    raise BpfmError(
        f"{checkpoint}: data_generation: the checkpoint was trained on shard generation {saved}, "
        f"the data now reads {current}; resume with --allow-new-data to continue on the new "
        "data, or use another --out"
    )
