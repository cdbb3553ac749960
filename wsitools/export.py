"""Export feature stores to the folder layouts CLAM and TRIDENT read (``wsitools export``).

A feature store is already readable by both as it is (``features``, ``coords`` and their
attributes on ``coords``, docs/formats.md); the export writes the files their training and
slide-encoding scripts look for by path:

* CLAM (a dataset folder: the ``data_dir`` of its ``Generic_MIL_Dataset``, under its training's
  ``--data_root_dir``; also its feature extraction's ``--data_h5_dir``):
  ``pt_files/{slide_id}.pt`` (the float32 feature tensor [N, D], ``torch.save``; what its MIL
  dataset loads), ``h5_files/{slide_id}.h5`` (``features`` float32 and ``coords``; what it loads
  with ``load_from_h5``) and ``patches/{slide_id}.h5`` (``coords`` alone: the coordinates file
  its feature extraction reads). Their ``coords`` carry CLAM's own meaning of the attributes:
  ``patch_level`` 0 and ``patch_size`` the tile's size in level-0 px, so that CLAM, which reads
  ``patch_size`` px at ``patch_level``, reads the tile's whole footprint.
* TRIDENT (a job folder): ``{mag}x_{size}px_{overlap}px_overlap/patches/{slide_id}_patches.h5``
  (``coords``) and ``.../features_{encoder}/{slide_id}.h5`` (``features`` float32 and ``coords``),
  ``coords`` with TRIDENT's attributes (``patch_size`` in target px, ``patch_size_level0``,
  ``level0_magnification``, ``target_magnification``, ``overlap``).

An export is one encoder's features (:class:`ExportKind`; for CLAM, which reads one folder as
one cohort, also one tile geometry): the kind most stores share (:func:`majority_kind`) is the
export's, and a store of another fails alone. Every exported h5 file records whose features and
which slide it holds as file attributes (:data:`EXPORT_FILE_ATTRS`), so that an export can be
told from other files. The export is built in a new folder that replaces the old one as a whole
(:func:`export_folder`), and a slide's files are written as a unit (:func:`export_store`).
Features are exported float32 whatever the store holds (float16 widens exactly).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import h5py
import numpy as np
import torch

from wsitools.errors import StoreError
from wsitools.feature_store import EncoderRecord, FeatureStore, TileGeometry, check_finite
from wsitools.io import TEMP_PREFIX, KeptErrorFile, atomic_path, check_own_folder, write_torch
from wsitools.types import check_slide_id

ExportTarget = Literal["clam", "trident"]
EXPORT_TARGETS: tuple[ExportTarget, ...] = ("clam", "trident")

EXPORT_FILE_ATTRS = (
    "slide_id", "slide_path", "encoder", "encoder_hash", "weight_sha256",
    "mpp_target", "tile_size", "tile_size_level0", "overlap",
)
"""Feature-store attributes every exported h5 file carries as file attributes (those the store
records): the slide (its wsitools id and its file), the encoder and the tiles."""

CLAM_FOLDERS = ("pt_files", "h5_files", "patches")
TRIDENT_FOLDER = re.compile(r"[0-9.]+x_[0-9]+px_[0-9]+px_overlap")


@dataclass(frozen=True)
class ExportResult:
    """The files written for one slide."""

    slide_id: str
    n_tiles: int
    paths: tuple[Path, ...]


class ExportKind(NamedTuple):
    """What the stores of one export share: the encoder (name and hash, as recorded), the width
    of its features and, for CLAM, the tiles (one folder is one cohort there, and features of
    other tiles describe other structures); TRIDENT's folders keep tile geometries apart."""

    encoder: str | None
    encoder_hash: str | None
    dim: int
    tiles: TileGeometry | None

    @classmethod
    def of(cls, store: FeatureStore, *, to: ExportTarget) -> ExportKind:
        record = EncoderRecord.of(store.attrs)
        return cls(record.name, record.hash, store.dim, TileGeometry.of(store.attrs) if to == "clam" else None)

    def describe(self) -> str:
        """``8-d features of encoder enc-a (hash 0123456789ab) from 224 px tiles at 0.5 um/px``."""
        encoder = EncoderRecord(self.encoder, self.encoder_hash, None).describe()
        tiles = f" from {self.tiles.describe()}" if self.tiles is not None else ""
        return f"{self.dim}-d features of encoder {encoder}{tiles}"


@dataclass(frozen=True)
class Majority:
    """The kind of an export: the one most of its ``total`` stores (``n`` of them) share."""

    kind: ExportKind
    n: int
    total: int


def majority_kind(kinds: Sequence[ExportKind]) -> Majority:
    """The kind most ``kinds`` share (of a tie, the first in order), so that a stray store fails
    alone whatever its name sorts as; ``kinds`` is not empty."""
    kind, n = Counter(kinds).most_common(1)[0]
    return Majority(kind, n, len(kinds))


def open_store(path: str | os.PathLike[str]) -> FeatureStore:
    """The feature store at ``path``, opened strictly; a :class:`StoreError` naming it when its
    file name is not its slide id (the export of another slide would be replaced)."""
    store = FeatureStore.open(path)
    if store.slide_id != Path(path).stem:
        raise StoreError(f"{path}: holds the features of slide {store.slide_id}; a feature store is named {{slide_id}}.h5")
    return store


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
            f"{store.path}: the file attribute overlap (target px between neighbouring tiles) is missing, and "
            "TRIDENT's folder name needs it; extract the features again with wsitools extract from a patch store "
            "that records it (wsitools tile writes it)"
        )
    return {**interop, "name": store.slide_id}


def trident_coords_dir(attrs: dict[str, Any]) -> str:
    """TRIDENT's folder of one patching setting: ``{mag}x_{patch_size}px_{overlap}px_overlap``, the
    magnification written as TRIDENT writes it (``20``, ``2.5``, ``19.786``)."""
    mag = float(attrs["target_magnification"])
    text = str(int(round(mag))) if abs(mag - round(mag)) < 1e-9 else f"{mag:g}"
    return f"{text}x_{int(attrs['patch_size'])}px_{int(attrs['overlap'])}px_overlap"


def export_file_attrs(store: FeatureStore) -> dict[str, Any]:
    """The file attributes of the store's exported h5 files (:data:`EXPORT_FILE_ATTRS`)."""
    return {k: store.attrs[k] for k in EXPORT_FILE_ATTRS if store.attrs.get(k) not in (None, "")}


def _write_h5(path: Path, coords: np.ndarray, coords_attrs: dict[str, Any], *, file_attrs: dict[str, Any],
              features: np.ndarray | None = None, features_attrs: dict[str, Any] | None = None) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        with KeptErrorFile(tmp, "w+") as raw, h5py.File(raw, "w") as f:  # a full disk: one OSError
            f.attrs.update(file_attrs)
            if features is not None:
                f.create_dataset("features", data=features)
                f["features"].attrs.update(features_attrs or {})
            f.create_dataset("coords", data=coords)
            f["coords"].attrs.update(coords_attrs)


def _write_tensor(path: Path, features: np.ndarray) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        write_torch(tmp, torch.from_numpy(features))


def export_store(
    store: FeatureStore, out: str | os.PathLike[str], *, to: ExportTarget, expect: Majority | None = None
) -> ExportResult:
    """Export one feature store, opened by :func:`open_store` (the export's first pass over its
    stores opens each once, and its arrays are read here), into the ``to`` layout under ``out``
    (see the module docstring).

    Its files are written as a unit: when one cannot be written, those already written are
    removed, so a slide is exported whole or not at all. A :class:`StoreError` names the store
    when it holds no tiles (CLAM's heads fail on an empty bag) or, given ``expect`` (the
    export's :func:`majority_kind`), when it is of another :class:`ExportKind`."""
    if to not in EXPORT_TARGETS:
        raise ValueError(f"unknown export target {to!r} (one of {', '.join(EXPORT_TARGETS)})")
    path = store.path
    if store.n == 0:
        raise StoreError(f"{path}: holds no tiles (no tissue was found on slide {store.slide_id}); nothing to export")
    sid, encoder = check_slide_id(store.slide_id), check_slide_id(store.encoder)  # both become paths
    attrs = clam_coords_attrs(store) if to == "clam" else trident_coords_attrs(store)
    kind = ExportKind.of(store, to=to)
    if expect is not None and kind != expect.kind:
        same_encoder = kind._replace(tiles=None) == expect.kind._replace(tiles=None)
        remedy = ("export each tile size and resolution to its own --out (CLAM reads a folder as one cohort)"
                  if same_encoder else "export each encoder's folder on its own")
        raise StoreError(
            f"{path}: {kind.describe()}, not those of this export ({expect.n} of its {expect.total} stores: "
            f"{expect.kind.describe()}); {remedy}"
        )
    out = Path(out)
    features, coords = store.load()
    check_finite(features, slide_id=sid, path=store.path)
    features = np.ascontiguousarray(features, dtype=np.float32)
    file_attrs = export_file_attrs(store)
    if to == "clam":
        paths = (out / "pt_files" / f"{sid}.pt", out / "h5_files" / f"{sid}.h5", out / "patches" / f"{sid}.h5")
        writes = (lambda p: _write_tensor(p, features),
                  lambda p: _write_h5(p, coords, attrs, file_attrs=file_attrs, features=features),
                  lambda p: _write_h5(p, coords, attrs, file_attrs=file_attrs))
    else:
        folder = out / trident_coords_dir(attrs)
        paths = (folder / "patches" / f"{sid}_patches.h5", folder / f"features_{encoder}" / f"{sid}.h5")
        writes = (lambda p: _write_h5(p, coords, attrs, file_attrs=file_attrs),
                  lambda p: _write_h5(p, coords, attrs, file_attrs=file_attrs, features=features,
                                      features_attrs={"name": sid, "encoder": encoder}))
    written: list[Path] = []
    try:
        for target, write in zip(paths, writes):
            write(target)
            written.append(target)
    except BaseException:
        for target in written:
            target.unlink(missing_ok=True)
        raise
    return ExportResult(sid, store.n, paths)


def _exported_by_us(path: Path, slide_id: str) -> bool:
    """Whether the h5 file at ``path`` is an exported file of slide ``slide_id`` (its file
    attributes say so: :func:`export_file_attrs`)."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("slide_id") == slide_id and "encoder" in f.attrs
    except OSError:
        return False


def _in_layout(rel: Path, path: Path, to: ExportTarget) -> bool:
    """Whether the file ``path`` (``rel`` under the export folder) is one an export ``to`` writes."""
    parts, name = rel.parts, rel.name
    if to == "clam":
        if len(parts) != 2 or parts[0] not in CLAM_FOLDERS:
            return False
        if parts[0] == "pt_files":
            return name.endswith(".pt")
        return name.endswith(".h5") and _exported_by_us(path, name[: -len(".h5")])
    if len(parts) != 3 or not TRIDENT_FOLDER.fullmatch(parts[0]) or not name.endswith(".h5"):
        return False
    if parts[1] == "patches":
        return name.endswith("_patches.h5") and _exported_by_us(path, name[: -len("_patches.h5")])
    return parts[1].startswith("features_") and _exported_by_us(path, name[: -len(".h5")])


def check_replaceable(out: str | os.PathLike[str], *, to: ExportTarget) -> None:
    """Refuse an existing ``out`` that is not an export of ``to`` (:func:`~wsitools.io.check_own_folder`,
    naming a file that is not an exported one): an export replaces its folder as a whole, which
    must delete nothing else (another tool's files, CLAM's own features, a TRIDENT job's other
    outputs). A missing or empty folder, and the temporaries of earlier runs, are fine."""
    check_own_folder(out, foreign=lambda folder: _foreign_file(folder, to),
                     writes="an export replaces its --out as a whole")


def _foreign_file(out: Path, to: ExportTarget) -> str | None:
    """The first file under ``out`` that an export ``to`` does not write, in words (None: there is none)."""
    for root, dirs, files in os.walk(out):
        dirs[:] = sorted(d for d in dirs if not d.startswith(TEMP_PREFIX))
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(TEMP_PREFIX) or (not path.is_symlink() and _in_layout(path.relative_to(out), path, to)):
                continue
            return f"holds {path.relative_to(out)}, which is no file of a wsitools {to} export"
    return None


class _NothingExported(Exception):
    """Raised inside :func:`export_folder` to leave ``out`` as it was."""


@contextmanager
def export_folder(out: str | os.PathLike[str], *, to: ExportTarget) -> Iterator[Path]:
    """A new, empty folder to build an export in; when the block ends it replaces ``out`` as a
    whole (an earlier export's files never mix with the new one's), unless nothing was written
    into it: then ``out`` is left as it was. An exception leaves ``out`` as it was too. ``out``
    must be replaceable (:func:`check_replaceable`, checked first)."""
    out = Path(out)
    check_replaceable(out, to=to)
    try:
        with atomic_path(out, overwrite=True) as tmp:
            tmp.mkdir()
            yield tmp
            if not any(p.is_file() for p in tmp.rglob("*")):
                raise _NothingExported
    except _NothingExported:
        pass
