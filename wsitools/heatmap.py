"""Attention heatmaps over slide thumbnails, and montages of the most attended tiles.

Inputs are an attention file (``attention/{slide_id}.h5`` from ``wsitools train``/``predict``:
attention per tile, level-0 coords, ``tile_size_level0``), the patch store (how the slide was
read, and the tiles of the montage) and the slide (for a thumbnail read at a low pyramid level,
never at full resolution). So a heatmap takes seconds per slide.

Values are shown per slide on a 0-1 scale: ``rank`` (default) maps each tile's attention to its
percentile within the slide, so the map is readable whatever the bag size (softmax attention
over 10^4 tiles is tiny everywhere); ``minmax`` rescales linearly between the slide's smallest
and largest attention. Where tiles overlap, their values are averaged.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from wsitools.errors import SlideError, StoreError
from wsitools.io import atomic_path
from wsitools.store import PatchStore
from wsitools.types import MicronsPerPixel, check_slide_id

log = logging.getLogger(__name__)

Scale = Literal["rank", "minmax"]
DEFAULT_THUMBNAIL_MPP = MicronsPerPixel(8.0)
"""Thumbnail resolution: 8 um/px shows a 20 x 15 mm slide in 2500 x 1900 px."""


@dataclass(frozen=True)
class AttentionMap:
    """One slide's attention per tile, as written by training or prediction."""

    slide_id: str
    attention: np.ndarray  # [N] float32
    coords: np.ndarray  # [N, 2] int64, level-0 top-left corners
    tile_size_level0: float
    attrs: dict[str, Any] = field(default_factory=dict)


def read_attention(path: str | os.PathLike[str]) -> AttentionMap:
    """Read an attention file; :class:`StoreError` naming it if it is not one."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("kind") != "attention" or "attention" not in f or "coords" not in f:
                raise StoreError(f"{path}: not an attention file (needs 'attention', 'coords', kind=attention)")
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            attention = np.asarray(f["attention"][()], dtype=np.float32)
            coords = np.asarray(f["coords"][()], dtype=np.int64)
    except OSError as exc:
        raise StoreError(f"{path}: cannot be read as an attention file: {exc}") from exc
    if "tile_size_level0" not in attrs:
        raise StoreError(f"{path}: lacks tile_size_level0 (the feature store did not record it)")
    if len(attention) != len(coords) or coords.ndim != 2 or coords.shape[1] != 2:
        raise StoreError(f"{path}: {len(attention)} attention values for coords of shape {coords.shape}")
    return AttentionMap(
        slide_id=str(attrs.get("slide_id", path.stem)),
        attention=attention,
        coords=coords,
        tile_size_level0=float(attrs["tile_size_level0"]),
        attrs=attrs,
    )


def display_values(attention: np.ndarray, *, scale: Scale = "rank") -> np.ndarray:
    """Attention mapped to [0, 1] for display (see the module docstring)."""
    a = np.asarray(attention, dtype=np.float64)
    if len(a) < 2:
        return np.ones_like(a)
    if scale == "rank":
        order = np.argsort(a, kind="mergesort")
        ranks = np.empty(len(a))
        ranks[order] = np.arange(len(a))
        return ranks / (len(a) - 1)
    if scale == "minmax":
        lo, hi = a.min(), a.max()
        return (a - lo) / (hi - lo) if hi > lo else np.ones_like(a)
    raise ValueError(f"unknown scale {scale!r}; use 'rank' or 'minmax'")


def attention_raster(
    amap: AttentionMap, *, shape: tuple[int, int], downsample: float, scale: Scale = "rank"
) -> np.ndarray:
    """Display values painted on a ``shape`` (h, w) grid whose pixels are ``downsample`` level-0
    px wide (the thumbnail's grid); NaN where no tile lies. Overlapping tiles are averaged."""
    h, w = shape
    values = display_values(amap.attention, scale=scale)
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.float64)
    x0 = np.floor(amap.coords[:, 0] / downsample).astype(np.int64)
    y0 = np.floor(amap.coords[:, 1] / downsample).astype(np.int64)
    x1 = np.ceil((amap.coords[:, 0] + amap.tile_size_level0) / downsample).astype(np.int64)
    y1 = np.ceil((amap.coords[:, 1] + amap.tile_size_level0) / downsample).astype(np.int64)
    x0, y0 = np.clip(x0, 0, w), np.clip(y0, 0, h)
    x1, y1 = np.clip(np.maximum(x1, x0 + 1), 0, w), np.clip(np.maximum(y1, y0 + 1), 0, h)
    for v, a, b, c, d in zip(values, y0, y1, x0, x1):
        total[a:b, c:d] += v
        count[a:b, c:d] += 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan).astype(np.float32)


def overlay(thumbnail: np.ndarray, raster: np.ndarray, *, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """The thumbnail with the raster's colours blended in where tiles are (uint8 RGB)."""
    from matplotlib import colormaps

    colours = colormaps[cmap](np.nan_to_num(raster, nan=0.0))[..., :3] * 255.0
    covered = ~np.isnan(raster)[..., None]
    blended = np.where(covered, (1.0 - alpha) * thumbnail + alpha * colours, thumbnail)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _title(amap: AttentionMap) -> str:
    title = amap.slide_id
    classes, probs = amap.attrs.get("classes"), amap.attrs.get("probs")
    if classes is not None and probs is not None:
        names = json.loads(classes) if isinstance(classes, str) else list(classes)
        title += "   " + "  ".join(f"{c}: {p:.2f}" for c, p in zip(names, np.asarray(probs)))
    if "label" in amap.attrs:
        title += f"   (label {amap.attrs['label']})"
    return title


def save_heatmap_figure(
    path: str | os.PathLike[str], image: np.ndarray, *, title: str, scale: Scale, cmap: str = "jet"
) -> Path:
    """Write the blended thumbnail with a title and a colour bar as PNG, about 1:1 in pixels."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    h, w = image.shape[:2]
    dpi = 100
    fig = Figure(figsize=(max(w, 300) / dpi + 1.4, max(h, 200) / dpi + 0.6), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.02, 0.8, 0.9))
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    cax = fig.add_axes((0.86, 0.1, 0.03, 0.75))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), colormaps[cmap]), cax=cax)
    bar.set_label("attention percentile in slide" if scale == "rank" else "attention (min-max in slide)")
    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png")
    return path


def top_tile_montage(tiles: np.ndarray, labels: list[str], *, columns: int | None = None, gap: int = 4) -> np.ndarray:
    """Tiles [k, S, S, 3] in a grid, each under a caption strip (e.g. rank and attention)."""
    from PIL import Image, ImageDraw

    k, s = len(tiles), tiles.shape[1]
    columns = columns or max(1, math.ceil(math.sqrt(k)))
    rows = math.ceil(k / columns)
    caption = 14
    cell_h = s + caption
    canvas = Image.new("RGB", (columns * (s + gap) + gap, rows * (cell_h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (tile, text) in enumerate(zip(tiles, labels)):
        r, c = divmod(i, columns)
        x, y = gap + c * (s + gap), gap + r * (cell_h + gap)
        draw.text((x + 2, y + 1), text, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(np.ascontiguousarray(tile)), (x, y + caption))
    return np.asarray(canvas)


@dataclass(frozen=True)
class HeatmapFiles:
    """What :func:`draw_heatmap` wrote for one slide."""

    slide_id: str
    heatmap: Path
    montage: Path | None
    seconds: float


def draw_heatmap(
    attention_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    slide_path: str | os.PathLike[str] | None = None,
    store_path: str | os.PathLike[str] | None = None,
    mpp: float = DEFAULT_THUMBNAIL_MPP,
    top_k: int = 16,
    alpha: float = 0.5,
    scale: Scale = "rank",
    cmap: str = "jet",
) -> HeatmapFiles:
    """Write ``{slide_id}.heatmap.png`` and (with a patch store and ``top_k > 0``)
    ``{slide_id}.top_tiles.png`` into ``out_dir``.

    ``store_path`` defaults to the patch store recorded in the attention file. The store is the
    record of how the slide was read: the thumbnail comes from the slide opened through it (its
    backend and mpp override, after checking the slide is the file that was tiled), so a slide
    that needed an mpp override gets its heatmap. ``slide_path`` (default: the store's record,
    else the attention file's) only says where the slide is now. A damaged store is a
    :class:`StoreError`; without any store the slide is opened on its own metadata and there is
    no montage. The montage needs a store whose coords equal the attention file's.
    """
    import time

    from wsitools.slide import open_slide

    start = time.perf_counter()
    amap = read_attention(attention_path)
    slide_id = check_slide_id(amap.slide_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store_file = Path(store_path or amap.attrs.get("store_path") or "")
    store = PatchStore.open(store_file) if store_file.name and store_file.exists() else None
    slide_file = Path(slide_path or (store.attrs.get("slide_path") if store else None) or amap.attrs.get("slide_path") or "")
    if not slide_file.is_file():
        raise SlideError(
            f"slide {slide_id}: slide file {str(slide_file) or '(none recorded)'} not found; pass --slide"
        )
    if store is None:
        log.warning("slide %s: no patch store (%s): the slide is read on its own metadata, no montage",
                    slide_id, store_file if store_file.name else "none recorded")
    with store.open_slide(slide_file) if store is not None else open_slide(slide_file) as slide:
        thumb, downsample = slide.thumbnail(mpp=mpp)
    raster = attention_raster(amap, shape=thumb.shape[:2], downsample=downsample, scale=scale)
    heatmap = save_heatmap_figure(
        out_dir / f"{slide_id}.heatmap.png", overlay(thumb, raster, alpha=alpha, cmap=cmap),
        title=_title(amap), scale=scale, cmap=cmap,
    )
    montage = None
    if top_k > 0 and store is not None:
        try:
            montage = write_top_tiles(amap, store, out_dir / f"{slide_id}.top_tiles.png", top_k=top_k)
        except StoreError as exc:
            log.warning("slide %s: no top-tile montage: %s", slide_id, exc)
    return HeatmapFiles(slide_id=slide_id, heatmap=heatmap, montage=montage, seconds=time.perf_counter() - start)


def write_top_tiles(
    amap: AttentionMap, store: PatchStore, out_path: str | os.PathLike[str], *, top_k: int = 16
) -> Path:
    """The ``top_k`` most attended tiles of the patch store, most attended first, as a PNG."""
    from PIL import Image

    if not np.array_equal(store.coords, amap.coords):
        raise StoreError(
            f"patch store {store.path} has other tile coords than the attention of slide {amap.slide_id} "
            f"({len(store.coords)} vs {len(amap.coords)} tiles)"
        )
    top = np.argsort(-amap.attention, kind="mergesort")[:top_k]
    order = np.argsort(top)
    tiles = np.empty((len(top), store.tile_size, store.tile_size, 3), np.uint8)
    tiles[order] = store.read_tiles(top[order])  # read in store order, place in rank order
    labels = [f"#{r + 1}  a={amap.attention[i]:.2e}" for r, i in enumerate(top)]
    image = top_tile_montage(tiles, labels)
    out_path = Path(out_path)
    with atomic_path(out_path, overwrite=True) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return out_path
