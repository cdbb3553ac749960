"""Slide reading: one reader interface over openslide-python and tiffslide.

Contract: every coordinate is in level-0 pixels; regions come back as RGB ``uint8`` arrays
(transparent pixels outside the scanned area are composited onto white); ``mpp`` is a checked
fact about the slide, never a guess.

Backends register themselves with :func:`register_backend`. ``backend="auto"`` tries tiffslide
first for SVS and generic TIFF (it decodes regions about 3x faster there) and OpenSlide first for
everything else (DICOM, MRXS and others tiffslide cannot read; NDPI, which OpenSlide decodes
faster); when the first cannot open the file, the other is tried.
"""

from __future__ import annotations

import math
import os
import re
import struct
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
from PIL import Image

from wsitools.errors import SlideError, one_line
from wsitools.types import MPP_MAX, MPP_MIN, Level0Px, MicronsPerPixel

Backend = Literal["auto", "openslide", "tiffslide"]

MPP_XY_TOLERANCE = 0.05
"""Largest relative difference between mpp-x and mpp-y accepted (square pixels assumed)."""

MPP_OVERRIDE_TOLERANCE = 0.05
"""Largest relative difference between an mpp override and the slide's own metadata mpp that
passes without a warning (an override meant for a slide without one, filled in for all)."""

_BACKENDS: dict[str, type[Slide]] = {}


PYRAMID_ASPECT_TOLERANCE = 0.05
"""How far a level's x and y downsamples may differ (relative) for it to count as a pyramid level."""

MAX_PAGES_CHECKED = 64
"""Pages of a TIFF compared with its level 0 when opened (slides hold a handful; an OME-TIFF of
many planes is not read page by page)."""

MAX_TIFF_PAGES = 1000
"""The most pages (IFDs) a TIFF given to tiffslide may have. A slide holds a handful (SVS: level
0, a few reduced levels, thumbnail, label, macro; a pyramid of some planes a few hundred at
most), while tifffile's sorting of pages into series grows with their square: 1000 reduced pages
take a few seconds, 100 000 most of an hour (:func:`tiff_page_count`)."""


class Bounds(NamedTuple):
    """A rectangle of level 0: its top-left ``x``, ``y`` and its ``width``, ``height``, in level-0 px."""

    x: int
    y: int
    width: int
    height: int


OPENSLIDE_BOUNDS = tuple(f"openslide.bounds-{key}" for key in ("x", "y", "width", "height"))
"""The properties in which OpenSlide reports the scanned part of level 0 (MRXS, Leica SCN,
Ventana BIF and a few others; never SVS or generic TIFF)."""


class SlideOpenError(SlideError):
    """The backend cannot open the file at all (as opposed to a slide with bad metadata)."""


def register_backend(name: str) -> Callable[[type[Slide]], type[Slide]]:
    """Class decorator that makes a :class:`Slide` subclass available as ``backend=name``."""

    def deco(cls: type[Slide]) -> type[Slide]:
        cls.backend = name
        _BACKENDS[name] = cls
        return cls

    return deco


def resize_rgb(
    image: np.ndarray,
    size: tuple[int, int],
    *,
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Resize an RGB uint8 array (or its sub-pixel ``box`` = x0, y0, x1, y1) to ``size`` = (w, h).

    Area averaging (box filter) when shrinking, bicubic when enlarging: the one resampling rule
    used by tiling, thumbnails and the tests' reference reads.
    """
    h, w = image.shape[:2]
    box = box or (0.0, 0.0, float(w), float(h))
    bw, bh = box[2] - box[0], box[3] - box[1]
    if (bw, bh) == (size[0], size[1]) and float(box[0]).is_integer() and float(box[1]).is_integer():
        x0, y0 = int(box[0]), int(box[1])
        return image[y0 : y0 + size[1], x0 : x0 + size[0]]
    shrinking = size[0] < bw or size[1] < bh
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(image).resize(size, resample, box=box))


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite an RGBA array onto white (openslide returns transparent pixels off-slide)."""
    if rgba.shape[-1] == 3:
        return rgba
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.float32) / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def whole_downsamples(
    dimensions: tuple[int, int], level_dimensions: Sequence[tuple[int, int]], downsamples: Sequence[float]
) -> tuple[float, ...]:
    """The levels' downsamples, each made the whole number k when the level is level 0 shrunk
    by k (each side ``floor`` or ``ceil`` of level 0's over k), as scanners and libvips write
    pyramids; other levels keep theirs.

    Backends report the ratio of the sides (2.0009 for a 2689 px level 0 over 1344), which maps
    level px to level 0 a little off the way the level was made, drifting across the slide; a
    level read at the target resolution then had to be resampled instead of copied.
    """
    out = []
    for size, ds in zip(level_dimensions, downsamples):
        k = _whole_factor(dimensions, size, ds)
        out.append(float(k) if k else float(ds))
    return tuple(out)


def _whole_factor(dimensions: tuple[int, int], size: tuple[int, int], downsample: float) -> int | None:
    """The whole k nearest ``downsample`` when a level of ``size`` is level 0 (``dimensions``)
    shrunk by k, each side ``floor`` or ``ceil`` of level 0's over k; else None."""
    k = max(1, round(downsample))
    whole = all(side in (dim // k, -(-dim // k)) for side, dim in zip(size, dimensions))
    return k if whole else None


def axis_downsamples(
    dimensions: tuple[int, int], level_dimensions: Sequence[tuple[int, int]], downsamples: Sequence[float]
) -> tuple[tuple[float, float], ...]:
    """Level-0 px per level px along (x, y), for each level: the whole factor k on both axes
    where the level is level 0 shrunk by k (:func:`whole_downsamples`), else each side's own
    ratio (level 0's width over the level's, heights likewise).

    Backends keep one downsample per level, the mean of the two ratios. A level whose sides were
    shrunk by factors a little apart (within :data:`PYRAMID_ASPECT_TOLERANCE`, so it is read)
    mapped with that mean drifts from its true place along both axes, by about 10 level-0 px
    across 2000 px at 1 % apart.
    """
    out = []
    for (w, h), ds in zip(level_dimensions, downsamples):
        k = _whole_factor(dimensions, (w, h), ds)
        out.append((float(k), float(k)) if k else (dimensions[0] / max(w, 1), dimensions[1] / max(h, 1)))
    return tuple(out)


def shrunk_alike(large: tuple[int, int], small: tuple[int, int]) -> bool:
    """Whether ``small`` = (w, h) is ``large`` shrunk by factors within
    :data:`PYRAMID_ASPECT_TOLERANCE` (relative) of each other along x and y."""
    rx, ry = large[0] / max(small[0], 1), large[1] / max(small[1], 1)
    return abs(rx - ry) <= PYRAMID_ASPECT_TOLERANCE * max(rx, ry)


ASSOCIATED_IMAGE = re.compile(r"^\s*(label|macro)\b", re.IGNORECASE | re.MULTILINE)
"""How an Aperio label or macro page's ImageDescription names it (a line ``label 415x422``)."""

SUBFILE_MASK = 4
"""The NewSubfileType bit of a transparency mask page."""


def larger_tiff_page(tif: Any, dimensions: tuple[int, int]) -> str | None:
    """A line naming the largest page (of the first :data:`MAX_PAGES_CHECKED`) of the open
    ``tifffile.TiffFile`` ``tif`` that holds the slide's image at more pixels than the level 0 a
    backend found (``dimensions``); None when there is none.

    In a pyramid stored smallest page first, tiffslide takes the first page for the slide, and
    OpenSlide keeps the first page and those flagged as reduced, dropping a full-resolution page
    after them: either would tile a reduced page, enlarged, at its coarser resolution. A page
    counts when it has level 0's shape (:func:`shrunk_alike`) and is neither a transparency mask
    nor an Aperio label or macro image; other associated images have their own shape.
    """
    w0, h0 = dimensions
    try:
        sizes = {
            index: (int(page.imagewidth), int(page.imagelength))
            for index, page in enumerate(tif.pages[:MAX_PAGES_CHECKED])
            if not int(getattr(page, "subfiletype", 0)) & SUBFILE_MASK
            and not ASSOCIATED_IMAGE.search(getattr(page, "description", "") or "")
        }
    except Exception:  # unreadable pages: nothing to compare
        return None
    larger = {i: (w, h) for i, (w, h) in sizes.items() if w * h > w0 * h0 and shrunk_alike((w, h), (w0, h0))}
    if not larger:
        return None
    index = max(larger, key=lambda i: larger[i][0] * larger[i][1])
    w, h = larger[index]
    return (
        f"page {index} holds a {w} x {h} px image, larger than the {w0} x {h0} px level 0 found "
        "(a pyramid stored smallest page first?)"
    )


def tiff_page_count(path: Path, *, limit: int) -> int | None:
    """The pages (IFDs of the main chain) of the TIFF at ``path``, counted no further than
    ``limit + 1``; None where it is no TIFF (classic or BigTIFF). Only the chain of IFD offsets is
    read (a few bytes per page), so a file of any number of pages is judged at once; a chain that
    loops or points past the end stops the count (the backend says what is wrong with it)."""
    with open(path, "rb") as f:
        head = f.read(16)
        order = {b"II": "<", b"MM": ">"}.get(head[:2])
        if order is None or len(head) < 16:
            return None
        version = struct.unpack(order + "H", head[2:4])[0]
        if version == 42:  # classic: 2-byte entry counts, 12-byte entries, 4-byte offsets
            count, entry, pointer, offset = "H", 12, "I", struct.unpack(order + "I", head[4:8])[0]
        elif version == 43:  # BigTIFF: 8-byte counts, 20-byte entries, 8-byte offsets
            count, entry, pointer, offset = "Q", 20, "Q", struct.unpack(order + "Q", head[8:16])[0]
        else:
            return None
        count_size, pointer_size = struct.calcsize(order + count), struct.calcsize(order + pointer)
        size, seen = os.fstat(f.fileno()).st_size, set()
        while offset and offset not in seen and offset + count_size <= size and len(seen) <= limit:
            seen.add(offset)
            f.seek(offset)
            entries = struct.unpack(order + count, f.read(count_size))[0]
            f.seek(offset + count_size + entries * entry)
            raw = f.read(pointer_size)
            if len(raw) < pointer_size:
                break
            offset = struct.unpack(order + pointer, raw)[0]
        return len(seen)


def _float_or_none(value: Any) -> float | None:
    """``value`` (a number, or a metadata string) as a positive finite float, else None.

    A string may have one comma as its decimal separator and no point (``"0,5"``, as Aperio
    files written in a decimal-comma locale hold, and as OpenSlide reads them); one with a
    comma and a point (``"1,234.5"``, a thousands separator) is no number.
    """
    if isinstance(value, str) and value.count(",") == 1 and "." not in value:
        value = value.replace(",", ".")
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _tiff_resolution_mpp(path: Path, *, size: tuple[int, int]) -> tuple[float | None, float | None]:
    """mpp from the TIFF XResolution/YResolution tags of the first page of ``size`` = (w, h),
    level 0's (else the first page), if present and metric."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            pages = tif.pages[:MAX_PAGES_CHECKED]
            page = next((p for p in pages if (p.imagewidth, p.imagelength) == tuple(size)), tif.pages[0])
            tags = page.tags
            unit = tags.get("ResolutionUnit")
            xres, yres = tags.get("XResolution"), tags.get("YResolution")
            if unit is None or xres is None or yres is None:
                return None, None
            um_per_unit = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}.get(int(unit.value))  # inch, cm, mm, um
            if um_per_unit is None:
                return None, None

            def to_mpp(v: Any) -> float | None:
                num, den = v if isinstance(v, tuple) else (v, 1)
                ppu = _float_or_none(num / den) if den else None
                return um_per_unit / ppu if ppu else None

            return to_mpp(xres.value), to_mpp(yres.value)
    except Exception:  # not a TIFF, or unreadable tags: no resolution from this source
        return None, None


class Slide(ABC):
    """A whole-slide image opened by one backend.

    Attributes set by backends: ``dimensions``, ``level_dimensions``, ``backend_downsamples``
    (the backend's own), ``properties``. ``level_downsamples`` are the backend's, made whole
    where a level is level 0 shrunk by a whole factor (:func:`whole_downsamples`): a level's
    resolution. ``level_downsamples_xy`` map level-0 px to the level's along each axis
    (:func:`axis_downsamples`). Opening checks that no page of a TIFF holds the image at more
    pixels than the level 0 found (:func:`larger_tiff_page`), and decodes a few pixels of the
    coarsest level, so a file whose pixels no backend can decode (an unknown compression, a broken tile stream) is reported as
    that, before anything is judged from its metadata. The resolution ``mpp`` is resolved once
    at open time (the override, else the metadata, else :class:`SlideError`); with
    ``require_mpp=False`` a slide without a usable one still opens, ``mpp_problem`` says why, and
    only reading ``mpp`` raises.
    """

    backend: ClassVar[str]
    property_prefix: ClassVar[str]

    dimensions: tuple[Level0Px, Level0Px]
    level_dimensions: tuple[tuple[int, int], ...]
    backend_downsamples: tuple[float, ...]
    level_downsamples: tuple[float, ...]
    level_downsamples_xy: tuple[tuple[float, float], ...]
    properties: Mapping[str, str]

    def __init__(
        self, path: str | os.PathLike[str], *, mpp_override: float | None = None, require_mpp: bool = True
    ):
        check_slide_file(Path(path))
        self.path = Path(path).resolve()
        self.mpp_override = mpp_override
        self.require_mpp = require_mpp
        try:
            self._open()
        except SlideError:
            raise
        except Exception as exc:
            raise SlideOpenError(f"{self.path}: cannot be opened by {self.backend}: {one_line(exc)}") from None
        larger = self._larger_tiff_page()
        if larger is not None:
            self.close()
            raise SlideOpenError(f"{self.path}: cannot be opened by {self.backend}: {larger}")
        self.level_downsamples = whole_downsamples(self.dimensions, self.level_dimensions, self.backend_downsamples)
        self.level_downsamples_xy = axis_downsamples(self.dimensions, self.level_dimensions, self.level_downsamples)
        self._probe()
        self._mpp: MicronsPerPixel | None = None
        self.mpp_problem: str | None = None
        try:
            self._mpp = self._resolve_mpp(mpp_override)
        except SlideError as exc:
            if require_mpp:
                self.close()
                raise
            self.mpp_problem = str(exc).removeprefix(f"{self.path}: ")

    def _probe(self) -> None:
        """Decode a few pixels of the coarsest level; a failure is a :class:`SlideOpenError`."""
        level = len(self.level_dimensions) - 1
        if level < 0:
            self.close()
            raise SlideOpenError(f"{self.path}: cannot be opened by {self.backend}: it has no image levels")
        w, h = self.level_dimensions[level]
        try:
            region = np.asarray(self._read((0, 0), level, (max(1, min(16, w)), max(1, min(16, h)))))
            if region.ndim != 3 or region.shape[-1] not in (3, 4):
                raise ValueError(f"pixels of shape {region.shape}, expected RGB(A)")
            if region.dtype != np.uint8:
                raise ValueError(f"pixels of type {region.dtype}, expected 8-bit (uint8)")
        except Exception as exc:
            self.close()
            raise SlideOpenError(
                f"{self.path}: cannot be opened by {self.backend}: its pixels cannot be decoded "
                f"({type(exc).__name__}: {one_line(exc)})"
            ) from None

    @property
    def mpp(self) -> MicronsPerPixel:
        """Level-0 resolution in um/px (a :class:`SlideError` saying why when it has none)."""
        if self._mpp is None:
            raise SlideError(f"{self.path}: {self.mpp_problem}")
        return self._mpp

    # --- backend hooks -------------------------------------------------------------------
    @abstractmethod
    def _open(self) -> None:
        """Open the file and set dimensions, level_dimensions, backend_downsamples, properties."""

    @abstractmethod
    def _read(self, origin: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size`` px of ``level`` from ``origin`` in that level's px, as an RGB or RGBA
        uint8 array (backend-native)."""

    @abstractmethod
    def close(self) -> None:
        """Release the file handle."""

    # --- the uniform interface -----------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def vendor(self) -> str | None:
        return self.properties.get(f"{self.property_prefix}.vendor")

    @property
    def objective_power(self) -> float | None:
        return _float_or_none(self.properties.get(f"{self.property_prefix}.objective-power"))

    @property
    def bounds(self) -> Bounds:
        """The scanned part of level 0 as OpenSlide reports it (:data:`OPENSLIDE_BOUNDS`, all four
        whole numbers), else the whole of level 0.

        Every coordinate wsitools writes is in the whole level-0 frame (patch stores, feature
        stores, exports, montage captions). QuPath's OpenSlide reader shows only this rectangle
        and puts its top-left at (0, 0), so the GeoJSON written for QuPath (tissue and attention)
        is shifted by ``-(x, y)``. Only OpenSlide's properties count: tiffslide leaves its bounds
        empty, and the files it reads (SVS, generic TIFF) have none in OpenSlide either.
        """
        try:
            x, y, width, height = (int(self.properties[key]) for key in OPENSLIDE_BOUNDS)
        except (KeyError, ValueError):
            return Bounds(0, 0, int(self.dimensions[0]), int(self.dimensions[1]))
        return Bounds(x, y, width, height)

    def level_mpp(self, level: int) -> MicronsPerPixel:
        return MicronsPerPixel(self.mpp * self.level_downsamples[level])

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read ``size`` = (w, h) pixels of ``level`` whose top-left is ``location`` in level-0 px
        (the level's pixel nearest to ``location / level_downsamples_xy[level]``, axis by axis).

        Returns an RGB uint8 array [h, w, 3]; areas outside the slide are white.
        """
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path}: level {level} does not exist ({self.level_count} levels)")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {size}")
        dx, dy = self.level_downsamples_xy[level]
        origin = (round(location[0] / dx), round(location[1] / dy))
        try:
            region = self._read(origin, level, (w, h))
        except Exception as exc:
            raise SlideError(
                f"{self.path}: reading {w}x{h} px at {tuple(location)} (level {level}) failed: {exc}"
            ) from None
        return _rgba_to_rgb(np.asarray(region))

    def read_region_resized(
        self,
        location: tuple[float, float],
        level: int,
        size: tuple[float, float],
        out_size: tuple[int, int],
    ) -> np.ndarray:
        """The region at ``location`` (level-0 px) spanning ``size`` = (w, h) px of ``level``, as
        ``out_size``.

        Location and size may be fractional: the covering whole pixels are read and resampled
        from the exact sub-pixel box, so every backend and every read path (one tile, or a
        block of tiles) samples the same geometry. A region of ``e`` level-0 px a side spans
        ``e / level_downsamples_xy[level]`` px of the level along each axis.
        """
        dx, dy = self.level_downsamples_xy[level]
        lx, ly = location[0] / dx, location[1] / dy
        ix, iy = math.floor(lx), math.floor(ly)
        fx, fy = lx - ix, ly - iy
        w, h = math.ceil(fx + size[0]), math.ceil(fy + size[1])
        region = self.read_region((round(ix * dx), round(iy * dy)), level, (w, h))
        return resize_rgb(region, out_size, box=(fx, fy, fx + size[0], fy + size[1]))

    def _larger_tiff_page(self) -> str | None:
        """:func:`larger_tiff_page` of the slide's file, opened for it; None for a file that is
        no TIFF (MRXS, DICOM...). A backend that holds the file open as a TIFF passes its own."""
        import tifffile

        try:
            with tifffile.TiffFile(self.path) as tif:
                return larger_tiff_page(tif, self.dimensions)
        except Exception:  # not a TIFF: nothing to compare
            return None

    def level_in_pyramid(self, level: int) -> bool:
        """Whether ``level`` is level 0 shrunk alike along both axes (within 5 %), as pyramid
        levels are. A backend may list another reduced image of the file as a level (a label
        strip flagged as reduced in a generic TIFF); it is never read for tiles or thumbnails."""
        return shrunk_alike(self.dimensions, self.level_dimensions[level])

    def best_level_for_mpp(self, mpp: float, *, tolerance: float = 0.01) -> int:
        """The coarsest pyramid level whose mpp is not coarser than ``mpp`` (within ``tolerance``).

        Reading it and shrinking keeps every detail the target resolution can hold, while reading
        far fewer pixels than level 0 whenever a finer-than-target level exists.
        """
        best = 0
        for level in range(self.level_count):
            if not self.level_in_pyramid(level):
                continue
            if self.level_mpp(level) <= mpp * (1.0 + tolerance):
                if self.level_downsamples[level] >= self.level_downsamples[best]:
                    best = level
        return best

    def thumbnail(self, *, mpp: float, block: int = 4096) -> tuple[np.ndarray, tuple[float, float]]:
        """The whole slide at about ``mpp`` um/px, read in blocks so memory stays bounded.

        Returns the image and its downsample along (x, y) (level-0 px per thumbnail px; the
        two differ a little, as each side is rounded to whole px). Never finer than level 0.
        """
        w0, h0 = self.dimensions
        target_ds = max(1.0, mpp / self.mpp)
        out_w, out_h = max(1, round(w0 / target_ds)), max(1, round(h0 / target_ds))
        level = self.best_level_for_mpp(self.mpp * target_ds)
        ldx, ldy = self.level_downsamples_xy[level]
        lw, lh = self.level_dimensions[level]
        sx, sy = out_w / lw, out_h / lh  # thumbnail px per level px
        step_x = max(1, int(block * sx))  # output px per block, so input blocks stay <= block
        step_y = max(1, int(block * sy))
        out = np.empty((out_h, out_w, 3), np.uint8)
        for oy in range(0, out_h, step_y):
            oy1 = min(out_h, oy + step_y)
            ly, ly1 = round(oy / sy), min(lh, max(round(oy1 / sy), round(oy / sy) + 1))
            for ox in range(0, out_w, step_x):
                ox1 = min(out_w, ox + step_x)
                lx, lx1 = round(ox / sx), min(lw, max(round(ox1 / sx), round(ox / sx) + 1))
                region = self.read_region(
                    (round(lx * ldx), round(ly * ldy)), level, (lx1 - lx, ly1 - ly)
                )
                out[oy:oy1, ox:ox1] = resize_rgb(region, (ox1 - ox, oy1 - oy))
        return out, (w0 / out_w, h0 / out_h)

    def info(self) -> dict[str, Any]:
        """Everything ``wsitools info`` prints, JSON-serialisable; without a usable mpp the
        resolutions are None and ``mpp_problem`` says why."""
        known = self._mpp is not None
        return {
            "path": str(self.path),
            "name": self.path.name,
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [float(d) for d in self.level_downsamples],
            "level_mpp": [float(self.level_mpp(i)) if known else None for i in range(self.level_count)],
            "mpp": float(self.mpp) if known else None,
            "mpp_source": ("override" if self.mpp_override is not None else "metadata") if known else None,
            "mpp_problem": self.mpp_problem,
            "objective_power": self.objective_power,
        }

    # --- resolution ----------------------------------------------------------------------
    def metadata_mpp(self) -> tuple[float | None, float | None]:
        """(mpp-x, mpp-y) from the backend's properties, else from the TIFF resolution tags of
        level 0's page. For a generic TIFF the tags win: the backends take them from the first
        page, which is not level 0 in a pyramid stored smallest first."""
        x = _float_or_none(self.properties.get(f"{self.property_prefix}.mpp-x"))
        y = _float_or_none(self.properties.get(f"{self.property_prefix}.mpp-y"))
        if (x is None and y is None) or self.vendor in (None, "generic-tiff"):
            tx, ty = _tiff_resolution_mpp(self.path, size=self.dimensions)
            if tx is not None or ty is not None:
                x, y = tx, ty
        return x, y

    def _unreadable_mpp(self) -> str | None:
        """``key = 'value'`` of the first mpp property (the backend's, then Aperio's own, which
        OpenSlide leaves out of its ``openslide.mpp-x`` when it cannot read it) that is there but
        no usable number (``'0.5 um'``, ``'0'``), else None."""
        for key in (f"{self.property_prefix}.mpp-x", f"{self.property_prefix}.mpp-y", "aperio.MPP"):
            value = self.properties.get(key)
            if value is not None and value.strip() and _float_or_none(value) is None:
                return f"{key} = {value!r}"
        return None

    def mpp_override_conflict(self) -> str | None:
        """A line naming the slide and both values when an mpp override differs from the slide's
        own (plausible) metadata mpp by more than :data:`MPP_OVERRIDE_TOLERANCE`: the override
        wins, and a wrong one (a scanner's nominal 0.25 given for a 20x slide) silently tiles at
        another scale. None without an override, without a usable metadata mpp, or when close."""
        if self.mpp_override is None:
            return None
        values = [v for v in self.metadata_mpp() if v is not None]
        metadata = sum(values) / len(values) if values else None
        if metadata is None or not MPP_MIN <= metadata <= MPP_MAX:
            return None
        override = float(self.mpp_override)
        difference = abs(override - metadata) / metadata
        if difference <= MPP_OVERRIDE_TOLERANCE:
            return None
        return (
            f"{self.path}: the mpp override {override:g} um/px differs from the slide's metadata mpp "
            f"{metadata:g} um/px by {difference:.0%}; the override is used (check the samples sheet's mpp column "
            "or --mpp-override)"
        )

    def _resolve_mpp(self, override: float | None) -> MicronsPerPixel:
        if override is not None:
            value = _float_or_none(override)
            if value is None or not MPP_MIN <= value <= MPP_MAX:
                raise SlideError(
                    f"{self.path}: mpp override {override!r} is outside {MPP_MIN}-{MPP_MAX} um/px"
                )
            return MicronsPerPixel(value)
        x, y = self.metadata_mpp()
        if x is None and y is None:
            unreadable = self._unreadable_mpp()
            what = (
                f"the slide's metadata resolution {unreadable} is not a positive number of um/px"
                if unreadable else "the slide's metadata gives no resolution (mpp)"
            )
            raise SlideError(f"{self.path}: {what}; give one with --mpp-override (or the samples sheet's mpp column)")
        x = x if x is not None else y
        y = y if y is not None else x
        assert x is not None and y is not None
        for axis, v in (("x", x), ("y", y)):
            if not MPP_MIN <= v <= MPP_MAX:
                raise SlideError(
                    f"{self.path}: metadata mpp-{axis} = {v:g} um/px is implausible for a slide "
                    f"(expected {MPP_MIN}-{MPP_MAX}); give the true value with --mpp-override"
                )
        if abs(x - y) / max(x, y) > MPP_XY_TOLERANCE:
            raise SlideError(
                f"{self.path}: mpp-x = {x:g} and mpp-y = {y:g} differ by more than "
                f"{MPP_XY_TOLERANCE:.0%}; non-square pixels are not supported"
            )
        return MicronsPerPixel((x + y) / 2.0)

    # --- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Callable[..., Slide], tuple[Any, ...]]:
        """Pickle by path: a worker process re-opens the file itself."""
        return _reopen, (str(self.path), self.backend, self.mpp_override, self.require_mpp)

    def __repr__(self) -> str:
        mpp = f"{self._mpp:.4g}" if self._mpp is not None else "unknown"
        return f"<{type(self).__name__} {self.path.name} {self.dimensions} mpp={mpp}>"


def _reopen(path: str, backend: str, mpp_override: float | None, require_mpp: bool = True) -> Slide:
    return open_slide(path, backend=backend, mpp_override=mpp_override, require_mpp=require_mpp)  # type: ignore[arg-type]


@register_backend("openslide")
class OpenSlideSlide(Slide):
    """openslide-python over the OpenSlide C library (openslide-bin)."""

    property_prefix = "openslide"

    def _open(self) -> None:
        import openslide

        self._osr = openslide.OpenSlide(str(self.path))
        self.dimensions = tuple(self._osr.dimensions)  # type: ignore[assignment]
        self.level_dimensions = tuple(tuple(d) for d in self._osr.level_dimensions)
        self.backend_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        self.properties = dict(self._osr.properties)

    def _read(self, origin: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        # OpenSlide takes level-0 px and divides by its own downsample: the nearest it can get
        # to the level's pixel (it resamples by what is left over where that is not whole).
        ds = self.backend_downsamples[level]
        return np.asarray(self._osr.read_region((round(origin[0] * ds), round(origin[1] * ds)), level, size))

    def close(self) -> None:
        self._osr.close()



class TileCache:
    """Decoded tiles, bounded in bytes and safe across threads; spent tiles go out first.

    Regions that share a border share the TIFF tiles along it; without a cache each is decoded
    once per region that touches it (1.3 decodes per 224 px patch on 256 px JPEG tiles).
    OpenSlide keeps a 32 MiB tile cache per slide for the same reason. A tile put as ``spent``
    (the reader expects no later region to need it, :meth:`TiffSlideSlide._read_tiles_direct`)
    is evicted before any other, so the tiles a later region needs survive a long row of
    regions; within each kind the least recently used goes first.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._kept: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._spent: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            for tiles in (self._kept, self._spent):
                tile = tiles.get(key)
                if tile is not None:
                    tiles.move_to_end(key)
                    return tile
            return None

    def put(self, key: tuple[int, int], tile: np.ndarray, *, spent: bool = False) -> None:
        with self._lock:
            old = self._kept.pop(key, None)
            if old is None:
                old = self._spent.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if tile.nbytes > self.max_bytes:
                return
            (self._spent if spent else self._kept)[key] = tile
            self._bytes += tile.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = (self._spent or self._kept).popitem(last=False)
                self._bytes -= evicted.nbytes


JPEG_COMPRESSION = 7
"""The TIFF compression tag value of (new-style) JPEG, the compression of nearly every WSI."""


def _jpeg_stream(data: bytes, tables: bytes | None) -> bytes:
    """A TIFF JPEG tile as a whole JPEG: the shared JPEGTables spliced in before its own segments."""
    return tables[:-2] + data[2:] if tables else data


def check_jpeg(data: bytes, tables: bytes | None, *, where: str) -> None:
    """Raise :class:`SlideError` if a JPEG tile does not decode cleanly.

    imagecodecs (tiffslide's decoder) ignores libjpeg's warnings, so corrupt entropy-coded data
    (bad Huffman codes, bytes left over before the end marker, a premature end) decodes silently
    into garbage. This decodes the tile once more with simplejpeg in strict mode, at 1/8 scale in
    grey (the entropy decoding is complete; the inverse DCT and colour work mostly skipped), where
    any warning is an error. ``tables`` are the TIFF's shared JPEGTables. A header TurboJPEG
    cannot classify (an unusual chroma subsampling) is left to the decoder proper, which fails on
    a broken header itself.
    """
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(_jpeg_stream(data, tables), colorspace="GRAY", strict=True, min_height=1, min_width=1)
    except ValueError as exc:
        if not str(exc).startswith("tjDecompressHeader"):
            raise SlideError(f"corrupt JPEG data in {where}: {exc}") from None


PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR = 2, 6
"""TIFF photometric interpretations of JPEG-compressed RGB pages."""

PHOTOMETRIC_SEPARATED, EXTRASAMPLE_UNSPECIFIED, ASSOCIATED_ALPHA = 5, 0, 1
"""TIFF photometric of CMYK pixels, and the ExtraSamples values of a sample of unspecified
meaning and of premultiplied alpha."""


def decode_jpeg_strict(
    data: bytes, tables: bytes | None, *, photometric: int, shape: tuple[int, int], where: str
) -> np.ndarray | None:
    """The RGB pixels [h, w, 3] of a TIFF JPEG tile, decoded once, in strict mode (any libjpeg
    warning, i.e. corrupt data, is a :class:`SlideError` naming ``where``).

    The same pixels as the TIFF decoder's (both are libjpeg-turbo with its default inverse DCT and
    upsampling) whenever TurboJPEG reads the tile's colour space as the TIFF's ``photometric``
    says it is: YCbCr or RGB data on a YCbCr page (the TIFF decoder keeps libjpeg's own reading
    there), RGB data on an RGB page. Otherwise (an RGB page whose JPEG looks like YCbCr, as in
    some Aperio files, which only the TIFF decoder can be told to read as RGB; a header TurboJPEG
    cannot classify; a tile of another ``shape`` = (h, w)) None: the caller checks the tile with
    :func:`check_jpeg` and decodes it the TIFF way. So a tile is decoded once where it can be,
    not checked by one decoder and decoded by another.
    """
    import simplejpeg

    stream = _jpeg_stream(data, tables)
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(stream)
    except ValueError:
        return None
    readable = {PHOTOMETRIC_YCBCR: ("YCbCr", "RGB"), PHOTOMETRIC_RGB: ("RGB",)}.get(photometric, ())
    if colorspace not in readable or (height, width) != shape:
        return None
    try:
        return simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=True)
    except ValueError as exc:
        raise SlideError(f"corrupt JPEG data in {where}: {exc}") from None


TILE_CACHE_BYTES = 32 * 2**20
"""Decoded-tile cache of a tiffslide-backed slide (OpenSlide's default size)."""


@register_backend("tiffslide")
class TiffSlideSlide(Slide):
    """tiffslide: tifffile + imagecodecs, pure Python (no DICOM or MRXS)."""

    property_prefix = "tiffslide"

    def _open(self) -> None:
        import tiffslide

        pages = tiff_page_count(self.path, limit=MAX_TIFF_PAGES)
        if pages is not None and pages > MAX_TIFF_PAGES:
            raise ValueError(
                f"it has more than {MAX_TIFF_PAGES} pages (image file directories), more than any slide; "
                "tifffile's time to sort pages into series grows with their square"
            )
        self._ts = tiffslide.TiffSlide(str(self.path))
        self._pages: dict[int, Any] = {}
        self._tiles = TileCache(TILE_CACHE_BYTES)
        self.dimensions = tuple(self._ts.dimensions)  # type: ignore[assignment]
        self.level_dimensions = tuple(tuple(d) for d in self._ts.level_dimensions)
        self.backend_downsamples = tuple(float(d) for d in self._ts.level_downsamples)
        self.properties = {k: str(v) for k, v in self._ts.properties.items() if v is not None}
        self._check_levels()
        self._unspecified_extra = frozenset(
            level for level, pages in enumerate(self._series().levels)
            if tuple(pages.keyframe.extrasamples) == (EXTRASAMPLE_UNSPECIFIED,)
        )

    def _larger_tiff_page(self) -> str | None:
        return larger_tiff_page(self._ts.ts_tifffile, self.dimensions)

    def _series(self) -> Any:
        """The tifffile series tiffslide reads the slide from."""
        return self._ts.ts_tifffile.series[int(self.properties.get("tiffslide.series-index", 0))]

    def _check_levels(self) -> None:
        """ValueError for a file tiffslide would read wrong, so that ``auto`` gives it to OpenSlide:

        - any level's image data reaching past the end of the file (a copy cut short, or still
          being copied: named as that when opened, not found out tile by tile);
        - pixels whose fourth sample is not plain alpha: CMYK (tiffslide gives C, M, Y, K as RGBA,
          so every pixel composites to white) or premultiplied alpha (composited as if it were not).
        """
        size = self._ts.ts_tifffile.filehandle.size
        for level, pages in enumerate(self._series().levels):
            for page in pages.pages:
                if page is None:
                    continue
                if int(page.photometric) == PHOTOMETRIC_SEPARATED:
                    raise ValueError(f"level {level} holds CMYK pixels, which tiffslide does not convert to RGB")
                if ASSOCIATED_ALPHA in tuple(page.extrasamples):
                    raise ValueError(f"level {level} holds premultiplied alpha, which tiffslide does not undo")
                if not len(page.dataoffsets):
                    continue
                end = int(np.max(np.add(page.dataoffsets, page.databytecounts, dtype=np.int64)))
                if end > size:
                    raise ValueError(
                        f"the file is truncated: the image data of level {level} reaches byte {end}, "
                        f"the file has {size} bytes"
                    )

    def _read(self, origin: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """The region's RGB(A) pixels; a fourth sample of unspecified meaning (ExtraSamples 0) is
        dropped: it is no alpha, and taken for one (all zeros: fully transparent) every pixel
        would be white."""
        region = self._read_samples(origin, level, size)
        return np.ascontiguousarray(region[..., :3]) if level in self._unspecified_extra else region

    def _read_samples(self, origin: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """The region's pixels with every sample the level's page has."""
        page = self._tiled_page(level)
        if page is None:
            # tiffslide takes level-0 px and truncates their quotient by its own downsample
            ds = self.backend_downsamples[level]
            location = tuple(math.ceil(o * ds) if o >= 0 else math.floor(o * ds) for o in origin)
            region = np.array(self._ts.read_region(location, level, size, as_array=True))
            # tiffslide pads what lies off the image with black; the contract is white
            (x, y), (w, h), (lw, lh) = origin, size, self.level_dimensions[level]
            region[: max(0, min(h, -y))] = 255
            region[max(0, lh - y) :] = 255
            region[:, : max(0, min(w, -x))] = 255
            region[:, max(0, lw - x) :] = 255
            return region
        return self._read_tiles_direct(level, page, origin[0], origin[1], size)

    def _tiled_page(self, level: int) -> Any:
        """The level's TIFF page when its tiles can be decoded directly (tiled, chunky RGB(A))."""
        if level not in self._pages:
            pages = self._series().levels[level].pages
            page = pages[0] if len(pages) == 1 else None
            ok = (
                page is not None and page.is_tiled and page.planarconfig == 1
                and page.samplesperpixel in (3, 4) and page.bitspersample == 8 and page.imagedepth == 1
            )
            self._pages[level] = page if ok else None
        return self._pages[level]

    def _read_tiles_direct(self, level: int, page: Any, x: int, y: int, size: tuple[int, int]) -> np.ndarray:
        """Paste the TIFF tiles the region touches, decoding those not in the tile cache.

        tiffslide's general path goes through zarr's async machinery, about 4x slower than the
        decoder itself on JPEG tiles; this is the decoder plus a copy. Off-image pixels are white.

        Callers that read many regions read them in raster order (blocks of tiles, thumbnails),
        so a tile reaching past the region's right or bottom edge (into image pixels) is cached
        for the regions to the right and below, and any other tile is cached as spent (its last
        use, unless the next region overlaps this one): spent tiles are evicted first, so the
        tiles still needed, about one row of tiles across the level, stay cached, and none is
        decoded twice while that row fits in the cache. Any other read order only costs
        decodes, never pixels.
        """
        w, h = size
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        out = np.empty((h, w, page.samplesperpixel), np.uint8)
        inside_w = min(x + w, page.imagewidth) - max(x, 0)
        inside_h = min(y + h, page.imagelength) - max(y, 0)
        if x < 0 or y < 0 or inside_w < w or inside_h < h:
            out.fill(255)  # part of the region is off the image
        tx0, ty0 = max(0, x // tw), max(0, y // th)
        tx1 = min(across - 1, (x + w - 1) // tw)
        ty1 = min(-(-page.imagelength // th) - 1, (y + h - 1) // th)
        for ty in range(ty0, ty1 + 1):
            for tx in range(tx0, tx1 + 1):
                key = (level, ty * across + tx)
                tile = self._tiles.get(key)
                if tile is None:
                    tile = self._load_tile(page, key[1], level)
                needed_later = (
                    (tx + 1) * tw > x + w and x + w < page.imagewidth
                    or (ty + 1) * th > y + h and y + h < page.imagelength
                )
                self._tiles.put(key, tile, spent=not needed_later)
                # overlap of this tile [tx*tw, +tw) x [ty*th, +th) with the region, in both frames
                ax0, ay0 = max(x, tx * tw), max(y, ty * th)
                ax1 = min(x + w, (tx + 1) * tw, page.imagewidth)
                ay1 = min(y + h, (ty + 1) * th, page.imagelength)
                if ax1 > ax0 and ay1 > ay0:
                    out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = tile[
                        ay0 - ty * th : ay1 - ty * th, ax0 - tx * tw : ax1 - tx * tw
                    ]
        return out

    def _load_tile(self, page: Any, index: int, level: int) -> np.ndarray:
        """Tile ``index`` of ``page`` read from the file and decoded.

        A tile of no bytes is one the scanner left out (a sparse TIFF, as OpenSlide and libtiff
        read it): white, like any other pixel outside the scanned area.
        """
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if count == 0:
            return np.full((page.tilelength, page.tilewidth, page.samplesperpixel), 255, np.uint8)
        fh = self._ts.ts_tifffile.filehandle
        with fh.lock:
            fh.seek(offset)
            data = fh.read(count)
        return self._decode_tile(page, data, index, level)

    @staticmethod
    def _decode_tile(page: Any, data: bytes, index: int, level: int) -> np.ndarray:
        """Tile ``index`` of ``page`` from its bytes ``data``; a JPEG tile strictly (corrupt data
        is a :class:`SlideError`, never garbage pixels), in one decode where it can be."""
        if page.compression == JPEG_COMPRESSION and page.samplesperpixel == 3:
            where = f"TIFF tile {index} of level {level}"
            tile = decode_jpeg_strict(
                data, page.jpegtables, photometric=int(page.photometric),
                shape=(page.tilelength, page.tilewidth), where=where,
            )
            if tile is not None:
                return tile
            check_jpeg(data, page.jpegtables, where=where)
        return page.decode(data, index, jpegtables=page.jpegtables)[0][0]

    def close(self) -> None:
        self._ts.close()


TIFFSLIDE_FIRST = (".svs", ".tif", ".tiff")
"""Formats tiffslide decodes faster than OpenSlide (whole blocks through tifffile/imagecodecs,
about 3x on our tiling benchmark); every other format (NDPI, where OpenSlide is faster, DICOM,
MRXS, SCN, BIF, VMS...) goes to OpenSlide first."""


def choose_backend(path: str | os.PathLike[str]) -> str:
    """The backend ``auto`` tries first: tiffslide for SVS and generic TIFF, else OpenSlide.

    If the first choice cannot open the file, ``open_slide`` tries the other one.
    """
    return "tiffslide" if Path(path).suffix.lower() in TIFFSLIDE_FIRST else "openslide"


def check_slide_file(path: Path) -> None:
    """A :class:`SlideError` when ``path`` names nothing: missing, or a link that leads nowhere
    (a loop of links says so, not "no such file")."""
    try:
        path.stat()
    except FileNotFoundError:
        raise SlideError(f"{path}: no such slide file") from None
    except OSError as exc:
        raise SlideError(f"{path}: cannot be read: {exc.strerror or one_line(exc)}") from None


def open_slide(
    path: str | os.PathLike[str],
    *,
    backend: Backend = "auto",
    mpp_override: float | None = None,
    require_mpp: bool = True,
) -> Slide:
    """Open a slide with the chosen backend and resolve its mpp (see module docstring).

    ``require_mpp=False`` opens a slide without a usable mpp too (for ``wsitools info``): its
    ``mpp_problem`` says why, and reading its ``mpp`` raises :class:`SlideError`.
    """
    p = Path(path)
    check_slide_file(p)
    if p.is_dir():  # no slide format is a folder (MRXS and DICOM are opened by a file in theirs)
        if p.suffix == ".zarr" or (p / "zarr.json").is_file():
            raise SlideError(f"{p}: is a patch store (wsitools tile's output), expected a slide file")
        raise SlideError(
            f"{p}: is a directory, expected a slide file (for a folder's slides give the files, e.g. {p / '*.svs'})"
        )
    if not p.is_file():  # opening a named pipe would wait for a writer: the cohort would hang on it
        raise SlideError(f"{p}: is not a regular file (a pipe, socket or device), expected a slide file")
    if p.stat().st_size == 0:
        raise SlideError(f"{p}: is empty (0 bytes; a copy that failed?)")
    try:
        with open(p, "rb"):
            pass
    except OSError as exc:  # a backend would say "unsupported format" for a file it may not read
        raise SlideError(f"{p}: cannot be read: {exc.strerror or one_line(exc)}") from None
    if backend != "auto":
        if backend not in _BACKENDS:
            raise SlideError(
                f"{p}: unknown backend {backend!r} (choose from auto, {', '.join(_BACKENDS)})"
            )
        return _BACKENDS[backend](p, mpp_override=mpp_override, require_mpp=require_mpp)
    first = choose_backend(p)
    order = [first] + [name for name in _BACKENDS if name != first]
    failures: list[str] = []
    for name in order:
        try:
            return _BACKENDS[name](p, mpp_override=mpp_override, require_mpp=require_mpp)
        except SlideOpenError as exc:  # a wrong mpp is the slide's fault: no second opinion
            failures.append(str(exc).removeprefix(f"{p.resolve()}: "))
    raise SlideError(f"{p}: no backend can open it ({'; '.join(failures)})")
