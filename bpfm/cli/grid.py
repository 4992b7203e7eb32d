"""`bpfm grid`: the whole study (what `pipelines/grid.py` runs locally or as a Ray job)."""

from __future__ import annotations

import argparse
import dataclasses

from bpfm.cli.common import add_json_flag, print_result


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
    parser.add_argument(
        "--profile", required=True, help="profile name (demo, paper, nightly) or a YAML file"
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
        help="Tune experiment name (default: the profile's study); "
        "the same name resumes, a new one starts over",
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
    cost = parser.add_argument_group("cost plan (with --dry-run)")
    cost.add_argument("--gpu-kind", default="H100", help="GPU of the throughput table (H100)")
    cost.add_argument("--plan-gpus", type=int, default=8, help="GPUs to pack the trials on")
    cost.add_argument("--gpus-per-node", type=int, default=8)
    add_json_flag(parser)


def load_profile_from_args(args: argparse.Namespace):
    from bpfm.profiles import load_profile, load_recipe

    profile = load_profile(args.profile)
    if args.data:
        data = dataclasses.replace(profile.data, uri=args.data)
        profile = dataclasses.replace(profile, data=data)
    if args.storage:
        profile = dataclasses.replace(profile, storage=args.storage)
    recipe = load_recipe(args.recipe) if args.recipe else {}
    return profile, recipe


def _cost_plan(args: argparse.Namespace, profile, train: dict) -> dict:
    """The cost plan of a dry run; samples per epoch from the manifest when it can be read."""
    from bpfm import costs, grid
    from bpfm.data.shardset import read_manifest
    from bpfm.errors import BpfmError

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
                           gpus_per_node=args.gpus_per_node, note=note)  # fmt: skip


def handle(args: argparse.Namespace) -> int:
    from bpfm import costs, grid

    profile, recipe = load_profile_from_args(args)
    train = {**profile.train, **recipe}
    if args.dry_run:
        plan = grid.dry_run(profile, train)
        plan["cost"] = _cost_plan(args, profile, train)
        print(grid.format_dry_run(plan))
        print(costs.format_cost_plan(plan["cost"]))
        if args.json:
            print_result(plan, True)
        return 0

    from bpfm.tune import run_grid

    result = run_grid(profile, recipe=recipe, name=args.name, gpus=args.gpus)
    print(
        f"\n{result['n_cells']} cells ({result['n_trials']} trials) of profile "
        f"{result['profile']}; MLflow experiment {result['study']}, grid run "
        f"{result['grid_run_id']}"
    )
    print(grid.format_table(result["cells"], grid.TRAIN_COLUMNS))
    if result["quantized"]:
        print()
        print(grid.format_table(result["quantized"], grid.QUANT_COLUMNS))
    for source, uri in result["registered"].items():
        print(f"best {source} model: {uri}")
    for error in result["errors"]:
        print(f"error: {error}")
    if args.json:
        print_result(result, True)
    return 1 if result["errors"] else 0
