"""`bpfm grid`: the whole study (what `pipelines/grid.py` runs locally or as a Ray job)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

from bpfm.cli.common import add_json_flag, print_result
from bpfm.errors import BpfmError
from bpfm.io.redact import redact
from bpfm.orchestration import progress

if TYPE_CHECKING:
    from bpfm.profiles import Profile


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "grid",
        help="run the grid of a profile on Ray (train, quantize, summarize)",
        description="Stage 0 makes missing data and backbones, stage 1 trains every cell with "
        "Ray Tune, stage 2 quantizes every trained model, stage 3 prints the summary; all of it "
        "is tracked in MLflow (MLFLOW_TRACKING_URI, else sqlite under .bpfm/). Re-running the "
        "same profile resumes its experiment. With RAY_ADDRESS set it joins that cluster.",
    )
    add_grid_arguments(parser)
    parser.set_defaults(func=handle)


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    from bpfm.profiles import PROFILE_DIR

    names = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
    parser.add_argument(
        "--profile", required=True, help=f"profile name ({names}) or a YAML file"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list cells, trials and resources; run nothing"
    )
    parser.add_argument(
        "--recipe",
        help="YAML/JSON of TrainConfig overrides for every cell "
        "(e.g. the recipe `bpfm search` writes)",
    )
    parser.add_argument(
        "--name",
        help="Tune experiment name (default: the profile's study, or study-<hash> when the "
        "recipe, data or MLflow store changed); the same name resumes, a new one starts over; a "
        "named experiment launched with another recipe, data or store is an error",
    )
    parser.add_argument("--data", help="override the profile's shard set URI")
    parser.add_argument("--storage", help="override the profile's Tune storage (folder or s3://)")
    parser.add_argument(
        "--gpus",
        default="auto",
        choices=("auto", "always", "never"),
        help="auto: use GPUs when the cluster has some now; always: request "
        "them anyway (autoscaling GPU workers); never: CPUs only",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
        help="every log line, Ray's and Tune's output (default: a progress bar and the summary)",
    )
    cost = parser.add_argument_group("cost plan (with --dry-run)")
    cost.add_argument("--gpu-kind", default="H100", help="GPU of the throughput table (H100)")
    cost.add_argument("--plan-gpus", type=int, default=8, help="GPUs to pack the trials on")
    cost.add_argument("--gpus-per-node", type=int, default=8)
    add_json_flag(parser)


def load_profile_from_args(args: argparse.Namespace) -> tuple[Profile, dict[str, Any]]:
    from bpfm.profiles import load_profile, load_recipe

    profile = load_profile(args.profile)
    if args.data:
        data = dataclasses.replace(profile.data, uri=args.data)
        profile = dataclasses.replace(profile, data=data)
    if args.storage:
        profile = dataclasses.replace(profile, storage=args.storage)
    recipe = load_recipe(args.recipe) if args.recipe else {}
    return profile, recipe


def _cost_plan(args: argparse.Namespace, profile: Profile, train: dict) -> dict:
    """The cost plan of a dry run; samples per epoch from the manifest when it can be read."""
    from bpfm.data.shardset import read_manifest
    from bpfm.orchestration import costs, grid

    if args.gpu_kind not in costs.BF16_PEAK_TFLOPS or min(args.plan_gpus, args.gpus_per_node) < 1:
        raise BpfmError(
            f"grid: --gpu-kind/--plan-gpus: need one of {', '.join(costs.BF16_PEAK_TFLOPS)} and "
            f"positive GPU counts, got {args.gpu_kind}/{args.plan_gpus}/{args.gpus_per_node}"
        )
    try:
        manifest, note = read_manifest(profile.data.uri), ""
        if manifest is None:
            note = f"no manifest at {profile.data.uri} yet"
    except BpfmError as err:
        manifest, note = None, str(err)
    return costs.cost_plan(grid.plan_grid(profile, train), profile, manifest,
                           gpu_kind=args.gpu_kind, gpus=args.plan_gpus,
                           gpus_per_node=args.gpus_per_node, note=note)


def handle(args: argparse.Namespace) -> int:
    from bpfm.orchestration import grid

    profile, recipe = load_profile_from_args(args)
    grid.check_trials(profile, recipe, args.recipe)
    if args.dry_run:
        return _dry_run(args, profile, {**profile.train, **recipe})

    from bpfm.orchestration import preflight

    preflight.check_launch(profile)  # before importing Ray: an unreachable server fails fast

    from bpfm.orchestration.ray_grid import run_grid

    if not args.verbose:  # a progress bar and the summary; -v: every log line, Ray's and Tune's
        _quiet_launch()
    try:
        result = run_grid(profile, recipe=recipe, name=args.name, gpus=args.gpus,
                          verbose=args.verbose)
    finally:
        progress.use(None)  # a process's bar is its launch's (tests launch several in one)
    _print_launch(result, args)
    return 1 if result["errors"] else 0


def _dry_run(args: argparse.Namespace, profile: Profile, train: dict) -> int:
    from bpfm.orchestration import costs, grid
    from bpfm.orchestration.dry_run import launch_notes

    plan = grid.dry_run(profile, train)
    plan["notes"] = launch_notes(profile, plan, args.gpus)
    plan["cost"] = _cost_plan(args, profile, train)
    print(redact(grid.format_dry_run(plan)))
    print(redact(costs.format_cost_plan(plan["cost"])))
    print(redact("\n".join(plan["notes"])))
    if args.json:
        print_result(plan, True)
    return 0


def _quiet_launch() -> None:
    """Warnings only from bpfm, MLflow and Ray, and the progress bar instead of Tune's output."""
    for name in ("", "mlflow", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Tune's newer console output prints its experiment box even when silent; the classic
    # reporter at verbosity 0 prints nothing
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    progress.use(progress.Progress())


def _print_launch(result: dict[str, Any], args: argparse.Namespace) -> None:
    from bpfm.orchestration import grid
    from bpfm.report import summary

    print(
        f"\n{result['n_cells']} cells ({result['n_trials']} trials) of profile "
        f"{result['profile']}; MLflow experiment {result['study']}, grid run "
        f"{result['grid_run_id']}"
    )
    print(summary.format_table2(result["cells"]))
    if result["quantized"]:
        print()
        if args.verbose:
            print(grid.format_table(result["quantized"], grid.QUANT_COLUMNS))
        else:
            print(summary.format_quantized(result["quantized"]))
    for source, uri in result["registered"].items():
        print(redact(f"best {source} model: {uri}"))
    for error in result["errors"]:
        print(redact(f"error: {error}"))
    print(summary.reading(result["cells"], result["study"]))
    if args.json:
        print_result(result, True)
