"""Synthetic whole-slide images with tissue at known places, for tests, benchmarks and the demo.

Tissue is textured with a real tissue image bundled with scikit-image
(``skimage.data.immunohistochemistry()``), mirrored so it tiles without seams, on a light
background. A second texture (the same tissue recoloured to an eosin-dominant stain and rotated)
marks planted regions, e.g. the "tumour" of a positive slide in the demo cohort.

Slides are written tile by tile; every smaller level (and the SVS thumbnail) is the area average
of level 0. The small levels are computed from the level-0 tiles as they are written, into arrays
memory-mapped on disk under a fixed budget (:data:`PYRAMID_BUDGET`); a level too large for it is
rendered afresh from level 0 tile by tile. So a slide far larger than memory (the tiling
benchmark's 40k x 30k) is made in bounded memory, rendering level 0 at most twice.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from wsitools.io import atomic_path
from wsitools.tables import write_table

Texture = Literal["tissue", "other"]
SlideFormat = Literal["tiff", "svs"]

BACKGROUND = 243
"""Grey level of the empty glass (slightly below white, as on a real scan)."""

PYRAMID_BUDGET = 1 << 30
"""Bytes of smaller levels kept (memory-mapped) while level 0 is written; a level beyond it is re-rendered."""


@dataclass(frozen=True)
class Region:
    """An elliptical patch of tissue: bounding box in level-0 px, and its texture."""

    x: int
    y: int
    w: int
    h: int
    texture: Texture = "tissue"

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Boolean mask of the level-0 pixel centres (xs, ys) inside the ellipse."""
        cx, cy = self.x + self.w / 2.0, self.y + self.h / 2.0
        return ((xs + 0.5 - cx) / (self.w / 2.0)) ** 2 + ((ys + 0.5 - cy) / (self.h / 2.0)) ** 2 <= 1.0


@lru_cache(maxsize=None)
def texture(name: Texture) -> np.ndarray:
    """A seamless 1024x1024 RGB texture: the IHC image mirrored into a 2x2 periodic tile."""
    from skimage import data
    from skimage.color import hed2rgb, rgb2hed

    ihc = data.immunohistochemistry()
    if name == "other":
        hed = rgb2hed(ihc)
        eosin = np.stack([hed[..., 0] * 0.25, hed[..., 0] * 1.4 + hed[..., 2], hed[..., 2] * 0.1], -1)
        ihc = np.rot90((np.clip(hed2rgb(eosin), 0, 1) * 255).astype(np.uint8))
    top = np.concatenate([ihc, ihc[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))


def render(regions: Sequence[Region], x: int, y: int, w: int, h: int) -> np.ndarray:
    """Level-0 pixels [h, w, 3] of the synthetic slide in the box (x, y, w, h)."""
    out = np.full((h, w, 3), BACKGROUND, np.uint8)
    xs = np.arange(x, x + w)[None, :]
    ys = np.arange(y, y + h)[:, None]
    for region in regions:
        if region.x >= x + w or region.y >= y + h or region.x + region.w <= x or region.y + region.h <= y:
            continue
        inside = region.contains(xs, ys)
        if not inside.any():
            continue
        tex = texture(region.texture)
        period = tex.shape[0]
        patch = np.take(np.take(tex, ys[:, 0] % period, axis=0), xs[0] % period, axis=1)
        if inside.all():
            out[:] = patch
        else:
            out[inside] = patch[inside]
    return out


def _block_sum(pixels: np.ndarray, f: int) -> np.ndarray:
    """uint32 sums of each ``f x f`` block of ``pixels`` [h * f, w * f, 3] (strided adds, which
    numpy does many times faster than a sum over the axes of a reshaped view)."""
    out = pixels[0::f, 0::f].astype(np.uint32)
    for i in range(f):
        for j in range(f):
            if i or j:
                out += pixels[i::f, j::f]
    return out


def _area_mean(pixels: np.ndarray, ds: int) -> np.ndarray:
    """The rounded mean of each ``ds x ds`` block of ``pixels`` [h * ds, w * ds, 3]."""
    return ((_block_sum(pixels, ds) + ds * ds // 2) // (ds * ds)).astype(np.uint8)


class _Pyramid:
    """The smaller levels of a slide, filled from the level-0 tiles while level 0 is written.

    A level whose downsample ``ds`` divides the tile size gets each of its pixels whole from one
    tile, so it is kept as final uint8 pixels (``round(mean)`` of the ``ds x ds`` block, summed
    through the smaller kept levels); any other (the SVS thumbnail) keeps uint32 block sums,
    since its blocks straddle tiles. All arrays are memory-mapped in ``folder``.
    """

    def __init__(self, folder: Path, shapes: dict[int, tuple[int, int]], *, tile: int):
        self.tile = tile
        self.arrays: dict[int, np.ndarray] = {}
        for ds, (h, w) in shapes.items():
            dtype = np.uint8 if tile % ds == 0 else np.uint32
            self.arrays[ds] = np.lib.format.open_memmap(folder / f"level-{ds}.npy", mode="w+", dtype=dtype, shape=(h, w, 3))

    def add(self, tile: np.ndarray, x: int, y: int) -> None:
        """Add the level-0 tile whose top-left corner is (x, y), a multiple of the tile size."""
        sums: dict[int, np.ndarray] = {1: tile}
        for ds in sorted(self.arrays):
            base = max(k for k in sums if ds % k == 0)
            if self.tile % ds:  # a block straddling tiles: accumulate its partial sums
                self._accumulate(ds, sums[base], base, x, y)
                continue
            sums[ds] = _block_sum(sums[base], ds // base)
            level = self.arrays[ds]
            y0, x0 = y // ds, x // ds
            part = sums[ds][: level.shape[0] - y0, : level.shape[1] - x0]
            n = ds * ds
            level[y0 : y0 + part.shape[0], x0 : x0 + part.shape[1]] = (part + n // 2) // n

    def _accumulate(self, ds: int, block: np.ndarray, base: int, x: int, y: int) -> None:
        """Add ``block`` (sums of ``base x base`` level-0 pixels from (x, y)) to level ``ds``'s sums."""
        sums = self.arrays[ds]
        h, w = sums.shape[:2]
        bx0, by0 = x // ds, y // ds
        bx1 = min(w, -(-(x + block.shape[1] * base) // ds))
        by1 = min(h, -(-(y + block.shape[0] * base) // ds))
        if bx0 >= bx1 or by0 >= by1:
            return
        # the block's columns/rows where a new pixel of this level starts (ds is a multiple of base)
        cols = np.maximum(np.arange(bx0, bx1) * ds - x, 0) // base
        rows = np.maximum(np.arange(by0, by1) * ds - y, 0) // base
        last_x, last_y = (bx1 * ds - x) // base, (by1 * ds - y) // base
        part = block[:last_y, :last_x].astype(np.uint32)
        sums[by0:by1, bx0:bx1] += np.add.reduceat(np.add.reduceat(part, rows, axis=0), cols, axis=1)

    def level(self, ds: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels [h, w, 3] of level ``ds`` at (x, y); outside the level they are glass."""
        kept = self.arrays[ds][y : y + h, x : x + w]
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        if kept.dtype != np.uint8:
            n = ds * ds
            kept = ((kept + n // 2) // n).astype(np.uint8)
        out[: kept.shape[0], : kept.shape[1]] = kept
        return out


def _tiles(
    regions: Sequence[Region], shape: tuple[int, int], tile: int, pyramid: _Pyramid | None = None
) -> Iterator[np.ndarray]:
    """Level-0 tiles row by row, each also added to ``pyramid``."""
    height, width = shape
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            pixels = render(regions, tx, ty, tile, tile)
            if pyramid is not None:
                pyramid.add(pixels, tx, ty)
            yield pixels


def _level(regions: Sequence[Region], pyramid: _Pyramid, ds: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Pixels [h, w, 3] at (x, y) of the level with downsample ``ds``: from the pyramid's sums
    when it kept them, else rendered afresh from level 0."""
    if ds in pyramid.arrays:
        return pyramid.level(ds, x, y, w, h)
    return _area_mean(render(regions, x * ds, y * ds, w * ds, h * ds), ds)


def _level_tiles(
    regions: Sequence[Region], pyramid: _Pyramid, ds: int, shape: tuple[int, int], tile: int
) -> Iterator[np.ndarray]:
    height, width = shape
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            yield _level(regions, pyramid, ds, tx, ty, tile, tile)


def _kept_levels(shapes: dict[int, tuple[int, int]], budget: int, *, tile: int) -> dict[int, tuple[int, int]]:
    """The levels (smallest first) whose arrays (see :class:`_Pyramid`) fit in ``budget`` bytes together."""
    chosen, used = {}, 0
    for ds, (h, w) in sorted(shapes.items(), key=lambda item: item[1][0] * item[1][1]):
        size = h * w * 3 * (1 if tile % ds == 0 else 4)
        if used + size > budget:
            break
        chosen[ds], used = (h, w), used + size
    return chosen


def write_slide(
    path: str | os.PathLike[str],
    *,
    size: tuple[int, int],
    mpp: float,
    regions: Sequence[Region],
    fmt: SlideFormat = "tiff",
    downsamples: Sequence[int] = (1, 4, 16),
    tile: int = 256,
    quality: int = 90,
    write_mpp: bool = True,
) -> Path:
    """Write a tiled, JPEG-compressed pyramidal slide that OpenSlide and tiffslide both read.

    ``fmt="svs"`` writes an Aperio-like SVS (ImageDescription with MPP and AppMag, every level a
    full-resolution-type page as Aperio does); ``fmt="tiff"`` a generic pyramidal TIFF with the
    resolution in the TIFF resolution tags. ``write_mpp=False`` leaves the resolution out (a slide
    that needs an mpp override).
    """
    import tifffile

    path = Path(path)
    width, height = size
    levels = [ds for ds in downsamples if ds == 1 or min(width, height) // ds >= tile // 2]
    if levels[:1] != [1] or any(tile % ds for ds in levels):
        raise ValueError(f"downsamples must start at 1 and divide the tile size {tile}, got {tuple(downsamples)}")
    shapes = {ds: (-(-height // ds), -(-width // ds)) for ds in levels}
    thumb_ds = max(1, -(-max(size) // 768))
    wanted = {ds: shapes[ds] for ds in levels if ds > 1}
    if fmt == "svs":
        wanted.setdefault(thumb_ds, (height // thumb_ds, width // thumb_ds))
    kept = _kept_levels(wanted, PYRAMID_BUDGET, tile=tile)
    scratch_dir = tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-pyramid-")
    with atomic_path(path, overwrite=True) as tmp, scratch_dir as scratch:
        pyramid = _Pyramid(Path(scratch), kept, tile=tile)
        with tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 2**31) as tw:
            for ds in levels:
                kwargs: dict = {}
                if fmt == "svs":
                    if ds == 1:
                        mag = 10.0 / mpp
                        desc = (
                            f"Aperio Image Library v12.0.0\r\n{width}x{height} ({tile}x{tile}) "
                            f"JPEG/RGB Q={quality}|AppMag = {mag:g}"
                        )
                        kwargs["description"] = desc + (f"|MPP = {mpp:g}" if write_mpp else "")
                    kwargs["subfiletype"] = 0
                else:
                    kwargs["subfiletype"] = 0 if ds == 1 else 1
                    if write_mpp:
                        kwargs["resolution"] = (1e4 / (mpp * ds), 1e4 / (mpp * ds))
                        kwargs["resolutionunit"] = "CENTIMETER"
                tiles = (
                    _tiles(regions, shapes[1], tile, pyramid)
                    if ds == 1
                    else _level_tiles(regions, pyramid, ds, shapes[ds], tile)
                )
                tw.write(
                    tiles,
                    shape=(*shapes[ds], 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": quality},
                    metadata=None,
                    **kwargs,
                )
                if fmt == "svs" and ds == 1:
                    thumb = _level(regions, pyramid, thumb_ds, 0, 0, width // thumb_ds, height // thumb_ds)
                    tw.write(thumb, photometric="rgb", compression="jpeg", metadata=None,
                             description=f"Aperio Image Library v12.0.0\r\n{width}x{height} -> "
                             f"{thumb.shape[1]}x{thumb.shape[0]}")
    return path


# --- a cohort for the demo and the workflow tests --------------------------------------------


@dataclass(frozen=True)
class CohortSlide:
    slide_id: str
    path: str
    label: str
    patient_id: str
    regions: tuple[Region, ...]


def make_cohort(
    out_dir: str | os.PathLike[str],
    *,
    n_slides: int = 12,
    size: tuple[int, int] = (4096, 3072),
    mpp: float = 0.5,
    seed: int = 0,
    fmt: SlideFormat = "svs",
) -> list[CohortSlide]:
    """Write a small labelled cohort: half the slides carry a planted region of the other texture.

    Writes ``out_dir/slides/{slide_id}.svs`` (or .tiff), ``out_dir/samples.tsv`` (slide_id, path,
    patient_id, label) and ``out_dir/truth.json`` (the planted regions, level-0 px). Labels are
    ``positive`` / ``negative``; two slides per patient, alternating patients positive (so 12
    slides are the fewest that cross-validation with a validation part takes: 3 patients a class,
    3 folds).
    """
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    width, height = size
    cohort: list[CohortSlide] = []
    for i in range(n_slides):
        positive = (i // 2) % 2 == 1  # the two slides of a patient share its label
        slide_id = f"slide_{i:03d}"
        # One or two tissue blobs, at random places inside the slide.
        regions = []
        for _ in range(int(rng.integers(1, 3))):
            w = int(rng.uniform(0.35, 0.55) * width)
            h = int(rng.uniform(0.45, 0.7) * height)
            x = int(rng.uniform(0.02, 0.98) * (width - w))
            y = int(rng.uniform(0.02, 0.98) * (height - h))
            regions.append(Region(x, y, w, h, "tissue"))
        if positive:
            host = regions[0]
            pw, ph = int(host.w * 0.45), int(host.h * 0.45)
            regions.append(
                Region(host.x + (host.w - pw) // 2, host.y + (host.h - ph) // 2, pw, ph, "other")
            )
        path = out / "slides" / f"{slide_id}.{fmt}"
        write_slide(path, size=size, mpp=mpp, regions=regions, fmt=fmt)
        cohort.append(
            CohortSlide(
                slide_id=slide_id,
                path=str(path.resolve()),
                label="positive" if positive else "negative",
                patient_id=f"patient_{i // 2:03d}",
                regions=tuple(regions),
            )
        )
    columns = ("slide_id", "path", "patient_id", "label")
    write_table(out / "samples.tsv", [{c: getattr(s, c) for c in columns} for s in cohort], columns)
    truth = {s.slide_id: [asdict(r) for r in s.regions] for s in cohort}
    (out / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return cohort
