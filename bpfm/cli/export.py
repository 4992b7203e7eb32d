"""`bpfm export`: a trained model dir to ExecuTorch (`.pte`) or ONNX Runtime (`.onnx`), run by
the runtime on the test view and checked against the torch model. Names are checked by
`ExportConfig.validate` (one line, exit 2), not argparse `choices`."""

from __future__ import annotations

import argparse

from bpfm.cli.common import add_json_flag, print_result
from bpfm.errors import BpfmError

SUMMARY_KEYS = ("variant", "format", "size_mib", "reduction_factor", "runtime_reduction_factor",
                "latency_ms_b1", "latency_ms_b64", "speedup_b1", "speedup_b64",
                "peak_rss_mib_b1", "rss_above_baseline_mib_b1", "macs_per_window",
                "parity_max_abs_fp32", "parity_mae_diff_int8", "delta_sbp_mae", "delta_dbp_mae",
                "delta_sbp_r2", "delta_dbp_r2", "model_file")
TEST_KEYS = ("sbp_mae", "dbp_mae", "sbp_r2", "dbp_r2", "sbp_bhs_grade", "dbp_bhs_grade", "aami",
             "n", "n_subjects")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained model to ExecuTorch or ONNX Runtime and check it",
        description="Export a model dir (from `bpfm train`) to ExecuTorch (pt2e + XNNPACK, "
        "OUT/model.pte) or ONNX Runtime (OUT/model.onnx), fp32 or INT8; evaluate the runtime's "
        "own outputs on the test view (OUT/metrics.json), compare them with the torch model "
        "(OUT/parity.json) and measure size, latency, peak RSS and MACs (OUT/export.json).",
    )
    parser.add_argument("--model", required=True, help="model dir written by `bpfm train`")
    parser.add_argument("--format", default="executorch", help="executorch | onnx")
    parser.add_argument("--mode", default="static", help="fp32 | dynamic | static")
    parser.add_argument("--observer", default="minmax",
                        help="static activations: executorch minmax | moving_average | histogram;"
                        " onnx minmax | entropy | percentile")
    parser.add_argument("--calib-batches", type=int, default=8,
                        help="training batches of 64 that static mode calibrates on")
    parser.add_argument("--file", help="evaluate this .pte / .onnx (made earlier) instead of "
                        "exporting one")
    parser.add_argument("--data", help="shard set URI (default: the one the model trained on)")
    parser.add_argument("--source", help="mimic | vitaldb | other (default: the model's)")
    parser.add_argument("--protocol", help="paper | calbased | calfree | aami (default: model's)")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads (latency, RSS)")
    parser.add_argument("--latency-runs", type=int, default=20,
                        help="timed runs per batch size (median); 0 skips latency")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS process")
    parser.add_argument("--out", required=True, help="output folder")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bpfm.export import ExportConfig, format_of
    from bpfm.export.run import run_export

    if args.threads < 1 or args.latency_runs < 0:
        raise BpfmError(f"export: threads/latency-runs: need >= 1 and >= 0, got {args.threads}/"
                        f"{args.latency_runs}")
    config = None
    if args.file is None:
        config = ExportConfig(format=args.format, mode=args.mode, observer=args.observer,
                              calib_batches=args.calib_batches).validate()
    else:
        format_of(args.file)
    result = run_export(args.model, config, out=args.out, data=args.data, source=args.source,
                        protocol=args.protocol, file=args.file, threads=args.threads,
                        latency_runs=args.latency_runs, rss=not args.no_rss)
    if args.json:
        print_result(result, True)
    else:
        summary = {key: result.get(key) for key in SUMMARY_KEYS}
        summary["test"] = {key: result["test"][key] for key in TEST_KEYS}
        print_result(summary, False)
    return 0
