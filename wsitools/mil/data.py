"""Cohorts for slide-level MIL: labelled slides matched to their feature bags, and bag sampling.

A *bag* is one slide's feature store ``{features_dir}/{slide_id}.h5`` (read and checked through
:mod:`wsitools.feature_store`). A *cohort* is the labelled slides (:mod:`wsitools.labels`) whose
bags exist and are usable: every bag is checked once up front (shape, feature width, finite
values), so a bad slide is named and skipped (or, with ``strict``, is an error) before any
training starts. Folds of a cohort: :mod:`wsitools.mil.folds`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsitools.errors import DataError
from wsitools.feature_store import (
    EncoderRecord,
    FeatureStore,
    TileGeometry,
    feature_path,
    features_root_hint,
    list_feature_stores,
)
from wsitools.labels import SHOWN_CLASSES, SURVIVAL_STRATA, LabelRow, check_labels_are_classes, first_few
from wsitools.text import TaskType
from wsitools.types import slide_id_from_path

log = logging.getLogger(__name__)


@dataclass
class Cohort:
    """The usable labelled slides: ids, class indices, patients, bag paths (and IVP bag paths).

    ``labels`` are what folds are stratified on: class indices (classification), the event
    indicator (survival: ``classes`` is ``("censored", "event")``) or zeros (regression: one
    stratum, ``("all",)``). ``targets`` holds the numbers a survival or regression head learns:
    ``[n, 2]`` follow-up time and event, or ``[n]`` target values.
    """

    slide_ids: list[str]
    labels: np.ndarray  # int64 [n] class indices into ``classes``
    patients: list[str]
    classes: tuple[str, ...]
    paths: list[Path]
    sizes: list[int]
    dim: int
    ivp_paths: list[Path] | None = None
    ivp_dim: int | None = None
    splits: list[str] | None = None
    folds: list[int] | None = None
    encoder: str | None = None
    encoder_hash: str | None = None
    encoder_weights: str | None = None
    tiles: TileGeometry = TileGeometry(None, None)
    skipped: dict[str, str] = field(default_factory=dict)
    task_type: TaskType = "classification"
    targets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.slide_ids)


def _warn_or_raise(problems: dict[str, str], *, strict: bool, what: str) -> None:
    if not problems:
        return
    listing = "; ".join(f"{s}: {r}" for s, r in list(problems.items())[:20])
    more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
    if strict:
        raise DataError(f"{len(problems)} {what}: {listing}{more}")
    log.warning("skipping %d %s: %s%s", len(problems), what, listing, more)


def build_cohort(
    rows: Sequence[LabelRow],
    features_dir: str | os.PathLike[str],
    classes: Sequence[str],
    *,
    ivp_features_dir: str | os.PathLike[str] | None = None,
    strict: bool = False,
    check_values: bool = True,
    allow_empty_classes: bool = False,
    task_type: TaskType = "classification",
    labels_file: str | os.PathLike[str] | None = None,
    task_file: str | os.PathLike[str] | None = None,
) -> Cohort:
    """Match labelled slides to their feature stores and check every bag.

    - A label not among ``classes`` is an error naming the labels table ``labels_file``, the
      task file ``task_file`` (where the rows and classes come from, when they are files) and the
      slide (classification; for survival and regression ``classes`` is ignored and the strata
      are set as :class:`Cohort` says).
    - A labelled slide without a feature store (e.g. it failed QC), or with an unusable one
      (non-finite features, wrong shape), is skipped with a warning naming it; with ``strict``
      it is an error. Feature stores without a label are listed in a warning and ignored.
    - Two bags whose stores record one slide fingerprint (one scan under two slide ids, as two
      copies of its file) are an error naming both (:func:`_check_distinct_slides`).
    - Bags whose feature width differs from the others are an error naming them (mixed encoders).
    - A class of ``classes`` without any usable labelled slide is an error naming it (a head
      would be trained and evaluated on a class it never saw); with ``allow_empty_classes`` a
      warning.
    - Fewer than two classes left is an error; so are, for survival, fewer than two events and,
      for regression, a target with a single value among the usable slides.
    """
    if task_type == "survival":
        classes = SURVIVAL_STRATA
    elif task_type == "regression":
        classes = ("all",)
    class_index = {c: i for i, c in enumerate(classes)}
    if task_type == "regression":
        rows = [replace(r, label="all") for r in rows]
    check_labels_are_classes(((r.slide_id, r.label) for r in rows), classes,
                             what=f"labels in labels table {labels_file}" if labels_file is not None else "labels",
                             task=f"task file {task_file}" if task_file is not None else "the task")
    stores = list_feature_stores(features_dir)
    unlabelled = sorted(set(stores) - {r.slide_id for r in rows})
    if unlabelled:
        log.warning(
            "%d feature stores in %s have no label and are ignored: %s%s",
            len(unlabelled), features_dir, ", ".join(unlabelled[:20]), " ..." if len(unlabelled) > 20 else "",
        )
    ivp_stores = list_feature_stores(ivp_features_dir) if ivp_features_dir is not None else None

    problems: dict[str, str] = {}
    infos: dict[str, FeatureStore] = {}
    ivp_infos: dict[str, FeatureStore] = {}
    for r in rows:
        if r.slide_id not in stores:
            problems[r.slide_id] = f"no feature store {feature_path(features_dir, r.slide_id)}"
            continue
        if ivp_stores is not None and r.slide_id not in ivp_stores:
            problems[r.slide_id] = f"no IVP feature store {feature_path(ivp_features_dir, r.slide_id)}"
            continue
        try:
            infos[r.slide_id] = FeatureStore.open_bag(stores[r.slide_id], check_values=check_values)
            if ivp_stores is not None:
                ivp_infos[r.slide_id] = FeatureStore.open_bag(ivp_stores[r.slide_id], check_values=check_values)
        except DataError as exc:
            problems[r.slide_id] = str(exc).removeprefix(f"slide {r.slide_id}: ")
    _warn_or_raise(problems, strict=strict, what="labelled slides without usable features")

    kept = [r for r in rows if r.slide_id in infos and r.slide_id not in problems]
    _check_distinct_slides([infos[r.slide_id] for r in kept])
    _check_one_width(infos, features_dir)
    if ivp_stores is not None:
        _check_one_width(ivp_infos, ivp_features_dir)
    if not kept:
        raise DataError(f"no labelled slide has a usable feature store in {features_dir}: "
                        f"{_why_none_usable(rows, stores, problems, features_dir)}")
    table = f"labels table {labels_file}: " if labels_file is not None else ""
    targets = _check_targets(kept, task_type, table=table)
    if task_type == "classification":
        present = sorted({r.label for r in kept}, key=lambda c: class_index[c])
        if len(present) < 2:
            raise DataError(
                f"{table}only one class ({present[0]!r}) among the {len(kept)} usable slides; "
                "a classifier needs at least two"
            )
        _check_empty_classes(classes, rows, kept, allow=allow_empty_classes)
    encoder = _one_encoder([infos[r.slide_id] for r in kept], features_dir)
    tiles = _one_geometry([infos[r.slide_id] for r in kept], features_dir)
    return Cohort(
        slide_ids=[r.slide_id for r in kept],
        labels=np.array([class_index[r.label] for r in kept], dtype=np.int64),
        patients=[r.patient_id for r in kept],
        classes=tuple(classes),
        paths=[infos[r.slide_id].path for r in kept],
        sizes=[infos[r.slide_id].n for r in kept],
        dim=infos[kept[0].slide_id].dim,
        ivp_paths=[ivp_infos[r.slide_id].path for r in kept] if ivp_stores is not None else None,
        ivp_dim=ivp_infos[kept[0].slide_id].dim if ivp_stores is not None else None,
        splits=[r.split for r in kept] if kept[0].split is not None else None,
        folds=[r.fold for r in kept] if kept[0].fold is not None else None,
        encoder=encoder.name,
        encoder_hash=encoder.hash,
        encoder_weights=encoder.weights,
        tiles=tiles,
        skipped=problems,
        task_type=task_type,
        targets=targets,
    )


def _why_none_usable(
    rows: Sequence[LabelRow], stores: dict[str, Path], problems: dict[str, str], features_dir: str | os.PathLike[str]
) -> str:
    """Why no labelled slide could be used, for the error: the first problem when some slide
    ids matched a store; else the ids against the store names, with the usual mismatches
    named (file names with their extension for ids, ids that differ in case, the features
    root given for an encoder's folder)."""
    if not stores:
        return "it holds no feature stores ({slide_id}.h5)" + features_root_hint(features_dir)
    matched = [r.slide_id for r in rows if r.slide_id in stores]
    if matched:
        return f"all {len(matched)} labelled slides with a store were skipped (first: {problems[matched[0]]})"
    ids = [r.slide_id for r in rows]
    message = (f"none of the {len(ids)} slide ids of the labels table (e.g. {ids[0]!r}) names one of its "
               f"{len(stores)} stores (e.g. {next(iter(stores)) + '.h5'!r})")
    lowered = {s.lower() for s in stores}
    if any(slide_id_from_path(i) in stores for i in ids):
        return message + "; give slide ids without the file extension, as wsitools names the slides"
    if any(i.lower() in lowered for i in ids):
        return message + "; slide ids are case-sensitive"
    return message


def _check_targets(kept: Sequence[LabelRow], task_type: TaskType, *, table: str = "") -> np.ndarray | None:
    """The survival or regression targets of the usable slides, checked for being learnable;
    ``table`` begins the errors (``labels table FILE: ``). Survival times that are all equal are
    learnable but say little (a warning): the head can only rank the events against the
    censored slides, and Uno's C and the time-dependent AUC are undefined."""
    if task_type == "survival":
        targets = np.array([[r.time, r.event] for r in kept], dtype=np.float64)
        n_events = int(targets[:, 1].sum())
        if n_events < 2:
            raise DataError(
                f"{table}{n_events} event(s) among the {len(kept)} usable slides; a survival head needs at least two"
            )
        if np.ptp(targets[:, 0]) == 0:
            log.warning("%sall %d usable slides have the time %g: the head learns events against censored slides "
                        "alone (no order in time; Uno's C and the time-dependent AUC are undefined)",
                        table, len(kept), targets[0, 0])
        return targets
    if task_type == "regression":
        targets = np.array([r.value for r in kept], dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            spread = float(np.ptp(targets)), float(np.std(targets))
        if spread[0] == 0:
            raise DataError(f"{table}the label is {targets[0]:g} on all {len(kept)} usable slides; nothing to regress")
        if not np.isfinite(spread).all():
            raise DataError(
                f"{table}the labels' spread is too large to standardise (labels from {targets.min():g} to "
                f"{targets.max():g} overflow their standard deviation); rescale them, e.g. to other units"
            )
        return targets
    return None


def _check_empty_classes(
    classes: Sequence[str], rows: Sequence[LabelRow], kept: Sequence[LabelRow], *, allow: bool
) -> None:
    labelled = Counter(r.label for r in rows)
    usable = Counter(r.label for r in kept)
    empty = [c for c in classes if usable[c] == 0]
    if not empty:
        return
    listing = first_few(
        [f"{c!r} ({f'{labelled[c]} labelled, none usable' if labelled[c] else 'no labelled slide'})" for c in empty],
        SHOWN_CLASSES,
    )
    if allow:
        log.warning("task classes without a usable labelled slide (trained and predicted all the same): %s", listing)
        return
    raise DataError(
        f"task classes without a usable labelled slide: {listing}; label slides of them, remove them "
        "from the task, or pass --allow-empty-classes"
    )


def _one_encoder(bags: Sequence[FeatureStore], features_dir: Any) -> EncoderRecord:
    """The one encoder all ``bags`` come from; several (other names, or one name with other
    weights or settings) is an error naming an example of each."""
    seen: dict[EncoderRecord, str] = {}
    for bag in bags:
        seen.setdefault(EncoderRecord.of(bag.attrs), bag.slide_id)
    if len(seen) > 1:
        listing = "; ".join(f"{rec.describe()} (e.g. slide {sid})" for rec, sid in seen.items())
        raise DataError(f"feature stores in {features_dir} come from several encoders: {listing}")
    return next(iter(seen)) if seen else EncoderRecord(None, None, None)


def _one_geometry(bags: Sequence[FeatureStore], features_dir: Any) -> TileGeometry:
    """The one tile size and resolution the ``bags`` that record them were cut at; several is
    an error naming an example of each (a cohort tiled twice with other settings)."""
    seen: dict[TileGeometry, str] = {}
    for bag in bags:
        tiles = TileGeometry.of(bag.attrs)
        if tiles.known:
            seen.setdefault(tiles, bag.slide_id)
    if len(seen) > 1:
        listing = "; ".join(f"{tiles.describe()} (e.g. slide {sid})" for tiles, sid in seen.items())
        raise DataError(
            f"feature stores in {features_dir} come from tiles of several sizes or resolutions: {listing}; "
            "extract every slide's features from tiles cut alike (one --mpp and --tile-size)"
        )
    return next(iter(seen)) if seen else TileGeometry(None, None)


def _check_distinct_slides(bags: Sequence[FeatureStore]) -> None:
    """Refuse two ``bags`` whose feature stores record one slide fingerprint (the slide file's
    size and the sha256 of its first and last MiB, :attr:`FeatureStore.slide_fingerprint`): one
    scan under two slide ids, as two copies of its file, would be trained on in one part of a
    fold and tested on in another. The identity compared is the source file's, never the
    features' (two slides may well give equal bags); stores that record none are not compared.
    A :class:`DataError` names both slides and their feature stores."""
    seen: dict[str, FeatureStore] = {}
    for bag in bags:
        fingerprint = bag.slide_fingerprint
        if fingerprint is None:
            continue
        first = seen.setdefault(fingerprint, bag)
        if first is not bag:
            raise DataError(
                f"slides {first.slide_id!r} ({first.path}) and {bag.slide_id!r} ({bag.path}) have features of one "
                f"slide file (their stores record the same slide fingerprint: the same size and the same first and "
                f"last MiB, as in {first.attrs.get('slide_path')} and {bag.attrs.get('slide_path')}); list each "
                "slide once in the labels table"
            )


def _check_one_width(infos: dict[str, FeatureStore], features_dir: Any) -> None:
    if not infos:
        return
    dims: dict[int, list[str]] = {}
    for sid, info in infos.items():
        dims.setdefault(info.dim, []).append(sid)
    if len(dims) > 1:
        common = max(dims, key=lambda d: len(dims[d]))
        odd = {d: s for d, s in dims.items() if d != common}
        listing = "; ".join(f"D={d}: {', '.join(s[:10])}" for d, s in odd.items())
        raise DataError(
            f"feature widths differ in {features_dir}: most slides have D={common}, but {listing} "
            "(mixed encoders?)"
        )


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency class weights, normalised so that a balanced cohort gets all ones."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)


def sample_index(
    n: int, bag_size: int | None, rng: np.random.Generator, *, instance_dropout: float = 0.0
) -> np.ndarray | None:
    """Rows to train on from an ``n``-row bag, sorted; ``None`` means all rows.

    ``instance_dropout`` drops that fraction of the rows (a random ``round((1 - p) n)`` rows are
    kept, at least one), then at most ``bag_size`` rows are kept (None or 0: no cap).
    """
    keep = n if instance_dropout <= 0.0 else max(1, int(round((1.0 - instance_dropout) * n)))
    if bag_size is not None and bag_size > 0:
        keep = min(keep, bag_size)
    if keep >= n:
        return None
    return np.sort(rng.choice(n, size=keep, replace=False))
