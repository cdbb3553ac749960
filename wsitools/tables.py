"""Tables with a header row: the one reader and writer of the package's tables, and the same
tables as small HTML pages.

Tables are read and written with the standard ``csv`` module, in one of two dialects
(:data:`TableDialect`): tab-separated (the workflow's tables: samples, labels, QC and metrics)
or comma-separated (a training run's predictions, splits and curves, and the training logs).
The workflow's HTML report shows a table inline only as an HTML file (Snakemake's report embeds
``text/html`` results in the page and offers any other text file as a download), so the QC and
metrics tables are also written as small self-contained HTML pages (:func:`write_html_table`).
"""

from __future__ import annotations

import csv
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from wsitools.io import atomic_path

TILE_TABLE_SUFFIXES = (".csv", ".tsv")
"""The suffixes (in any case) of a tile-label table as ``tune pathotune --data``: anything else
is a folder of class folders."""

TableDialect = Literal["tsv", "csv"]
"""``tsv``: tab-separated, lines ending in ``\n``; ``csv``: the csv module's default (the
spreadsheet dialect: comma-separated, quoted where needed, lines ending in ``\r\n``)."""


def read_table(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """A tab-separated table with a header row, as a list of row dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def write_table(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    dialect: TableDialect = "tsv",
) -> None:
    """Write rows as a table with ``columns`` as header, atomically (a reader never sees half a
    table). Values are written as the csv module writes them (text as it is, a float as its
    ``repr``, so it reads back exactly); keys of a row that are not in ``columns`` are left out."""
    options: dict[str, Any] = {"delimiter": "\t", "lineterminator": "\n"} if dialect == "tsv" else {}
    with atomic_path(path, overwrite=True) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore", **options)
            writer.writeheader()
            writer.writerows(rows)


_HTML_STYLE = (
    "body{font-family:sans-serif;font-size:13px;margin:12px}"
    "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    "th{background:#f0f0f0;position:sticky;top:0}td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "tr.left-out td{background:#fde2e2}p{max-width:60em}"
)


def is_tile_table(path: str | os.PathLike[str]) -> bool:
    """Whether ``tune pathotune --data PATH`` is a tile-label table naming tiles of patch stores
    (:data:`TILE_TABLE_SUFFIXES`), for the command and the workflow alike."""
    return Path(path).suffix.lower() in TILE_TABLE_SUFFIXES


def is_number(text: str) -> bool:
    """True when ``text`` reads as a number (``float`` accepts it)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_html_table(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    title: str,
    note: str = "",
    left_out: Sequence[bool] | None = None,
) -> None:
    """Write rows as a self-contained HTML page holding one table, atomically.

    Every cell is escaped; numbers are right-aligned; rows flagged in ``left_out`` are tinted
    red (say so in ``note``, shown above the table)."""
    flags = list(left_out) if left_out is not None else [False] * len(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row, flag in zip(rows, flags):
        cells = []
        for c in columns:
            value = row.get(c)
            text = "" if value is None else str(value)
            kind = ' class="num"' if text and is_number(text) else ""
            cells.append(f"<td{kind}>{html.escape(text)}</td>")
        opening = '<tr class="left-out">' if flag else "<tr>"
        body.append(opening + "".join(cells) + "</tr>")
    page = (
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{_HTML_STYLE}</style></head><body>\n<h3>{html.escape(title)}</h3>\n"
        + (f"<p>{html.escape(note)}</p>\n" if note else "")
        + f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table>\n"
        "</body></html>\n"
    )
    with atomic_path(path, overwrite=True) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")


class _SemicolonSeparated(csv.excel):
    """Spreadsheet CSV in locales whose decimal mark is a comma: fields separated by ``;``."""

    delimiter = ";"


_DIALECTS: dict[str, type[csv.Dialect]] = {",": csv.excel, "\t": csv.excel_tab, ";": _SemicolonSeparated}
_SUFFIX_DELIMITERS = {".tsv": "\t", ".tab": "\t", ".csv": ","}


def sniff_dialect(path: Path, head: str) -> type[csv.Dialect] | csv.Dialect:
    """The CSV dialect of a user's table from ``head`` (its first lines): the separator its
    suffix names (``.tsv``/``.tab`` tab, ``.csv`` comma) when the header line holds it; else
    the one of comma, tab and semicolon that the header line holds (a TSV saved as ``.csv``, a
    spreadsheet's semicolon-separated export); else by the suffix, or sniffed among the three."""
    header = next((line for line in head.lstrip("\ufeff").splitlines() if line.strip()), "")
    expected = _SUFFIX_DELIMITERS.get(path.suffix.lower())
    if expected is not None and expected in header:
        return _DIALECTS[expected]
    present = [d for d in _DIALECTS if d in header]
    if len(present) == 1:
        return _DIALECTS[present[0]]
    if expected is not None:
        return _DIALECTS[expected]
    try:
        return csv.Sniffer().sniff(head, delimiters=",\t;")
    except csv.Error:
        return csv.excel
