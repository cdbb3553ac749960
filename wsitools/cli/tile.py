"""``wsitools tile``: tissue detection and tiling into one zarr patch store per slide."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from wsitools.errors import ConfigError, stopped_line
from wsitools.cli.options import (
    fraction, jpeg_quality, mpp, non_negative_float, non_negative_int, positive_float, positive_int, show_progress,
)
from wsitools.store import CODECS, DEFAULT_CODEC, DEFAULT_JPEG_QUALITY
from wsitools.tiling import TilingParams, TilingStopped, tile_slides
from wsitools.tissue import TissueParams
from wsitools.types import MicronsPerPixel, TargetPx


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tile",
        help="find tissue and tile slides into zarr patch stores",
        description=__doc__ + " Writes DIR/{slide_id}.zarr, {slide_id}.qc.json, "
        "{slide_id}.tissue.png and {slide_id}.geojson for each slide. Slides are tiled in a worker "
        "process: one that dies (a signal, out of memory, a decoder crash) leaves its slide a failed "
        "qc.json saying how, and the next slide goes on.",
    )
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files (.svs, .tiff, .ndpi, .mrxs, ...)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--slide-id", default=None, metavar="ID",
                   help="the slide's id in output names (one SLIDE only; default: its file name)")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--mpp", type=mpp, default=None, help="target um/px (default 0.5)")
    res.add_argument("--magnification", type=positive_float, default=None,
                     help="target magnification, e.g. 20 (instead of --mpp)")
    p.add_argument("--tile-size", type=positive_int, default=224, help="tile side in target px (224)")
    p.add_argument("--overlap", type=non_negative_int, default=0, help="overlap between tiles in target px (0)")
    p.add_argument("--min-tissue", type=fraction, default=0.5,
                   help="minimum tissue fraction of a kept tile; 0 keeps every tile that touches tissue (0.5)")
    p.add_argument("--backend", choices=["auto", "openslide", "tiffslide"], default="auto",
                   help="the library that reads the slides; auto: tiffslide first for .svs/.tif/.tiff, "
                   "OpenSlide first otherwise, the other if the first cannot open it (auto)")
    p.add_argument("--mpp-override", type=mpp, default=None, metavar="UM",
                   help="the slides' level-0 mpp when their metadata lacks it or is wrong")
    p.add_argument("--no-pixels", action="store_true", help="store coordinates only")
    p.add_argument("--codec", choices=list(CODECS), default=DEFAULT_CODEC,
                   help=f"how tile pixels are stored: one JPEG per tile, or lossless ({DEFAULT_CODEC})")
    p.add_argument("--jpeg-quality", type=jpeg_quality, default=DEFAULT_JPEG_QUALITY, metavar="Q",
                   help=f"quality of the tile JPEGs, 1-100 ({DEFAULT_JPEG_QUALITY})")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="threads or processes (--scheduler) that read, encode and write one slide's tile "
                   "chunks in parallel (default: the CPUs this process may use)")
    p.add_argument("--scheduler", choices=["threads", "processes"], default="threads",
                   help="how a slide's tile blocks run in parallel: threads of one process (the decoders "
                   "release the GIL; least memory) or processes (each opens the slide itself) (threads)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace whatever is at a store's path (a store made with other parameters, "
                   "one whose attributes are unreadable, a foreign folder); an intact store of the same "
                   "parameters and slide is kept, a damaged one is always rebuilt")
    p.add_argument("--keep-going", action="store_true",
                   help="exit 0 even if some slides failed (their qc.json says why)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    t = p.add_argument_group("tissue detection")
    d = TissueParams()
    t.add_argument("--tissue-mpp", type=mpp, default=d.mpp, help=f"mask resolution ({d.mpp} um/px)")
    t.add_argument("--min-region-area", type=non_negative_float, default=d.min_region_area,
                   help=f"drop tissue regions smaller than this, um^2 ({d.min_region_area:g})")
    t.add_argument("--no-fill-holes", action="store_true", help="keep holes inside tissue")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        params = TilingParams(
            mpp=None if args.magnification else MicronsPerPixel(args.mpp or 0.5),
            magnification=args.magnification,
            tile_size=TargetPx(args.tile_size),
            overlap=TargetPx(args.overlap),
            min_tissue=args.min_tissue,
            store_pixels=not args.no_pixels,
            codec=args.codec,
            jpeg_quality=args.jpeg_quality,
            tissue=TissueParams(
                mpp=MicronsPerPixel(args.tissue_mpp),
                min_region_area=args.min_region_area,
                fill_holes=not args.no_fill_holes,
            ),
        )
    except ConfigError as exc:
        print(f"wsitools tile: error: {exc}", file=sys.stderr)
        return 2
    if args.slide_id is not None and len(args.slides) != 1:
        print("wsitools tile: error: --slide-id names one slide; give one SLIDE", file=sys.stderr)
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)  # an unusable --out fails here, once, not per slide
    try:
        records = tile_slides(
            args.slides,
            args.out,
            params,
            slide_ids=None if args.slide_id is None else [args.slide_id],
            backend=args.backend,
            mpp_override=args.mpp_override,
            workers=args.workers,
            scheduler=args.scheduler,
            overwrite=args.overwrite,
            progress=show_progress(quiet=args.quiet),
            isolate=True,
        )
    except TilingStopped as stop:
        _print_records(stop.records)
        print(stopped_line("tile", stop.signum, f": {stop.summary} (see {args.out}/*.qc.json)"), file=sys.stderr)
        return 128 + stop.signum  # asked to stop: not done, --keep-going or not
    failed = [r for r in records if r["status"] == "failed"]
    _print_records(records)
    if failed:
        print(f"{len(failed)} of {len(records)} slides failed (see {args.out}/*.qc.json)", file=sys.stderr)
    return 0 if not failed or args.keep_going else 1


def _print_records(records: list[dict[str, Any]]) -> None:
    for r in records:
        detail = f"{r['n_tiles']} tiles" if r["status"] != "failed" else r["reason"]
        print(f"{r['slide_id']}\t{r['status']}\t{detail}")
