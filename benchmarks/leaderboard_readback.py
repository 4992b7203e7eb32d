"""How long the leaderboard takes to read a study back from an `mlflow server` with a database
backend (sqlite, the tests' server), for N finished runs shaped like a grid's.

    python benchmarks/leaderboard_readback.py [--runs 1000] [--variants 6]

Writes N runs into one experiment (a train run per cell with the axis params, 18 test metrics,
and the BHS/AAMI tags; `--variants` quant runs nested under each), each with one `log_batch`,
then times `bpfm.report.runs.load_study` (pages of 1,000 runs per search) against one
`search_runs` call per run (what reading run by run would cost). Target (issue 18): under a
minute for 1,000 runs. Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = ("mae", "me", "sd", "rmse", "r2", "mase", "bhs5", "bhs10", "bhs15")
METRICS = [f"{target}_{name}" for target in ("sbp", "dbp") for name in NAMES]


def write_runs(client, experiment_id: str, runs: int, variants: int) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    cells = max(1, runs // (1 + variants))
    for cell in range(cells):
        parent = client.create_run(experiment_id, tags={"bpfm.kind": "train"}).info.run_id
        params = {"source": "mimic", "protocol": "paper", "size": "small", "freeze": "frozen",
                  "epochs": str(cell), "init": "xavier", "seed": "42"}
        client.log_batch(
            parent,
            metrics=[Metric(m, 1.0 + cell / 1000, now, 0) for m in METRICS],
            params=[Param(k, v) for k, v in params.items()],
            tags=[
                RunTag("sbp_bhs_grade", "B"),
                RunTag("dbp_bhs_grade", "A"),
                RunTag("aami", "fail"),
            ],
        )
        client.set_terminated(parent)
        for variant in range(variants):
            child = client.create_run(
                experiment_id,
                tags={"bpfm.kind": "quant", "mlflow.parentRunId": parent},
            ).info.run_id
            client.log_batch(
                child,
                metrics=[Metric(m, 1.0, now, 0) for m in (*METRICS, "size_mib", "latency_ms_b1")],
                params=[
                    Param("mode", "static"),
                    Param("observer", f"o{variant}"),
                    Param("weights", "per_channel"),
                    Param("backend", "fx"),
                ],
            )
            client.set_terminated(child)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--variants", type=int, default=6)
    parser.add_argument(
        "--per-run-sample",
        type=int,
        default=50,
        help="runs read one search each, to extrapolate that way's cost",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from mlflow.tracking import MlflowClient

    from bpfm.report.runs import load_study
    from tests.services.mlflow_server import start_mlflow_server

    with tempfile.TemporaryDirectory(prefix="bpfm-lb-") as tmp:
        server = start_mlflow_server(Path(tmp) / "mlflow")
        try:
            client = MlflowClient(server.uri)
            experiment_id = client.create_experiment("readback")
            began = time.perf_counter()
            write_runs(client, experiment_id, args.runs, args.variants)
            written = time.perf_counter() - began
            began = time.perf_counter()
            study = load_study(client, ["readback"])
            batched = time.perf_counter() - began
            n = len(study.train) + len(study.quant)
            ids = list(study.train["run_id"][: args.per_run_sample])
            began = time.perf_counter()
            for run_id in ids:
                client.search_runs([experiment_id], filter_string=f"attributes.run_id = '{run_id}'")
            per_run = (time.perf_counter() - began) / max(1, len(ids))
        finally:
            server.stop()
    result = {"runs": n, "write_s": written, "load_study_s": batched,
              "one_search_per_run_s_estimated": per_run * n,
              "speedup": per_run * n / batched}
    print(
        f"{n} runs: load_study {batched:.1f} s (pages of 1,000); one search per run would take "
        f"~{per_run * n:.0f} s ({per_run * 1000:.0f} ms each); writing them took {written:.0f} s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
