"""Folds of a cohort: patient-level stratified k-fold, or the labels table's own splits and folds.

Every patient's slides fall in one part (no leakage between training and test), the classes (or,
for survival, the event indicator) are spread evenly over the folds, and a seed fixes the
assignment: the same seed gives the same folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from wsitools.errors import DataError
from wsitools.labels import SURVIVAL_STRATA, folds_fit, folds_instead
from wsitools.mil.config import named

if TYPE_CHECKING:
    from wsitools.mil.data import Cohort


@dataclass(frozen=True)
class Fold:
    """One train / validation / test partition of a cohort, as index arrays."""

    index: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _patient_labels(labels: np.ndarray, patients: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Unique patients (first-seen order) and each one's majority label (for stratification)."""
    order: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        order.setdefault(p, []).append(i)
    names = list(order)
    plabels = np.array([np.bincount(labels[idx]).argmax() for idx in order.values()], dtype=np.int64)
    return names, plabels


def _stratified_assign(plabels: np.ndarray, n_parts: int, rng: np.random.Generator) -> np.ndarray:
    """Deal the patients of each class round-robin into ``n_parts`` parts, after a shuffle.

    Each class starts where the previous one stopped, so part sizes differ by at most one.
    """
    part = np.empty(len(plabels), dtype=np.int64)
    offset = 0
    for c in np.unique(plabels):
        members = rng.permutation(np.flatnonzero(plabels == c))
        part[members] = (offset + np.arange(len(members))) % n_parts
        offset = (offset + len(members)) % n_parts
    return part


def _split_val(
    candidates: np.ndarray, labels: np.ndarray, patients: Sequence[str], val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split slide indices into train and validation by patient, stratified by class."""
    sub_patients = [patients[i] for i in candidates]
    names, plabels = _patient_labels(labels[candidates], sub_patients)
    val_patients: set[str] = set()
    for c in np.unique(plabels):
        members = rng.permutation(np.flatnonzero(plabels == c))
        n_val = max(1, int(round(val_fraction * len(members)))) if len(members) >= 2 else 0
        val_patients.update(names[m] for m in members[:n_val])
    is_val = np.array([p in val_patients for p in sub_patients], dtype=bool)
    return candidates[~is_val], candidates[is_val]


def patient_kfold(
    labels: np.ndarray,
    patients: Sequence[str],
    *,
    n_folds: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> list[Fold]:
    """Patient-level stratified k-fold: every patient's slides are in one test fold; inside each
    fold's training part a stratified ``val_fraction`` of the patients is held out for early
    stopping. Raises :class:`DataError` if a class has fewer patients than folds (naming the
    class by its name in ``classes`` when given)."""
    labels = np.asarray(labels, dtype=np.int64)
    if n_folds < 2:
        raise DataError(f"{named('folds')} must be at least 2, got {n_folds}")
    names, plabels = _patient_labels(labels, patients)
    counts = np.bincount(plabels)
    strata = tuple(classes) if classes is not None else None
    spread = [s == "censored" for s in strata] if strata == SURVIVAL_STRATA else None
    other = folds_instead(counts.tolist(), n_folds, spread=spread)
    instead = f"use {other} folds (--folds {other})" if other else "label more patients"
    kind = "stratum" if strata == SURVIVAL_STRATA or (strata is not None and len(strata) == 1) else "class"
    short = [
        f"{kind} {strata[c] if strata is not None else c!r}: "
        f"{n} patient{'s' if n != 1 else ''}"
        for c, n in enumerate(counts) if 0 < n < n_folds and not (spread and spread[c])
    ]
    if short and strata is not None and len(strata) == 1:  # regression: one stratum
        raise DataError(f"{n_folds}-fold cross-validation needs at least {n_folds} labelled patients, "
                        f"but there are {counts[0]}; {instead}")
    if short:
        per = "with an event" if strata == SURVIVAL_STRATA else "per class"
        raise DataError(f"{n_folds}-fold cross-validation needs at least {n_folds} patients {per}; {'; '.join(short)}; {instead}")
    if not folds_fit(counts.tolist(), n_folds, spread=spread):
        raise DataError(
            f"{n_folds}-fold cross-validation of {', '.join(map(str, counts[counts > 0]))} patients per {kind} leaves "
            f"a fold's training part without two patients of one {kind} to hold one out for validation "
            f"(early stopping); {instead}"
        )
    rng = np.random.default_rng(seed)
    part = _stratified_assign(plabels, n_folds, rng)
    part_of = dict(zip(names, part))
    slide_part = np.array([part_of[p] for p in patients])
    folds = []
    for k in range(n_folds):
        test = np.flatnonzero(slide_part == k)
        train, val = _split_val(np.flatnonzero(slide_part != k), labels, patients, val_fraction, rng)
        folds.append(Fold(index=k, train=train, val=val, test=test))
    return folds


def user_folds(cohort: Cohort, *, val_fraction: float = 0.2, seed: int = 0) -> list[Fold]:
    """Folds from the labels table: a ``split`` column gives one fold (validation carved from
    ``train`` by patient if no ``val`` rows); a ``fold`` column gives one fold per value, that
    value's slides being the test set. A patient spanning two parts is an error (leakage)."""
    rng = np.random.default_rng(seed)
    if cohort.splits is not None:
        parts = np.array(cohort.splits)
        _check_patients_disjoint(cohort.patients, list(parts))
        test = np.flatnonzero(parts == "test")
        if len(test) == 0:
            raise DataError("the labels table's split column has no 'test' slides left")
        val = np.flatnonzero(parts == "val")
        train = np.flatnonzero(parts == "train")
        if len(val) == 0:
            train, val = _split_val(train, cohort.labels, cohort.patients, val_fraction, rng)
        return [Fold(index=0, train=train, val=val, test=test)]
    if cohort.folds is None:
        raise DataError("the labels table has neither a split nor a fold column")
    folds_col = np.array(cohort.folds)
    _check_patients_disjoint(cohort.patients, [str(f) for f in folds_col])
    out = []
    for k, value in enumerate(sorted(set(folds_col.tolist()))):  # integers, in numeric order
        test = np.flatnonzero(folds_col == value)
        train, val = _split_val(np.flatnonzero(folds_col != value), cohort.labels, cohort.patients, val_fraction, rng)
        out.append(Fold(index=k, train=train, val=val, test=test))
    if len(out) < 2:
        raise DataError("the labels table's fold column has a single value; give at least two folds")
    return out


def _check_patients_disjoint(patients: Sequence[str], parts: Sequence[str]) -> None:
    where: dict[str, set[str]] = {}
    for p, part in zip(patients, parts):
        where.setdefault(p, set()).add(str(part))
    leaky = {p: s for p, s in where.items() if len(s) > 1}
    if leaky:
        listing = "; ".join(f"{p} in {sorted(s)}" for p, s in list(leaky.items())[:10])
        raise DataError(f"patients appear in more than one split/fold (leakage): {listing}")
