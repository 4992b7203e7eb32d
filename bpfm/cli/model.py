"""`bpfm model info`: parameter counts and file size of a model configuration."""

from __future__ import annotations

import argparse

from bpfm.cli.common import add_json_flag, print_result
from bpfm.errors import BpfmError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="model sizes, parameters and file size")
    commands = parser.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="parameters (total, trainable) and fp32 size in MiB")
    info.add_argument("--size", required=True, help="small | medium (alias base) | large")
    info.add_argument("--freeze", default="unfrozen", help="frozen | unfrozen (default unfrozen)")
    info.add_argument("--head", default="paper", help="paper | linear | mlp (default paper)")
    info.add_argument(
        "--head-hidden", default="", help="mlp head hidden sizes, comma-separated (e.g. 256,64)"
    )
    add_json_flag(info)
    info.set_defaults(func=run_info)


def parse_hidden(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BpfmError(f"--head-hidden: {text!r} is not a comma-separated list of sizes") from None


def run_info(args: argparse.Namespace) -> int:
    from bpfm.model import apply_freeze, count_parameters, create_model, size_config
    from bpfm.quant.measure import state_dict_bytes

    config = size_config(args.size)
    model = create_model(
        args.size, head=args.head, head_hidden=parse_hidden(args.head_hidden), device="meta"
    )
    apply_freeze(model, args.freeze)
    total, trainable = count_parameters(model)
    size_bytes = state_dict_bytes(model)
    print_result(
        {
            "size": model.spec["size"],
            "head": args.head,
            "freeze": args.freeze,
            "dim": config.dim,
            "depth": config.depth,
            "heads": config.heads,
            "total_params": total,
            "trainable_params": trainable,
            "state_dict_bytes": size_bytes,
            "state_dict_mib": round(size_bytes / 2**20, 2),
        },
        args.json,
    )
    return 0
