"""Tiling benchmark: our tiler against a naive per-tile loop and against its bound, in one run.

One process, one synthetic slide (default 40k x 30k at 0.25 um/px, JPEG tiles, pyramid 1/2/4/8/16,
tissue over part of it), target 0.5 um/px, 224 px tiles:

- ours: ``tile_slide`` with the default store (one JPEG per tile) with 1 worker and with all CPUs,
  and coordinates only (no pixels) with 1 worker;
- naive: what CLAM- and STAMP-style code does: for each tissue tile, ``read_region`` at level 0
  (448 x 448) and resize to 224 (on a sample of the tiles);
- raw decode: tifffile + imagecodecs decoding every JPEG tile of the level we read that the
  kept tiles touch, in one thread: the bound for reading this file;
- bound: that decode plus the least a store with pixels must add, in one thread: encoding as many
  tiles with the store's codec and writing them as new chunk files (the store's own chunk writer;
  pixels cut from the decoded tiles, so they code as the real ones do). No tiler that writes such
  a store can beat it on this machine and file system. Given for the default codec (the target's
  yardstick) and for ``lossless``.

Prints tiles/s for each and the ratios (targets: ours >= 3x naive per core, ours >= 0.9 of the
bound with one worker).

    python benchmarks/bench_tiling.py [--size 40000x30000] [--slide PATH] [--naive-sample 400]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from wsitools.io import available_cpus
from wsitools.slide import open_slide
from wsitools.store import CHUNK_TILES, PatchStore, TileCodec, write_tile_chunk
from wsitools.synthetic import Region, write_slide
from wsitools.tiling import TilingParams, plan_tiles, tile_geometry, tile_slide
from wsitools.tissue import detect_tissue


SAMPLE_TILES = 256
"""Decoded tiles kept to cut the pixels of the bound's encoding from."""


def make_slide(path: Path, width: int, height: int) -> Path:
    """Three large tissue ellipses over about 40% of the slide."""
    regions = [
        Region(int(width * 0.05), int(height * 0.1), int(width * 0.4), int(height * 0.8)),
        Region(int(width * 0.5), int(height * 0.05), int(width * 0.45), int(height * 0.5)),
        Region(int(width * 0.55), int(height * 0.6), int(width * 0.3), int(height * 0.35), "other"),
    ]
    t = time.perf_counter()
    write_slide(path, size=(width, height), mpp=0.25, regions=regions, fmt="svs", downsamples=(1, 2, 4, 8, 16))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s")
    return path


def warm_up(slide_path: Path, params: TilingParams, out: Path) -> None:
    """Import everything the tiler imports lazily (zarr, dask, skimage, scipy...: 0.5 s here) by
    tiling the slide once without pixels: a process tiling a cohort pays that once, not per slide."""
    import dask.delayed  # noqa: F401  (only the pixel path imports dask)

    tile_slide(slide_path, out, replace(params, store_pixels=False), workers=1, progress=False)
    shutil.rmtree(out)


def naive_rate(slide_path: Path, coords: np.ndarray, sample: int) -> float:
    """Tiles/s of read_region at level 0 + resize, one tile at a time."""
    from PIL import Image

    rng = np.random.default_rng(0)
    picked = coords[rng.choice(len(coords), size=min(sample, len(coords)), replace=False)]
    with open_slide(slide_path, backend="openslide") as s:
        t = time.perf_counter()
        for x, y in picked:
            region = s.read_region((int(x), int(y)), 0, (448, 448))
            np.asarray(Image.fromarray(region).resize((224, 224), Image.Resampling.BOX))
        return len(picked) / (time.perf_counter() - t)


def raw_decode(
    slide_path: Path, level: int, coords: np.ndarray, tile_level: float, ds: float
) -> tuple[float, list[np.ndarray]]:
    """Target tiles/s that decoding the touched JPEG tiles of ``level`` alone would allow, and
    about :data:`SAMPLE_TILES` of the decoded tiles, spread over the slide."""
    import tifffile

    with tifffile.TiffFile(slide_path) as tif:
        page = tif.series[0].levels[level].keyframe
        th, tw = page.tilelength, page.tilewidth
        across = -(-page.imagewidth // tw)
        touched: set[int] = set()
        for x, y in coords / ds:
            for ty in range(int(y // th), int((y + tile_level - 1) // th) + 1):
                for tx in range(int(x // tw), int((x + tile_level - 1) // tw) + 1):
                    touched.add(ty * across + tx)
        fh = tif.filehandle
        blobs = []
        for i in sorted(touched):
            fh.seek(page.dataoffsets[i])
            blobs.append((i, fh.read(page.databytecounts[i])))
        t = time.perf_counter()
        for i, data in blobs:
            page.decode(data, i, jpegtables=page.jpegtables)
        seconds = time.perf_counter() - t
        step = max(1, len(blobs) // SAMPLE_TILES)
        decoded = [page.decode(data, i, jpegtables=page.jpegtables)[0][0] for i, data in blobs[::step]]
    decoded_px = len(blobs) * th * tw
    return decoded_px / (224 * 224) / seconds, decoded


def encode_and_write_seconds(decoded: list[np.ndarray], n_tiles: int, tile: int, out: Path, codec: TileCodec) -> float:
    """Seconds to encode ``n_tiles`` tiles with ``codec`` and write them as new chunks of
    :data:`CHUNK_TILES` tiles through the store's own :func:`write_tile_chunk`, in this thread
    (Blosc's own threads off)."""
    import numcodecs.blosc

    numcodecs.blosc.use_threads = False
    crops = np.stack([d[:tile, :tile, :3] for d in decoded if d.shape[0] >= tile and d.shape[1] >= tile])
    seconds = 0.0
    for c, start in enumerate(range(0, n_tiles, CHUNK_TILES)):
        chunk = crops[np.arange(start, min(n_tiles, start + CHUNK_TILES)) % len(crops)]
        t = time.perf_counter()
        write_tile_chunk(out, c, chunk, codec=codec)
        seconds += time.perf_counter() - t
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="40000x30000", help="level-0 WIDTHxHEIGHT of the synthetic slide")
    ap.add_argument("--slide", type=Path, default=None, help="reuse (or create) the slide at this path")
    ap.add_argument("--naive-sample", type=int, default=400, help="tiles timed for the naive loop")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench_tiling_"))
    slide_path = args.slide or work / f"bench_{width}x{height}.svs"
    if not slide_path.exists():
        make_slide(slide_path, width, height)
    params = TilingParams(mpp=0.5, tile_size=224)
    codec = params.tile_codec
    assert codec is not None
    bound_label = f"bound: decode + {codec.name} q{codec.quality} + write, 1 core"
    cpus = available_cpus()
    try:
        with open_slide(slide_path) as s:
            geometry = tile_geometry(s, params)
            _, coords, _ = plan_tiles(geometry, detect_tissue(s, params.tissue), params.min_tissue)
        print(f"{len(coords)} tissue tiles of 224 px at 0.5 um/px, read from level {geometry.level}")

        warm_up(slide_path, params, work / "warm_up")
        results: dict[str, float] = {}
        runs = (("ours, 1 worker", params, 1), (f"ours, {cpus} workers", params, cpus),
                ("ours, coordinates only, 1 worker", replace(params, store_pixels=False), 1))
        for i, (label, run_params, workers) in enumerate(runs):
            out = work / f"tiles_{i}"
            t = time.perf_counter()
            tile_slide(slide_path, out, run_params, workers=workers, progress=False)
            results[label] = len(PatchStore.open(out / f"{slide_path.stem}.zarr")) / (time.perf_counter() - t)
            shutil.rmtree(out)
        results["naive read_region(level 0) + resize, 1 core"] = naive_rate(slide_path, coords, args.naive_sample)
        raw, decoded = raw_decode(
            slide_path, geometry.level, coords, geometry.tile_size_level0 / geometry.level_downsample,
            geometry.level_downsample,
        )
        results["raw JPEG decode of the level read, 1 core"] = raw
        for label, c in ((bound_label, codec), ("bound: decode + lossless + write, 1 core", TileCodec("lossless"))):
            write_s = encode_and_write_seconds(decoded, len(coords), geometry.tile_size, work / "bound", c)
            shutil.rmtree(work / "bound")
            results[label] = len(coords) / (len(coords) / raw + write_s)
    finally:
        for d in ("bound", "tiles_0", "tiles_1", "tiles_2", "warm_up"):
            shutil.rmtree(work / d, ignore_errors=True)

    with open_slide(slide_path) as s:
        dims = "x".join(map(str, s.dimensions))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {cpus} CPUs; slide {dims}")
    for label, rate in results.items():
        print(f"  {label:48s} {rate:8.1f} tiles/s")
    ours1 = results["ours, 1 worker"]
    bound = results[bound_label]
    raw = results["raw JPEG decode of the level read, 1 core"]
    print(f"  ratio ours/naive per core:      {ours1 / results['naive read_region(level 0) + resize, 1 core']:.2f}x (target >= 3)")
    print(f"  ratio ours/bound per core:      {ours1 / bound:.2f} (target >= 0.9)")
    print(f"  ratio bound/raw decode:         {bound / raw:.2f} (the most any tiler writing this store can reach here)")
    print(f"  ratio coordinates only/raw decode: {results['ours, coordinates only, 1 worker'] / raw:.2f}")


if __name__ == "__main__":
    main()
