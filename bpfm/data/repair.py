"""Repairing a published shard set that fails verification (`bpfm data shard`, same inputs).

Only the sources whose parts fail are converted again, into new part files of the same
generation (a suffix keeps their names apart from the damaged ones); a new manifest naming them
is then published, and the damaged files are deleted after that. Readers therefore see the old
manifest or the new one, never a part that is being rewritten."""

from __future__ import annotations

import logging
import math
import re
import uuid

import pyarrow.fs as pafs

from bpfm.data.shardset import ShardOptions, ShardSet
from bpfm.errors import BpfmError
from bpfm.io import storage

log = logging.getLogger(__name__)

_PART_NAME = re.compile(r"part-(\d+)(?:-[0-9a-f]+)?\.parquet$")


def parts_by_source(manifest: dict, sources: list[dict]) -> list[list[dict]] | None:
    """The manifest's parts grouped by the source (`describe_sources` entry) that wrote them,
    from the part numbers each source owns (`first_part` on); None when a part fits none."""
    # the rows per part the set was cut at, which decide how many part numbers a source owns
    per_part = ShardOptions.from_dict(manifest["options"]).rows_per_part
    groups: list[list[dict]] = [[] for _ in sources]
    for part in manifest["parts"]:
        match = _PART_NAME.search(part["path"])
        if match is None:
            return None
        number = int(match.group(1))
        owners = [
            i
            for i, s in enumerate(sources)
            if s["subset"] == part["subset"]
            and 0 <= number - s["first_part"] < math.ceil(s["segments"] / per_part)
        ]
        if len(owners) != 1:
            return None
        groups[owners[0]].append(part)
    return groups


def plan(manifest: dict, sources: list[dict], report: dict) -> tuple[list[int], dict[int, dict]]:
    """(indices of the sources to convert again, results of the others rebuilt from the
    manifest). A source is converted again when one of its parts fails verification or the
    manifest's record of it does not add up."""
    groups = parts_by_source(manifest, sources)
    if groups is None:
        return list(range(len(sources))), {}
    failing = {p["path"] for p in report["problems"]}
    recorded = {(s.get("subset"), s.get("sha256")): s for s in manifest["sources"]}
    bad, kept = [], {}
    for i, (source, parts) in enumerate(zip(sources, groups, strict=True)):
        entry = recorded.get((source["subset"], source["sha256"]), {})
        sound = (
            not any(p["path"] in failing for p in parts)
            and isinstance(entry.get("rows"), int)
            and isinstance(entry.get("dropped"), dict)
            and entry["rows"] == sum(p["rows"] for p in parts)
        )
        if sound:
            kept[i] = {"rows": entry["rows"], "dropped": entry["dropped"], "parts": parts}
        else:
            bad.append(i)
    return bad, kept


def new_suffix() -> str:
    return f"-{uuid.uuid4().hex[:8]}"


def delete_parts(shards: ShardSet, paths: set[str]) -> None:
    """Delete part files (relative paths) that no published manifest names any more."""
    for path in sorted(paths):
        try:
            with storage.storage_errors(shards.uri):
                shards.filesystem.delete_file(f"{shards.root}/{path}")
        except BpfmError as err:
            log.warning("could not delete replaced part %s: %s", path, err)


def delete_suffixed(shards: ShardSet, suffix: str) -> None:
    """Remove the parts a failed repair had written (their names end in `suffix`)."""
    folder = f"{shards.root}/{shards.generation}"
    with storage.storage_errors(shards.uri):
        infos = shards.filesystem.get_file_info(
            pafs.FileSelector(folder, recursive=True, allow_not_found=True)
        )
    paths = {i.path.removeprefix(f"{shards.root}/") for i in infos if i.path.endswith(
        f"{suffix}.parquet")}
    delete_parts(shards, paths)
