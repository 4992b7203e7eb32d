"""Settings checked against the dataclass or function that will take them, before anything runs:
unknown keys (with the nearest known name) and values of the wrong type, as `(key, problem)`
pairs that callers turn into `file: section.key: problem` lines.

pydantic does the type checking, strictly (`batch_size: "8"` and `lr: true` are mistakes, not
values to coerce), on the settings as JSON so that YAML lists stand in for tuples. Ranges and
choices stay with the configs' own `validate()`."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from bpfm.errors import BpfmError

Config = TypeVar("Config")


def from_fields(cls: type[Config], values: Mapping[str, Any], what: str) -> Config:
    """`cls(**values)` for a config dataclass, refusing keys it has no field for in one line
    (`what: a, b: unknown field(s)`): a file written by a newer bpfm, or edited by hand."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise BpfmError(f"{what}: {', '.join(unknown)}: unknown field(s)")
    return cls(**values)


@functools.cache
def _schema(target: type | Callable, exclude: tuple[str, ...]) -> type[BaseModel]:
    hints = typing.get_type_hints(target)
    if dataclasses.is_dataclass(target):
        fields = {
            f.name: (hints[f.name], f.default if f.default is not dataclasses.MISSING
                     else f.default_factory())
            for f in dataclasses.fields(target)
        }
    else:  # a function: its keyword-only parameters are the settings
        parameters = inspect.signature(target).parameters.values()
        fields = {p.name: (hints[p.name], p.default) for p in parameters
                  if p.kind is inspect.Parameter.KEYWORD_ONLY}
    fields = {name: spec for name, spec in fields.items() if name not in exclude}
    config = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True)
    return create_model(target.__name__, __config__=config, **fields)


def known_keys(target: type | Callable, exclude: tuple[str, ...] = ()) -> list[str]:
    return list(_schema(target, tuple(exclude)).model_fields)


def field_problems(
    target: type | Callable, values: Mapping[str, Any], exclude: tuple[str, ...] = ()
) -> list[tuple[str, str]]:
    """Every unknown key and wrongly typed value of `values` for `target` (a dataclass, or a
    function's keyword-only parameters, less `exclude`), in key order."""
    schema = _schema(target, tuple(exclude))
    try:
        schema.model_validate_json(json.dumps(dict(values), default=str))
    except ValidationError as err:
        problems = [_problem(schema, e) for e in err.errors()]
        return sorted(problems, key=lambda p: p[0])
    return []


def _problem(schema: type[BaseModel], error: Mapping[str, Any]) -> tuple[str, str]:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, schema.model_fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return key, f"unknown key{hint}"
    value = error.get("input")
    problem = f"{error['msg'].replace('Input should', 'should')}, got {value!r}"
    if error["type"] == "float_type" and isinstance(value, str) and _is_number(value):
        problem += " (YAML reads 1e-3 without a dot as text: write 1.0e-3)"
    return key, problem


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
