"""``wsitools info``: what a slide is (backend, levels, downsamples, mpp, vendor).

A slide without a usable mpp is still shown in full, with the mpp problem stated; a file whose
pixels no backend can decode is an error naming the cause.
"""

from __future__ import annotations

import argparse
import json

from wsitools.cli.options import mpp
from wsitools.slide import open_slide


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a slide's properties", description=__doc__)
    p.add_argument("slide", help="slide file")
    p.add_argument("--backend", choices=["auto", "openslide", "tiffslide"], default="auto",
                   help="the library that reads the slide; auto: tiffslide first for .svs/.tif/.tiff, "
                   "OpenSlide first otherwise, the other if the first cannot open it (auto)")
    p.add_argument("--mpp-override", type=mpp, default=None, metavar="UM",
                   help="use this mpp (um/px) instead of the slide's metadata")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open_slide(args.slide, backend=args.backend, mpp_override=args.mpp_override, require_mpp=False) as slide:
        info = slide.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}")
    for key in ("name", "backend", "vendor", "objective_power"):
        print(f"  {key:16s} {info[key]}")
    if info["mpp"] is None:
        print(f"  {'mpp':16s} unknown: {info['mpp_problem']}")
    else:
        print(f"  {'mpp':16s} {info['mpp']}")
        print(f"  {'mpp_source':16s} {info['mpp_source']}")
    print(f"  {'dimensions':16s} {info['dimensions'][0]} x {info['dimensions'][1]}")
    print("  levels:")
    for i, (dims, ds, level_mpp) in enumerate(
        zip(info["level_dimensions"], info["level_downsamples"], info["level_mpp"])
    ):
        resolution = f"  mpp {level_mpp:.4g}" if level_mpp is not None else ""
        print(f"    {i}: {dims[0]} x {dims[1]}  downsample {ds:.4g}{resolution}")
    return 0
