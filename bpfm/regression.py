"""Nightly regression check: every tracked metric of a run against a committed baseline, with
per-metric, direction-aware tolerances. Pure functions (plus reading / writing the baseline JSON).

Entries are keyed by what they measure (`train/<cell id>`, `quant/<cell id>/<variant>`), each a
mapping of metric name to value (numbers, BHS grades, AAMI verdicts). A metric regresses when it
moves the wrong way by more than `max(abs, rel * |baseline|)`; grades and verdicts regress on any
step down. Missing entries or metrics regress too: a run that stopped logging something is broken.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bpfm.errors import BpfmError

FORMAT = "bpfm-nightly-baseline/1"
DIRECTIONS = ("lower", "higher", "zero", "equal", "either", "grade", "verdict", "ignore")
GRADES = "ABCD"  # best first
VERDICTS = ("pass", "not_assessable", "fail")  # best first


@dataclass(frozen=True)
class Tolerance:
    """How far a metric may move the wrong way. Directions: `lower` / `higher` is better, `zero`
    (closer to 0 is better: mean error), `equal` (counts: any change), `either` (unknown metric:
    any change beyond the tolerance), `grade` (A-D), `verdict` (AAMI), `ignore`."""

    direction: str
    abs: float = 0.0
    rel: float = 0.0

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise BpfmError(f"tolerance: direction: {self.direction!r} not one of {DIRECTIONS}")

    def allowed(self, baseline: float) -> float:
        return max(self.abs, self.rel * abs(baseline))


# (metric name pattern, tolerance): the first matching pattern wins. Accuracy tolerances are set
# for the nightly profile's few-step CPU runs (same seeds; float noise across machines only),
# latency loosely because CI machines are shared.
DEFAULT_TOLERANCES: tuple[tuple[str, Tolerance], ...] = (
    ("*_bhs_grade", Tolerance("grade")),
    ("*aami", Tolerance("verdict")),
    ("n", Tolerance("equal")),
    ("n_subjects", Tolerance("equal")),
    ("*_mae_ci_*", Tolerance("lower", abs=1.0, rel=0.10)),
    # quantized minus fp32: the INT8 model should track fp32, and beating it is chance
    ("delta_*_mae", Tolerance("zero", abs=0.5)),
    ("delta_*_r2", Tolerance("zero", abs=0.02)),
    ("*_mase", Tolerance("lower", abs=0.05)),
    ("*_me", Tolerance("zero", abs=1.0)),
    ("*_mae", Tolerance("lower", abs=0.5, rel=0.05)),
    ("*_sd", Tolerance("lower", abs=0.5, rel=0.05)),
    ("*_rmse", Tolerance("lower", abs=0.5, rel=0.05)),
    ("*_r2", Tolerance("higher", abs=0.02)),
    ("*_bhs5", Tolerance("higher", abs=2.0)),
    ("*_bhs10", Tolerance("higher", abs=2.0)),
    ("*_bhs15", Tolerance("higher", abs=2.0)),
    ("val_mae", Tolerance("lower", abs=0.5, rel=0.05)),
    ("train_loss", Tolerance("lower", abs=0.05, rel=0.10)),
    ("size_mib", Tolerance("lower", rel=0.02)),
    ("reduction_factor", Tolerance("higher", rel=0.02)),
    ("latency_ms_*", Tolerance("lower", rel=1.0)),
    ("speedup_*", Tolerance("higher", rel=0.75)),  # a ratio of two noisy latencies
    ("*", Tolerance("either", abs=1e-6, rel=0.10)),
)


def tolerance_for(
    metric: str, tolerances: Sequence[tuple[str, Tolerance]] = DEFAULT_TOLERANCES
) -> Tolerance:
    for pattern, tolerance in tolerances:
        if fnmatch.fnmatchcase(metric, pattern):
            return tolerance
    return Tolerance("either", abs=1e-6, rel=0.10)


@dataclass(frozen=True)
class Finding:
    entry: str
    metric: str
    status: str  # ok | regressed | improved | missing | new
    baseline: Any = None
    current: Any = None
    allowed: float | None = None
    direction: str = ""


@dataclass
class Comparison:
    findings: list[Finding] = field(default_factory=list)

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.status in ("regressed", "missing")]

    @property
    def improvements(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "improved"]

    @property
    def passed(self) -> bool:
        return not self.regressions

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for finding in self.findings:
            counts[finding.status] = counts.get(finding.status, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "counts": self.counts(),
            "findings": [asdict(f) for f in self.findings if f.status != "ok"],
        }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _ordinal(order: tuple[str, ...] | str, baseline: Any, current: Any) -> str:
    if current == baseline:
        return "ok"
    if current not in order or baseline not in order:
        return "regressed"
    return "regressed" if order.index(current) > order.index(baseline) else "improved"


def compare_value(baseline: Any, current: Any, tolerance: Tolerance) -> tuple[str, float | None]:
    """(status, allowed move) of one metric: ok, regressed or improved."""
    direction = tolerance.direction
    if direction == "ignore":
        return "ok", None
    if direction == "grade":
        return _ordinal(GRADES, baseline, current), None
    if direction == "verdict":
        return _ordinal(VERDICTS, baseline, current), None
    old, new = _number(baseline), _number(current)
    if old is None or new is None:
        return ("ok" if baseline == current else "regressed"), None
    if math.isnan(old) or math.isnan(new):
        if math.isnan(old) and math.isnan(new):
            return "ok", None
        return ("regressed" if math.isnan(new) else "improved"), None
    allowed = tolerance.allowed(old)
    if direction == "equal":
        return ("ok" if new == old else "regressed"), 0.0
    if direction == "zero":
        old, new = abs(old), abs(new)
    if direction == "either":
        return ("ok" if abs(new - old) <= allowed else "regressed"), allowed
    worse = new - old if direction in ("lower", "zero") else old - new
    if worse > allowed:
        return "regressed", allowed
    if -worse > allowed:
        return "improved", allowed
    return "ok", allowed


def compare(
    baseline: Mapping[str, Mapping[str, Any]],
    current: Mapping[str, Mapping[str, Any]],
    tolerances: Sequence[tuple[str, Tolerance]] = DEFAULT_TOLERANCES,
) -> Comparison:
    """Every metric of every baseline entry against the current run; new entries and metrics
    are listed (`new`) but do not fail the check."""
    comparison = Comparison()
    for entry in sorted(baseline):
        if entry not in current:
            comparison.findings.append(Finding(entry, "*", "missing"))
            continue
        old_metrics, new_metrics = baseline[entry], current[entry]
        for metric in sorted(old_metrics):
            tolerance = tolerance_for(metric, tolerances)
            if metric not in new_metrics:
                comparison.findings.append(
                    Finding(entry, metric, "missing", old_metrics[metric], None, None,
                            tolerance.direction)
                )
                continue
            status, allowed = compare_value(old_metrics[metric], new_metrics[metric], tolerance)
            comparison.findings.append(
                Finding(entry, metric, status, old_metrics[metric], new_metrics[metric], allowed,
                        tolerance.direction)
            )
        for metric in sorted(set(new_metrics) - set(old_metrics)):
            comparison.findings.append(Finding(entry, metric, "new", None, new_metrics[metric]))
    for entry in sorted(set(current) - set(baseline)):
        comparison.findings.append(Finding(entry, "*", "new"))
    return comparison


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_markdown(comparison: Comparison, title: str = "bpfm nightly regression report") -> str:
    verdict = "PASS" if comparison.passed else "FAIL"
    counts = ", ".join(f"{n} {status}" for status, n in sorted(comparison.counts().items()))
    lines = [f"# {title}", "", f"**{verdict}**: {counts}.", ""]
    for heading, status in (
        ("Regressions", ("regressed", "missing")),
        ("Improvements beyond tolerance", ("improved",)),
        ("New (not in the baseline)", ("new",)),
    ):
        rows = [f for f in comparison.findings if f.status in status]
        if not rows:
            continue
        lines += [f"## {heading}", "", "| entry | metric | baseline | current | allowed | better |",
                  "|---|---|---|---|---|---|"]
        lines += [
            f"| {f.entry} | {f.metric} | {_show(f.baseline)} | {_show(f.current)} | "
            f"{_show(f.allowed)} | {f.direction or '-'} |"
            for f in rows
        ]
        lines.append("")
    lines += _compared_table(comparison)
    return "\n".join(lines)


def _show_tolerance(direction: str, allowed: float | None) -> str:
    if direction in ("grade", "verdict"):
        return "no worse"
    if direction == "equal":
        return "equal"
    if direction == "ignore" or allowed is None:
        return "-"
    sign = {"lower": "+", "higher": "-", "zero": "|d| "}.get(direction, "±")
    return f"{sign}{allowed:.3g}"


VERDICT_WORDS = {"ok": "ok", "regressed": "REGRESSED", "missing": "MISSING", "improved": "better",
                 "new": "new"}


def _compared_table(comparison: Comparison) -> list[str]:
    """Every comparison made: metric, baseline, now, the tolerance (how far it may move the
    wrong way) and the verdict, one table per entry."""
    lines = ["## Every metric compared", ""]
    entries: dict[str, list[Finding]] = {}
    for finding in comparison.findings:
        entries.setdefault(finding.entry, []).append(finding)
    for entry, findings in sorted(entries.items()):
        lines += [f"### {entry}", "", "| metric | baseline | now | tolerance | verdict |",
                  "|---|---|---|---|---|"]
        lines += [
            f"| {f.metric} | {_show(f.baseline)} | {_show(f.current)} | "
            f"{_show_tolerance(f.direction, f.allowed)} | {VERDICT_WORDS.get(f.status, f.status)} |"
            for f in findings
        ]
        lines.append("")
    return lines


# ------------------------------------------------------------------ the baseline file


def parse_tolerances(raw: Mapping[str, Any], source: str) -> tuple[tuple[str, Tolerance], ...]:
    """A baseline's `tolerances` overrides ({pattern: {direction, abs, rel}}), ahead of the
    defaults."""
    overrides = []
    for pattern, spec in raw.items():
        if not isinstance(spec, Mapping):
            raise BpfmError(f"{source}: tolerances.{pattern}: must be a mapping")
        try:
            overrides.append((pattern, Tolerance(**spec)))
        except TypeError as err:
            raise BpfmError(f"{source}: tolerances.{pattern}: {err}") from None
    return (*overrides, *DEFAULT_TOLERANCES)


def load_baseline(path: str | Path) -> dict[str, Any]:
    """The baseline document; one-line errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise BpfmError(f"{path}: baseline: not found (create it with --update-baseline)")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BpfmError(f"{path}: baseline: not valid JSON ({err})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BpfmError(f"{path}: format: expected {FORMAT!r}")
    if not isinstance(document.get("entries"), dict):
        raise BpfmError(f"{path}: entries: missing")
    return document


def baseline_document(
    entries: Mapping[str, Mapping[str, Any]],
    *,
    profile: str,
    created: str,
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A new baseline from a run's entries, keeping the previous file's tolerance overrides."""
    return {
        "format": FORMAT,
        "profile": profile,
        "created": created,
        "tolerances": dict((previous or {}).get("tolerances") or {}),
        "entries": {key: dict(sorted(values.items())) for key, values in sorted(entries.items())},
    }
