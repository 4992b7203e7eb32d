"""`bpfm search`: Optuna search (Ray Tune, TPE + ASHA) of the recipe of one grid cell."""

from __future__ import annotations

import argparse
import dataclasses

from bpfm.cli.common import add_json_flag, print_result
from bpfm.errors import BpfmError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="Optuna search of lr, weight decay, head, dropout, warm-up for one grid cell",
        description="Search learning rate, weight decay, head type (paper, linear, mlp), MLP "
        "width and depth, dropout and warm-up for one grid cell with Ray Tune's OptunaSearch "
        "(seeded TPE) and ASHA early stopping. The Optuna study lives in --storage, so running "
        "the same command again continues an interrupted search up to --trials. Each trial is "
        "an MLflow run (bpfm.kind=search); the best trial is written as a recipe file for "
        "`bpfm grid --recipe FILE`.",
    )
    parser.add_argument(
        "--profile",
        default="demo",
        help="profile giving data, backbone, recipe and resources (default demo)",
    )
    parser.add_argument("--size", default="small")
    parser.add_argument("--freeze", default="unfrozen", choices=("frozen", "unfrozen"))
    parser.add_argument("--init", default="pretrained", choices=("pretrained", "xavier"))
    parser.add_argument("--source", help="default: the profile's first source")
    parser.add_argument("--protocol", help="default: the profile's first protocol")
    parser.add_argument("--seed", type=int, help="training seed (default: the profile's first)")
    parser.add_argument(
        "--epochs", type=int, help="epochs per trial, ASHA's max_t (default: the profile's largest)"
    )
    parser.add_argument("--trials", type=int, default=20, help="total trials of the study")
    parser.add_argument("--study", help="Optuna study name (default: search-<cell id>)")
    parser.add_argument(
        "--storage",
        help="Optuna storage: database URL or sqlite file (default: .bpfm/search/optuna.db)",
    )
    parser.add_argument("--experiment", help="MLflow experiment (default: <study>-search)")
    parser.add_argument(
        "--recipe-out", help="recipe file to write (default: .bpfm/search/<study>/recipe.yaml)"
    )
    parser.add_argument("--sampler-seed", type=int, default=42, help="TPE sampler seed")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=1,
        help="trials at once (TPE learns most from sequential trials)",
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        default=1,
        help="ASHA: epochs every trial gets before it may be stopped",
    )
    parser.add_argument("--reduction-factor", type=int, default=2, help="ASHA reduction factor")
    parser.add_argument("--data", help="override the profile's shard set URI")
    parser.add_argument("--gpus", default="auto", choices=("auto", "always", "never"))
    add_json_flag(parser)
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:

    from bpfm.orchestration.ray_search import SearchConfig, run_search
    from bpfm.profiles import AXIS_CHOICES, load_profile

    profile = load_profile(args.profile)
    if args.data:
        data = dataclasses.replace(profile.data, uri=args.data)
        profile = dataclasses.replace(profile, data=data)
    axes = profile.axes
    cell = {
        "size": args.size, "freeze": args.freeze, "init": args.init,
        "source": args.source or axes["source"][0],
        "protocol": args.protocol or axes["protocol"][0],
        "seed": axes["seed"][0] if args.seed is None else args.seed,
        "epochs": args.epochs or max(axes["epochs"]),
    }
    for axis in ("size", "source", "protocol"):
        if cell[axis] not in AXIS_CHOICES[axis]:
            raise BpfmError(
                f"search: --{axis}: unknown {cell[axis]!r} (one of {', '.join(AXIS_CHOICES[axis])})"
            )
    if args.trials < 1 or cell["epochs"] < 1:
        raise BpfmError("search: --trials/--epochs: must be >= 1")
    config = SearchConfig(
        cell=cell, trials=args.trials, study=args.study or "", storage=args.storage or "",
        experiment=args.experiment or "", recipe_out=args.recipe_out or "",
        seed=args.sampler_seed, grace_period=args.grace_period,
        reduction_factor=args.reduction_factor, max_concurrent=args.max_concurrent,
    )
    result = run_search(profile, config, gpus=args.gpus)
    if args.json:
        print_result(result, True)
    else:
        print(search_summary(result))
        print(f"recipe: {result['recipe']}  (use: bpfm grid --profile P --recipe FILE)")
    return 0


def search_summary(result: dict) -> str:
    """One line a reader can check: what this launch ran, what the study holds, who won. The
    study counts the trials of every launch; ASHA stops weak ones early (pruned), and a trial
    started as this launch's driver ended may not be in the study yet."""
    other = result["trials"] - result["complete"] - result.get("pruned", 0)
    parts = [f"{result['complete']} trained to the end",
             f"{result.get('pruned', 0)} stopped early by ASHA"]
    if other:
        parts.append(f"{other} failed or unfinished")
    return (
        f"study {result['study']}: this launch ran {result['ran']} trials; the study holds "
        f"{result['trials']} ({', '.join(parts)}); best: trial #{result['best_trial']}, "
        f"validation MAE {result['best_val_mae']:.3f} mmHg"
    )
