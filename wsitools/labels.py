"""The labels table of a task: written by the workflow from the samples sheet, read by training.

The table (CSV or TSV) has ``slide_id``, the target columns of the task type (``label``; or
``time`` and ``event`` for survival: :func:`parse_targets`), optional ``patient_id``
and the user's own ``split`` or ``fold``. The workflow writes one per task
(:func:`write_labels`) after checking the sheet's labels against the task and the heads' folds
when it builds the job graph (:func:`check_task_labels`, :func:`check_outcome_labels`,
:func:`check_patient_labels`);
``wsitools train`` reads it (:func:`read_labels`). No torch import: the workflow imports this.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsitools.errors import DataError
from wsitools.io import read_user_text
from wsitools.samples import SPLIT_COLUMNS, Sample
from wsitools.store import recorded_slide_fingerprint
from wsitools.tables import is_number, sniff_dialect, write_table
from wsitools.text import TaskType
from wsitools.types import check_slide_id, safe_id


LABEL_COLUMNS: dict[TaskType, tuple[str, ...]] = {
    "classification": ("slide_id", "label"),
    "regression": ("slide_id", "label"),
    "survival": ("slide_id", "time", "event"),
}
"""The columns a labels table needs for each task type."""

SURVIVAL_STRATA = ("censored", "event")
"""The strata of a survival cohort (folds are stratified on the event indicator)."""


def _finite(text: str, *, where: str, column: str) -> float:
    """``text`` as a finite float; a :class:`DataError` naming ``where`` and the column if not."""
    if not text:
        raise DataError(f"{where}: empty {column}")
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: {column} {text!r} is not a number") from None
    if not np.isfinite(value):
        raise DataError(f"{where}: {column} {text!r} is not a finite number")
    return value


def parse_targets(row: Mapping[str, str], task_type: TaskType, *, where: str) -> dict[str, Any]:
    """The target fields of one labels-table row (``label``; ``value`` for regression; ``time``
    and ``event`` for survival, ``label`` being the stratum) for ``task_type``, checked: a
    :class:`DataError` starting with ``where`` for an empty label, a number that is not finite,
    a negative time or an event other than 0/1."""
    if task_type == "classification":
        if not row["label"]:
            raise DataError(f"{where} has an empty label")
        return {"label": row["label"]}
    if task_type == "regression":
        value = _finite(row["label"], where=where, column="label")
        return {"label": row["label"], "value": value}
    time = _finite(row["time"], where=where, column="time")
    if time < 0:
        raise DataError(f"{where}: time {row['time']!r} is negative")
    event = _finite(row["event"], where=where, column="event")
    if event not in (0.0, 1.0):
        raise DataError(f"{where}: event {row['event']!r} must be 0 (censored) or 1 (event)")
    return {"label": SURVIVAL_STRATA[int(event)], "time": time, "event": int(event)}


@dataclass(frozen=True)
class LabelRow:
    """One row of a labels table: a class label, a numeric target (``value``, regression) or a
    follow-up ``time`` with its ``event`` indicator (survival; ``label`` is then the event as text)."""

    slide_id: str
    label: str
    patient_id: str
    split: str | None = None
    fold: int | None = None
    value: float | None = None
    time: float | None = None
    event: int | None = None


MISSING_MARKERS = frozenset({
    # pandas' default NA strings (what STAMP and CLAM, reading with pandas, take as missing)
    "na", "n/a", "#n/a", "#n/a n/a", "#na", "<na>", "nan", "-nan", "none", "null",
    "1.#ind", "-1.#ind", "1.#qnan", "-1.#qnan",
    # and what else a sheet writes for "no value" that no class is called: a word, SAS's and
    # Stata's ".", and a question mark. A lone "-" is not one: with "+" it is a receptor status.
    "missing", ".", "?",
})
"""Cell values (compared ignoring case) that spreadsheets and data-frame exports write for "no
value"; as labels of a task without a task file they would silently become a class."""


SHOWN_CLASSES = 10
"""Classes (or labels) a message lists by name; it counts the others, so it stays one line."""

MAX_CLASSES = 1000
"""More classes than this, taken from the labels of a task without a task file, are no
classification: a column of numbers read as classes (:func:`classes_from_labels`)."""

MANY_CLASSES = 20
"""More classes than this, taken from the labels of a task without a task file, most of them on
one row only, are no classification either (:func:`classes_from_labels`)."""


def classes_from_labels(
    labelled: Iterable[tuple[str, str]], *, where: str, unlabelled: str = "leave the cell empty",
    column: str | None = None,
) -> tuple[str, ...]:
    """The classes of a task without a task file: the labels of ``labelled`` (slide id, label)
    pairs, sorted. Two labels that are one number or one word written two ways (``1`` and
    ``1.0``, ``tumor`` and ``Tumor``, as exports and merged sheets can mix) would be two classes,
    and so would a missing-value
    marker (``NA``, ``NaN``, ``#N/A``, ...; :data:`MISSING_MARKERS`): a :class:`DataError`
    starting with ``where`` names them and a slide of each, and says how to mark a slide without
    a label there (``unlabelled``: an empty cell in a samples sheet; a labels table leaves the row
    out). A task file that lists such a label as a class makes it one. Labels too many to be
    classes (more than :data:`MAX_CLASSES`, or more than :data:`MANY_CLASSES` mostly on one row
    each: a column of numbers, meant as a regression or survival target) are a
    :class:`DataError` starting with ``where`` and ``column`` (where the labels are, when
    ``where`` does not say)."""
    first: dict[float, tuple[str, str]] = {}
    spelled: dict[str, tuple[str, str]] = {}
    labels: dict[str, int] = {}
    for slide_id, label in labelled:
        if label.casefold() in MISSING_MARKERS:
            raise DataError(
                f"{where}: label {label!r} (slide {slide_id}) looks like a missing value, which would make it a "
                f"class; {unlabelled} for a slide without a label, or list the classes in a task file"
            )
        labels[label] = labels.get(label, 0) + 1
        seen, seen_slide = spelled.setdefault(label.casefold(), (label, slide_id))
        if seen != label:
            raise DataError(
                f"{where}: labels {seen!r} and {label!r} differ only in case (slides {seen_slide} and {slide_id}), "
                "which would make them two classes; write each class's label alike, or list both as classes "
                "in a task file"
            )
        if not is_number(label):
            continue
        seen, seen_slide = first.setdefault(float(label), (label, slide_id))
        if seen != label:
            raise DataError(
                f"{where}: labels {seen!r} and {label!r} are one number written two ways (slides {seen_slide} "
                f"and {slide_id}), which would make them two classes; write each class's label alike"
            )
    single = sum(n == 1 for n in labels.values())
    if len(labels) > MAX_CLASSES or (len(labels) > MANY_CLASSES and 2 * single > len(labels)):
        of = f", column {column!r}" if column else ""
        raise DataError(
            f"{where}{of}: {len(labels)} different labels in {sum(labels.values())} labelled rows ({single} of them "
            "in one row only) are too many to be the classes of a classification (a column of numbers?); for a "
            "numeric target give a task file of type regression (or survival, with time and event columns)"
        )
    return tuple(sorted(labels))


def check_labels_are_classes(
    labelled: Iterable[tuple[str, str]], classes: Sequence[str], *, what: str, task: str
) -> None:
    """Every label of ``labelled`` (slide id, label) pairs must be one of a task file's
    ``classes``, as written. A :class:`DataError` starting with ``what`` (the labels and where
    they are) and naming ``task`` (the task file) lists the other labels with a few slides
    each, and says which of them are a class written in another case or spacing (``tumor`` for
    ``Tumor``), the usual slip."""
    known = set(classes)
    unknown: dict[str, list[str]] = {}
    for slide_id, label in labelled:
        if label not in known:
            unknown.setdefault(label, []).append(slide_id)
    if not unknown:
        return

    def spelling(text: str) -> str:
        return " ".join(text.split()).casefold()

    written = {spelling(c): c for c in classes}
    shown = list(unknown.items())[:SHOWN_CLASSES]
    more = f"; and {len(unknown) - len(shown)} more labels" if len(unknown) > len(shown) else ""
    listing = "; ".join(f"{label!r} (slides {first_few(ids, 5)})" for label, ids in shown) + more
    variants = [f"{label!r} is class {written[spelling(label)]!r} in another case or spacing"
                for label, _ in shown if spelling(label) in written]
    hint = f" ({'; '.join(variants)}: labels must be written as the classes are)" if variants else ""
    raise DataError(
        f"{what} that are not classes of {task} ({first_few(classes, SHOWN_CLASSES)}): {listing}{hint}; "
        "fix the labels or add the classes to the task file"
    )


def table_rows(
    reader: csv.DictReader, *, what: str, complete: bool = False
) -> Iterator[tuple[int, dict[str, str]]]:
    """The rows of a user's table as (line in the file, row with stripped keys and values: a
    spreadsheet's stray space makes no other label); a row with more fields than the header (a
    value holding the separator, such as a decimal comma), and with ``complete`` one with fewer
    (cut off), is a :class:`DataError` starting with ``what`` and naming the line; so is a
    header naming a column twice (only the last would be read)."""
    named: set[str] = set()
    for column in (c.strip() for c in reader.fieldnames or ()):
        if column in named:
            raise DataError(f"{what}: the header names column '{column}' twice; only one would be read")
        if column:
            named.add(column)
    header = len(reader.fieldnames or ())
    for raw in reader:
        line = reader.line_num
        if None in raw:
            raise DataError(
                f"{what}, line {line}: {header + len(raw[None])} fields, but the header has {header} "
                "(a separator inside a value, such as a decimal comma? quote that value)"
            )
        if complete and None in raw.values():
            raise DataError(
                f"{what}, line {line}: {sum(v is not None for v in raw.values())} fields, but the header has {header}"
            )
        yield line, {(k or "").strip(): (v or "").strip() for k, v in raw.items()}


def slide_rows(reader: csv.DictReader, *, what: str) -> Iterator[tuple[int, str, dict[str, str]]]:
    """The rows of a table keyed by ``slide_id`` as (line, slide id, row) (:func:`table_rows`),
    rows with no cell filled skipped. A :class:`DataError` starting with ``what`` names the line
    of a row with an empty slide id but other cells filled (a cut cell would drop its slide
    unseen), and of an unsafe or a repeated slide id."""
    seen: set[str] = set()
    for line, row in table_rows(reader, what=what):
        slide_id = row["slide_id"]
        if not slide_id:
            filled = [f"{k} {v!r}" for k, v in row.items() if v]
            if filled:
                raise DataError(f"{what}, line {line}: no slide_id, but {', '.join(filled[:3])}; "
                                "fill in the slide id or remove the row")
            continue
        try:
            check_slide_id(slide_id)
        except ValueError as exc:
            as_file = {"/", "\\"}.isdisjoint(slide_id)  # a file name (not a path) has a safe id to suggest
            named = f" (wsitools names a slide file so called {safe_id(slide_id)!r})" if as_file else ""
            raise DataError(f"{what}, line {line}: {exc}{named}") from None
        if slide_id in seen:
            raise DataError(f"{what}, line {line}: slide {slide_id} appears twice")
        seen.add(slide_id)
        yield line, slide_id, row


def read_labels(path: str | os.PathLike[str], *, task_type: TaskType = "classification") -> list[LabelRow]:
    """Read a labels table (CSV or TSV) with ``slide_id``, the target columns of ``task_type``
    (:data:`LABEL_COLUMNS`: ``label``, a class or a number; or ``time`` and ``event`` for
    survival) and optional ``patient_id``, ``split`` (train/val/test) or ``fold`` (integer) columns.

    A slide without ``patient_id`` is its own patient. Raises :class:`DataError` naming the file
    and row for a missing column, an unsafe or repeated slide id, an empty slide id in a filled
    row, an empty label, a bad split, or (regression, survival) a target that is not a finite
    number, a negative time or an event other than 0/1; naming the file and the column for a
    column named twice, and the file and both ids for patient ids that differ only in case.
    """
    path = Path(path)
    text = read_user_text(path, what="labels table", expected="a CSV or TSV file", encoding="utf-8-sig")
    reader = csv.DictReader(text.splitlines(), dialect=sniff_dialect(path, text[:4096]))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    for need in LABEL_COLUMNS[task_type]:
        if need not in columns:
            hint = (" (a survival table? give a task file with 'type: survival')"
                    if task_type == "classification" and {"time", "event"} <= set(columns) else "")
            raise DataError(
                f"labels table {path}: no '{need}' column for a {task_type} task "
                f"(columns: {', '.join(columns) or 'none'}){hint}"
            )
    if "split" in columns and "fold" in columns:
        raise DataError(f"labels table {path}: give either a 'split' or a 'fold' column, not both")
    rows: list[LabelRow] = []
    given: list[tuple[str, str]] = []  # (patient id, slide id) where the table gives the patient
    for line, slide_id, row in slide_rows(reader, what=f"labels table {path}"):
        targets = parse_targets(row, task_type, where=f"labels table {path}, line {line}: slide {slide_id}")
        split = row.get("split") or None
        if split is not None and split not in ("train", "val", "test"):
            raise DataError(
                f"labels table {path}, line {line}: slide {slide_id} has split {split!r}; "
                "use train, val or test"
            )
        fold: int | None = None
        if row.get("fold"):
            try:
                fold = int(row["fold"])
            except ValueError as exc:
                raise DataError(
                    f"labels table {path}, line {line}: slide {slide_id} has fold {row['fold']!r}, not an integer"
                ) from exc
        if row.get("patient_id"):
            given.append((row["patient_id"], slide_id))
        rows.append(
            LabelRow(
                slide_id=slide_id,
                patient_id=row.get("patient_id") or slide_id,
                split=split,
                fold=fold,
                **targets,
            )
        )
    if not rows:
        raise DataError(f"labels table {path}: no rows")
    _check_patient_spelling(given, where=f"labels table {path}")
    has_split = [r.split is not None for r in rows]
    has_fold = [r.fold is not None for r in rows]
    for name, flags in (("split", has_split), ("fold", has_fold)):
        if any(flags) and not all(flags):
            missing = [r.slide_id for r, f in zip(rows, flags) if not f]
            raise DataError(f"labels table {path}: {name} is empty for slides {first_few(missing, 10)}")
    return rows


def _check_patient_spelling(given: Iterable[tuple[str, str]], *, where: str) -> None:
    """Patient ids of ``given`` (patient id, slide id) pairs that differ only in case (``P001``,
    ``p001``) would be two patients, whose slides the folds could put into training and test:
    a :class:`DataError` starting with ``where`` names both ids and a slide of each."""
    first: dict[str, tuple[str, str]] = {}
    for patient_id, slide_id in given:
        seen, seen_slide = first.setdefault(patient_id.casefold(), (patient_id, slide_id))
        if seen != patient_id:
            raise DataError(
                f"{where}: patient ids {seen!r} and {patient_id!r} differ only in case (slides {seen_slide} and "
                f"{slide_id}), which would make them two patients, split between training and test as if "
                "unrelated; write each patient's id alike"
            )


def write_labels(
    samples: Sequence[Sample],
    *,
    usable: Iterable[str],
    columns: Mapping[str, str],
    out: str | os.PathLike[str],
    task_type: TaskType = "classification",
    tiles_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, str]]:
    """The labels table of one task: usable slides that have every target in the sheet.

    ``columns`` maps the table's target columns to the sheet's (``label``; for survival
    ``time`` and ``event``). Columns ``slide_id``, ``patient_id`` and the targets (the table
    ``wsitools train`` reads), plus the sheet's ``split`` or ``fold`` column when it fills one
    (the user's own splits). Slides that failed QC or lack a target are left out. Fewer than two
    classes left (classification) is an error, raised here (before training) with the counts.
    With ``tiles_dir`` (the slides' patch stores, ``{tiles_dir}/{slide_id}.zarr``), two slides
    of the table that are copies of one file are an error (:func:`check_distinct_slides`).
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
    if tiles_dir is not None:
        check_distinct_slides(samples, [r["slide_id"] for r in rows], tiles_dir=tiles_dir)
    if task_type == "classification":
        classes = sorted({r["label"] for r in rows})
        if len(classes) < 2:
            raise DataError(
                f"task labels from column {columns['label']!r}: {len(rows)} usable labelled slide(s) "
                f"with class(es) {classes}: training needs at least two classes"
            )
    write_table(out, rows, ("slide_id", "patient_id", *columns, *splits))
    return rows


def check_distinct_slides(
    samples: Sequence[Sample], slide_ids: Iterable[str], *, tiles_dir: str | os.PathLike[str]
) -> None:
    """Refuse two of ``slide_ids`` whose patch stores (``{tiles_dir}/{slide_id}.zarr``) record
    one slide fingerprint (the file's size and the sha256 of its first and last MiB): one scan
    under two ids as two copies of the file (the sheet's check before the run catches one file
    under two names, links included) would be trained on and tested on in cross-validation.
    A :class:`DataError` names both slides and their files; slides without a store are skipped."""
    by_id = {s.slide_id: s for s in samples}
    seen: dict[str, Sample] = {}
    for slide_id in slide_ids:
        fingerprint = recorded_slide_fingerprint(Path(tiles_dir) / f"{slide_id}.zarr")
        if fingerprint is None:
            continue
        first = seen.setdefault(fingerprint, by_id[slide_id])
        if first.slide_id != slide_id:
            raise DataError(
                f"slides {first.slide_id!r} ({first.path}) and {slide_id!r} ({by_id[slide_id].path}) are copies "
                "of one slide file (the same size and the same first and last MiB); list each slide once in "
                "the samples sheet"
            )


def first_few(items: Sequence[str], shown: int) -> str:
    """The first ``shown`` of ``items`` (slide ids, classes), comma-separated, and how many more
    there are: a message stays one line and still says how many it is about."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


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
    labelled = [s for s in samples if all(s.value(c) for c in columns.values())]
    parsed = []
    for s in labelled:
        row = {k: s.value(c) for k, c in columns.items()}
        parsed.append(parse_targets(row, task_type, where=f"config: tasks: {task}: {sheet}: slide {s.slide_id}"))
    if task_type == "survival":
        counted = {s.patient_id for s, t in zip(labelled, parsed) if t["event"]}
        what = "patients with an event"
        # folds as patient_kfold makes them: censored patients dealt as far as they go
        counts, spread = [len({s.patient_id for s in labelled} - counted), len(counted)], [True, False]
    else:
        counted = {s.patient_id for s in labelled}
        what = "labelled patients"
        counts, spread = [len(counted)], None
    if len(labelled) < 2 or (task_type == "survival" and len(counted) < 2):
        raise DataError(f"config: tasks: {task}: {len(labelled)} labelled slide(s), {len(counted)} {what} "
                        f"in columns {', '.join(map(repr, columns.values()))} of {sheet}; training needs at least two")
    if any(s.value(c) for s in labelled for c in SPLIT_COLUMNS):
        return
    for head, k in folds.items():
        if len(counted) < k:
            raise DataError(f"config: heads: {head}: folds: {k}-fold cross-validation of task {task!r} needs at "
                            f"least {k} {what}, but {sheet} has {len(counted)}; set `heads: {head}: folds` lower")
        if not folds_fit(counts, k, spread=spread):
            other = folds_instead(counts, k, spread=spread)
            raise DataError(
                f"config: heads: {head}: folds: {k}-fold cross-validation of task {task!r} leaves a fold's training "
                f"part without two patients of one stratum to hold one out for validation ({sheet}: "
                f"{len(counted)} {what}, {sum(counts) - len(counted)} other); "
                + (f"set `heads: {head}: folds` to {other}" if other else "label more patients")
            )


def folds_fit(counts: Sequence[int], n_folds: int, *, spread: Sequence[bool] | None = None) -> bool:
    """Whether patient-stratified ``n_folds``-fold cross-validation works for classes (or strata)
    of ``counts`` patients: every class has at least ``n_folds`` patients (one in each test fold),
    and every fold's training part keeps two patients of some class, so that one can be held out
    for validation (early stopping). A class's test part in a fold is at most ceil(n / k).
    Strata marked in ``spread`` (survival's censored patients) are dealt as far as they go and
    need not reach every fold: only the events make the metrics of a fold."""
    marks = spread if spread is not None else [False] * len(counts)
    present = [(n, s) for n, s in zip(counts, marks) if n > 0]
    filled = [n for n, s in present if not s]
    return bool(filled) and min(filled) >= n_folds and max(n - -(-n // n_folds) for n, _ in present) >= 2


def folds_instead(counts: Sequence[int], n_folds: int, *, spread: Sequence[bool] | None = None) -> int | None:
    """The fold count nearest below ``n_folds`` that :func:`folds_fit` ``counts``, else the
    nearest above (more folds leave larger training parts: 3 patients a class take 3 folds, not
    2); None if none does."""
    fitting = [k for k in range(2, max(counts, default=0) + 1)
               if k != n_folds and folds_fit(counts, k, spread=spread)]
    below = [k for k in fitting if k < n_folds]
    return max(below) if below else min(fitting, default=None)


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
    present = (sorted({label for _, label in labelled}) if classes is not None  # checked against them below
               else list(classes_from_labels(((s.slide_id, label) for s, label in labelled),
                                             where=f"config: tasks: {task}: {where}")))
    order = list(classes) if classes is not None else present
    if classes is not None:
        check_labels_are_classes(((s.slide_id, label) for s, label in labelled), classes,
                                 what=f"config: tasks: {task}: labels in {where}", task=task_file or "the task")
        labels = set(present)
        empty = [c for c in classes if c not in labels]
        if empty and not allow_empty_classes:
            raise DataError(
                f"config: tasks: {task}: class{'es' if len(empty) > 1 else ''} "
                f"{first_few([repr(c) for c in empty], SHOWN_CLASSES)} of "
                f"{task_file or 'the task'} {'have' if len(empty) > 1 else 'has'} no labelled slide in {where}; "
                f"label slides of {'them' if len(empty) > 1 else 'it'}, remove {'them' if len(empty) > 1 else 'it'} "
                "from the task file, or add --allow-empty-classes to the "
                "heads' extra_args"
            )
    if len(present) < 2:
        raise DataError(
            f"config: tasks: {task}: {len(labelled)} labelled slide(s) in {where} with class(es) {present}; "
            "training needs at least two classes"
        )
    if any(s.value(c) for s, _ in labelled for c in SPLIT_COLUMNS):
        return  # the sheet's own splits: the folds setting is not used
    patients = Counter(_patient_classes(labelled, order).values())
    counts = {c: patients[c] for c in order}
    for head, k in folds.items():
        if folds_fit(list(counts.values()), k):
            continue
        listing = first_few(
            [f"{c!r} has {n} patient{'s' if n != 1 else ''}" for c, n in counts.items() if n], SHOWN_CLASSES
        )
        other = folds_instead(list(counts.values()), k)
        fix = f"set `heads: {head}: folds` to {other}" if other else "label more patients"
        raise DataError(
            f"config: heads: {head}: folds: {k}-fold cross-validation of task {task!r} needs at least {k} "
            f"patients of each class and, in every fold's training part, two of one class to hold one out "
            f"for validation, but in {where} {listing}; {fix}"
        )


def check_patient_labels(
    samples: Sequence[Sample], *, task: str, columns: Mapping[str, str], sheet: str, heads: Sequence[str]
) -> None:
    """For heads on patient bags (``heads``): the labelled slides of each patient must carry the
    same targets (the task's ``columns`` of the sheet; numbers compared as numbers), before any
    slide is tiled; a :class:`DataError` names the task, the patient, two slides that differ and
    the heads."""

    def key(text: str) -> str | float:
        return float(text) if is_number(text) else text

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


def read_patients(path: str | os.PathLike[str]) -> dict[str, str]:
    """Slide id -> patient id from a table (CSV or TSV) with ``slide_id`` and ``patient_id``
    columns, such as the labels table or the workflow's samples sheet (other columns are
    ignored). A slide with an empty ``patient_id`` is its own patient. A missing column, a
    column named twice, a filled row without slide id, an unsafe slide id or a slide listed
    twice is a :class:`DataError` naming the file (and the line or column: :func:`slide_rows`)."""
    path = Path(path)
    text = read_user_text(path, what="patients table", expected="a CSV or TSV file", encoding="utf-8-sig")
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    reader = csv.DictReader(lines, dialect=sniff_dialect(path, "\n".join(lines[:50])))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in ("slide_id", "patient_id") if c not in columns]
    if missing:
        raise DataError(
            f"patients table {path}: no {' or '.join(map(repr, missing))} column "
            f"(columns: {', '.join(columns) or 'none'})"
        )
    patients = {slide_id: row["patient_id"] or slide_id
                for _, slide_id, row in slide_rows(reader, what=f"patients table {path}")}
    if not patients:
        raise DataError(f"patients table {path}: no rows")
    return patients
