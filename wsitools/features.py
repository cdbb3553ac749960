"""Feature extraction: patch store -> encoder -> h5 feature store ``{out_root}/{encoder}/{slide_id}.h5``.

Tiles are read by DataLoader workers in contiguous batches (whole zarr chunks, decoded to pixels
by :meth:`PatchStore.read_tiles` whatever the store's codec; a coords-only store reads its slide),
handed over in pinned memory and copied to the device without blocking, so the
next batch is decoded while the current one runs. On the device the encoder's card recipe applies
(scale to [0, 1], resize, normalise), the network runs under ``torch.inference_mode`` with the
card's autocast dtype on a GPU, channels-last, optionally ``torch.compile``-d, and the features
accumulate on the device (no per-batch synchronisation) until one copy back at the end.

Features are stored float32 by default, the dtype CLAM's and TRIDENT's heads take as they are;
float16 (``dtype="float16"``) halves the disk. The ``coords`` dataset carries the attributes
CLAM and TRIDENT read there (:func:`interop_attrs`), so their readers take a feature store as it is.

The h5 file is written under a temporary name and renamed when complete. An existing file is
reused when its ``encoder_hash``, ``store_hash`` and dtype match and its coordinates equal the
store's; otherwise it is recomputed. Layout and attributes: docs/formats.md.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsitools import __version__
from wsitools.encoders.loading import Encoder
from wsitools.errors import ModelError, StoreError
from wsitools.io import atomic_path, available_cpus, remove_dead_temps
from wsitools.store import PatchStore
from wsitools.types import DEFAULT_FEATURE_DTYPE, FEATURE_DTYPES, FeatureDtype, check_slide_id

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KIND = "feature_store"
REQUIRED_ATTRS = ("encoder", "slide_id")
"""Attributes every reader relies on; a file without one of them is not a usable feature store."""

GEOMETRY_ATTRS = ("tile_size", "tile_size_level0", "mpp_target")
"""File attributes the CLAM/TRIDENT attributes of ``coords`` are computed from."""


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
    computes it, so that its slide encoders' ``coords // patch_size_level0`` is each tile's grid
    index), the level-0 and target magnifications and ``overlap`` (target px; left out when
    unknown). The legacy (CLAM) reading of the same file: ``patch_level`` 0 (coordinates are
    level-0) and ``custom_downsample`` (level-0 px per target px), so that patch_size x
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


def feature_store_path(out_root: str | os.PathLike[str], encoder_name: str, slide_id: str) -> Path:
    """``{out_root}/{encoder_name}/{slide_id}.h5`` (both names checked: they become paths)."""
    return Path(out_root) / check_slide_id(encoder_name) / f"{check_slide_id(slide_id)}.h5"


@dataclass(frozen=True)
class FeatureStore:
    """A finished feature store: its attributes, and :meth:`load` for the arrays."""

    path: Path
    attrs: dict[str, Any]
    n: int
    dim: int
    dtype: str
    """The stored dtype of ``features`` (``float32`` or ``float16``)."""

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FeatureStore:
        """Open and check a feature store; :class:`StoreError` naming the file if it is not one."""
        p = Path(path)
        if p.name.startswith(".tmp-"):
            raise StoreError(f"{p}: is an unfinished (temporary) feature store")
        if not p.is_file():
            raise StoreError(f"{p}: no such feature store")
        try:
            with h5py.File(p, "r") as f:
                attrs = {k: _from_h5(v) for k, v in f.attrs.items()}
                if "features" not in f or "coords" not in f:
                    raise StoreError(f"{p}: not a feature store (needs datasets 'features' and 'coords')")
                fshape, cshape = f["features"].shape, f["coords"].shape
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
        return cls(path=p, attrs=attrs, n=int(fshape[0]), dim=int(fshape[1]), dtype=dtype)

    @property
    def encoder(self) -> str:
        return str(self.attrs["encoder"])

    @property
    def encoder_hash(self) -> str:
        return str(self.attrs["encoder_hash"])

    @property
    def store_hash(self) -> str:
        return str(self.attrs["store_hash"])

    @property
    def slide_id(self) -> str:
        return str(self.attrs["slide_id"])

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """``(features [N, D], coords [N, 2] int64)``."""
        with h5py.File(self.path, "r") as f:
            return np.asarray(f["features"][:]), np.asarray(f["coords"][:], np.int64)

    def coords(self) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            return np.asarray(f["coords"][:], np.int64)

    def interop_attrs(self) -> dict[str, Any]:
        """The CLAM/TRIDENT attributes of its ``coords`` (computed from the file's attributes, so
        also for a store written before they were stored)."""
        return interop_attrs_of(self.path, self.attrs)


def _from_h5(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass(frozen=True)
class ExtractResult:
    """Outcome of one store: where the features are and whether they were computed or reused."""

    path: Path
    slide_id: str
    n_tiles: int
    status: Literal["computed", "reused"]
    seconds: float

    @property
    def patches_per_s(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else float("nan")


class TileBatches(Dataset):
    """Contiguous batches ``[b, S, S, 3]`` uint8 of a patch store (one item per batch)."""

    def __init__(self, store: PatchStore, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.store = store
        self.batch_size = batch_size
        self.n = len(store)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.batch_size
        return torch.from_numpy(self.store.read_tiles(slice(start, min(self.n, start + self.batch_size))))


def default_workers() -> int:
    """DataLoader workers: one CPU left for the main process, at most 8."""
    return min(8, max(0, available_cpus() - 1))


def tile_loader(store: PatchStore, *, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """The DataLoader that feeds extraction (exposed for the benchmark)."""
    return DataLoader(
        TileBatches(store, batch_size),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )


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
        "mpp_target": store.mpp_target,
        "tile_size": store.tile_size,
        "tile_size_level0": store.tile_size_level0,
        **({"overlap": int(store.attrs["overlap"])} if "overlap" in store.attrs else {}),
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def reusable(path: Path, store: PatchStore, encoder: Encoder, dtype: FeatureDtype) -> bool:
    """True if ``path`` holds features of exactly this store and encoder (hashes and coords),
    stored in ``dtype``."""
    try:
        existing = FeatureStore.open(path)
    except StoreError as exc:
        log.info("%s: recomputing (%s)", path, exc)
        return False
    if existing.encoder_hash != encoder.encoder_hash or existing.store_hash != store.params_hash:
        log.info("%s: recomputing (encoder or patch store changed)", path)
        return False
    if existing.dim != encoder.dim or not np.array_equal(existing.coords(), store.coords):
        log.info("%s: recomputing (shape or coordinates differ from the store)", path)
        return False
    if existing.dtype != dtype:
        log.info("%s: recomputing (stored as %s, %s asked for)", path, existing.dtype, dtype)
        return False
    return True


def compute_features(
    store: PatchStore,
    encoder: Encoder,
    *,
    batch_size: int = 128,
    workers: int | None = None,
    compile: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """Features ``[N, D]`` float32 of every tile of ``store``, in store order."""
    from tqdm import tqdm

    device = encoder.device
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    forward = torch.compile(encoder.forward_batch, dynamic=False) if compile else encoder.forward_batch
    n = len(store)
    loader = tile_loader(
        store,
        batch_size=batch_size,
        workers=default_workers() if workers is None else workers,
        pin_memory=cuda,
    )
    out = torch.empty((n, encoder.dim), dtype=torch.float32, device=device)
    pos = 0
    with torch.inference_mode(), tqdm(
        total=n, unit="patch", unit_scale=True, desc=store.slide_id, disable=not progress, leave=False
    ) as bar:
        for tiles in loader:
            with encoder.autocast():
                feats = forward(encoder.preprocess(tiles))
            out[pos : pos + len(tiles)] = feats
            pos += len(tiles)
            bar.update(len(tiles))
    if pos != n:
        raise StoreError(f"{store.path}: read {pos} tiles but the store holds {n}")
    return out.cpu().numpy()


def as_stored(features: np.ndarray, dtype: FeatureDtype, *, source: Path, encoder: str) -> np.ndarray:
    """``features`` in the stored dtype; :class:`ModelError` naming ``source`` when a value is not
    finite (an encoder that diverged, or a value beyond float16's range of 65504)."""
    with np.errstate(over="ignore"):  # an overflow is reported below, naming the store
        stored = features.astype(dtype, copy=False)
    finite = np.isfinite(stored).all(axis=1)
    if not finite.all():
        bad = int((~finite).sum())
        hint = " (beyond float16's range: store float32)" if np.isfinite(features[~finite]).all() else ""
        raise ModelError(f"{source}: encoder {encoder!r} produced non-finite {dtype} features for {bad} tiles{hint}")
    return stored


def write_feature_store(path: Path, features: np.ndarray, coords: np.ndarray, attrs: dict[str, Any]) -> None:
    """Write ``features``/``coords`` and ``attrs`` to ``path`` atomically (replacing any old file),
    with the CLAM/TRIDENT attributes on ``coords`` (:func:`interop_attrs`)."""
    with atomic_path(path, overwrite=True) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            f.create_dataset("coords", data=np.asarray(coords, np.int64))
            f["coords"].attrs.update(interop_attrs_of(path, attrs))
            f.attrs.update(attrs)


def extract_features(
    store: str | os.PathLike[str] | PatchStore,
    encoder: Encoder,
    out_root: str | os.PathLike[str],
    *,
    batch_size: int = 128,
    workers: int | None = None,
    compile: bool = False,
    dtype: FeatureDtype = DEFAULT_FEATURE_DTYPE,
    overwrite: bool = False,
    progress: bool = False,
) -> ExtractResult:
    """Write (or reuse) ``{out_root}/{encoder.name}/{slide_id}.h5`` for one patch store.

    Args:
        store: a patch store path or an open :class:`PatchStore` (unfinished stores raise
            :class:`StoreError`).
        encoder: from :func:`wsitools.encoders.load_encoder`.
        out_root: the features root.
        batch_size: tiles per forward pass (and per DataLoader item).
        workers: DataLoader workers (default: CPUs - 1, at most 8; 0 reads in this process).
        compile: ``torch.compile`` the forward pass (worth it on a GPU for large cohorts).
        dtype: the stored dtype of ``features``: float32, or float16 for half the disk.
        overwrite: recompute even if a matching feature store exists.
        progress: show a tqdm bar with patches/s.
    """
    start = time.perf_counter()
    store = store if isinstance(store, PatchStore) else PatchStore.open(store)
    path = feature_store_path(out_root, encoder.name, store.slide_id)
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(FEATURE_DTYPES)}, not {dtype!r}")
    if not overwrite and path.exists() and reusable(path, store, encoder, dtype):
        return ExtractResult(path, store.slide_id, len(store), "reused", time.perf_counter() - start)
    if len(store) == 0:
        log.warning("%s: patch store has no tiles; writing an empty feature store", store.path)
    elif not store.has_pixels:
        store.check_slide()  # here, once, rather than in every DataLoader worker
    if path.parent.is_dir():
        remove_dead_temps(path.parent, path.name)
    features = compute_features(store, encoder, batch_size=batch_size, workers=workers, compile=compile, progress=progress)
    stored = as_stored(features, dtype, source=store.path, encoder=encoder.name)
    write_feature_store(path, stored, store.coords, feature_attrs(store, encoder))
    seconds = time.perf_counter() - start
    log.info("%s: %d tiles in %.1f s (%.0f patches/s)", path, len(store), seconds, len(store) / max(seconds, 1e-9))
    return ExtractResult(path, store.slide_id, len(store), "computed", seconds)
