"""Helpers shared by the sub-commands: the `--json` contract and human-readable output."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from bpfm.io.redact import redact


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line of stdout"
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    if hasattr(value, "__fspath__"):
        return str(value)
    return value


def print_result(result: dict[str, Any], as_json: bool) -> None:
    """Print a command's result: `key: value` lines for people, or one JSON line for programs;
    strings redacted (a URI's credentials)."""
    if as_json:
        print(json.dumps(_jsonable(result), sort_keys=True))
        return
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for sub_key, sub_value in value.items():
                print(redact(f"  {sub_key}: {sub_value}"))
        else:
            print(redact(f"{key}: {value}"))
