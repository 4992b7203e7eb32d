"""`bpfm train` (one grid cell: fine-tune or train from scratch) and `bpfm evaluate` (test
metrics of a trained model dir). Names are checked by `TrainConfig.validate`, not argparse
`choices`, so that a wrong name is one line (`bpfm: error: ...`, exit 2), like every other
user error."""

from __future__ import annotations

import argparse

from bpfm.cli.common import add_json_flag, print_result
from bpfm.defaults import home
from bpfm.errors import BpfmError

# Result keys shown to people (everything goes to --json).
SUMMARY_KEYS = (
    "sbp_mae",
    "dbp_mae",
    "sbp_sd",
    "dbp_sd",
    "sbp_me",
    "dbp_me",
    "sbp_r2",
    "dbp_r2",
    "sbp_mase",
    "dbp_mase",
    "sbp_bhs_grade",
    "dbp_bhs_grade",
    "aami",
    "n",
    "n_subjects",
)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="shard set URI (folder or s3://), from `bpfm data shard`")
    parser.add_argument("--source", help="mimic | vitaldb | other")
    parser.add_argument("--protocol", help="paper | calbased | calfree | aami")


def _add_calibration_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calibration", default="none",
        help="per-subject calibration: none | offset | affine | head (comma-separated for "
        "several); each is reported beside none and the trivial calibrated predictor",
    )
    parser.add_argument(
        "--calib-windows", type=int, default=5,
        help="K calibration windows per test subject (aami: its AAMI_Cal segments)",
    )


def _calibration_summary(result: dict) -> dict:
    """Per method: MAE, MASE and cal_mase per target (what people read; --json has it all)."""
    keys = ("sbp_mae", "dbp_mae", "sbp_mase", "dbp_mase", "sbp_cal_mase", "dbp_cal_mase")
    return {
        "k": result["k"], "n_test": result["n_test"], "n_subjects": result["n_subjects"],
        **{name: {k: round(m[k], 3) for k in keys} for name, m in result["metrics"].items()},
    }


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """What is trained: size, freezing, initialisation, epochs and where it goes."""
    parser.add_argument("--size", default="small", help="small | medium (base) | large")
    parser.add_argument("--freeze", default="unfrozen", help="frozen | unfrozen")
    parser.add_argument(
        "--init", default="xavier",
        help="xavier | pretrained (EEG) | pretrained_ecgppg | pretrained_eeg_then_ecgppg",
    )
    parser.add_argument(
        "--checkpoint", help="backbone checkpoint (path or URI) for --init pretrained"
    )
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", help="model dir to write (default .bpfm/runs/train)")
    parser.add_argument(
        "--report-epochs",
        type=_int_list,
        default=(),
        help="also write out/epoch-N/ model dirs, e.g. 100,200",
    )


def _add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """How it is trained: optimiser, schedule, head, loss, targets, seeds."""
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--head", default="paper", help="paper | linear | mlp")
    parser.add_argument("--head-hidden", type=_int_list, default=(), help="mlp sizes, e.g. 256,64")
    parser.add_argument("--head-dropout", type=float, default=0.0)
    parser.add_argument("--optimizer", default="adam", help="adam | adamw")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--schedule", default="constant", help="constant | cosine")
    parser.add_argument("--warmup-epochs", type=float, default=0.0)
    parser.add_argument("--loss", default="mse", help="mse | huber")
    parser.add_argument(
        "--raw-targets",
        action="store_true",
        help="train on raw mmHg targets (the paper's recipe) instead of z-scores",
    )
    parser.add_argument(
        "--raw-inputs",
        action="store_true",
        help="feed PulseDB's [0, 1] windows as they are (the paper) instead of z-scored windows",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--split-seed", type=int, default=42)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Where and how the run executes: device, compilation, workers, resume, data cache."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the training steps (GPUs: ~1.6x)"
    )
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--max-steps-per-epoch", type=int, help="cap steps per epoch (tiny runs)")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    parser.add_argument(
        "--allow-new-data",
        action="store_true",
        help="resume even though the shard set was republished since the checkpoint",
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="stream a remote shard set's parts every epoch instead of copying them once into "
        "this node's cache (BPFM_CACHE_DIR, capped by BPFM_CACHE_MAX_GB)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="fine-tune or train one configuration",
        description="Train one configuration and write a model dir (model.safetensors, "
        "config.json, metrics.json, predictions.parquet, checkpoints/). Re-running the same "
        "command resumes from the last epoch checkpoint.",
    )
    _add_data_flags(train)
    _add_model_flags(train)
    _add_recipe_flags(train)
    _add_run_flags(train)
    _add_calibration_flags(train)
    add_json_flag(train)
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="test metrics of a trained model dir",
        description="Evaluate a model dir on the test view of its own data / source / protocol, "
        "or of the ones given.",
    )
    evaluate.add_argument("--model", help="model dir written by `bpfm train`")
    _add_data_flags(evaluate)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--batch-size", type=int, default=256)
    _add_calibration_flags(evaluate)
    add_json_flag(evaluate)
    evaluate.set_defaults(func=run_evaluate)


def _config_from_args(args: argparse.Namespace):
    from bpfm.training.config import TrainConfig

    return TrainConfig(
        data=args.data or "",
        cache=not args.no_cache,
        source=args.source or "mimic",
        protocol=args.protocol or "paper",
        size=args.size,
        freeze=args.freeze,
        init=args.init,
        checkpoint=args.checkpoint,
        head=args.head,
        head_hidden=args.head_hidden,
        head_dropout=args.head_dropout,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        loss=args.loss,
        standardize_targets=not args.raw_targets,
        normalize_inputs=not args.raw_inputs,
        seed=args.seed,
        split_seed=args.split_seed,
        device=args.device,
        amp=not args.no_amp,
        compile=args.compile,
        report_epochs=args.report_epochs,
        out=args.out or str(home() / "runs" / "train"),
        num_workers=args.num_workers,
        max_steps_per_epoch=args.max_steps_per_epoch,
        calibration=args.calibration,
        calib_windows=args.calib_windows,
    ).validate()


def run_train(args: argparse.Namespace) -> int:
    from bpfm.training.loop import fit
    from bpfm.training.model_dir import read_metrics

    result = fit(
        _config_from_args(args), resume=not args.no_resume, allow_new_data=args.allow_new_data
    )
    output = {
        "out": str(result.out),
        "epochs": result.epochs,
        "split": result.split["label"],
        "val_mae": result.history[-1]["val_mae"],
    }
    if args.json:
        output.update(
            test=result.test, report_dirs={e: str(p) for e, p in result.report_dirs.items()}
        )
    else:
        output.update({f"test_{k}": result.test[k] for k in SUMMARY_KEYS})
    calibration = read_metrics(result.out).get("calibration")
    if calibration:
        output["calibration"] = calibration if args.json else _calibration_summary(calibration)
    print_result(output, args.json)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from bpfm.training.calibration import parse_methods
    from bpfm.training.evaluate import evaluate

    if not args.model:
        raise BpfmError("evaluate: model: no model dir given (--model DIR)")
    metrics = evaluate(
        args.model,
        args.data,
        args.source,
        args.protocol,
        device=args.device,
        batch_size=args.batch_size,
        calibration=parse_methods(args.calibration),
        calib_windows=args.calib_windows,
    )
    shown = metrics if args.json else {k: metrics[k] for k in ("split", *SUMMARY_KEYS)}
    if "calibration" in metrics and not args.json:
        shown["calibration"] = _calibration_summary(metrics["calibration"])
    print_result(shown, args.json)
    return 0
