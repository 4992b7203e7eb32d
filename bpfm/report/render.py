"""Render a report (titled sections of tables, notes and plots) as Markdown, as one self-contained
HTML page (images embedded as base64) and as one CSV per table."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

HTML_STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}"
    "th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}"
    "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%;border:1px solid #eee;margin:4px 0}"
    "p.note{color:#555;font-size:13px}"
)


@dataclass
class Section:
    title: str
    table: pd.DataFrame | None = None
    note: str = ""
    csv: str | None = None  # file name of the table's CSV, when it gets one
    images: list[Path] = field(default_factory=list)


@dataclass
class Report:
    title: str
    preamble: str
    sections: list[Section]


def format_value(column: str, value: Any) -> str:
    """Numbers as the paper prints them: R^2 to 4 decimals, everything else to 2."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer() and column in ("epochs", "seed", "seeds", "n", "n_subjects"):
            return str(int(value))
        return f"{value:.4f}" if "r2" in column else f"{value:.2f}"
    return str(value)


def _cells(table: pd.DataFrame) -> list[list[str]]:
    return [
        [format_value(str(column), value) for column, value in zip(table.columns, row, strict=True)]
        for row in table.itertuples(index=False)
    ]


def markdown_table(table: pd.DataFrame) -> str:
    header = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells in _cells(table):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def html_table(table: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for cells in _cells(table)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _has_rows(section: Section) -> bool:
    return section.table is not None and not section.table.empty


def render_markdown(report: Report, out_dir: Path) -> str:
    parts = [f"# {report.title}", "", report.preamble, ""]
    for section in report.sections:
        parts += [f"## {section.title}", ""]
        if section.note:
            parts += [section.note, ""]
        if _has_rows(section):
            parts += [markdown_table(section.table), ""]
            if section.csv:
                parts += [f"CSV: `{section.csv}`", ""]
        for image in section.images:
            parts += [f"![{image.stem}]({image.relative_to(out_dir).as_posix()})", ""]
    return "\n".join(parts)


def _embedded(image: Path) -> str:
    data = base64.b64encode(image.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(image.stem)}" src="data:image/png;base64,{data}">'


def render_html(report: Report) -> str:
    """One file with no external references: it can be mailed or attached as it is."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(report.title)}</title><style>{HTML_STYLE}</style></head><body>",
        f"<h1>{html.escape(report.title)}</h1><p>{html.escape(report.preamble)}</p>",
    ]
    for section in report.sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.note:
            parts.append(f"<p class='note'>{html.escape(section.note)}</p>")
        if _has_rows(section):
            parts.append(html_table(section.table))
        parts.extend(_embedded(image) for image in section.images)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    """Writes report.md, report.html and the sections' CSVs into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for section in report.sections:
        if section.csv and section.table is not None:
            path = out_dir / section.csv
            section.table.to_csv(path, index=False)
            written[section.csv] = path
    markdown = out_dir / "report.md"
    markdown.write_text(render_markdown(report, out_dir), encoding="utf-8")
    page = out_dir / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    written.update({"report.md": markdown, "report.html": page})
    return written
