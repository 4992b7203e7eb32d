"""`bpfm nightly`: the nightly regression run against the committed baseline."""

from __future__ import annotations

import argparse
from pathlib import Path

from bpfm.cli.common import add_json_flag, print_result


def register(subparsers: argparse._SubParsersAction) -> None:
    from bpfm.orchestration.nightly import DEFAULT_BASELINE

    parser = subparsers.add_parser(
        "nightly",
        help="run the nightly profile and compare every metric with the baseline",
        description="Run the `nightly` grid profile (fixed seeds; synthetic PulseDB plus the real "
        "challenge2015 sample, BPFM_CHALLENGE2015 overrides its path), compare every tracked "
        "metric with the baseline JSON using direction-aware tolerances, write regression.md and "
        "regression.json, and exit 1 on a regression. --update-baseline rewrites the baseline.",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=DEFAULT_BASELINE,
        help="baseline JSON (default: pipelines/baselines/nightly.json)",
    )
    parser.add_argument(
        "--update-baseline",
        action="store_true",
        help="rewrite the baseline from this run instead of comparing",
    )
    parser.add_argument(
        "--out", type=Path, help="report folder (default: .bpfm/nightly/<UTC time>)"
    )
    parser.add_argument("--profile", default="nightly", help="grid profile (default: nightly)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the profile's data, backbone and Tune storage locations "
        "(default: make them anew under --out/work)",
    )
    parser.add_argument(
        "--keep-work",
        action="store_true",
        help="keep all of --out/work after the run (default: its Tune state and backbones are "
        "removed, the shards stay)",
    )
    parser.add_argument(
        "--grid-run",
        metavar="RUN_ID",
        help="compare this finished grid run instead of running the grid",
    )
    parser.add_argument("--gpus", default="auto", choices=("auto", "always", "never"))
    add_json_flag(parser)
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from bpfm.orchestration.nightly import NightlyConfig, run_nightly

    result = run_nightly(NightlyConfig(
        profile=args.profile, baseline=args.baseline, update_baseline=args.update_baseline,
        out=args.out, reuse=args.reuse, grid_run=args.grid_run, gpus=args.gpus,
        keep_work=args.keep_work,
    ))
    if args.json:
        print_result(result, True)
    else:
        print(
            f"nightly {result['status']}: {result['entries']} entries, "
            f"{result['regressions']} regressions, {result['improvements']} improvements; "
            f"grid run {result['grid_run_id']}"
        )
        for error in result["errors"]:
            print(f"error: {error}")
        if "report" in result:
            print(f"report: {result['report']}")
    return 1 if result["status"] == "fail" else 0
