"""`pipelines/shard.py` on a two-node Ray cluster (a head and a worker on this host, as the tests'
`two_node_ray`): a release of 8 Subset files on the real SeaweedFS S3, one Ray task per file,
files spread over both nodes. Prints the aggregate MB/s of input converted (S3 download,
HDF5 read, Parquet write back to S3, manifest) and which node converted each file.

    python benchmarks/shard_two_nodes.py [--segments-per-file 1500] [--cpus-per-node 1]

The 8 inputs are one tiled synthetic Train subset (`data_throughput.build_input`) under PulseDB's
8 subset names of the two families (a converter's work does not depend on the name).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NAMES = ("Train", "CalBased_Test", "CalFree_Test", "AAMI_Test", "AAMI_Cal", "VitalDB_Train",
         "VitalDB_CalBased_Test", "VitalDB_CalFree_Test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments-per-file", type=int, default=1500)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    args = parser.parse_args()
    sys.path[:0] = [str(HERE), str(REPO)]
    from data_throughput import build_input

    import pipelines.shard as job
    from tests.orchestration.conftest import two_node_ray
    from tests.services.s3 import start_seaweed_s3

    workdir = Path(tempfile.mkdtemp(prefix="bpfm-shard2n-"))
    server = start_seaweed_s3(workdir / "seaweed")
    try:
        source = build_input(workdir, args.segments_per_file)
        client = server.client()
        for name in NAMES:
            client.upload_file(str(source), server.bucket, f"raw/{name}_Subset.mat")
        size = len(NAMES) * source.stat().st_size
        os.environ.update(server.env())
        with two_node_ray(server.env(), num_cpus=args.cpus_per_node) as nodes:
            import ray

            ran_on = workdir / "ran-on"  # both nodes share this host's disk
            ran_on.mkdir()

            @ray.remote
            def convert_on_node(item: dict, *rest) -> dict:  # the job's task, noting its node
                node = ray.get_runtime_context().get_node_id()
                (ran_on / item["name"]).write_text(node)
                return job._convert_input(item, *rest)

            job.convert_input = convert_on_node
            began = time.perf_counter()
            manifest = job.shard_with_ray([f"s3://{server.bucket}/raw"],
                                          f"s3://{server.bucket}/out")
            seconds = time.perf_counter() - began
            ran = [p.read_text() for p in ran_on.iterdir()]
            per_node = {n: ran.count(n) for n in nodes}
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result = {"files": len(NAMES), "input_mb": size / 1e6, "seconds": seconds,
              "mb_per_s": size / 1e6 / seconds, "rows": manifest["rows"],
              "files_per_node": list(per_node.values())}
    print(
        f"{len(NAMES)} files, {size / 1e6:.0f} MB on 2 nodes ({args.cpus_per_node} CPU each): "
        f"{seconds:.1f} s, {size / 1e6 / seconds:.1f} MB/s; files per node "
        f"{result['files_per_node']}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
