"""The `bpfm` command. Each sub-command lives in its own module under `bpfm/cli/` and exposes
`register(subparsers)`; heavy imports (torch, ray, mlflow) happen inside the handlers so that
`bpfm --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from bpfm.errors import BpfmError
from bpfm.io.redact import RedactingFormatter

# One module per command group, in the order `bpfm --help` lists them.
COMMAND_MODULES = (
    "data",
    "model",
    "pretrain",
    "train",
    "quantize",
    "export",
    "grid",
    "search",
    "leaderboard",
    "nightly",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bpfm",
        description="Cuffless blood pressure from ECG + PPG with CEReBrO, an EEG foundation model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"bpfm.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)  # every log line redacted (URIs, secrets)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    try:
        return int(args.func(args) or 0)
    except BpfmError as err:
        print(f"bpfm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # bpfm.io.interrupts.Interrupted says which signal
        print(f"bpfm: {err or 'interrupted'}", file=sys.stderr)
        return getattr(err, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
