"""The attention file ``attention/{slide_id}.h5``: one slide's attention per tile and prediction.

Training (out-of-fold) and prediction write it; ``wsitools heatmap`` reads it. This module is the
only one that knows its layout (docs/formats.md, "Attention file"): datasets ``attention`` [N]
float32 (sums to one) and ``coords`` [N, 2] int64 (level-0 x, y of each tile's top-left, as in
the feature store); attributes name the slide, the head and the prediction (``classes``,
``probs``, ``pred``; a survival or regression head's one output as ``classes`` ``["risk"]`` or
``["prediction"]`` with its value in ``probs``), say how the heads that made the map pooled
(:func:`pooling_attrs`: a head pooling by the mean attends to every tile alike) and carry over
the feature store's slide/store paths and tile geometry, so a heatmap needs nothing else. The
file records each dataset's CRC-32 (:data:`CHECKSUM_ATTRS`), which every read checks: a flipped
bit that keeps a value finite would otherwise move a tile or its colour silently.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsitools import __version__
from wsitools.errors import StoreError
from wsitools.feature_store import crc32_of
from wsitools.io import KeptErrorFile, atomic_path

ATTENTION_FORMAT_VERSION = 1
PROVENANCE_ATTRS = ("slide_path", "store_path", "tile_size", "tile_size_level0", "mpp_target", "encoder")
"""Feature-store attributes copied into the attention file when the store has them."""

CHECKSUM_ATTRS = {"attention": "attention_crc32", "coords": "coords_crc32"}
"""The file attribute recording each dataset's CRC-32 (:func:`~wsitools.feature_store.crc32_of`),
by dataset. Optional: files written before they were recorded are read unchecked."""


def pooling_attrs(poolings: Sequence[str]) -> dict[str, Any]:
    """The attributes that record how the heads whose attention a map averages pooled
    (``poolings``: each head's, ``attention`` or ``mean``): ``n_models`` (heads averaged),
    ``n_mean_pooled`` (how many of them pool by the mean: their attention is uniform, so they
    add the same to every tile) and ``pooling``, the two in a word (``attention``: none by the
    mean, ``mean``: all, ``mixed``)."""
    n_mean = sum(p == "mean" for p in poolings)
    summary = "attention" if n_mean == 0 else "mean" if n_mean == len(poolings) else "mixed"
    return {"pooling": summary, "n_models": len(poolings), "n_mean_pooled": n_mean}


@dataclass(frozen=True)
class AttentionMap:
    """One slide's attention per tile, and the head's prediction for the slide.

    ``classes`` and ``probs`` are empty when the file carries no prediction; for a survival or
    regression head they are one name (``risk``, ``prediction``) and its value. ``pred`` is
    ``None`` unless there are classes to choose from. ``n_models`` heads made the map, and
    ``n_mean_pooled`` of them pool by the mean (:func:`pooling_attrs`; a file that does not
    record it was made by one head pooling by attention)."""

    slide_id: str
    attention: np.ndarray  # [N] float32
    coords: np.ndarray  # [N, 2] int64, level-0 top-left corners
    tile_size_level0: float
    classes: tuple[str, ...] = ()
    probs: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [C] float64, order of classes
    attrs: dict[str, Any] = field(default_factory=dict)
    n_models: int = 1
    n_mean_pooled: int = 0

    @property
    def mean_pooled(self) -> bool:
        """Whether every head that made the map pooled by the mean: its weights are uniform, not
        an attention map, and no tile ranks above another."""
        return self.n_mean_pooled == self.n_models

    @property
    def pred(self) -> str | None:
        """The predicted class (highest probability), or None without classes to choose from."""
        return self.classes[int(np.argmax(self.probs))] if len(self.classes) > 1 else None

    @property
    def level0_mpp(self) -> float | None:
        """The level-0 resolution (um/px) of the slide the tiles were cut from, as their geometry
        implies it: ``mpp_target * tile_size / tile_size_level0``; None where the file does not
        record ``mpp_target`` and ``tile_size`` (bags of other tools)."""
        try:
            mpp = float(self.attrs["mpp_target"]) * float(self.attrs["tile_size"]) / self.tile_size_level0
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None
        return mpp if math.isfinite(mpp) and mpp > 0 else None


def write_attention(
    path: str | os.PathLike[str],
    *,
    slide_id: str,
    attention: np.ndarray,
    coords: np.ndarray,
    classes: Sequence[str],
    probs: np.ndarray,
    feature_path: str | os.PathLike[str],
    provenance: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> None:
    """Write one slide's attention file atomically.

    ``provenance`` is the feature store's attributes (only :data:`PROVENANCE_ATTRS` are kept);
    ``meta`` adds attributes such as the head, task, fold and label (non-scalars as JSON). Each
    dataset's checksum is recorded (:data:`CHECKSUM_ATTRS`).
    """
    if len(attention) != len(coords):
        raise ValueError(f"slide {slide_id}: {len(attention)} attention values for {len(coords)} coords")
    if len(probs) != len(classes):
        raise ValueError(f"slide {slide_id}: {len(probs)} probabilities for {len(classes)} classes")
    datasets = {"attention": np.asarray(attention, dtype=np.float32), "coords": np.asarray(coords, dtype=np.int64)}
    with atomic_path(path, overwrite=True) as tmp:
        with KeptErrorFile(tmp, "w+") as raw, h5py.File(raw, "w") as f:  # a full disk: one OSError
            for name, values in datasets.items():
                f.create_dataset(name, data=values)
                f.attrs[CHECKSUM_ATTRS[name]] = crc32_of(values)
            f.attrs["format_version"] = ATTENTION_FORMAT_VERSION
            f.attrs["kind"] = "attention"
            f.attrs["slide_id"] = slide_id
            f.attrs["classes"] = json.dumps(list(classes))
            f.attrs["probs"] = np.asarray(probs, dtype=np.float64)
            if len(classes) > 1:  # a survival or regression head has one output: no class to pick
                f.attrs["pred"] = str(classes[int(np.argmax(probs))])
            f.attrs["feature_path"] = str(Path(feature_path).resolve())
            f.attrs["package_version"] = __version__
            for key in PROVENANCE_ATTRS:
                if provenance.get(key) is not None:
                    f.attrs[key] = provenance[key]
            for key, value in meta.items():
                f.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)


def _checked(path: Path, name: str, values: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    """``values``, dataset ``name`` of the attention file at ``path`` as read; a
    :class:`StoreError` naming the file and the dataset when ``attrs`` record its checksum
    (:data:`CHECKSUM_ATTRS`) and the values do not match it."""
    recorded = attrs.get(CHECKSUM_ATTRS[name])
    if recorded is not None and (crc := crc32_of(values)) != int(recorded):
        raise StoreError(
            f"{path}: checksum mismatch in {name!r} (CRC-32 {crc:08x}, recorded {int(recorded):08x}): damaged "
            "since it was written; write it again (wsitools train or predict)"
        )
    return values


def _prediction(path: Path, attrs: Mapping[str, Any]) -> tuple[tuple[str, ...], np.ndarray]:
    if "classes" not in attrs or "probs" not in attrs:
        return (), np.zeros(0)
    try:
        raw = attrs["classes"]
        classes = tuple(str(c) for c in (json.loads(raw) if isinstance(raw, str) else list(raw)))
        probs = np.asarray(attrs["probs"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable 'classes' or 'probs' attribute: {exc}") from None
    if len(classes) != len(probs) or not np.all(np.isfinite(probs)):
        raise StoreError(f"{path}: {len(probs)} probabilities for {len(classes)} classes (or not finite)")
    return classes, probs


def _pooling(path: Path, attrs: Mapping[str, Any]) -> tuple[int, int]:
    """``(n_models, n_mean_pooled)`` of an attention file (:func:`pooling_attrs`); ``(1, 0)``,
    one head pooling by attention, where it records neither (files of heads that could only
    pool by attention)."""
    try:
        n_models, n_mean = int(attrs.get("n_models", 1)), int(attrs.get("n_mean_pooled", 0))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable 'n_models' or 'n_mean_pooled' attribute: {exc}") from None
    if n_models < 1 or not 0 <= n_mean <= n_models:
        raise StoreError(f"{path}: {n_mean} of {n_models} heads pooled by the mean (n_mean_pooled of n_models)")
    return n_models, n_mean


def _slide_id(attrs: Mapping[str, Any], path: Path) -> str:
    """The slide an attention file is of: its ``slide_id`` attribute, else its file name."""
    value = attrs.get("slide_id")
    if isinstance(value, bytes):
        value = value.decode()
    return str(value) if value not in (None, "") else path.stem


def attention_slide_id(path: str | os.PathLike[str]) -> str:
    """The slide id an attention file records (its file name where it records none, or cannot be
    read: :func:`read_attention` then names what is wrong with it)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            return _slide_id(f.attrs, path)
    except OSError:
        return path.stem


def read_attention(path: str | os.PathLike[str]) -> AttentionMap:
    """Read an attention file; :class:`StoreError` naming it if it is not one, or if a dataset
    does not match the checksum the file records (:data:`CHECKSUM_ATTRS`)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("kind") != "attention" or "attention" not in f or "coords" not in f:
                raise StoreError(f"{path}: not an attention file (needs 'attention', 'coords', kind=attention)")
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            attention = np.asarray(_checked(path, "attention", f["attention"][()], attrs), dtype=np.float32)
            coords = np.asarray(_checked(path, "coords", f["coords"][()], attrs), dtype=np.int64)
    except OSError as exc:
        raise StoreError(f"{path}: cannot be read as an attention file: {exc}") from exc
    if "tile_size_level0" not in attrs:
        raise StoreError(f"{path}: lacks tile_size_level0 (the feature store did not record it)")
    if attention.ndim != 1 or len(attention) != len(coords) or coords.ndim != 2 or coords.shape[1] != 2:
        raise StoreError(f"{path}: {len(attention)} attention values for coords of shape {coords.shape}")
    if not np.all(np.isfinite(attention)):
        raise StoreError(f"{path}: attention has values that are not finite")
    if np.any(attention < 0):  # a head's attention is a softmax: weights from 0 to 1
        raise StoreError(f"{path}: attention has negative values ({float(attention.min()):g}); not a head's attention")
    classes, probs = _prediction(path, attrs)
    n_models, n_mean_pooled = _pooling(path, attrs)
    return AttentionMap(
        slide_id=_slide_id(attrs, path),
        attention=attention,
        coords=coords,
        tile_size_level0=float(attrs["tile_size_level0"]),
        classes=classes,
        probs=probs,
        attrs=attrs,
        n_models=n_models,
        n_mean_pooled=n_mean_pooled,
    )
