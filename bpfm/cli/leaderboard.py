"""`bpfm leaderboard`: the clinical-standard report of one or more MLflow experiments."""

from __future__ import annotations

import argparse
from pathlib import Path

from bpfm.cli.common import add_json_flag, print_result


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "leaderboard",
        help="tables II-V, subgroups and plots from MLflow runs (md, html, csv)",
        description="Compile the paper's tables, the calibration gap, subgroups with bootstrap "
        "CIs and Bland-Altman / scatter / error plots from the finished runs of MLflow "
        "experiments; write report.md, a self-contained report.html and CSVs, and log them as a "
        "bpfm.kind=leaderboard run.",
    )
    parser.add_argument(
        "--experiment", action="append", required=True, metavar="NAME",
        help="MLflow experiment to report (repeat for several)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--tracking-uri", default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the sqlite store in .bpfm/)",
    )
    parser.add_argument(
        "--no-log", action="store_true", help="do not log the report as an MLflow run"
    )
    add_json_flag(parser)
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from bpfm.report.leaderboard import LeaderboardConfig, build_leaderboard

    config = LeaderboardConfig(
        experiments=args.experiment,
        out=args.out,
        tracking_uri=args.tracking_uri,
        log_run=not args.no_log,
    )
    result = build_leaderboard(config)
    if not args.json:
        print(f"report: {result['report']}")
        for best in result["best"]:
            print(
                f"best {best['source']}/{best['protocol']}: SBP MAE {best['sbp_mae']:.2f}, "
                f"DBP MAE {best['dbp_mae']:.2f} mmHg (run {best['run_id']})"
            )
        return 0
    print_result(result, True)
    return 0
