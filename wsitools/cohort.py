"""A cohort of slides for the workflow: the samples sheet, the QC summary, labels and metrics tables.

The Snakemake workflow (``workflow/``) and ``wsitools demo`` call these functions; the Snakefile
holds no logic of its own beyond wiring. Everything a user can get wrong here (an unsafe or
duplicate slide id, a missing slide file, an implausible mpp override) is a :class:`DataError`
naming the sheet, the row and the problem, raised before any job runs.

Tables are tab-separated with a header row, read and written with the standard ``csv`` module.
The workflow's HTML report shows a table inline only as an HTML file (Snakemake's report embeds
``text/html`` results in the page and offers any other text file as a download), so the QC and
metrics tables are also written as small self-contained HTML pages (:func:`write_html_table`).
"""

from __future__ import annotations

import csv
import glob
import html
import json
import math
import os
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsitools.encoders.cards import find_card
from wsitools.errors import DataError, ModelError
from wsitools.io import atomic_path
from wsitools.metrics import METRICS, REGRESSION_METRICS, roc_points
from wsitools.text import TaskType
from wsitools.types import MPP_MAX, MPP_MIN, MicronsPerPixel, check_slide_id, slide_id_from_path

QC_COLUMNS = (
    "slide_id",
    "status",
    "reason",
    "mpp",
    "mpp_target",
    "level",
    "level_downsample",
    "tissue_area_mm2",
    "n_tiles",
    "slide_path",
)
"""Columns of ``results/qc/summary.tsv``, one row per slide of the cohort: the fields of the
slide's ``{slide_id}.qc.json`` (``mpp`` is the slide's level-0 resolution, ``level`` the pyramid
level read; empty where a failed slide has no value)."""

SPLIT_COLUMNS = ("split", "fold")
"""Samples-sheet columns with the user's own splits, passed on to the labels tables."""

USABLE_STATUS = "ok"
"""The QC status of a slide that goes on to feature extraction and training."""


@dataclass(frozen=True)
class Sample:
    """One slide of the cohort, as the samples sheet (or a slide glob) describes it."""

    slide_id: str
    path: str
    patient_id: str
    mpp: MicronsPerPixel | None = None
    fields: Mapping[str, str] = field(default_factory=dict)
    """Every column of the sheet for this row (labels of any task live here)."""

    def value(self, column: str) -> str:
        """The (stripped) value of ``column`` for this slide; empty when absent."""
        return self.fields.get(column, "").strip()


def workflow_dir() -> Path:
    """The ``workflow/`` folder of the wsitools checkout this package was imported from.

    The workflow is not part of the installed package: it lives beside it in the repository
    (repo root = parent of the package folder), so the package must be installed editable
    (``pip install -e .``) or run from a checkout.
    """
    root = Path(__file__).resolve().parent.parent
    snakefile = root / "workflow" / "Snakefile"
    if not snakefile.is_file():
        raise DataError(
            f"no workflow at {snakefile}: the Snakemake workflow ships with the repository, "
            "install wsitools from a checkout with `pip install -e .`"
        )
    return root / "workflow"


def snakemake_command(workdir: str | os.PathLike[str], *args: str) -> list[str]:
    """The command that runs this checkout's workflow in ``workdir`` with Snakemake's CLI.

    Snakemake runs as ``python -m snakemake`` with the current interpreter, so it sees the same
    environment (and wsitools) as the caller.
    """
    snakefile = workflow_dir() / "Snakefile"
    return [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile),
            "--directory", str(workdir), *args]


def _parse_mpp(text: str, where: str) -> MicronsPerPixel | None:
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: mpp {text!r} is not a number") from None
    if not (math.isfinite(value) and MPP_MIN <= value <= MPP_MAX):
        raise DataError(f"{where}: mpp {value:g} is outside {MPP_MIN:g}-{MPP_MAX:g} um/px")
    return MicronsPerPixel(value)


def _check_unique(samples: Sequence[Sample], source: str) -> None:
    seen: dict[str, str] = {}
    for s in samples:
        if s.slide_id in seen:
            raise DataError(
                f"{source}: duplicate slide id {s.slide_id!r} ({seen[s.slide_id]} and {s.path})"
            )
        seen[s.slide_id] = s.path


def _check_files(samples: Sequence[Sample], source: str) -> None:
    for s in samples:
        if not os.path.isfile(s.path):
            raise DataError(f"{source}: slide {s.slide_id!r}: file {s.path} does not exist")


def read_samples(path: str | os.PathLike[str], *, check_files: bool = True) -> list[Sample]:
    """Read and validate a samples sheet (TSV with a header row).

    Required columns: ``slide_id`` and ``path``; optional: ``patient_id`` (defaults to the slide
    id, so splits are per slide), ``label`` and ``mpp`` (an override for slides whose metadata
    lacks a resolution); other columns are kept in :attr:`Sample.fields`. Relative slide paths
    are relative to the working directory (the workflow's convention). Blank lines and lines
    starting with ``#`` are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"samples sheet {path} does not exist")
    with open(path, newline="") as f:
        lines = [line for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise DataError(f"samples sheet {path} is empty")
    reader = csv.DictReader(lines, delimiter="\t")
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in ("slide_id", "path") if c not in columns]
    if missing:
        raise DataError(
            f"samples sheet {path}: missing column(s) {', '.join(missing)} "
            f"(found {', '.join(columns) or 'none'}; is it tab-separated?)"
        )
    samples = []
    for row_no, row in enumerate(reader, start=2):
        if None in row:
            raise DataError(f"samples sheet {path}, row {row_no}: more fields than columns")
        fields = {k.strip(): (v or "").strip() for k, v in row.items()}
        where = f"samples sheet {path}, row {row_no}"
        try:
            slide_id = check_slide_id(fields["slide_id"])
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
        if not fields["path"]:
            raise DataError(f"{where}: slide {slide_id!r} has no path")
        samples.append(
            Sample(
                slide_id=slide_id,
                path=fields["path"],
                patient_id=fields.get("patient_id") or slide_id,
                mpp=_parse_mpp(fields.get("mpp", ""), f"{where} (slide {slide_id!r})"),
                fields=fields,
            )
        )
    if not samples:
        raise DataError(f"samples sheet {path} lists no slides")
    _check_unique(samples, f"samples sheet {path}")
    if check_files:
        _check_files(samples, f"samples sheet {path}")
    return samples


def samples_from_glob(pattern: str) -> list[Sample]:
    """The slides matching a glob (relative to the working directory), ids derived from the
    file names (:func:`~wsitools.types.slide_id_from_path`: any name gives a safe id; two files
    with one id are an error naming both).

    No labels: a glob cohort can be tiled and embedded, and heads need a sheet.
    """
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"slide glob {pattern!r} matches no file")
    samples = [Sample(slide_id=(sid := slide_id_from_path(p)), path=p, patient_id=sid, fields={}) for p in paths]
    _check_unique(samples, f"slide glob {pattern!r}")
    return samples


def load_cohort(*, samples: str | None, slides_glob: str | None) -> list[Sample]:
    """The cohort from exactly one of a samples sheet or a slide glob (the workflow's config)."""
    if bool(samples) == bool(slides_glob):
        raise DataError("config: give exactly one of 'samples' (a samples sheet) and 'slides_glob'")
    return read_samples(samples) if samples else samples_from_glob(slides_glob or "")


# --- QC --------------------------------------------------------------------------------------


def read_qc(path: str | os.PathLike[str]) -> dict[str, Any]:
    """One slide's ``{slide_id}.qc.json`` as written by ``wsitools tile``."""
    try:
        qc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"QC file {path} cannot be read: {exc}") from None
    if not isinstance(qc, dict) or "status" not in qc:
        raise DataError(f"QC file {path} has no 'status'")
    return qc


def _qc_row(qc: Mapping[str, Any], slide_id: str) -> dict[str, str]:
    def text(key: str) -> str:
        value = qc.get(key)
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value).replace("\t", " ").replace("\n", " ")

    row = {c: text(c) for c in QC_COLUMNS}
    row["slide_id"] = slide_id
    return row


def write_qc_summary(
    qc_files: Iterable[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    thumbnails: str | os.PathLike[str] | None = None,
) -> list[dict[str, str]]:
    """Gather per-slide QC files into one table (``QC_COLUMNS``), sorted by slide id.

    The slide id is the QC file's name (``{slide_id}.qc.json``), so a QC file that lacks it
    still lands on the right row. With ``thumbnails``, each slide's tissue thumbnail
    (``{slide_id}.tissue.png`` beside its QC file, absent for a slide that could not be read)
    is copied there as ``{slide_id}.png``, a folder the workflow's report shows.
    """
    rows = []
    pictures = {}
    for path in qc_files:
        path = Path(path)
        if not path.name.endswith(".qc.json"):
            raise DataError(f"{path} is not a {{slide_id}}.qc.json file")
        slide_id = path.name[: -len(".qc.json")]
        rows.append(_qc_row(read_qc(path), slide_id))
        picture = path.with_name(f"{slide_id}.tissue.png")
        if picture.is_file():
            pictures[slide_id] = picture
    rows.sort(key=lambda r: r["slide_id"])
    if thumbnails is not None:
        with atomic_path(thumbnails, overwrite=True) as tmp:
            tmp.mkdir()
            for slide_id, picture in pictures.items():
                shutil.copyfile(picture, tmp / f"{slide_id}.png")
    write_table(out, rows, QC_COLUMNS)
    return rows


def read_table(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """A tab-separated table with a header row, as a list of row dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def write_table(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> None:
    """Write rows as a tab-separated table with ``columns`` as header, atomically."""
    with atomic_path(path, overwrite=True) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(
                f, fieldnames=list(columns), delimiter="\t", lineterminator="\n", extrasaction="ignore"
            )
            writer.writeheader()
            writer.writerows(rows)


_HTML_STYLE = (
    "body{font-family:sans-serif;font-size:13px;margin:12px}"
    "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    "th{background:#f0f0f0;position:sticky;top:0}td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "tr.left-out td{background:#fde2e2}p{max-width:60em}"
)


def _is_number(text: str) -> bool:
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
            kind = ' class="num"' if text and _is_number(text) else ""
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


def write_qc_html(summary: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The QC table (``results/qc/summary.tsv``) as an HTML page for the report; slides left out
    (status other than ``ok``) are tinted red."""
    rows = read_table(summary)
    counts = _status_counts(rows)
    write_html_table(
        out, rows, QC_COLUMNS, title=f"QC summary: {len(rows)} slides",
        note=", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        + ". Rows tinted red are slides left out of feature extraction, training and heatmaps (the reason "
        "column says why); mpp is the slide's own resolution (um/px at level 0), mpp_target the tiles'.",
        left_out=[r["status"] != USABLE_STATUS for r in rows],
    )
    return rows


def usable_slides(summary: str | os.PathLike[str]) -> list[str]:
    """Ids of the slides whose QC status is ``ok``, in table order."""
    return [r["slide_id"] for r in read_table(summary) if r["status"] == USABLE_STATUS]


def _status_counts(rows: Iterable[Mapping[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def qc_report(summary: str | os.PathLike[str]) -> str:
    """A short text summary of a QC table: counts per status, and each unusable slide's reason."""
    rows = read_table(summary)
    counts = _status_counts(rows)
    lines = [
        f"QC: {len(rows)} slides: "
        + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        + f" (table: {summary})"
    ]
    for r in rows:
        if r["status"] != USABLE_STATUS:
            lines.append(f"  left out: {r['slide_id']} ({r['status']}): {r['reason'] or 'no reason given'}")
    return "\n".join(lines)


# --- labels for the heads --------------------------------------------------------------------


def write_labels(
    samples: Sequence[Sample],
    *,
    usable: Iterable[str],
    columns: Mapping[str, str],
    out: str | os.PathLike[str],
    task_type: TaskType = "classification",
) -> list[dict[str, str]]:
    """The labels table of one task: usable slides that have every target in the sheet.

    ``columns`` maps the table's target columns to the sheet's (``label``; for survival
    ``time`` and ``event``). Columns ``slide_id``, ``patient_id`` and the targets (the table
    ``wsitools train`` reads), plus the sheet's ``split`` or ``fold`` column when it fills one
    (the user's own splits). Slides that failed QC or lack a target are left out. Fewer than two
    classes left (classification) is an error, raised here (before training) with the counts.
    """
    for column in columns.values():
        if samples and not any(column in s.fields for s in samples):
            raise DataError(f"samples sheet has no column {column!r} for the task's labels")
    keep = set(usable)
    splits = [c for c in SPLIT_COLUMNS if any(s.value(c) for s in samples)]
    rows = [
        {"slide_id": s.slide_id, "patient_id": s.patient_id, **{k: s.value(c) for k, c in columns.items()},
         **{c: s.value(c) for c in splits}}
        for s in samples
        if s.slide_id in keep and all(s.value(c) for c in columns.values())
    ]
    if task_type == "classification":
        classes = sorted({r["label"] for r in rows})
        if len(classes) < 2:
            raise DataError(
                f"task labels from column {columns['label']!r}: {len(rows)} usable labelled slide(s) "
                f"with class(es) {classes}: training needs at least two classes"
            )
    write_table(out, rows, ("slide_id", "patient_id", *columns, *splits))
    return rows


def task_columns(task_type: TaskType, *, label_column: str, time_column: str, event_column: str) -> dict[str, str]:
    """The labels table's target columns and the samples-sheet columns they come from."""
    if task_type == "survival":
        return {"time": time_column, "event": event_column}
    return {"label": label_column}


def check_outcome_labels(
    samples: Sequence[Sample],
    *,
    task: str,
    task_type: TaskType,
    columns: Mapping[str, str],
    folds: Mapping[str, int],
    sheet: str,
) -> None:
    """Check a survival or regression task's targets in the samples sheet before any slide is
    tiled: every filled value as ``wsitools train`` checks it (a number; time >= 0, event 0/1),
    naming the slide and column; at least two labelled slides (survival: two events); each head's
    k-fold cross-validation needs at least k labelled patients (survival: k with an event)."""
    from wsitools.mil.targets import parse_targets

    labelled = [s for s in samples if all(s.value(c) for c in columns.values())]
    parsed = []
    for s in labelled:
        row = {k: s.value(c) for k, c in columns.items()}
        parsed.append(parse_targets(row, task_type, where=f"config: tasks: {task}: {sheet}: slide {s.slide_id}"))
    if task_type == "survival":
        counted = {s.patient_id for s, t in zip(labelled, parsed) if t["event"]}
        what = "patients with an event"
    else:
        counted = {s.patient_id for s in labelled}
        what = "labelled patients"
    if len(labelled) < 2 or (task_type == "survival" and len(counted) < 2):
        raise DataError(f"config: tasks: {task}: {len(labelled)} labelled slide(s), {len(counted)} {what} "
                        f"in columns {', '.join(map(repr, columns.values()))} of {sheet}; training needs at least two")
    if any(s.value(c) for s in labelled for c in SPLIT_COLUMNS):
        return
    for head, k in folds.items():
        if len(counted) < k:
            raise DataError(f"config: heads: {head}: folds: {k}-fold cross-validation of task {task!r} needs at "
                            f"least {k} {what}, but {sheet} has {len(counted)}; set `heads: {head}: folds` lower")


def check_task_labels(
    samples: Sequence[Sample],
    *,
    task: str,
    label_column: str,
    classes: Sequence[str] | None,
    folds: Mapping[str, int],
    sheet: str,
    task_file: str | None = None,
    allow_empty_classes: bool = False,
) -> None:
    """Check a task's labels in the samples sheet against its classes and the heads' folds,
    before any slide is tiled (the workflow calls this when it builds the job graph).

    - every label must be a class of the task file (when there is one, ``classes``);
    - every class of the task needs a labelled slide (unless ``allow_empty_classes``);
    - at least two classes must be labelled;
    - without the sheet's own ``split``/``fold`` columns, each head's k-fold cross-validation
      (``folds``: head name -> k) needs at least k patients of each class (a patient counts for
      the class most of its slides have, as the split does).

    Each problem is a :class:`DataError` naming the class and the config key to change. Slides
    that later fail QC are not known yet: training checks again on what is left.
    """
    where = f"column {label_column!r} of {sheet}"
    labelled = [(s, s.value(label_column)) for s in samples if s.value(label_column)]
    present = sorted({label for _, label in labelled})
    order = list(classes) if classes is not None else present
    if classes is not None:
        unknown: dict[str, list[str]] = {}
        for s, label in labelled:
            if label not in classes:
                unknown.setdefault(label, []).append(s.slide_id)
        if unknown:
            listing = "; ".join(f"{label!r} (slides {', '.join(ids[:5])})" for label, ids in unknown.items())
            raise DataError(
                f"config: tasks: {task}: labels in {where} that are not classes of {task_file or 'the task'} "
                f"({', '.join(classes)}): {listing}; fix the labels or add the classes to the task file"
            )
        empty = [c for c in classes if c not in present]
        if empty and not allow_empty_classes:
            raise DataError(
                f"config: tasks: {task}: class{'es' if len(empty) > 1 else ''} {', '.join(map(repr, empty))} of "
                f"{task_file or 'the task'} {'have' if len(empty) > 1 else 'has'} no labelled slide in {where}; "
                "label slides of it, remove it from the task file, or add --allow-empty-classes to the "
                "heads' extra_args"
            )
    if len(present) < 2:
        raise DataError(
            f"config: tasks: {task}: {len(labelled)} labelled slide(s) in {where} with class(es) {present}; "
            "training needs at least two classes"
        )
    if any(s.value(c) for s, _ in labelled for c in SPLIT_COLUMNS):
        return  # the sheet's own splits: the folds setting is not used
    patients = _patient_classes(labelled, order)
    counts = {c: sum(1 for label in patients.values() if label == c) for c in order}
    for head, k in folds.items():
        short = {c: n for c, n in counts.items() if 0 < n < k}
        if not short:
            continue
        fewest = min(short.values())
        listing = ", ".join(f"{c!r} has {n} patient{'s' if n != 1 else ''}" for c, n in short.items())
        fix = (
            f"set `heads: {head}: folds` to at most {fewest}" if fewest >= 2
            else "label more patients of that class (cross-validation needs at least 2)"
        )
        raise DataError(
            f"config: heads: {head}: folds: {k}-fold cross-validation of task {task!r} needs at least {k} "
            f"patients of each class, but in {where} {listing}; {fix}"
        )


def check_patient_labels(
    samples: Sequence[Sample], *, task: str, columns: Mapping[str, str], sheet: str, heads: Sequence[str]
) -> None:
    """For heads on patient bags (``heads``): the labelled slides of each patient must carry the
    same targets (the task's ``columns`` of the sheet; numbers compared as numbers), before any
    slide is tiled; a :class:`DataError` names the task, the patient, two slides that differ and
    the heads."""

    def key(text: str) -> str | float:
        return float(text) if _is_number(text) else text

    first: dict[str, Sample] = {}
    for s in samples:
        values = [s.value(c) for c in columns.values()]
        if not all(values):
            continue
        seen = first.setdefault(s.patient_id, s)
        expected = [seen.value(c) for c in columns.values()]
        if list(map(key, values)) != list(map(key, expected)):
            raise DataError(
                f"config: tasks: {task}: patient {s.patient_id} in {sheet}: slides {seen.slide_id} "
                f"({'/'.join(expected)}) and {s.slide_id} ({'/'.join(values)}) disagree on "
                f"{', '.join(map(repr, columns.values()))}, but heads {', '.join(heads)} pool a patient's "
                "slides into one bag (bag: patient) with one label"
            )


def _patient_classes(labelled: Sequence[tuple[Sample, str]], order: Sequence[str]) -> dict[str, str]:
    """Each patient's class: the one most of its slides have (ties: the first in ``order``)."""
    by_patient: dict[str, list[str]] = {}
    for s, label in labelled:
        by_patient.setdefault(s.patient_id, []).append(label)
    rank = {c: i for i, c in enumerate(order)}
    return {
        p: min(set(labels), key=lambda c: (-labels.count(c), rank.get(c, len(rank))))
        for p, labels in by_patient.items()
    }


def config_error(error: Any) -> str:
    """One line for a config that fails the workflow's schema (a ``jsonschema.ValidationError``):
    the key it is about and what is wrong, never the schema itself. An unknown key (a typo) is
    named with its place and the nearest known key."""
    import difflib

    path = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        known = sorted((error.schema or {}).get("properties", {}))
        unknown = sorted(k for k in error.instance if k not in known)
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            return f"config: {': '.join([*path, key])}: unknown key ({hint})"
    where = f"{': '.join(path)}: " if path else ""
    return f"config: {where}{' '.join(str(error.message).split())}"


def check_encoders(encoders: Mapping[str, str], *, models_dir: str | None) -> None:
    """Check that every encoder the config names has a valid card (``encoders``: config key ->
    card name or card file), before any slide is tiled; a :class:`DataError` names the key."""
    for key, name in encoders.items():
        try:
            find_card(name, models_dir=models_dir or None)
        except ModelError as exc:
            raise DataError(f"config: {key}: {exc}") from None


# --- the report's tables and figures ---------------------------------------------------------

def head_of(path: str | os.PathLike[str]) -> tuple[str, str, str]:
    """(task, encoder, head) of a file in ``heads/{task}/{encoder}/{head}/``."""
    parts = Path(path).parts
    if len(parts) < 4:
        raise DataError(f"{path} is not inside heads/{{task}}/{{encoder}}/{{head}}/")
    return parts[-4], parts[-3], parts[-2]


def _number(value: Any) -> str:
    return "" if value is None else f"{float(value):.4f}"


TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": METRICS,
    "survival": ("c_index", "uno_c"),
    "regression": REGRESSION_METRICS,
}
"""The metrics of each task type in the metrics table (``metrics.json`` of every head)."""


def write_metrics_table(
    metrics_files: Iterable[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    html_out: str | os.PathLike[str] | None = None,
) -> list[dict[str, str]]:
    """One row per trained head: cross-validated metrics from each ``metrics.json``.

    Per metric of the head's task type (:data:`TASK_METRICS`): the value over the pooled
    out-of-fold predictions with its bootstrap 95 % interval (``_lo``, ``_hi``), and the mean
    and standard deviation over folds; the columns of the other types stay empty. With
    ``html_out``, also :func:`write_metrics_html` for the report.
    """
    rows = []
    used: list[str] = []
    for path in metrics_files:
        task, encoder, head = head_of(path)
        try:
            m = json.loads(Path(path).read_text())
            pooled, folds = m["pooled"], m["mean_over_folds"]
            task_type = m.get("task_type") or "classification"
            row = {"task": task, "task_type": task_type, "encoder": encoder, "head": head,
                   "prompts": ",".join(m.get("prompts") or []),
                   "n_slides": str(m["n_slides"]), "n_patients": str(m["n_patients"])}
            for name in TASK_METRICS[task_type]:
                lo, hi = pooled.get(f"{name}_ci95") or (None, None)
                row.update({name: _number(pooled.get(name)), f"{name}_lo": _number(lo),
                            f"{name}_hi": _number(hi),
                            f"{name}_fold_mean": _number(folds[name]["mean"]),
                            f"{name}_fold_sd": _number(folds[name]["sd"])})
            if task_type not in used:
                used.append(task_type)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"metrics file {path} cannot be read: {exc!r}") from None
        rows.append(row)
    names = [n for t in TASK_METRICS if t in (used or ["classification"]) for n in TASK_METRICS[t]]
    columns = ["task", "task_type", "encoder", "head", "prompts", "n_slides", "n_patients"] + [
        f"{name}{suffix}" for name in names
        for suffix in ("", "_lo", "_hi", "_fold_mean", "_fold_sd")
    ]
    write_table(out, [{c: r.get(c, "") for c in columns} for r in rows], columns)
    if html_out is not None:
        write_metrics_html(rows, html_out)
    return rows


def _with_interval(value: str, lo: str, hi: str) -> str:
    return f"{value} [{lo}, {hi}]" if value and lo and hi else value


def write_metrics_html(rows: Sequence[Mapping[str, str]], out: str | os.PathLike[str]) -> None:
    """The metrics table (rows of :func:`write_metrics_table`) as an HTML page for the report:
    per metric of the heads' task types the pooled out-of-fold value with its bootstrap 95 %
    interval, and the mean and standard deviation over folds (empty for a head of another type)."""
    types = [t for t in TASK_METRICS if any(r.get("task_type", "classification") == t for r in rows)]
    names = [n for t in (types or ["classification"]) for n in TASK_METRICS[t]]
    shown = []
    for r in rows:
        row = {k: r[k] for k in ("task", "task_type", "encoder", "head", "prompts", "n_slides", "n_patients")}
        for name in names:
            if name not in r:
                continue
            row[name] = _with_interval(r[name], r[f"{name}_lo"], r[f"{name}_hi"])
            sd = r[f"{name}_fold_sd"]
            row[f"{name} over folds"] = r[f"{name}_fold_mean"] + (f" ± {sd}" if sd else "")
        shown.append(row)
    columns = ["task", "task_type", "encoder", "head", "prompts", "n_slides", "n_patients"] + [
        c for name in names for c in (name, f"{name} over folds")
    ]
    write_html_table(
        out, [{c: r.get(c, "") for c in columns} for r in shown], columns,
        title="Cross-validated metrics of every head",
        note="Each metric over the pooled out-of-fold predictions, with its bootstrap 95 % interval in "
        "brackets, and its mean ± standard deviation over the folds. AUROC is one-vs-rest macro for "
        "more than two classes; c_index is Harrell's concordance, uno_c Uno's. metrics.tsv holds the "
        "same numbers, one per column.",
    )


def plot_roc(predictions_files: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> None:
    """ROC curves of the out-of-fold predictions of several heads of one task, in one figure.

    One panel per class (one-vs-rest; a single panel for the second class of a two-class
    task), one curve per (encoder, head), with its AUROC in the legend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from wsitools.metrics import binary_auroc

    runs = []
    for path in predictions_files:
        with open(path, newline="") as f:
            table = list(csv.DictReader(f))
        if not table or "label" not in table[0]:
            raise DataError(f"predictions {path} have no rows with a 'label' column")
        classes = [c[len("prob_"):] for c in table[0] if c.startswith("prob_")]
        labels = np.array([r["label"] for r in table])
        probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in table])
        runs.append(("/".join(head_of(path)[1:]), classes, labels, probs))
    classes = runs[0][1]
    panels = classes[1:] if len(classes) == 2 else classes
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, cls in zip(axes[0], panels):
        for name, run_classes, labels, probs in runs:
            positive = labels == cls
            scores = probs[:, run_classes.index(cls)]
            fpr, tpr = roc_points(positive, scores)
            ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUROC {binary_auroc(positive, scores):.3f})")
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
               title=f"{cls} vs " + ("rest" if len(classes) > 2 else classes[0]), aspect="equal")
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    with atomic_path(out, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_outcomes(
    predictions_files: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *, task_type: TaskType
) -> None:
    """The out-of-fold predictions of several heads of one survival or regression task, one
    panel per (encoder, head): Kaplan-Meier curves of the high- and low-risk groups (risk above
    the fold head's training median, i.e. > 0) with the log-rank p-value, or predicted against
    true values with the Pearson correlation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from wsitools.metrics import regression_metrics
    from wsitools.survival import draw_risk_groups

    need = ("time", "event", "risk") if task_type == "survival" else ("label", "prediction")
    runs = []
    for path in predictions_files:
        with open(path, newline="") as f:
            table = list(csv.DictReader(f))
        if not table or any(c not in table[0] for c in need):
            raise DataError(f"predictions {path} have no rows with columns {', '.join(need)} (a {task_type} head's)")
        runs.append(("/".join(head_of(path)[1:]), {c: np.array([float(r[c]) for r in table]) for c in need}))
    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 4.2), squeeze=False)
    for ax, (name, cols) in zip(axes[0], runs):
        if task_type == "survival":
            draw_risk_groups(ax, cols["time"], cols["event"], cols["risk"] > 0, title=name)
            continue
        y, p = cols["label"], cols["prediction"]
        ax.scatter(y, p, s=12, alpha=0.7)
        lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], color="0.7", lw=1, ls="--")
        ax.set(xlabel="true", ylabel="predicted (out of fold)",
               title=f"{name} (Pearson {regression_metrics(y, p)['pearson']:.3f})")
    fig.tight_layout()
    with atomic_path(out, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
