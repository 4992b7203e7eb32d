"""`bpfm quantize`: one INT8 variant of a trained model dir, measured against its fp32 model.
Names are checked by `QuantConfig.validate`, not argparse `choices`, so that a wrong name is one
line (`bpfm: error: ...`, exit 2), like every other user error."""

from __future__ import annotations

import argparse

from bpfm.cli.common import add_json_flag, print_result
from bpfm.defaults import home

# Result keys shown to people (everything goes to --json).
SUMMARY_KEYS = (
    "variant",
    "engine",
    "size_mib",
    "size_kind",
    "reduction_factor",
    "threads",
    "latency_ms_b1",
    "latency_ms_b64",
    "speedup_b1",
    "speedup_b64",
    "compile_s",
    "delta_sbp_mae",
    "delta_dbp_mae",
    "delta_sbp_r2",
    "delta_dbp_r2",
    "model_file",
)
TEST_KEYS = ("sbp_mae", "dbp_mae", "sbp_sd", "dbp_sd", "sbp_r2", "dbp_r2", "sbp_bhs_grade",
             "dbp_bhs_grade", "aami", "n", "n_subjects")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="INT8-quantize a trained model and measure it against fp32",
        description="Quantize a trained model dir (from `bpfm train`), evaluate it on the test "
        "view with the clinical metrics, measure size and CPU latency against fp32, and write "
        "OUT/quant.json plus the quantized model (OUT/model.pt for fx, OUT/model.pt2 for pt2e).",
    )
    parser.add_argument("--model", required=True, help="model dir written by `bpfm train`")
    parser.add_argument("--data", help="shard set URI (default: the one the model trained on)")
    parser.add_argument("--source", help="mimic | vitaldb | other (default: the model's)")
    parser.add_argument("--protocol",
                        help="paper | calbased | calfree | aami (default: the model's)")
    parser.add_argument("--mode", default="dynamic", help="dynamic | static | fp32")
    parser.add_argument("--observer", default="minmax",
                        help="static activations: minmax | moving_average | histogram")
    parser.add_argument("--weights", default="per_channel", help="per_channel | per_tensor")
    parser.add_argument("--backend", default="fx",
                        help="fx (torch.ao, as the paper) | pt2e (torchao, compiled)")
    parser.add_argument("--calib-batches", type=int, default=8,
                        help="training batches of 64 that static mode calibrates on")
    parser.add_argument("--quantize-input", action="store_true",
                        help="round ECG and PPG to 8 bits, one scale per channel")
    parser.add_argument("--no-compile", action="store_true",
                        help="pt2e: run the eager reference graph (slow) instead of compiling")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for latency")
    parser.add_argument("--latency-runs", type=int, default=20,
                        help="timed runs per batch size (median reported); 0 skips latency")
    parser.add_argument("--out", help="output folder (default .bpfm/runs/quantize/<variant>)")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bpfm.quant.quantized import QuantConfig
    from bpfm.quant.study import run_quantization

    config = QuantConfig(
        mode=args.mode, observer=args.observer, weights=args.weights, backend=args.backend,
        calib_batches=args.calib_batches, quantize_input=args.quantize_input,
        compile=not args.no_compile,
    ).validate()
    out = args.out or str(home() / "runs" / "quantize" / config.name)
    result = run_quantization(args.model, config, data=args.data, source=args.source,
                              protocol=args.protocol, out=out, threads=args.threads,
                              latency_runs=args.latency_runs)
    if args.json:
        print_result(result, True)
    else:
        summary = {key: result[key] for key in SUMMARY_KEYS}
        summary["test"] = {key: result["test"][key] for key in TEST_KEYS}
        print_result(summary, False)
    return 0
