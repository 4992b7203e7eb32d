"""`bpfm data synth|shard|inspect|verify|gc|subsets`: synthetic PulseDB, Parquet shards, their
summary, their integrity and their generations."""

from __future__ import annotations

import argparse
from dataclasses import replace

from bpfm.cli.common import add_json_flag, print_result
from bpfm.errors import BpfmError
from bpfm.io.interrupts import stop_on_signals


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="PulseDB files, Parquet shards, object storage")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    for add in (_add_synth, _add_shard, _add_inspect, _add_verify, _add_gc, _add_subsets):
        add(commands)


def _add_synth(commands: argparse._SubParsersAction) -> None:
    synth = commands.add_parser(
        "synth", help="write a synthetic PulseDB release (Subset, Subj_Wins and Info files)"
    )
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--subjects", type=int, default=None, help="subjects per source")
    synth.add_argument("--segments-per-subject", type=int, default=None)
    synth.add_argument("--seed", type=int, default=None)
    add_json_flag(synth)
    synth.set_defaults(func=run_synth)


def _add_shard(commands: argparse._SubParsersAction) -> None:
    shard = commands.add_parser(
        "shard", help="convert PulseDB files to Parquet shards (a folder or s3://bucket/prefix)"
    )
    shard.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="*_Subset.mat or Subj_Wins files, or folders holding *_Subset.mat",
    )
    shard.add_argument("--out", required=True, metavar="URI", help="folder or s3:// URI")
    shard.add_argument("--no-abp", action="store_true", help="leave the ABP column empty")
    shard.add_argument(
        "--signals",
        choices=("packed", "list", "bytes"),
        default="packed",
        help="signal encoding: packed = schema v2 (default), list = schema v1 (DESIGN section 3)",
    )
    shard.add_argument(
        "--drop-invalid",
        action="store_true",
        help="drop (and count) rows with bad values instead of failing",
    )
    shard.add_argument(
        "--workers",
        type=int,
        default=None,
        help="parallel conversion processes (default: one per file, up to CPUs)",
    )
    add_json_flag(shard)
    shard.set_defaults(func=run_shard)


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser("inspect", help="rows, subjects and BP per source and subset")
    inspect.add_argument("uri", metavar="URI", help="shard set: folder or s3:// URI")
    add_json_flag(inspect)
    inspect.set_defaults(func=run_inspect)


def _add_verify(commands: argparse._SubParsersAction) -> None:
    verify = commands.add_parser(
        "verify", help="check a shard set against its manifest (sizes, footers; --deep: sha256)"
    )
    verify.add_argument("uri", metavar="URI", help="shard set: folder or s3:// URI")
    verify.add_argument(
        "--deep", action="store_true", help="also hash every part and compare its sha256"
    )
    verify.add_argument("--generation", help="a kept previous generation instead of the current")
    add_json_flag(verify)
    verify.set_defaults(func=run_verify)


def _add_gc(commands: argparse._SubParsersAction) -> None:
    gc = commands.add_parser(
        "gc", help="delete generations older than the published one and the KEEP before it"
    )
    gc.add_argument("uri", metavar="URI", help="shard set: folder or s3:// URI")
    gc.add_argument(
        "--keep", type=int, default=None, help="previous generations to keep (default 2)"
    )
    add_json_flag(gc)
    gc.set_defaults(func=run_gc)


def _add_subsets(commands: argparse._SubParsersAction) -> None:
    subsets = commands.add_parser(
        "subsets",
        help="build a Subset file from Subj_Wins files and "
        "an Info file (PulseDB's Generate_Subsets.m)",
    )
    subsets.add_argument("--segments", required=True, help="folder of Subj_Wins files")
    subsets.add_argument("--info", required=True, help="Info file (Subj_Name, Subj_SegIDX)")
    subsets.add_argument("--out", required=True, help="Subset file to write")
    add_json_flag(subsets)
    subsets.set_defaults(func=run_subsets)


def run_synth(args: argparse.Namespace) -> int:
    from bpfm.data.synth import SynthConfig, write_synthetic_pulsedb

    overrides = {
        "subjects": args.subjects,
        "segments_per_subject": args.segments_per_subject,
        "seed": args.seed,
    }
    config = replace(SynthConfig(), **{k: v for k, v in overrides.items() if v is not None})
    result = write_synthetic_pulsedb(args.out, config)
    print_result(
        {
            "out": str(args.out),
            "subset_files": [str(p) for p in result.subset_files],
            "segment_files": len(result.segment_files),
            "info_files": len(result.info_files),
            "segments": dict(result.segments),
        },
        args.json,
    )
    return 0


def run_shard(args: argparse.Namespace) -> int:
    from bpfm.data.shards import write_shards

    if args.workers is not None and args.workers < 1:
        raise BpfmError(f"--workers: must be >= 1, got {args.workers}")
    with stop_on_signals():  # SIGINT / SIGTERM: stop, publish nothing, exit 130 / 143
        manifest = write_shards(
            args.inputs,
            args.out,
            include_abp=not args.no_abp,
            drop_invalid=args.drop_invalid,
            workers=args.workers,
            signals=args.signals,
        )
    result = {
        "uri": args.out,
        "up_to_date": manifest["up_to_date"],
        "generation": manifest["generation"],
        "rows": manifest["rows"],
        "bytes": manifest["bytes"],
        "parts": len(manifest["parts"]),
        "partitions": {
            f"{source}/{subset}": rows
            for source, by_subset in manifest["partitions"].items()
            for subset, rows in by_subset.items()
        },
        "dropped": manifest["dropped"],
    }
    print_result(result, args.json)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from bpfm.data.shards import inspect_shards

    info = inspect_shards(args.uri)
    if args.json:
        print_result(info, True)
        return 0
    summary = {k: v for k, v in info.items() if k != "partitions"}
    summary["partitions"] = {
        name: (
            f"{p['rows']} rows, {p['subjects']} subjects, "
            f"SBP {p['sbp_mean']:.1f} +- {p['sbp_sd']:.1f}, "
            f"DBP {p['dbp_mean']:.1f} +- {p['dbp_sd']:.1f} mmHg"
        )
        for name, p in info["partitions"].items()
    }
    print_result(summary, False)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from bpfm.data.shards import open_shards
    from bpfm.data.verify import describe_problems, verify_shards
    report = verify_shards(open_shards(args.uri, args.generation), deep=args.deep)
    if args.json:
        print_result(report, True)
    else:
        shown = {k: v for k, v in report.items() if k != "problems"}
        shown["problems"] = {p["path"]: p["problem"] for p in report["problems"]}
        print_result(shown, False)
    if not report["ok"]:
        raise BpfmError(describe_problems(report))
    return 0


def run_gc(args: argparse.Namespace) -> int:
    from bpfm.data.generations import KEEP, collect

    print_result(collect(args.uri, KEEP if args.keep is None else args.keep), args.json)
    return 0


def run_subsets(args: argparse.Namespace) -> int:
    from bpfm.data.pulsedb import generate_subsets

    out = generate_subsets(args.segments, args.info, args.out)
    print_result({"out": str(out)}, args.json)
    return 0
