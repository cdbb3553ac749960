"""Tiling: cut a slide's tissue into tiles at a target resolution and write its patch store.

The tile grid lives in target pixels: tile (i, j) starts at (i * stride, j * stride) target px,
so its level-0 corner is that times ``scale`` = mpp_target / mpp_level0, rounded. Tiles are read
from the coarsest pyramid level that is not coarser than the target, in blocks of neighbouring
tiles (one read and one resize per block, not per tile), and written straight into the zarr
chunks by parallel dask tasks, one chunk per task, so memory stays bounded by the number of
workers whatever the slide's size.

Integrity: a store is built under a temporary name unique to the run, sealed with its manifest
and renamed into place in one step; a run that finds another's finished store in its way keeps
that one. A damaged store is rebuilt. With ``isolate`` every slide is tiled in a worker process
whose death (a signal, out of memory, a decoder crash) becomes that slide's ``failed`` record.
"""

from __future__ import annotations

import datetime as _dt
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsitools import __version__
from wsitools.errors import (
    ConfigError, DamagedStoreError, SlideError, StoreError, WsiToolsError, error_line,
)
from wsitools.io import (
    LostRace, atomic_path, available_cpus, remove_dead_temps, remove_path, stable_hash, write_json_atomic,
)
from wsitools.slide import Backend, Slide, open_slide
from wsitools.store import (
    CHUNK_TILES, DEFAULT_CODEC, DEFAULT_JPEG_QUALITY, FORMAT_VERSION, Codec, PatchStore, TileCodec, codec_attrs,
    create_patch_store, read_store_attrs, seal_patch_store, slide_identity, write_tile_chunk, write_tile_table,
)
from wsitools.tissue import TissueParams, TissueResult, detect_tissue, params_dict, tissue_fraction, write_qc
from wsitools.types import MPP_MAX, MPP_MIN, MicronsPerPixel, TargetPx, check_distinct_ids, check_slide_id, slide_id_from_path

log = logging.getLogger(__name__)

Scheduler = Literal["threads", "processes"]
Status = Literal["ok", "no_tissue", "failed"]

MAX_BLOCK_READ = 4096
"""Largest side, in pixels of the level read, of one block read: bounds a task's memory."""

ENLARGE_WARNING = 1.1
"""A target finer than the slide's level 0 by more than this factor is warned about: its tiles
are enlarged by interpolation (a 20x scan tiled at 40x). Below it lie the usual gaps between a
nominal and a scanner's resolution (0.25 um/px asked of a 0.263 um/px scan: 1.05)."""


DEFAULT_MPP = MicronsPerPixel(0.5)
"""The target resolution when neither an mpp nor a magnification is given (20x)."""


@dataclass(frozen=True)
class TilingParams:
    """What to tile: resolution (mpp, or magnification), tile size, overlap, tissue threshold."""

    mpp: MicronsPerPixel | None = None
    """Target resolution in um/px: :data:`DEFAULT_MPP` unless ``magnification`` is given (then None)."""
    magnification: float | None = None
    """Target magnification (e.g. 20): converted with the slide's objective power and mpp, or with
    the 10 um/px-at-1x convention (20x = 0.5 um/px) when the slide does not state its objective."""
    tile_size: TargetPx = TargetPx(224)
    overlap: TargetPx = TargetPx(0)
    min_tissue: float = 0.5
    """Keep tiles whose tissue fraction is at least this (0-1)."""
    store_pixels: bool = True
    codec: Codec = DEFAULT_CODEC
    """How stored pixels are coded: ``jpeg`` (one JPEG per tile) or ``lossless``."""
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    tissue: TissueParams = field(default_factory=TissueParams)

    def __post_init__(self) -> None:
        if self.mpp is not None and self.magnification is not None:
            raise ConfigError("give exactly one of a target mpp and a target magnification")
        if self.mpp is None and self.magnification is None:
            object.__setattr__(self, "mpp", DEFAULT_MPP)
        if self.mpp is not None and not MPP_MIN <= self.mpp <= MPP_MAX:
            raise ConfigError(f"target mpp must be from {MPP_MIN:g} to {MPP_MAX:g} um/px, got {self.mpp}")
        if self.magnification is not None and not self.magnification > 0:
            raise ConfigError(f"magnification must be positive, got {self.magnification}")
        if self.tile_size < 8:
            raise ConfigError(f"tile size must be at least 8 px, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise ConfigError(f"overlap must be in [0, tile size), got {self.overlap}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"min tissue fraction must be in [0, 1], got {self.min_tissue}")
        TileCodec(self.codec, self.jpeg_quality)  # a ConfigError for a bad codec or quality

    @property
    def tile_codec(self) -> TileCodec | None:
        """The store's tile codec; None for a coordinates-only store."""
        return TileCodec(self.codec, self.jpeg_quality) if self.store_pixels else None

    @property
    def stride(self) -> int:
        return int(self.tile_size - self.overlap)

    def target_mpp(self, slide: Slide) -> MicronsPerPixel:
        """The target resolution on ``slide``; one from a magnification is bounded like an mpp."""
        if self.mpp is not None:
            return self.mpp
        assert self.magnification is not None
        objective = slide.objective_power
        if objective:
            mpp = slide.mpp * objective / self.magnification
        else:
            mpp = 10.0 / self.magnification
        if not MPP_MIN <= mpp <= MPP_MAX:
            raise SlideError(
                f"{slide.path}: magnification {self.magnification:g} gives a target of {mpp:g} um/px, "
                f"outside {MPP_MIN:g}-{MPP_MAX:g} um/px"
            )
        return MicronsPerPixel(mpp)


@dataclass(frozen=True)
class TileGeometry:
    """How the target grid maps onto a slide and the pyramid level it is read from."""

    mpp_level0: float
    mpp_target: float
    tile_size: int
    stride: int
    level: int
    level_downsample: float
    """The level's downsample (its resolution over level 0's)."""
    grid_shape: tuple[int, int]
    """Tiles along (x, y) that fit inside the slide."""
    level_downsample_xy: tuple[float, float]
    """Level-0 px per px of the level along (x, y) (:attr:`~wsitools.slide.Slide.level_downsamples_xy`):
    both ``level_downsample`` on a pyramid level of level 0 shrunk by a whole factor."""

    @property
    def scale(self) -> float:
        """Level-0 px per target px."""
        return self.mpp_target / self.mpp_level0

    @property
    def resize_factor(self) -> float:
        """Pixels of the level read per target px (1 when a level matches the target)."""
        return self.scale / self.level_downsample

    @property
    def resize_xy(self) -> tuple[float, float]:
        """Pixels of the level read per target px along (x, y)."""
        return self.scale / self.level_downsample_xy[0], self.scale / self.level_downsample_xy[1]

    @property
    def tile_size_level0(self) -> float:
        return self.tile_size * self.scale

    @property
    def block_tiles(self) -> int:
        """Tiles per side of one block: 8, so that a full chunk of 64 tiles is one square block
        (fewest source tiles decoded per tile kept), fewer if a block would exceed
        MAX_BLOCK_READ px of the level read."""
        return int(np.clip(MAX_BLOCK_READ // max(1.0, self.stride * self.resize_factor), 1, 8))

    def level0(self, grid: np.ndarray) -> np.ndarray:
        """Level-0 top-left corners of grid cells [N, 2] (i, j)."""
        return np.rint(grid * self.stride * self.scale).astype(np.int64)


def tile_geometry(slide: Slide, params: TilingParams) -> TileGeometry:
    mpp_target = float(params.target_mpp(slide))
    scale = mpp_target / slide.mpp
    w_t, h_t = int(slide.dimensions[0] / scale), int(slide.dimensions[1] / scale)
    n = [max(0, (side - params.tile_size) // params.stride + 1) for side in (w_t, h_t)]
    level = slide.best_level_for_mpp(mpp_target)
    return TileGeometry(
        mpp_level0=float(slide.mpp),
        mpp_target=mpp_target,
        tile_size=int(params.tile_size),
        stride=params.stride,
        level=level,
        level_downsample=float(slide.level_downsamples[level]),
        grid_shape=(n[0], n[1]),
        level_downsample_xy=slide.level_downsamples_xy[level],
    )


def plan_tiles(
    geometry: TileGeometry, tissue: TissueResult, min_tissue: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid cells, level-0 coords and tissue fractions of the tiles to keep, in block order.

    Block order (blocks of ``block_tiles``^2 cells row by row, cells row by row inside a block)
    keeps the tiles of one chunk spatially together, so each task reads few, compact regions.
    """
    nx, ny = geometry.grid_shape
    jj, ii = np.mgrid[0:ny, 0:nx]
    grid = np.stack([ii.ravel(), jj.ravel()], axis=1).astype(np.int64)
    coords = geometry.level0(grid)
    fraction = tissue_fraction(tissue.mask, tissue.downsample, coords, geometry.tile_size_level0)
    keep = (fraction >= min_tissue) & (fraction > 0)
    grid, coords, fraction = grid[keep], coords[keep], fraction[keep]
    b = geometry.block_tiles
    order = np.lexsort((grid[:, 0], grid[:, 1], grid[:, 0] // b, grid[:, 1] // b))
    return grid[order], coords[order], fraction[order]


_local = threading.local()


def _cached_slide(path: str, backend: str, mpp_override: float | None) -> Slide:
    """One open slide per (thread, slide): handles are not shared between threads."""
    cache: dict[tuple[str, str, float | None], Slide] = _local.__dict__.setdefault("slides", {})
    key = (path, backend, mpp_override)
    if key not in cache:
        cache[key] = open_slide(path, backend=backend, mpp_override=mpp_override)  # type: ignore[arg-type]
    return cache[key]


def cell_rectangles(cells: np.ndarray) -> list[np.ndarray]:
    """The cells of one block (sorted row by row) as rectangles that hold them and nothing else:
    the indices into ``cells`` of each, rectangles in raster order of their top-left corners.

    A block at the edge of the tissue keeps only some of its cells; reading its bounding box
    would decode source tiles that no kept tile touches. Each run of adjacent cells in a row is a rectangle, grown downwards while the next
    row has a run with the same columns, so a full block is still one read.
    """
    starts = np.flatnonzero(
        np.r_[True, (cells[1:, 1] != cells[:-1, 1]) | (cells[1:, 0] != cells[:-1, 0] + 1)]
    )
    ends = np.r_[starts[1:], len(cells)]
    rects: list[list[int]] = []
    growing: dict[tuple[int, int], tuple[int, int]] = {}  # (first, last column) -> (rect, last row)
    for a, b in zip(starts.tolist(), ends.tolist()):
        cols, row = (int(cells[a, 0]), int(cells[b - 1, 0])), int(cells[a, 1])
        rect, last_row = growing.get(cols, (len(rects), row - 2))
        if last_row != row - 1:
            rect = len(rects)
            rects.append([])
        rects[rect].extend(range(a, b))
        growing[cols] = (rect, row)
    return [np.asarray(r) for r in rects]


def read_tiles(slide: Slide, geometry: TileGeometry, grid: np.ndarray) -> list[np.ndarray]:
    """Tiles [S, S, 3] for grid cells ``grid`` (sorted by block), read a block at a time.

    Where the level read is at the target resolution (tiles are exact crops of it) each
    rectangle of cells of a block (:func:`cell_rectangles`) is read on its own, so no source
    tile outside the kept tiles is decoded; where it is resampled the block's bounding box is
    read, as resampling a smaller region rounds a few pixels the other way (by 1). The tiles
    are views into the regions read, not copies: the encoders take them as they are.
    """
    s, stride = geometry.tile_size, geometry.stride
    tiles: list[np.ndarray] = [np.empty(0, np.uint8)] * len(grid)
    blocks = (grid[:, 0] // geometry.block_tiles) + (grid[:, 1] // geometry.block_tiles) * (1 << 32)
    starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
    rx, ry = geometry.resize_xy
    exact = rx == ry == 1.0
    for a, b in zip(starts, np.r_[starts[1:], len(grid)]):
        for rect in cell_rectangles(grid[a:b]) if exact else [np.arange(b - a)]:
            cells = grid[a:b][rect]
            i0, j0 = cells.min(axis=0)
            i1, j1 = cells.max(axis=0)
            w_t = int((i1 - i0) * stride + s)
            h_t = int((j1 - j0) * stride + s)
            x0, y0 = i0 * stride * geometry.scale, j0 * stride * geometry.scale
            size = (w_t * rx, h_t * ry)
            region = slide.read_region_resized((x0, y0), geometry.level, size, (w_t, h_t))
            for k, (i, j) in zip(rect.tolist(), cells.tolist()):
                ox, oy = (i - i0) * stride, (j - j0) * stride
                tiles[a + k] = region[oy : oy + s, ox : ox + s]
    return tiles


def _write_chunk_of(
    slide: Slide, geometry: TileGeometry, grid: np.ndarray, tiles_path: str, start: int, codec: TileCodec
) -> int:
    """Read the tiles of one zarr chunk and write them (chunk-aligned: no two tasks share a chunk)."""
    write_tile_chunk(tiles_path, start // CHUNK_TILES, read_tiles(slide, geometry, grid), codec=codec)
    return len(grid)


def _write_chunk(
    slide_args: tuple[str, str, float | None],
    geometry: TileGeometry,
    grid: np.ndarray,
    tiles_path: str,
    start: int,
    codec: TileCodec,
) -> int:
    """:func:`_write_chunk_of` as a dask task: the slide opened once per worker thread or process."""
    return _write_chunk_of(_cached_slide(*slide_args), geometry, grid, tiles_path, start, codec)


def _run_chunks(
    slide: Slide,
    geometry: TileGeometry,
    grid: np.ndarray,
    tiles_path: Path,
    *,
    codec: TileCodec,
    workers: int,
    scheduler: Scheduler,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    if workers == 1 and scheduler == "threads":
        # One worker: the chunks one after another in this thread, on the slide already open (its
        # decoded-tile cache included), without a scheduler's queues and thread switches.
        with tqdm(total=len(grid), unit="tile", desc=slide.path.name, disable=not progress, leave=False) as bar:
            for a in range(0, len(grid), CHUNK_TILES):
                bar.update(_write_chunk_of(slide, geometry, grid[a : a + CHUNK_TILES], str(tiles_path), a, codec))
        return
    import dask
    from dask.callbacks import Callback

    slide_args = (str(slide.path), slide.backend, slide.mpp_override)
    tasks = [
        dask.delayed(_write_chunk)(
            slide_args, geometry, grid[a : a + CHUNK_TILES], str(tiles_path), a, codec,
            dask_key_name=f"tile-chunk-{a}",
        )
        for a in range(0, len(grid), CHUNK_TILES)
    ]
    bar = tqdm(total=len(grid), unit="tile", desc=slide.path.name, disable=not progress, leave=False)

    class _Progress(Callback):  # type: ignore[misc]
        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if isinstance(key, str) and key.startswith("tile-chunk-"):
                bar.update(result)

    with bar, _Progress():
        if scheduler == "threads":
            # A pool of our own, shut down (its running tasks finished) before an error leaves
            # here: no task may still write a chunk into a temporary store that is being removed.
            # (dask's process pool is shut down the same way by dask itself.)
            with ThreadPoolExecutor(workers) as pool:
                dask.compute(*tasks, scheduler="threads", pool=pool)
        else:
            from dask.multiprocessing import RemoteException

            try:
                dask.compute(*tasks, scheduler=scheduler, num_workers=workers)
            except RemoteException as exc:
                # dask wraps an error raised in a worker process with that process's traceback
                # in its message; the error itself is what the slide's QC record should say.
                raise exc.exception from None


def _store_identity(slide: Slide, params: TilingParams, geometry: TileGeometry) -> dict[str, Any]:
    """Everything that changes a store's content; its hash is the store's identity."""
    return {
        **slide_identity(slide.path),
        "backend": slide.backend,
        "mpp_override": slide.mpp_override,
        "mpp_target": geometry.mpp_target,
        "tile_size": geometry.tile_size,
        "overlap": int(params.overlap),
        "min_tissue": float(params.min_tissue),
        "tissue": params_dict(params.tissue),
        "has_pixels": bool(params.store_pixels),
        **codec_attrs(params.tile_codec),
        "format_version": FORMAT_VERSION,
    }


def same_store(attrs: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Whether a store with ``attrs`` is the one ``identity`` (:func:`_store_identity`) asks for:
    the same parameters and slide, the slide's modification time aside when its size and
    fingerprint match (a slide copied or touched, its bytes unchanged, keeps its store and so
    everything made from it)."""
    recorded = attrs.get("params_hash")
    return recorded == stable_hash(identity) or (
        "slide_fingerprint" in attrs and recorded == stable_hash({**identity, "slide_mtime": attrs.get("slide_mtime")})
    )


def _store_attrs(
    identity: dict[str, Any],
    slide_id: str,
    slide: Slide,
    params: TilingParams,
    geometry: TileGeometry,
    tissue: TissueResult,
) -> dict[str, Any]:
    """The provenance attributes of a store (docs/formats.md): its identity and the rest."""
    return {
        **identity,
        "params_hash": stable_hash(identity),
        "slide_id": slide_id,
        "mpp_level0": float(slide.mpp),
        "magnification": params.magnification,
        "stride": geometry.stride,
        "tile_size_level0": geometry.tile_size_level0,
        "level": geometry.level,
        "level_downsample": geometry.level_downsample,
        "resize_factor": geometry.resize_factor,
        "grid_shape": list(geometry.grid_shape),
        "tissue_area_um2": tissue.area_um2,
        "tissue_warning": tissue.warning,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _qc_record(slide_id: str, slide_path: Path, status: Status, reason: str, **extra: Any) -> dict[str, Any]:
    return {"slide_id": slide_id, "slide_path": str(slide_path), "status": status, "reason": reason, **extra}


def _empty_reason(attrs: dict[str, Any]) -> str:
    """Why a store holds no tile: no whole tile fits in the slide, or none has enough tissue."""
    if 0 in attrs.get("grid_shape", (1, 1)):
        return (
            f"the slide is smaller than one tile ({attrs['tile_size']} px at {attrs['mpp_target']:g} um/px, "
            f"{attrs['tile_size_level0']:g} level-0 px a side)"
        )
    if attrs["min_tissue"] == 0:
        return "no tile touches tissue"
    return f"no tile has tissue fraction >= {attrs['min_tissue']}"


def _record_from_attrs(attrs: dict[str, Any], store: Path) -> dict[str, Any]:
    """A finished store's QC record; its reason says why no tile was kept, and the tissue
    detection's warning (:attr:`~wsitools.tissue.TissueResult.warning`) when there was one."""
    n = int(attrs["n_tiles"])
    reasons = ([] if n else [_empty_reason(attrs)]) + ([attrs["tissue_warning"]] if attrs.get("tissue_warning") else [])
    return _qc_record(
        attrs["slide_id"],
        Path(attrs["slide_path"]),
        "ok" if n else "no_tissue",
        "; ".join(reasons),
        store=str(store),
        mpp=attrs["mpp_level0"],
        mpp_target=attrs["mpp_target"],
        level=attrs["level"],
        level_downsample=attrs["level_downsample"],
        tissue_area_mm2=round(attrs["tissue_area_um2"] / 1e6, 4),
        n_tiles=n,
        params_hash=attrs["params_hash"],
    )


def tile_slide(
    slide_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    params: TilingParams = TilingParams(),
    *,
    backend: Backend = "auto",
    mpp_override: float | None = None,
    slide_id: str | None = None,
    workers: int | None = None,
    scheduler: Scheduler = "threads",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Detect tissue, tile, and write ``out_dir/{slide_id}.zarr`` plus its QC files.

    Returns the QC record (also written as ``{slide_id}.qc.json``). A finished, intact store
    with the same parameters (and the same slide file) is kept as it is; a damaged one (its
    manifest does not hold) is rebuilt; anything else at the store's path (a store with other
    parameters, something that is no patch store) is an error unless ``overwrite``, which
    replaces it. A slide without tissue gives an empty store and status ``no_tissue``.
    """
    path = Path(slide_path)
    slide_id = check_slide_id(slide_id or slide_id_from_path(str(path)))
    out = Path(out_dir)
    store_path = out / f"{slide_id}.zarr"
    out.mkdir(parents=True, exist_ok=True)
    with open_slide(path, backend=backend, mpp_override=mpp_override) as slide:
        conflict = slide.mpp_override_conflict()
        if conflict is not None:
            log.warning("%s", conflict)
        geometry = tile_geometry(slide, params)
        if geometry.scale * ENLARGE_WARNING < 1:
            log.warning(
                "%s: the target %.4g um/px is finer than the slide's level 0 (%.4g um/px): tiles are enlarged "
                "%.2fx by interpolation and hold no detail the scan does not", path, geometry.mpp_target,
                geometry.mpp_level0, 1 / geometry.scale,
            )
        identity = _store_identity(slide, params, geometry)
        replace = False
        if store_path.exists() or store_path.is_symlink():
            replace = True
            try:
                kept = PatchStore(store_path)
                kept.check_chunks()  # every chunk: one damaged in place passes the sizes
                old = kept.attrs
            except DamagedStoreError as exc:
                log.warning("%s: rebuilding it", exc)
            except StoreError as exc:
                if not overwrite:
                    raise StoreError(f"{exc}; use --overwrite to replace it") from None
            else:
                if same_store(old, identity):
                    log.info("%s: finished store with the same parameters exists; kept", store_path)
                    return _finish(out, _record_from_attrs(old, store_path))
                if not overwrite:
                    changed = sorted(k for k in identity if old.get(k) != identity[k])
                    raise StoreError(
                        f"{store_path}: exists with other parameters ({', '.join(changed) or 'format'}); "
                        "use --overwrite to replace it"
                    )
        tissue = detect_tissue(slide, params.tissue)
        attrs = _store_attrs(identity, slide_id, slide, params, geometry, tissue)
        grid, coords, fraction = plan_tiles(geometry, tissue, params.min_tissue)
        try:
            with atomic_path(store_path, overwrite=replace) as tmp:
                group = create_patch_store(
                    tmp, n_tiles=len(grid), tile_size=geometry.tile_size, codec=params.tile_codec, attrs=attrs,
                )
                write_tile_table(group, coords, fraction)
                if params.tile_codec is not None and len(grid):
                    _run_chunks(
                        slide, geometry, grid, tmp / "tiles", codec=params.tile_codec,
                        workers=workers or available_cpus(), scheduler=scheduler, progress=progress,
                    )
                write_qc(tissue, out, slide_id)  # the tissue QC files appear with the store they describe
                seal_patch_store(tmp)
        except LostRace:
            winner = read_store_attrs(store_path)
            if winner.get("params_hash") != attrs["params_hash"]:
                raise StoreError(
                    f"{store_path}: another run finished it with other parameters while this one was tiling"
                ) from None
            log.info("%s: another run finished the same store first; kept", store_path)
            return _finish(out, _record_from_attrs(winner, store_path))
        record = _record_from_attrs({**attrs, "n_tiles": len(grid)}, store_path)
        if not len(grid):  # the tissue warning, if any, was logged by detect_tissue
            log.warning("%s: %s", path, _empty_reason(attrs))
        return _finish(out, record)


def _finish(out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write a slide's QC record (``{slide_id}.qc.json``, the last file of its tiling) and return it."""
    write_json_atomic(out / f"{record['slide_id']}.qc.json", record)
    return record


def _failed(out: Path, slide_id: str, path: Path, reason: str) -> dict[str, Any]:
    """Record a failed slide: its QC record, and no tissue QC files unless a finished store is there.
    Its slide path is absolute (links resolved; a link loop kept as it is), as a tiled slide's
    (its store's) is: one form in the QC table."""
    if not (out / f"{slide_id}.zarr").exists():
        for suffix in (".tissue.png", ".geojson"):
            remove_path(out / f"{slide_id}{suffix}")
    return _finish(out, _qc_record(slide_id, Path(os.path.realpath(path)), "failed", reason))


def _tile_one(path: Path, slide_id: str, out: Path, params: TilingParams, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Tile one slide; any failure is its ``failed`` QC record, logged in one line (a user error,
    or an ``OSError`` naming its file: a full disk, a read-only or forbidden ``out_dir``; its
    traceback only at debug level) or with its traceback (a bug). An ``OSError`` writing that
    record (the same full or read-only ``out_dir``) is raised."""
    try:
        return tile_slide(path, out, params, slide_id=slide_id, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of one slide is that slide's QC record
        line = error_line(exc)
        if line is None:
            reason = f"{path}: {type(exc).__name__}: {exc}"
            log.exception("%s", reason)
        else:
            reason = line if isinstance(exc, WsiToolsError) else f"{path}: {line}"
            log.debug("tiling failed for %s", path, exc_info=True)
            log.error("%s", reason)
        return _failed(out, slide_id, path, reason)


def _worker_main(conn: Any, out: str, params: TilingParams, kwargs: dict[str, Any], log_levels: dict[str, int]) -> None:
    """A tiling worker process: tile each (path, slide id) it is sent, send back the QC record;
    ``log_levels``: the supervising process's levels of the root logger ("") and of the others it sets."""
    logging.basicConfig(level=log_levels[""], format="%(levelname)s %(name)s: %(message)s")
    for name, level in log_levels.items():
        logging.getLogger(name).setLevel(level)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        while (task := conn.recv()) is not None:
            try:
                record = _tile_one(Path(task[0]), task[1], Path(out), params, kwargs)
            except OSError as exc:  # its record cannot be written: sent for the supervising process to raise
                conn.send(exc)
                return
            conn.send(record)
    except (EOFError, BrokenPipeError):  # the supervising process is gone
        pass


_SIGNAL_HINTS = {
    signal.SIGKILL: ": out of memory, a time limit, or killed by hand",
    signal.SIGSEGV: ": a crash in a decoder or library",
    signal.SIGBUS: ": a crash, or a file truncated while read",
    signal.SIGABRT: ": a crash in a decoder or library",
}


def death_reason(exitcode: int | None) -> str:
    """How a worker process ended, in words (``killed by signal 9 (SIGKILL: ...)``)."""
    if exitcode is None:
        return "stopped before it finished"
    if exitcode >= 0:
        return f"ended with exit status {exitcode}"
    try:
        sig = signal.Signals(-exitcode)
    except ValueError:
        return f"killed by signal {-exitcode}"
    return f"killed by signal {-exitcode} ({sig.name}{_SIGNAL_HINTS.get(sig, '')})"


class _Worker:
    """One tiling worker process (spawned: no threads or open files inherited), reused for slide
    after slide and replaced when it dies. Not a daemon, so that it may start the processes of
    ``scheduler="processes"``; it ends when the pipe to this process closes."""

    def __init__(self, out: Path, params: TilingParams, kwargs: dict[str, Any]):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        levels = {name: logging.getLogger(name or None).getEffectiveLevel() for name in ("", "tifffile")}
        self.process = ctx.Process(
            target=_worker_main, args=(child_conn, str(out), params, kwargs, levels), name="wsitools-tile"
        )
        self.process.start()
        child_conn.close()

    def tile(self, path: Path, slide_id: str) -> dict[str, Any] | None:
        """The slide's QC record, or None if the worker died on it; the ``OSError`` that kept the
        worker from writing that record is raised here (the worker has ended)."""
        try:
            self.conn.send((str(path), slide_id))
            answer = self.conn.recv()
        except (EOFError, OSError):
            self.process.join()
            return None
        if isinstance(answer, OSError):
            self.process.join()
            raise answer
        return answer

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join()


class TilingStopped(WsiToolsError):
    """A SIGTERM stopped :func:`tile_slides` after the slide it was tiling got its record: the
    run did not finish, whatever ``keep_going`` says (a scheduler, or Snakemake, must not take
    the job for done). ``records`` are those of the slides it got to."""

    def __init__(self, signum: int, records: list[dict[str, Any]], n_slides: int):
        tiled = sum(r["status"] != "failed" for r in records)
        self.signum, self.records = signum, records
        self.summary = f"{tiled} of {n_slides} slides tiled"
        super().__init__(f"stopped by {signal.Signals(signum).name}: {self.summary}")


@contextmanager
def _forward_termination(workers: list[_Worker]) -> Iterator[list[int]]:
    """While tiling, SIGTERM (a scheduler cancelling the job) ends the worker, not this process,
    so the slide gets its record; the signals received are collected in the yielded list."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        for w in workers:
            if w.process.is_alive():
                w.process.terminate()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def tile_slides(
    slide_paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    params: TilingParams = TilingParams(),
    *,
    slide_ids: Sequence[str] | None = None,
    isolate: bool = False,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Tile every slide; a slide that fails gets a ``failed`` QC record and the rest go on.

    ``slide_ids`` (one per slide, e.g. from a samples sheet) replace the ids derived from the
    file names (:func:`~wsitools.types.slide_id_from_path`). Two slides with one id are a
    :class:`~wsitools.errors.DataError` naming both, before any is tiled. ``kwargs`` go to :func:`tile_slide` for
    every slide. With ``isolate`` (the command line's way) the slides are tiled in a worker
    process: when it dies (killed, out of memory, a crash in a decoder) the slide's record says
    how (``failed``, ``killed by signal 9 (SIGKILL...)``), its dead temporaries are removed, and a
    new worker goes on with the next slide. A SIGTERM ends the worker, records its slide, and
    stops before the next one, raising :class:`TilingStopped`. An ``OSError`` writing a failed
    slide's record (a full disk, a read-only ``out_dir``) stops the run: it is raised.
    """
    if slide_ids is not None and len(slide_ids) != len(slide_paths):
        raise ValueError(f"{len(slide_ids)} slide ids for {len(slide_paths)} slides")
    ids = list(slide_ids) if slide_ids is not None else [slide_id_from_path(str(p)) for p in slide_paths]
    check_distinct_ids(ids, slide_paths)
    out = Path(out_dir)
    records = []
    workers: list[_Worker] = []
    with _forward_termination(workers) as stopped:
        for i, p in enumerate(slide_paths):
            path = Path(p)
            try:
                slide_id = check_slide_id(ids[i])
            except ValueError as exc:
                log.error("%s: %s", path, exc)
                records.append(_qc_record(path.name, path, "failed", str(exc)))
                continue
            if not isolate:
                records.append(_tile_one(path, slide_id, out, params, kwargs))
                continue
            if not workers:
                workers.append(_Worker(out, params, kwargs))
            record = workers[0].tile(path, slide_id)
            if record is None:  # the worker died on this slide
                dead = workers.pop()
                reason = f"{path}: tiling was {death_reason(dead.process.exitcode)}"
                log.error("%s", reason)
                out.mkdir(parents=True, exist_ok=True)
                remove_dead_temps(out)  # the dead worker's store, tissue files, QC file
                record = _failed(out, slide_id, path, reason)
            records.append(record)
            if stopped:
                break
        for w in workers:
            w.close()
    if stopped:
        raise TilingStopped(stopped[0], records, len(slide_paths))
    return records
