"""Labels, feature bags and cohorts for slide-level MIL.

A *bag* is one slide's feature store ``{features_dir}/{slide_id}.h5`` (``features`` [N, D],
``coords`` [N, 2], see docs/formats.md). A *cohort* is the labelled slides whose bags exist and
are usable: every bag is checked once up front (shape, feature width, finite values), so a bad
slide is named and skipped (or, with ``strict``, is an error) before any training starts.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch

from wsitools.errors import DataError, StoreError, one_line
from wsitools.io import read_user_text
from wsitools.mil.targets import LABEL_COLUMNS, SURVIVAL_STRATA, parse_targets
from wsitools.text import TaskType
from wsitools.types import check_slide_id

log = logging.getLogger(__name__)

CHECK_ROWS = 16384
"""Rows read at a time when checking or loading a whole bag (bounds memory)."""


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


def _sniff_dialect(path: Path, head: str) -> type[csv.Dialect] | csv.Dialect:
    if path.suffix.lower() in (".tsv", ".tab"):
        return csv.excel_tab
    if path.suffix.lower() == ".csv":
        return csv.excel
    try:
        return csv.Sniffer().sniff(head, delimiters=",\t;")
    except csv.Error:
        return csv.excel


def read_labels(path: str | os.PathLike[str], *, task_type: TaskType = "classification") -> list[LabelRow]:
    """Read a labels table (CSV or TSV) with ``slide_id``, the target columns of ``task_type``
    (:data:`LABEL_COLUMNS`: ``label``, a class or a number; or ``time`` and ``event`` for
    survival) and optional ``patient_id``, ``split`` (train/val/test) or ``fold`` (integer) columns.

    A slide without ``patient_id`` is its own patient. Raises :class:`DataError` naming the file
    and row for a missing column, an unsafe or repeated slide id, an empty label, a bad split, or
    (regression, survival) a target that is not a finite number, a negative time or an event
    other than 0/1.
    """
    path = Path(path)
    text = read_user_text(path, what="labels table", expected="a CSV or TSV file", encoding="utf-8-sig")
    reader = csv.DictReader(text.splitlines(), dialect=_sniff_dialect(path, text[:4096]))
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
    seen: set[str] = set()
    for line, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        slide_id = row["slide_id"]
        if not slide_id:
            continue
        try:
            check_slide_id(slide_id)
        except ValueError as exc:
            raise DataError(f"labels table {path}, line {line}: {exc}") from exc
        if slide_id in seen:
            raise DataError(f"labels table {path}, line {line}: slide {slide_id} appears twice")
        seen.add(slide_id)
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
    has_split = [r.split is not None for r in rows]
    has_fold = [r.fold is not None for r in rows]
    for name, flags in (("split", has_split), ("fold", has_fold)):
        if any(flags) and not all(flags):
            missing = [r.slide_id for r, f in zip(rows, flags) if not f]
            raise DataError(f"labels table {path}: {name} is empty for slides {', '.join(missing[:10])}")
    return rows


def feature_path(features_dir: str | os.PathLike[str], slide_id: str) -> Path:
    """Where a slide's feature store lives: ``{features_dir}/{slide_id}.h5``."""
    return Path(features_dir) / f"{check_slide_id(slide_id)}.h5"


def check_feature_dir(features_dir: str | os.PathLike[str]) -> Path:
    """``features_dir`` if it is a directory; else a :class:`StoreError` saying what it is (one
    feature store given for the directory of them, or nothing)."""
    folder = Path(features_dir)
    if folder.is_file():
        raise StoreError(
            f"{folder}: is a file; give the directory of feature stores (features/ENCODER, "
            f"holding {{slide_id}}.h5), e.g. {folder.parent}"
        )
    if not folder.is_dir():
        raise StoreError(f"feature directory {folder}: no such directory")
    return folder


def list_feature_stores(features_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Finished feature stores in a directory, by slide id (temporary ``.tmp-*`` files are skipped)."""
    folder = check_feature_dir(features_dir)
    return {p.stem: p for p in sorted(folder.glob("*.h5")) if not p.name.startswith(".")}


@dataclass(frozen=True)
class BagInfo:
    """What a feature store holds, without its features."""

    slide_id: str
    path: Path
    n: int
    dim: int
    attrs: dict[str, Any]


def _attr_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def bag_info(path: str | os.PathLike[str], *, check_values: bool = True) -> BagInfo:
    """Open a feature store and check it: ``features`` [N, D] with N >= 1, ``coords`` [N, 2],
    and (with ``check_values``) every feature finite. Raises :class:`DataError` naming the slide."""
    path = Path(path)
    slide_id = path.stem
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise DataError(f"slide {slide_id}: feature store {path} has no 'features' dataset")
            feats = f["features"]
            if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] == 0:
                raise DataError(f"slide {slide_id}: features in {path} have shape {feats.shape}, expected [N>0, D]")
            if feats.dtype.kind != "f":
                raise DataError(
                    f"slide {slide_id}: features in {path} are of type {feats.dtype}, expected floating point"
                )
            if "coords" in f and f["coords"].shape != (feats.shape[0], 2):
                raise DataError(
                    f"slide {slide_id}: coords in {path} have shape {f['coords'].shape}, "
                    f"expected ({feats.shape[0]}, 2)"
                )
            if check_values:
                for start in range(0, feats.shape[0], CHECK_ROWS):
                    block = feats[start : start + CHECK_ROWS]
                    bad = ~np.isfinite(block).all(axis=1)
                    if bad.any():
                        rows = start + np.flatnonzero(bad)
                        raise DataError(
                            f"slide {slide_id}: feature store {path} has non-finite (NaN/inf) features "
                            f"in {int(bad.sum())}+ rows, first row {int(rows[0])}"
                        )
            attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
            return BagInfo(slide_id=slide_id, path=path, n=int(feats.shape[0]), dim=int(feats.shape[1]), attrs=attrs)
    except (OSError, TypeError, ValueError) as exc:
        raise DataError(f"slide {slide_id}: feature store {path} cannot be read: {one_line(exc)}") from None


class RowLayout(NamedTuple):
    """Where a contiguous ``features`` dataset lies in its h5 file (what a memory map needs)."""

    offset: int
    dtype: str
    shape: tuple[int, int]


def row_layout(path: str | os.PathLike[str]) -> RowLayout | None:
    """The byte layout of ``features`` in ``path``; ``None`` when it is chunked (or unallocated),
    so its rows cannot be mapped directly."""
    with h5py.File(path, "r") as f:
        dset = f["features"]
        offset = dset.id.get_offset() if dset.chunks is None else None
        return None if offset is None else RowLayout(int(offset), dset.dtype.str, tuple(dset.shape))


def read_features(
    path: str | os.PathLike[str], index: np.ndarray | None = None, *, layout: RowLayout | None = None
) -> torch.Tensor:
    """Features of one bag as a float32 tensor ``[n, D]``: all rows, or the rows in ``index``
    (returned in sorted row order).

    A whole bag is read in blocks of :data:`CHECK_ROWS` rows into the float32 result, so a
    float16 store never sits in memory twice. With the ``layout`` of a contiguous dataset (what
    the feature step writes; from :func:`row_layout`, looked up once per store), selected rows
    are gathered through a memory map of the h5 file at the dataset's offset, without opening it
    with HDF5 or HDF5's per-row selection (0.2-0.4 ms of a 4-6 ms training step on 512 rows).
    Without one (a chunked dataset) the whole bag is read and indexed. float16 is widened by
    torch (vectorised), not numpy.
    """
    if index is None or layout is None:
        with h5py.File(path, "r") as f:
            dset = f["features"]
            n, dim = dset.shape
            out = torch.empty((n, dim), dtype=torch.float32)
            for start in range(0, n, CHECK_ROWS):
                out[start : start + CHECK_ROWS] = torch.from_numpy(dset[start : start + CHECK_ROWS])
        return out if index is None else out[torch.from_numpy(np.sort(index))]
    rows = np.memmap(path, dtype=np.dtype(layout.dtype), mode="r", offset=layout.offset, shape=layout.shape)
    return torch.from_numpy(rows[np.sort(index)]).to(torch.float32)


def read_coords(path: str | os.PathLike[str]) -> np.ndarray:
    """The ``coords`` [N, 2] int64 of a feature store (level-0 x, y of each tile's top-left)."""
    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise StoreError(f"feature store {path} has no 'coords' dataset")
        return np.asarray(f["coords"][()], dtype=np.int64)


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
) -> Cohort:
    """Match labelled slides to their feature stores and check every bag.

    - A label not among ``classes`` is an error naming the slide (classification; for survival
      and regression ``classes`` is ignored and the strata are set as :class:`Cohort` says).
    - A labelled slide without a feature store (e.g. it failed QC), or with an unusable one
      (non-finite features, wrong shape), is skipped with a warning naming it; with ``strict``
      it is an error. Feature stores without a label are listed in a warning and ignored.
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
    unknown = [f"{r.slide_id} ({r.label!r})" for r in rows if r.label not in class_index]
    if unknown:
        raise DataError(
            f"labels not among the task's classes {list(classes)}: slides {', '.join(unknown[:20])}"
        )
    stores = list_feature_stores(features_dir)
    unlabelled = sorted(set(stores) - {r.slide_id for r in rows})
    if unlabelled:
        log.warning(
            "%d feature stores in %s have no label and are ignored: %s%s",
            len(unlabelled), features_dir, ", ".join(unlabelled[:20]), " ..." if len(unlabelled) > 20 else "",
        )
    ivp_stores = list_feature_stores(ivp_features_dir) if ivp_features_dir is not None else None

    problems: dict[str, str] = {}
    infos: dict[str, BagInfo] = {}
    ivp_infos: dict[str, BagInfo] = {}
    for r in rows:
        if r.slide_id not in stores:
            problems[r.slide_id] = f"no feature store {feature_path(features_dir, r.slide_id)}"
            continue
        if ivp_stores is not None and r.slide_id not in ivp_stores:
            problems[r.slide_id] = f"no IVP feature store {feature_path(ivp_features_dir, r.slide_id)}"
            continue
        try:
            infos[r.slide_id] = bag_info(stores[r.slide_id], check_values=check_values)
            if ivp_stores is not None:
                ivp_infos[r.slide_id] = bag_info(ivp_stores[r.slide_id], check_values=check_values)
        except DataError as exc:
            problems[r.slide_id] = str(exc).removeprefix(f"slide {r.slide_id}: ")
    _warn_or_raise(problems, strict=strict, what="labelled slides without usable features")

    kept = [r for r in rows if r.slide_id in infos and r.slide_id not in problems]
    _check_one_width(infos, features_dir)
    if ivp_stores is not None:
        _check_one_width(ivp_infos, ivp_features_dir)
    if not kept:
        raise DataError(f"no labelled slide has a usable feature store in {features_dir}")
    targets = _check_targets(kept, task_type)
    if task_type == "classification":
        present = sorted({r.label for r in kept}, key=lambda c: class_index[c])
        if len(present) < 2:
            raise DataError(
                f"only one class ({present[0]!r}) among the {len(kept)} usable slides; "
                "a classifier needs at least two"
            )
        _check_empty_classes(classes, rows, kept, allow=allow_empty_classes)
    encoder = _one_encoder([infos[r.slide_id] for r in kept], features_dir)
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
        skipped=problems,
        task_type=task_type,
        targets=targets,
    )


def _check_targets(kept: Sequence[LabelRow], task_type: TaskType) -> np.ndarray | None:
    """The survival or regression targets of the usable slides, checked for being learnable."""
    if task_type == "survival":
        targets = np.array([[r.time, r.event] for r in kept], dtype=np.float64)
        n_events = int(targets[:, 1].sum())
        if n_events < 2:
            raise DataError(
                f"{n_events} event(s) among the {len(kept)} usable slides; a survival head needs at least two"
            )
        return targets
    if task_type == "regression":
        targets = np.array([r.value for r in kept], dtype=np.float64)
        if np.ptp(targets) == 0:
            raise DataError(f"the label is {targets[0]:g} on all {len(kept)} usable slides; nothing to regress")
        return targets
    return None


def _check_empty_classes(
    classes: Sequence[str], rows: Sequence[LabelRow], kept: Sequence[LabelRow], *, allow: bool
) -> None:
    labelled = {c: sum(r.label == c for r in rows) for c in classes}
    usable = {c: sum(r.label == c for r in kept) for c in classes}
    empty = [c for c in classes if usable[c] == 0]
    if not empty:
        return
    listing = ", ".join(
        f"{c!r} ({'no labelled slide' if not labelled[c] else f'{labelled[c]} labelled, none usable'})" for c in empty
    )
    if allow:
        log.warning("task classes without a usable labelled slide (trained and predicted all the same): %s", listing)
        return
    raise DataError(
        f"task classes without a usable labelled slide: {listing}; label slides of them, remove them "
        "from the task, or pass --allow-empty-classes"
    )


class EncoderRecord(NamedTuple):
    """The encoder of a feature store, as its attributes record it (None where they do not)."""

    name: str | None
    hash: str | None
    weights: str | None

    @classmethod
    def of(cls, attrs: dict[str, Any]) -> EncoderRecord:
        def text(key: str) -> str | None:
            value = attrs.get(key)
            return str(value) if value not in (None, "") else None

        return cls(text("encoder"), text("encoder_hash"), text("weight_sha256"))

    def describe(self) -> str:
        """``name (hash 0123456789ab)``, for messages."""
        return f"{self.name or 'unnamed'} (hash {self.hash[:12]})" if self.hash else f"{self.name or 'unnamed'}"


def _one_encoder(bags: Sequence[BagInfo], features_dir: Any) -> EncoderRecord:
    """The one encoder all ``bags`` come from; several (other names, or one name with other
    weights or settings) is an error naming an example of each."""
    seen: dict[EncoderRecord, str] = {}
    for bag in bags:
        seen.setdefault(EncoderRecord.of(bag.attrs), bag.slide_id)
    if len(seen) > 1:
        listing = "; ".join(f"{rec.describe()} (e.g. slide {sid})" for rec, sid in seen.items())
        raise DataError(f"feature stores in {features_dir} come from several encoders: {listing}")
    return next(iter(seen)) if seen else EncoderRecord(None, None, None)


def _check_one_width(infos: dict[str, BagInfo], features_dir: Any) -> None:
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
        raise DataError(f"--folds must be at least 2, got {n_folds}")
    names, plabels = _patient_labels(labels, patients)
    counts = np.bincount(plabels)
    short = [
        f"class {classes[c] if classes is not None else c!r}: {n} patient{'s' if n != 1 else ''}"
        for c, n in enumerate(counts) if 0 < n < n_folds
    ]
    if short:
        raise DataError(
            f"{n_folds}-fold cross-validation needs at least {n_folds} patients per class; "
            f"{'; '.join(short)} (use fewer folds: --folds)"
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
    for k, value in enumerate(sorted(set(folds_col.tolist()))):
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
