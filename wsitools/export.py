"""Export feature stores to the folder layouts CLAM and TRIDENT read (``wsitools export``).

A feature store is already readable by both as it is (``features``, ``coords`` and their
attributes on ``coords``, docs/formats.md); the export writes the files their training and
slide-encoding scripts look for by path:

* CLAM (``--data_root_dir`` of its training, ``--data_h5_dir`` of its feature extraction):
  ``pt_files/{slide_id}.pt`` (the float32 feature tensor [N, D], ``torch.save``; what its MIL
  dataset loads), ``h5_files/{slide_id}.h5`` (``features`` float32 and ``coords``) and
  ``patches/{slide_id}.h5`` (``coords`` alone: the coordinates file its feature extraction reads).
  Their ``coords`` carry CLAM's own meaning of the attributes: ``patch_level`` 0 and
  ``patch_size`` the tile's size in level-0 px, so that CLAM, which reads
  ``patch_size`` px at ``patch_level``, reads the tile's whole footprint.
* TRIDENT (a job folder): ``{mag}x_{size}px_{overlap}px_overlap/patches/{slide_id}_patches.h5``
  (``coords``) and ``.../features_{encoder}/{slide_id}.h5`` (``features`` float32 and ``coords``),
  ``coords`` with TRIDENT's attributes (``patch_size`` in target px, ``patch_size_level0``,
  ``level0_magnification``, ``target_magnification``, ``overlap``).

Features are exported float32 whatever the store holds (float16 widens exactly). Every file is
written under a temporary name and renamed when complete, replacing an older export.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch

from wsitools.errors import StoreError
from wsitools.feature_store import EncoderRecord, FeatureStore, check_finite
from wsitools.io import atomic_path, write_torch
from wsitools.types import check_slide_id

ExportTarget = Literal["clam", "trident"]
EXPORT_TARGETS: tuple[ExportTarget, ...] = ("clam", "trident")


@dataclass(frozen=True)
class ExportResult:
    """The files written for one slide."""

    slide_id: str
    n_tiles: int
    paths: tuple[Path, ...]
    encoder: EncoderRecord
    dim: int


def clam_coords_attrs(store: FeatureStore) -> dict[str, Any]:
    """CLAM's attributes of ``coords``: read ``patch_size`` px at pyramid level ``patch_level``
    (0: the tile's level-0 size, rounded to whole pixels), and the slide's ``name``."""
    interop = store.interop_attrs()
    size0 = round(interop["patch_size"] * interop["custom_downsample"])
    return {"patch_size": size0, "patch_level": 0, "name": store.slide_id}


def trident_coords_attrs(store: FeatureStore) -> dict[str, Any]:
    """TRIDENT's attributes of ``coords`` (those of the feature store, with the slide's ``name``);
    :class:`StoreError` when the overlap is unknown (it names TRIDENT's folder)."""
    interop = store.interop_attrs()
    if "overlap" not in interop:
        raise StoreError(
            f"{store.path}: no overlap attribute (written by an older wsitools); run wsitools extract again"
        )
    return {**interop, "name": store.slide_id}


def trident_coords_dir(attrs: dict[str, Any]) -> str:
    """TRIDENT's folder of one patching setting: ``{mag}x_{patch_size}px_{overlap}px_overlap``, the
    magnification written as TRIDENT writes it (``20``, ``2.5``, ``19.786``)."""
    mag = float(attrs["target_magnification"])
    text = str(int(round(mag))) if abs(mag - round(mag)) < 1e-9 else f"{mag:g}"
    return f"{text}x_{int(attrs['patch_size'])}px_{int(attrs['overlap'])}px_overlap"


def _write_h5(path: Path, coords: np.ndarray, coords_attrs: dict[str, Any], *,
              features: np.ndarray | None = None, features_attrs: dict[str, Any] | None = None) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        with h5py.File(tmp, "w") as f:
            if features is not None:
                f.create_dataset("features", data=features)
                f["features"].attrs.update(features_attrs or {})
            f.create_dataset("coords", data=coords)
            f["coords"].attrs.update(coords_attrs)


def _write_tensor(path: Path, features: np.ndarray) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        write_torch(tmp, torch.from_numpy(features))


def export_store(
    path: str | os.PathLike[str], out: str | os.PathLike[str], *, to: ExportTarget, like: ExportResult | None = None
) -> ExportResult:
    """Export one feature store into the ``to`` layout under ``out`` (see the module docstring).

    A :class:`StoreError` names the store when its file name is not its slide id (another
    slide's files would be replaced) or, given ``like`` (the export's first store's result),
    when its features are of another encoder (name and hash, as recorded, a missing hash
    included) or width: an export is one encoder's, as CLAM reads a folder."""
    if to not in EXPORT_TARGETS:
        raise ValueError(f"unknown export target {to!r} (one of {', '.join(EXPORT_TARGETS)})")
    store = FeatureStore.open(path)
    if store.slide_id != Path(path).stem:
        raise StoreError(f"{path}: holds the features of slide {store.slide_id}; a feature store is named {{slide_id}}.h5")
    record = EncoderRecord.of(store.attrs)
    if like is not None and ((record.name, record.hash, store.dim) != (like.encoder.name, like.encoder.hash, like.dim)):
        raise StoreError(
            f"{path}: {store.dim}-d features of encoder {record.describe()}, not those of this export's other "
            f"stores ({like.dim}-d, encoder {like.encoder.describe()}); export each encoder's folder on its own"
        )
    out = Path(out)
    sid, encoder = check_slide_id(store.slide_id), check_slide_id(store.encoder)  # both become paths
    attrs = clam_coords_attrs(store) if to == "clam" else trident_coords_attrs(store)
    features, coords = store.load()
    check_finite(features, slide_id=sid, path=store.path)
    features = np.ascontiguousarray(features, dtype=np.float32)
    if to == "clam":
        paths = (out / "pt_files" / f"{sid}.pt", out / "h5_files" / f"{sid}.h5", out / "patches" / f"{sid}.h5")
        _write_tensor(paths[0], features)
        _write_h5(paths[1], coords, attrs, features=features)
        _write_h5(paths[2], coords, attrs)
    else:
        folder = out / trident_coords_dir(attrs)
        paths = (folder / "patches" / f"{sid}_patches.h5", folder / f"features_{encoder}" / f"{sid}.h5")
        _write_h5(paths[0], coords, attrs)
        _write_h5(paths[1], coords, attrs, features=features, features_attrs={"name": sid, "encoder": encoder})
    return ExportResult(sid, store.n, paths, record, store.dim)
