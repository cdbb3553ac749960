"""The h5 feature store ``{features_root}/{encoder}/{slide_id}.h5``: path, write, read, verify.

This module owns the format (docs/formats.md, "Feature store"): ``features`` [N, D] (float32 or
float16), ``coords`` [N, 2] int64 level-0 top-left corners with the attributes CLAM and TRIDENT
read there (:func:`interop_attrs`), and file attributes naming the encoder and the patch store.
Every step reads and writes feature stores through it: extraction writes them
(:func:`write_feature_store`, atomic, so nothing half-written looks finished) and decides whether
one can be reused (:func:`reusable`). One type, :class:`FeatureStore`, describes an opened
store, with two openers: export and extraction's reuse check open the files this package wrote
strictly (:meth:`FeatureStore.open`); MIL training and prediction open any h5 file with a
floating ``features`` dataset as a bag (:meth:`FeatureStore.open_bag`, every value finite) and
read its rows (:func:`read_features`, with :func:`row_layout` for sampled rows through a memory
map) and coordinates (:func:`read_coords`). :class:`EncoderRecord` and :class:`TileGeometry`
read what a store records of the encoder and of the tiles its features come from.

A store records the CRC-32 of each dataset (:data:`CHECKSUM_ATTRS`), and every read of a whole
dataset here checks it (:func:`checked_rows`): a flipped bit that leaves a value finite would
otherwise change predictions silently. Sampled rows read through the memory map (training
steps) are not checked; the whole bag was, when the cohort was checked. Before anything is read
or allocated, every reader checks that the file is a regular one and that each dataset holds
in it the values its shape claims (:func:`stored_dataset`): a few KB of h5 may claim terabytes.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import h5py
import numpy as np

from wsitools import __version__
from wsitools.errors import DataError, StoreError, one_line
from wsitools.io import KeptErrorFile, atomic_path, file_kind
from wsitools.types import FeatureDtype, check_slide_id

if TYPE_CHECKING:
    import torch

    from wsitools.encoders.loading import Encoder
    from wsitools.store import PatchStore

log = logging.getLogger(__name__)

CHECK_ROWS = 16384
"""Rows read at a time when checking or loading a whole bag (bounds memory)."""

FORMAT_VERSION = 1
KIND = "feature_store"
REQUIRED_ATTRS = ("encoder", "slide_id")
"""Attributes every reader relies on; a file without one of them is not a usable feature store."""

GEOMETRY_ATTRS = ("tile_size", "tile_size_level0", "mpp_target")
"""File attributes the CLAM/TRIDENT attributes of ``coords`` are computed from."""

CHECKSUM_ATTRS = {"features": "features_crc32", "coords": "coords_crc32"}
"""The file attribute recording each dataset's :func:`crc32_of`, by dataset."""

MAX_ROWS = 100_000_000
"""The most tiles a store may hold: more than any slide gives (a 200 000 x 200 000 px scan cut
into 32 px tiles gives 40 million)."""

MAX_DIM = 65_536
"""The widest features a store may hold (encoders give 384 to a few thousand values per tile)."""

MAX_COMPRESSION = 1100
"""How many times more bytes than it is stored in a compressed dataset's values may take:
deflate (h5py's gzip) packs at most about 1032 to 1, and features about 1.1 to 1."""


def magnification(mpp: float) -> float:
    """The magnification of a resolution by TRIDENT's convention (pixel size = 10 um / magnification,
    so 0.5 um/px is 20x), to 3 decimals; not snapped to a nominal 20x/40x, so TRIDENT's ratio of
    level-0 to target magnification reproduces the tile's level-0 size."""
    return round(10.0 / mpp, 3)


def interop_attrs(
    *, tile_size: int, tile_size_level0: float, mpp_target: float, overlap: int | None = None
) -> dict[str, Any]:
    """The attributes CLAM and TRIDENT read on the ``coords`` dataset, for tiles of ``tile_size``
    target px at ``mpp_target`` um/px covering ``tile_size_level0`` level-0 px (docs/formats.md).

    TRIDENT: ``patch_size`` (target px), ``patch_size_level0`` (level-0 px, rounded down as TRIDENT
    computes it; without overlap, ``coords // patch_size_level0`` is each tile's grid index, which
    TRIDENT's slide encoders use), the level-0 and target magnifications and ``overlap`` (target
    px; left out when unknown). The legacy (CLAM) reading of the same file: ``patch_level`` 0
    (coordinates are level-0) and ``custom_downsample`` (level-0 px per target px), so that patch_size x
    downsample(patch_level) x custom_downsample is the tile's level-0 size. The level-0 mpp is the one the tiles were cut with
    (``mpp_target * tile_size / tile_size_level0``); wsitools never tiles a slide without one.
    """
    scale = float(tile_size_level0) / int(tile_size)
    attrs: dict[str, Any] = {
        "patch_size": int(tile_size),
        "patch_size_level0": math.floor(float(tile_size_level0) + 1e-6),
        "level0_magnification": magnification(float(mpp_target) / scale),
        "target_magnification": magnification(float(mpp_target)),
        "patch_level": 0,
        "custom_downsample": scale,
    }
    if overlap is not None:
        attrs["overlap"] = int(overlap)
    return attrs


def interop_attrs_of(path: Path, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`interop_attrs` from a feature store's file attributes; :class:`StoreError` naming the
    file when its geometry is missing (a magnification is never guessed)."""
    missing = [k for k in GEOMETRY_ATTRS if k not in attrs]
    if missing:
        raise StoreError(
            f"{path}: attributes {', '.join(missing)} are missing, so its tile size and magnification "
            "are unknown; extract the features again with wsitools extract"
        )
    return interop_attrs(
        tile_size=int(attrs["tile_size"]),
        tile_size_level0=float(attrs["tile_size_level0"]),
        mpp_target=float(attrs["mpp_target"]),
        overlap=int(attrs["overlap"]) if "overlap" in attrs else None,
    )


def peer_tile_size_level0(coords_attrs: Mapping[str, Any]) -> float | None:
    """A tile's side in level-0 px from the attributes CLAM or TRIDENT write on ``coords``:
    TRIDENT's ``patch_size_level0`` (rounded down by TRIDENT), else CLAM's ``patch_size`` where
    ``patch_level`` is 0 (at another level it would need that level's downsample, which only the
    slide knows); None where neither is there (CLAM's own feature files carry no attributes)."""
    if "patch_size_level0" in coords_attrs:
        size = coords_attrs["patch_size_level0"]
    elif "patch_size" in coords_attrs and coords_attrs.get("patch_level") == 0:
        size = coords_attrs["patch_size"]
    else:
        return None
    try:
        value = float(size)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def feature_store_path(out_root: str | os.PathLike[str], encoder_name: str, slide_id: str) -> Path:
    """``{out_root}/{encoder_name}/{slide_id}.h5`` (both names checked: they become paths)."""
    return feature_path(Path(out_root) / check_slide_id(encoder_name), slide_id)


def feature_path(features_dir: str | os.PathLike[str], slide_id: str) -> Path:
    """Where a slide's feature store lives: ``{features_dir}/{slide_id}.h5``."""
    return Path(features_dir) / f"{check_slide_id(slide_id)}.h5"


def check_target(path: str | os.PathLike[str]) -> Path:
    """``path`` ready to take a feature store: its folder created and nothing but a file there;
    else a :class:`StoreError` naming it. Called before any features are computed, because a
    directory at ``path`` (or a folder that cannot be made) would otherwise fail only at the final
    rename, after all the work."""
    path = Path(path)
    remedy = "remove it or write the features elsewhere"
    if path.is_dir():
        raise StoreError(f"{path}: is a directory, where the feature store file goes; {remedy}")
    if path.exists() and not path.is_file():
        raise StoreError(f"{path}: is not a regular file, where the feature store file goes; {remedy}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in path.parents if p.exists() or p.is_symlink()), None)
        is_file = blocker is not None and blocker.is_file()
        reason = f"{blocker} is a file" if is_file else (exc.strerror or one_line(exc))
        raise StoreError(f"{path}: its folder {path.parent} cannot be created ({reason})") from None
    return path


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


def features_root_hint(features_dir: str | os.PathLike[str]) -> str:
    """For an error about a folder without feature stores, the folder to give instead, as
    ``"; ..."``, else ``""``: the encoder folders of a features root (the ``--out`` of
    ``wsitools extract``, whose encoder folders hold the stores), or, for a folder of ``.pt``
    files (CLAM's ``pt_files``: bare tensors, without the coordinates every bag needs), the
    ``h5_files`` folder beside it, which holds the same features with their coordinates."""
    folder = Path(features_dir)
    if not folder.is_dir():
        return ""
    if any(p.suffix == ".pt" for p in folder.iterdir()):
        return (f"; it holds .pt files (CLAM's pt_files: features without tile coordinates): give the folder of "
                f"the same features as h5 files with their coords, CLAM's h5_files, e.g. {folder.parent / 'h5_files'}")
    encoders = sorted(
        p.name for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any(q.suffix == ".h5" for q in p.iterdir())
    )
    if not encoders:
        return ""
    return (f"; it is a features root holding the encoder folders {', '.join(encoders)}: give one of them, "
            f"e.g. {folder / encoders[0]}")


def list_feature_stores(features_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Finished feature stores in a directory, by slide id (temporary ``.tmp-*`` files are skipped)."""
    folder = check_feature_dir(features_dir)
    return {p.stem: p for p in sorted(folder.glob("*.h5")) if not p.name.startswith(".")}


@dataclass(frozen=True)
class FeatureStore:
    """An opened feature store: its shape and attributes, and :meth:`load` for the arrays.

    ``slide_id`` is the file's ``slide_id`` attribute for a store opened strictly
    (:meth:`open`), and the file name without ``.h5`` for a bag (:meth:`open_bag`: cohorts and
    predictions match bags to slides by file name, and a bag need not carry the attribute; one
    that does must agree).
    """

    path: Path
    attrs: dict[str, Any]
    n: int
    dim: int
    dtype: str
    """The stored dtype of ``features`` (``float32`` or ``float16``)."""
    slide_id: str

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FeatureStore:
        """Open and check a feature store; :class:`StoreError` naming the file if it is not one."""
        p = Path(path)
        if p.name.startswith(".tmp-"):
            raise StoreError(f"{p}: is an unfinished (temporary) feature store")
        try:
            with open_h5(p) as f:
                attrs = _decoded_attrs(f.attrs)
                if "features" not in f or "coords" not in f:
                    raise StoreError(f"{p}: not a feature store (needs datasets 'features' and 'coords')")
                fshape, cshape = stored_dataset(f, "features", p).shape, stored_dataset(f, "coords", p).shape
                dtype = f["features"].dtype.name
        except OSError as exc:
            raise StoreError(f"{p}: not a readable h5 file ({exc})") from None
        if attrs.get("kind") != KIND:
            raise StoreError(f"{p}: not a wsitools feature store (kind {attrs.get('kind')!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{p}: feature store format {attrs.get('format_version')} is not supported "
                f"(this wsitools reads format {FORMAT_VERSION}); extract the features again"
            )
        if len(fshape) != 2 or cshape != (fshape[0], 2):
            raise StoreError(f"{p}: features {fshape} and coords {cshape} do not match ([N, D] and [N, 2])")
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise StoreError(f"{p}: damaged feature store: attributes {', '.join(missing)} are missing")
        return cls(path=p, attrs=attrs, n=int(fshape[0]), dim=int(fshape[1]), dtype=dtype, slide_id=str(attrs["slide_id"]))

    @classmethod
    def open_bag(cls, path: str | os.PathLike[str], *, check_values: bool = True) -> FeatureStore:
        """Open any h5 file as a MIL bag and check it: ``features`` [N, D] floating point with
        N >= 1, ``coords`` [N, 2] (training and prediction write each tile's attention with its
        position), and (with ``check_values``) every feature finite. Lenient where :meth:`open`
        is strict (no kind, version or attributes needed), so bags written by other tools train
        too; but a ``slide_id`` attribute, where there is one, must be the file's name (a store
        copied or renamed under another slide's id would be that slide's bag). ``check_values``
        also reads ``coords`` and checks both datasets' checksums where the file records them
        (:func:`checked_rows`), so a damaged store is found here, with the cohort. Where the file
        records no ``tile_size_level0``, its ``attrs`` take it from the ``coords`` attributes
        CLAM or TRIDENT write (:func:`peer_tile_size_level0`), so that its attention can be
        drawn. Raises :class:`DataError` naming the slide."""
        path = Path(path)
        slide_id = path.stem
        try:
            with open_h5(path) as f:
                if "features" not in f:
                    raise DataError(f"slide {slide_id}: feature store {path} has no 'features' dataset")
                feats = stored_dataset(f, "features", path)
                if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] == 0:
                    raise DataError(
                        f"slide {slide_id}: features in {path} have shape {feats.shape}, expected [N>0, D]"
                    )
                if feats.dtype.kind != "f":
                    raise DataError(
                        f"slide {slide_id}: features in {path} are of type {feats.dtype}, expected floating point"
                    )
                if "coords" not in f:
                    raise DataError(
                        f"slide {slide_id}: feature store {path} has no 'coords' dataset (each tile's level-0 "
                        "position, which its attention map needs)"
                    )
                coords = stored_dataset(f, "coords", path)
                if coords.shape != (feats.shape[0], 2):
                    raise DataError(
                        f"slide {slide_id}: coords in {path} have shape {coords.shape}, expected ({feats.shape[0]}, 2)"
                    )
                attrs = _decoded_attrs(f.attrs)
                recorded = attrs.get("slide_id")
                if recorded not in (None, "") and str(recorded) != slide_id:
                    raise DataError(
                        f"slide {slide_id}: feature store {path} holds the features of slide {recorded} (its "
                        "slide_id attribute); a feature store is named {slide_id}.h5"
                    )
                if check_values:
                    _read_through(_finite(checked_rows(f, "features", path), slide_id=slide_id, path=path))
                    _read_through(checked_rows(f, "coords", path))
                if "tile_size_level0" not in attrs:
                    level0 = peer_tile_size_level0(_decoded_attrs(coords.attrs))
                    if level0 is not None:
                        attrs["tile_size_level0"] = level0
                return cls(
                    path=path, attrs=attrs, n=int(feats.shape[0]), dim=int(feats.shape[1]),
                    dtype=feats.dtype.name, slide_id=slide_id,
                )
        except StoreError as exc:
            raise DataError(f"slide {slide_id}: {exc}") from None
        except (OSError, TypeError, ValueError, MemoryError) as exc:
            raise DataError(
                f"slide {slide_id}: feature store {path} cannot be read: {one_line(exc)}; extract it again"
            ) from None

    @property
    def encoder(self) -> str:
        return str(self.attrs["encoder"])

    @property
    def encoder_hash(self) -> str | None:
        """The ``encoder_hash`` attribute; None where the store does not record it (stores of
        other writers, e.g. :mod:`wsitools.mil.synthetic`'s)."""
        return EncoderRecord.of(self.attrs).hash

    @property
    def store_hash(self) -> str:
        return str(self.attrs["store_hash"])

    @property
    def slide_fingerprint(self) -> str | None:
        """The fingerprint of the slide file the features come from
        (:func:`~wsitools.io.file_fingerprint`, copied from the patch store at extraction), which
        two byte-copies of one scan share; None where the store does not record it (stores
        extracted before it was recorded, from a patch store without one, or by other writers)."""
        value = self.attrs.get("slide_fingerprint")
        return value if isinstance(value, str) and value else None

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """``(features, coords)``: features [N, D] in the stored dtype, every value finite,
        coords [N, 2] int64, both checked against their checksums (:func:`checked_rows`)."""
        with open_h5(self.path) as f:
            rows = _finite(checked_rows(f, "features", self.path), slide_id=self.slide_id, path=self.path)
            features = _read_all(f["features"], rows)
            blocks = checked_rows(f, "coords", self.path)
            coords = _read_all(f["coords"], blocks)
        return features, coords.astype(np.int64, copy=False)

    def coords(self) -> np.ndarray:
        """The ``coords`` [N, 2] int64 (:func:`read_coords`)."""
        return read_coords(self.path)

    def interop_attrs(self) -> dict[str, Any]:
        """The CLAM/TRIDENT attributes of its ``coords`` (computed from the file's attributes, so
        also for a store written before they were stored)."""
        return interop_attrs_of(self.path, self.attrs)


def _decoded_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """h5 attributes as plain Python values (text, numbers, lists)."""
    return {k: _attr_value(v) for k, v in attrs.items()}


def _attr_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def feature_attrs(store: PatchStore, encoder: Encoder) -> dict[str, Any]:
    """The attributes of a feature store made from ``store`` by ``encoder`` (docs/formats.md)."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "encoder": encoder.name,
        "encoder_hash": encoder.encoder_hash,
        "weight_sha256": ",".join(f"{role}:{sha}" for role, sha in sorted(encoder.weight_sha256.items())),
        "store_path": str(store.path),
        "store_hash": store.params_hash,
        "slide_id": store.slide_id,
        "slide_path": str(store.slide_path),
        **({"slide_fingerprint": str(store.attrs["slide_fingerprint"])} if "slide_fingerprint" in store.attrs else {}),
        "mpp_target": store.mpp_target,
        "tile_size": store.tile_size,
        "tile_size_level0": store.tile_size_level0,
        **({"overlap": int(store.attrs["overlap"])} if "overlap" in store.attrs else {}),
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def reusable(path: Path, store: PatchStore, encoder: Encoder, dtype: FeatureDtype) -> bool:
    """True if ``path`` holds features of exactly this store and encoder (hashes and coords),
    stored in ``dtype``, finite and matching their checksums (a damaged file is recomputed, with
    a warning naming it). Features of another patch store that still exists under another path
    (another tiling of the slide, or another project's slide of the same id, in one features
    folder) are a :class:`StoreError`: replacing them would silently change what that store's
    users read."""
    try:
        existing = FeatureStore.open(path)
    except StoreError as exc:
        log.warning("%s: recomputing (%s)", path, str(exc).removeprefix(f"{path}: "))
        return False
    if existing.encoder_hash != encoder.encoder_hash:
        # Said aloud: besides a changed card or weight file, this is what a second card of the
        # same name (another folder, another network) writing to the same features root looks like.
        log.warning(
            "%s: replacing features of encoder hash %s with %s's (%s): the card or its weights "
            "changed, or another card has the name %r",
            path, existing.encoder_hash, encoder.name, encoder.encoder_hash, encoder.name,
        )
        return False
    if existing.store_hash != store.params_hash:
        made_from = existing.attrs.get("store_path")
        if made_from not in (None, str(store.path)) and Path(made_from).is_dir():
            raise StoreError(
                f"{path}: holds features of another patch store ({made_from}, slide "
                f"{existing.attrs.get('slide_path')}) under slide id {store.slide_id}: one features folder per "
                "tiling (and per project); extract into another --out (--overwrite replaces them)"
            )
        log.info("%s: recomputing (patch store changed)", path)
        return False
    if existing.dim != encoder.dim:
        log.info("%s: recomputing (%d-d features, the encoder gives %d-d)", path, existing.dim, encoder.dim)
        return False
    if existing.dtype != dtype:
        log.info("%s: recomputing (stored as %s, %s asked for)", path, existing.dtype, dtype)
        return False
    try:  # extraction writes finite features and matching checksums only: others were damaged since
        with open_h5(path) as f:
            blocks = checked_rows(f, "coords", path)
            coords = _read_all(f["coords"], blocks)
            _read_through(_finite(checked_rows(f, "features", path), slide_id=store.slide_id, path=path))
    except (DataError, StoreError, OSError, MemoryError) as exc:
        log.warning("%s: recomputing (%s)", path, one_line(exc))
        return False
    if not np.array_equal(coords, store.coords):
        log.info("%s: recomputing (coordinates differ from the store)", path)
        return False
    return True


def write_feature_store(
    path: str | os.PathLike[str],
    features: np.ndarray,
    coords: np.ndarray,
    attrs: Mapping[str, Any],
    *,
    chunks: tuple[int, int] | None = None,
) -> Path:
    """Write ``features``/``coords`` and ``attrs`` to ``path`` atomically (replacing any old file),
    with the CLAM/TRIDENT attributes on ``coords`` (:func:`interop_attrs`) and each dataset's
    checksum (:data:`CHECKSUM_ATTRS`); returns ``path``. A write that fails (a full disk) is an
    ``OSError`` naming ``path`` (:class:`~wsitools.io.KeptErrorFile`), and nothing is left behind.

    ``features`` is stored contiguous (what :func:`row_layout` maps) unless ``chunks`` is given."""
    path = Path(path)
    features, coords = np.asarray(features), np.asarray(coords, np.int64)
    checksums = {CHECKSUM_ATTRS["features"]: crc32_of(features), CHECKSUM_ATTRS["coords"]: crc32_of(coords)}
    with atomic_path(path, overwrite=True) as tmp:
        with KeptErrorFile(tmp, "w+") as raw, h5py.File(raw, "w") as f:
            f.create_dataset("features", data=features, chunks=chunks)
            f.create_dataset("coords", data=coords)
            f["coords"].attrs.update(interop_attrs_of(path, attrs))
            f.attrs.update({**attrs, **checksums})
    return path


def crc32_of(values: np.ndarray, crc: int = 0) -> int:
    """The CRC-32 (zlib) of ``values``' bytes, little-endian in C order, continued from ``crc``:
    the checksum of rows read in blocks is that of the whole dataset."""
    return zlib.crc32(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")), crc)


def open_h5(path: Path) -> h5py.File:
    """The h5 file at ``path`` opened for reading, if it is a regular file (or a link to one):
    opening a FIFO would wait for a writer forever, and a device never ends. Else a
    :class:`StoreError` naming it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise StoreError(f"{path}: no such feature store") from None
    except OSError as exc:
        raise StoreError(f"{path}: cannot be read ({exc.strerror or one_line(exc)})") from None
    if not stat.S_ISREG(mode):
        raise StoreError(f"{path}: is {file_kind(mode)}, not a feature store file (an h5 file)")
    return h5py.File(path, "r")


def stored_dataset(f: h5py.File, name: str, path: Path) -> h5py.Dataset:
    """Dataset ``name`` of the open store ``f`` (at ``path``), once it is known to hold in the
    file every value its shape claims: checked before anything is read or allocated for it, since
    a few KB of h5 can claim a dataset of terabytes in chunks never written, which read as fill
    values for hours before an allocation fails. A :class:`StoreError` naming the file and the
    dataset when it is not a dataset of the file itself (a link, a virtual dataset or one whose
    values lie in another file: a store is one self-contained file, copied and checked alone),
    when it has more than :data:`MAX_ROWS` rows or (features) :data:`MAX_DIM` columns, or when its
    values take more bytes than the file stores of it (times :data:`MAX_COMPRESSION` where it is
    compressed)."""
    link = f.get(name, getlink=True)
    if isinstance(link, (h5py.ExternalLink, h5py.SoftLink)):
        target = f"{link.path} in {link.filename}" if isinstance(link, h5py.ExternalLink) else link.path
        raise StoreError(f"{path}: {name!r} is a link to {target}, not a dataset of the file; a feature store "
                         "holds its own data")
    dset = f[name]
    if not isinstance(dset, h5py.Dataset):
        raise StoreError(f"feature store {path}: {name!r} is a group, not a dataset")
    if dset.is_virtual or dset.external:
        where = "a virtual dataset" if dset.is_virtual else f"stored in another file, {dset.external[0][0]}"
        raise StoreError(f"{path}: {name!r} is {where}; a feature store holds its own data")
    shape = dset.shape
    if len(shape) >= 1 and shape[0] > MAX_ROWS:
        raise StoreError(f"{path}: {name!r} claims {shape[0]:,} rows, more than the {MAX_ROWS:,} tiles any slide "
                         "gives; damaged, extract it again")
    if name == "features" and len(shape) == 2 and shape[1] > MAX_DIM:
        raise StoreError(f"{path}: 'features' claims {shape[1]:,}-d features, more than the {MAX_DIM:,} of any "
                         "encoder; damaged, extract it again")
    claimed, stored = dset.size * dset.dtype.itemsize, dset.id.get_storage_size()
    compressed = dset.id.get_create_plist().get_nfilters() > 0
    if claimed > stored * (MAX_COMPRESSION if compressed else 1):
        held = f"{stored:,} bytes{' compressed' if compressed else ''}"
        raise StoreError(f"{path}: {name!r} claims {shape} values of {claimed:,} bytes, but the file holds {held} of "
                         "them (never written, or cut short); damaged, extract it again")
    return dset


def checked_rows(f: h5py.File, name: str, path: Path) -> Iterator[np.ndarray]:
    """The rows of dataset ``name`` of the open store ``f`` (at ``path``), :data:`CHECK_ROWS` at
    a time; after the last, a :class:`StoreError` naming the file and the dataset when the file
    records the dataset's checksum (:data:`CHECKSUM_ATTRS`) and the rows read do not match it.
    A store without one (written before checksums were recorded, or by another tool) is read
    unchecked. Read it to the end: the check comes last. The dataset itself is checked at once
    (:func:`stored_dataset`), before the caller allocates anything for its rows."""
    return _checked_rows(stored_dataset(f, name, path), f.attrs.get(CHECKSUM_ATTRS[name]), name, path)


def _checked_rows(dset: h5py.Dataset, recorded: Any, name: str, path: Path) -> Iterator[np.ndarray]:
    crc = 0
    for start in range(0, dset.shape[0], CHECK_ROWS):
        rows = dset[start : start + CHECK_ROWS]
        crc = crc32_of(rows, crc) if recorded is not None else 0
        yield rows
    if recorded is not None and crc != recorded:
        raise StoreError(
            f"{path}: checksum mismatch in {name!r} (CRC-32 {crc:08x}, recorded {int(recorded):08x}): "
            "damaged since it was written; extract it again (wsitools extract --overwrite)"
        )


def _read_all(dset: h5py.Dataset, blocks: Iterable[np.ndarray]) -> np.ndarray:
    """The rows of ``dset`` from ``blocks``, its consecutive blocks of rows (:func:`checked_rows`,
    which has checked ``dset`` already: take them first, then allocate)."""
    out = np.empty(dset.shape, dset.dtype)
    start = 0
    for rows in blocks:
        out[start : start + len(rows)] = rows
        start += len(rows)
    return out


def _read_through(blocks: Iterable[np.ndarray]) -> None:
    """Read ``blocks`` to the end, for the checks they make (:func:`checked_rows`, :func:`_finite`)."""
    for _ in blocks:
        pass


def check_finite(feats: h5py.Dataset | np.ndarray, *, slide_id: str, path: Path) -> None:
    """A :class:`DataError` naming the slide when a row of ``feats`` holds NaN or inf (read
    :data:`CHECK_ROWS` rows at a time). Extraction never writes such rows, so the file was
    damaged after writing (or written by another tool)."""
    _read_through(_finite((feats[s : s + CHECK_ROWS] for s in range(0, feats.shape[0], CHECK_ROWS)),
                          slide_id=slide_id, path=path))


def _finite(blocks: Iterable[np.ndarray], *, slide_id: str, path: Path) -> Iterator[np.ndarray]:
    """``blocks`` of consecutive feature rows, each checked as :func:`check_finite` says."""
    start = 0
    for block in blocks:
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            rows = start + np.flatnonzero(bad)
            raise DataError(
                f"slide {slide_id}: feature store {path} has non-finite (NaN/inf) features "
                f"in {int(bad.sum())}+ rows, first row {int(rows[0])}; extract it again (wsitools extract --overwrite)"
            )
        start += len(block)
        yield block


class RowLayout(NamedTuple):
    """Where a contiguous ``features`` dataset lies in its h5 file (what a memory map needs)."""

    offset: int
    dtype: str
    shape: tuple[int, int]


def row_layout(path: str | os.PathLike[str]) -> RowLayout | None:
    """The byte layout of ``features`` in ``path``; ``None`` when it is chunked (or unallocated),
    so its rows cannot be mapped directly."""
    with open_h5(Path(path)) as f:
        dset = stored_dataset(f, "features", Path(path))
        offset = dset.id.get_offset() if dset.chunks is None else None
        return None if offset is None else RowLayout(int(offset), dset.dtype.str, tuple(dset.shape))


def read_features(
    path: str | os.PathLike[str], index: np.ndarray | None = None, *, layout: RowLayout | None = None
) -> torch.Tensor:
    """Features of one bag as a float32 tensor ``[n, D]``: all rows, or the rows in ``index``
    (returned in sorted row order).

    A whole bag is read in blocks of :data:`CHECK_ROWS` rows into the float32 result, so a
    float16 store never sits in memory twice, and checked against its checksum
    (:func:`checked_rows`; :class:`StoreError`). With the ``layout`` of a contiguous dataset (what
    the feature step writes; from :func:`row_layout`, looked up once per store), selected rows
    are gathered through a memory map of the h5 file at the dataset's offset, without opening it
    with HDF5 or HDF5's per-row selection (0.2-0.4 ms of a 4-6 ms training step on 512 rows).
    Without one (a chunked dataset) the whole bag is read and indexed. float16 is widened by
    torch (vectorised), not numpy.
    """
    import torch  # here: a workflow's checks read stores' attributes without loading torch

    if index is None or layout is None:
        with open_h5(Path(path)) as f:
            blocks = checked_rows(f, "features", Path(path))
            # numpy's allocation: a bag too large for memory is a MemoryError, as in every other reader
            out = torch.from_numpy(np.empty(f["features"].shape, np.float32))
            start = 0
            for rows in blocks:
                out[start : start + len(rows)] = torch.from_numpy(_native(rows))
                start += len(rows)
        return out if index is None else out[torch.from_numpy(np.sort(index))]
    rows = np.memmap(path, dtype=np.dtype(layout.dtype), mode="r", offset=layout.offset, shape=layout.shape)
    return torch.from_numpy(_native(rows[np.sort(index)])).to(torch.float32)


def _native(rows: np.ndarray) -> np.ndarray:
    """``rows`` in the machine's byte order (torch reads no other; a store written big-endian by
    another tool is converted, a native one returned as it is)."""
    return rows.astype(rows.dtype.newbyteorder("="), copy=False)


def read_coords(path: str | os.PathLike[str]) -> np.ndarray:
    """The ``coords`` [N, 2] int64 of a feature store (level-0 x, y of each tile's top-left),
    checked against its checksum (:func:`checked_rows`)."""
    with open_h5(Path(path)) as f:
        if "coords" not in f:
            raise StoreError(f"feature store {path} has no 'coords' dataset")
        blocks = checked_rows(f, "coords", Path(path))
        return _read_all(f["coords"], blocks).astype(np.int64, copy=False)


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


class TileGeometry(NamedTuple):
    """The tiles a feature store's features were computed from, as its attributes record them:
    side in px and resolution in um/px (None where not recorded, as in other tools' files).

    Features of one encoder at another resolution or tile size describe other structures (a
    tile at 1 um/px covers four times the tissue of one at 0.5), so a head trained on one is
    not applied to the other, and one cohort holds one geometry."""

    tile_size: int | None
    mpp: float | None

    @classmethod
    def of(cls, attrs: Mapping[str, Any]) -> TileGeometry:
        try:
            size = int(attrs["tile_size"]) if attrs.get("tile_size") is not None else None
            mpp = round(float(attrs["mpp_target"]), 6) if attrs.get("mpp_target") is not None else None
        except (TypeError, ValueError):
            return cls(None, None)
        return cls(size, mpp if mpp is not None and math.isfinite(mpp) else None)

    @property
    def known(self) -> bool:
        return self.tile_size is not None and self.mpp is not None

    def describe(self) -> str:
        """``224 px tiles at 0.5 um/px``, for messages."""
        return f"{self.tile_size} px tiles at {self.mpp:g} um/px" if self.known else "tiles of unrecorded size"
