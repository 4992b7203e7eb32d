"""`bpfm pretrain`: SimMIM masked-patch pretraining of the encoder on EEG(-like) windows."""

from __future__ import annotations

import argparse

from bpfm.cli.common import add_json_flag, print_result


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="SimMIM pretraining; writes an official-layout .ckpt for --init pretrained"
    )
    parser.add_argument("--out", required=True, help="checkpoint file to write (.ckpt)")
    parser.add_argument("--size", default="small", help="small | medium (alias base) | large")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--eeg", help="EDF / .npz / Parquet file or folder of them")
    source.add_argument(
        "--synthetic", action="store_true", help="generated EEG-like windows (the default)"
    )
    source.add_argument(
        "--data", help="shard set URI: in-domain pretraining on the ECG+PPG windows of its train "
        "view (--source, --protocol), never validation or test windows"
    )
    parser.add_argument("--source", default="mimic", help="with --data: mimic | vitaldb | other")
    parser.add_argument(
        "--protocol", default="paper", help="with --data: paper | calbased | calfree | aami"
    )
    parser.add_argument("--split-seed", type=int, default=42, help="with --data")
    parser.add_argument(
        "--init-checkpoint", help="continue from this backbone (e.g. the EEG one) instead of xavier"
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--window", type=int, default=1280, help="samples per window")
    parser.add_argument("--sample-rate", type=float, default=125.0, help="EDF resampling target")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--log-every", type=int, default=50)
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bpfm.training.pretrain import PretrainConfig, pretrain

    result = pretrain(
        PretrainConfig(
            out=args.out,
            size=args.size,
            eeg=args.eeg,
            steps=args.steps,
            channels=args.channels,
            window=args.window,
            sample_rate=args.sample_rate,
            batch_size=args.batch_size,
            lr=args.lr,
            mask_ratio=args.mask_ratio,
            seed=args.seed,
            device=args.device,
            log_every=args.log_every,
            data=args.data,
            source=args.source,
            protocol=args.protocol,
            split_seed=args.split_seed,
            init_checkpoint=args.init_checkpoint,
        )
    )
    print_result(
        {
            "out": result.out,
            "steps": result.steps,
            "windows": result.windows,
            "first_loss": round(result.first_loss, 5),
            "last_loss": round(result.last_loss, 5),
            "seconds": round(result.seconds, 1),
        },
        args.json,
    )
    return 0
