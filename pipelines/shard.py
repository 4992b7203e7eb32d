"""PulseDB -> Parquet shards as a Ray job, for the real ~250 GB:

    ray job submit --working-dir . -- python pipelines/shard.py s3://bucket/pulsedb/ \
        --out s3://bucket/pulsedb/shards

One Ray task per input file (a Subset or a Subj_Wins file) runs bpfm's plain `convert_file`; an
input on s3:// is downloaded to local temp first (h5py reads local files). Each finished file
leaves a marker (its description, sha256 and parts with their checksums) in the generation
folder, so a re-submitted job skips every file whose parts are all there. The driver publishes
the manifest once, after every task succeeded; until then nothing is visible to readers."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a job's unpacked working dir

import ray  # noqa: E402

from bpfm.data import shards  # noqa: E402
from bpfm.data.generations import publish_manifest, published_manifest  # noqa: E402
from bpfm.errors import BpfmError, DataError  # noqa: E402
from bpfm.io import storage  # noqa: E402

log = logging.getLogger("bpfm.shard")
PARTS_PER_FILE = 1000  # part numbers reserved per input: Subj_Wins files share one partition


def list_inputs(inputs: list[str]) -> list[dict]:
    """Input files (name, URI, size): files as given, folders and s3:// prefixes searched for
    *_Subset.mat."""
    import pyarrow.fs as pafs

    found = []
    for uri in inputs:
        fs, path = storage.filesystem_for(uri)
        with storage.storage_errors(uri):
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                files = [i for i in infos if i.base_name.endswith("_Subset.mat") and i.is_file]
                if not files:
                    raise DataError(uri, "input", "folder holds no *_Subset.mat files")
            elif info.type == pafs.FileType.File:
                files = [info]
            else:
                raise DataError(uri, "input", "no such file or folder")
        scheme = "" if storage.is_local(uri) else uri.split("://")[0] + "://"
        found.extend({"uri": f"{scheme}{item.path}", "name": item.base_name, "size": item.size}
                     for item in files)
    return sorted({f["uri"]: f for f in found}.values(), key=lambda f: f["uri"])


def _marker_uri(out: str, generation: str, name: str) -> str:
    return storage.join(out, generation, "_done", f"{name}.json")


def _complete(out: str, marker: dict) -> bool:
    """Whether every part a marker names exists with the size it was written with."""
    fs, root = storage.filesystem_for(out)
    for part in marker["result"]["parts"]:
        with storage.storage_errors(out):
            info = fs.get_file_info(f"{root}/{part['path']}")
        if info.size != part["bytes"]:
            return False
    return True


@ray.remote
def convert_input(item: dict, out: str, generation: str, index: int, options: dict) -> dict:
    """One input file -> its parts under the (unpublished) generation folder, and a marker.
    Errors cross back as one-line BpfmErrors (DataError's three arguments do not unpickle)."""
    try:
        return _convert_input(item, out, generation, index, options)
    except BpfmError as err:
        raise BpfmError(str(err)) from None


def _convert_input(item: dict, out: str, generation: str, index: int, options: dict) -> dict:
    marker_uri = _marker_uri(out, generation, item["name"])
    if storage.exists(marker_uri):
        marker = json.loads(storage.read_bytes(marker_uri))
        if _complete(out, marker):
            return {**marker, "skipped": True}
    with tempfile.TemporaryDirectory(prefix="bpfm-shard-") as tmp:
        local = Path(item["uri"]) if storage.is_local(item["uri"]) else Path(tmp) / item["name"]
        if not storage.is_local(item["uri"]):
            fs, path = storage.filesystem_for(item["uri"])
            with storage.storage_errors(item["uri"]), fs.open_input_stream(path) as src, \
                    open(local, "wb") as dst:
                while chunk := src.read(64 << 20):
                    dst.write(chunk)
        (source,) = shards.describe_sources([local], 1)
        source.update(path=item["uri"], first_part=index * PARTS_PER_FILE)
        result = shards.convert_file(
            local, out, generation=generation, first_part=source["first_part"],
            options=shards.ShardOptions.from_dict(options),
        )
    marker = {"source": source, "result": result}
    storage.publish_bytes(marker_uri, json.dumps(marker).encode())
    return {**marker, "skipped": False}


def shard_with_ray(inputs: list[str], out: str, *, include_abp: bool = True,
                   drop_invalid: bool = False, cpus_per_file: float = 1.0) -> dict:
    """Convert every input in parallel Ray tasks and publish one manifest; returns it, with
    `files_converted` / `files_skipped` (and `up_to_date` when nothing changed)."""
    options = shards.ShardOptions(include_abp, drop_invalid)
    items = list_inputs(inputs)
    listing = json.dumps([[i["name"], i["size"]] for i in items] + [options.as_dict()],
                         sort_keys=True)
    generation = f"gen-r{hashlib.sha256(listing.encode()).hexdigest()[:15]}"
    log.info("%d input files -> %s (%s)", len(items), out, generation)
    refs = [convert_input.options(num_cpus=cpus_per_file).remote(
        item, out, generation, index, options.as_dict()) for index, item in enumerate(items)]
    try:
        done = ray.get(refs)  # the first task's error stops the job: nothing is published
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if isinstance(err.cause, BpfmError) else None
        if cause is None:
            raise
        raise BpfmError(str(cause)) from None
    sources = [d["source"] for d in done]
    names: dict[str, str] = {}
    for source in sources:
        if source["kind"] == "subset" and source["subset"] in names:
            raise DataError(source["path"], "input",
                            f"subset name '{source['subset']}' also comes from "
                            f"{names[source['subset']]}")
        names[source["subset"]] = source["path"]
    key = shards.conversion_key(sources, options.as_dict())
    current = published_manifest(out)  # an unreadable one counts as absent: publish again
    skipped = sum(d["skipped"] for d in done)
    counts = {"files_converted": len(done) - skipped, "files_skipped": skipped}
    if current is not None and current.get("key") == key:
        return {**current, **counts, "up_to_date": True}
    manifest = shards.build_manifest(key, generation, sources, [d["result"] for d in done], options)
    manifest = publish_manifest(out, manifest, current)  # keeps the previous generations
    log.info("%s: published %d rows in %d parts", out, manifest["rows"], len(manifest["parts"]))
    return {**manifest, **counts, "up_to_date": False}


def main(argv: list[str] | None = None) -> int:
    from bpfm.cli.common import add_json_flag, print_result
    from bpfm.orchestration.ray_grid import init_ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="PulseDB files, folders or s3:// prefixes")
    parser.add_argument("--out", required=True, help="shard set URI (folder or s3://)")
    parser.add_argument("--no-abp", action="store_true", help="drop the ABP waveform column")
    parser.add_argument("--drop-invalid", action="store_true", help="drop and count bad rows")
    parser.add_argument("--cpus-per-file", type=float, default=1.0)
    add_json_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        init_ray()
        manifest = shard_with_ray(args.inputs, args.out, include_abp=not args.no_abp,
                                  drop_invalid=args.drop_invalid,
                                  cpus_per_file=args.cpus_per_file)
    except BpfmError as err:
        print(f"bpfm: error: {err}", file=sys.stderr)
        return 2
    summary = {k: manifest[k] for k in ("rows", "bytes", "generation", "partitions", "dropped",
                                        "files_converted", "files_skipped", "up_to_date")}
    print_result({"out": args.out, **summary}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
