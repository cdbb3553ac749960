"""Patient-level bags: all slides of a patient pooled into one bag (``--bag patient``).

A patient bag is the concatenation of its slides' feature stores, in labels-table order; the
head attends across all of them at once, so evidence may sit in any one slide (or be spread
over several). Each slide's slice of the patient's attention goes back to that slide's own
attention file (:func:`write_patient_attention`), so every slide still gets its heatmap. The
default stays one bag per slide (:data:`~wsitools.mil.config.Bag`).

This module groups a slide cohort into patients (:func:`patient_cohort`), checks that a
patient's slides agree on their target (:func:`check_patient_targets`), and splits and writes
attention; the slide -> patient table that prediction needs is read by
:func:`wsitools.labels.read_patients`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsitools.attention import write_attention
from wsitools.errors import DataError
from wsitools.feature_store import FeatureStore
from wsitools.labels import LabelRow
from wsitools.mil.data import Cohort
from wsitools.text import TaskType


@dataclass(frozen=True)
class SlideGroup:
    """The slides of one patient bag, in the order their features are concatenated."""

    slide_ids: tuple[str, ...]
    paths: tuple[Path, ...]
    sizes: tuple[int, ...]
    ivp_paths: tuple[Path, ...] | None = None


@dataclass
class PatientCohort(Cohort):
    """A cohort whose entries are patients: ``slide_ids`` and ``patients`` both hold the patient
    ids, ``sizes`` the total rows of each patient bag, ``labels``/``targets``/``splits``/``folds``
    the patient's (its slides agree), and ``groups`` the slides of each patient bag."""

    groups: list[SlideGroup] = field(default_factory=list)


def _target_of(row: LabelRow, task_type: TaskType) -> tuple[Any, ...]:
    """What a patient's slides must agree on: the class, the value, or the time and event."""
    if task_type == "survival":
        return (row.time, row.event)
    if task_type == "regression":
        return (row.value,)
    return (row.label,)


def check_patient_targets(
    rows: Sequence[LabelRow], path: str | os.PathLike[str], *, task_type: TaskType = "classification"
) -> None:
    """Every patient's slides must carry one target (class, value, or time and event): a patient
    bag has a single label. A disagreement is a :class:`DataError` naming the file, the
    patient and two slides that differ."""
    what = "time and event" if task_type == "survival" else "label"
    first: dict[str, LabelRow] = {}
    for row in rows:
        seen = first.setdefault(row.patient_id, row)
        if _target_of(row, task_type) != _target_of(seen, task_type):
            shown = ["/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in _target_of(r, task_type))
                     for r in (seen, row)]
            raise DataError(
                f"labels table {path}: patient {row.patient_id}: slides {seen.slide_id} ({shown[0]}) and "
                f"{row.slide_id} ({shown[1]}) disagree on the {what}; patient bags (--bag patient) need one "
                f"{what} per patient"
            )


def _group_indices(patients: Sequence[str]) -> dict[str, list[int]]:
    """Indices of each patient's entries, patients in first-seen order."""
    order: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        order.setdefault(p, []).append(i)
    return order


def patient_cohort(cohort: Cohort) -> PatientCohort:
    """Pool the usable slides of ``cohort`` into one bag per patient (a patient whose slides were
    all skipped is gone; one with some skipped pools the rest). The slides of a patient must
    share their ``split``/``fold`` value (a :class:`DataError` naming the patient); a survival
    cohort needs two patients with an event, a classification cohort two classes."""
    order = _group_indices(cohort.patients)
    first = [idx[0] for idx in order.values()]
    for part_name, parts in (("split", cohort.splits), ("fold", cohort.folds)):
        if parts is None:
            continue
        for patient, idx in order.items():
            values = sorted({str(parts[i]) for i in idx})
            if len(values) > 1:
                raise DataError(
                    f"patient {patient}: slides in {part_name}s {', '.join(values)}; a patient bag lies in one "
                    f"{part_name} (give all its slides the same {part_name})"
                )
    groups = [
        SlideGroup(
            slide_ids=tuple(cohort.slide_ids[i] for i in idx),
            paths=tuple(cohort.paths[i] for i in idx),
            sizes=tuple(cohort.sizes[i] for i in idx),
            ivp_paths=tuple(cohort.ivp_paths[i] for i in idx) if cohort.ivp_paths is not None else None,
        )
        for idx in order.values()
    ]
    labels = cohort.labels[first]
    targets = cohort.targets[first] if cohort.targets is not None else None
    if cohort.task_type == "survival" and int(targets[:, 1].sum()) < 2:
        raise DataError(
            f"{int(targets[:, 1].sum())} patient(s) with an event among {len(order)}; a survival head on "
            "patient bags needs at least two"
        )
    if cohort.task_type == "classification" and len(np.unique(labels)) < 2:
        raise DataError(f"all {len(order)} patients have one class; a classifier needs at least two")
    patients = list(order)
    return PatientCohort(
        slide_ids=patients,
        labels=labels,
        patients=patients,
        classes=cohort.classes,
        paths=[g.paths[0] for g in groups],
        sizes=[sum(g.sizes) for g in groups],
        dim=cohort.dim,
        ivp_paths=[g.ivp_paths[0] for g in groups] if cohort.ivp_paths is not None else None,
        ivp_dim=cohort.ivp_dim,
        splits=[cohort.splits[i] for i in first] if cohort.splits is not None else None,
        folds=[cohort.folds[i] for i in first] if cohort.folds is not None else None,
        encoder=cohort.encoder,
        encoder_hash=cohort.encoder_hash,
        encoder_weights=cohort.encoder_weights,
        tiles=cohort.tiles,
        skipped=cohort.skipped,
        task_type=cohort.task_type,
        targets=targets,
        groups=groups,
    )


def entry_slides(cohort: Cohort, i: int) -> tuple[str, ...]:
    """The slides of cohort entry ``i``: its own slide, or a patient bag's slides."""
    return cohort.groups[i].slide_ids if isinstance(cohort, PatientCohort) else (cohort.slide_ids[i],)


def entry_row(cohort: Cohort, i: int) -> dict[str, Any]:
    """The identifying columns of entry ``i`` in ``predictions.csv``: ``slide_id`` and
    ``patient_id`` of a slide bag; ``patient_id`` and its ``slides`` (``;``-separated) of a
    patient bag."""
    if isinstance(cohort, PatientCohort):
        return {"patient_id": cohort.patients[i], "slides": ";".join(cohort.groups[i].slide_ids)}
    return {"slide_id": cohort.slide_ids[i], "patient_id": cohort.patients[i]}


def split_attention(attention: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """A patient bag's attention [sum(sizes)] cut into each slide's slice, in bag order."""
    attention = np.asarray(attention)
    if len(attention) != sum(sizes):
        raise ValueError(f"{len(attention)} attention values for slides of {sum(sizes)} tiles")
    return np.split(attention, np.cumsum(sizes)[:-1])


def write_patient_attention(
    folder: Path,
    *,
    patient_id: str,
    bags: Sequence[FeatureStore],
    coords: Sequence[np.ndarray],
    attention: np.ndarray,
    classes: Sequence[str],
    probs: np.ndarray,
    meta: Mapping[str, Any],
) -> list[Path]:
    """Write ``{slide_id}.h5`` for each slide of a patient bag: its slice of the patient's
    attention (summing to the slide's share of it, not to one), its ``coords``, and the patient's
    prediction; attributes ``bag`` (``patient``), ``patient_id``, ``patient_slides`` and
    ``attention_share`` say where the slice came from."""
    written = []
    slides = [b.slide_id for b in bags]
    for bag, tiles, part in zip(bags, coords, split_attention(attention, [b.n for b in bags])):
        path = folder / f"{bag.slide_id}.h5"
        write_attention(
            path,
            slide_id=bag.slide_id,
            attention=part,
            coords=tiles,
            classes=classes,
            probs=probs,
            feature_path=bag.path,
            provenance=bag.attrs,
            meta={**meta, "bag": "patient", "patient_id": patient_id, "patient_slides": slides,
                  "attention_share": float(np.sum(part, dtype=np.float64))},
        )
        written.append(path)
    return written


def group_slides(slides: Sequence[str], patients: Mapping[str, str]) -> dict[str, list[str]]:
    """The ``slides`` grouped by patient (patients in first-seen order, slides in given order)."""
    groups: dict[str, list[str]] = {}
    for slide_id in slides:
        groups.setdefault(patients[slide_id], []).append(slide_id)
    return groups
