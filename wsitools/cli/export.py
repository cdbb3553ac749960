"""``wsitools export``: feature stores into the folder layouts of CLAM and TRIDENT.

torch and h5py are imported inside the handler, so other sub-commands start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from wsitools.cli.options import feature_store_dir

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    ex = subparsers.add_parser(
        "export",
        help="export feature stores to CLAM's or TRIDENT's folder layout",
        description=(
            "Write the feature stores of --features (one encoder's folder, features/{encoder}) in the layout "
            "CLAM or TRIDENT reads. clam: OUT/pt_files/{slide_id}.pt (float32 tensor), OUT/h5_files/{slide_id}.h5 "
            "and OUT/patches/{slide_id}.h5 (coordinates for CLAM's feature extraction). trident: "
            "OUT/{mag}x_{size}px_{overlap}px_overlap/patches/{slide_id}_patches.h5 and "
            ".../features_{encoder}/{slide_id}.h5. Features are written float32; earlier exports are replaced."
        ),
    )
    ex.add_argument("--to", required=True, choices=["clam", "trident"], help="the layout to write")
    ex.add_argument("--features", required=True, metavar="DIR", type=feature_store_dir,
                    help="a folder of feature stores DIR/{slide_id}.h5 (features/{encoder})")
    ex.add_argument("--out", required=True, metavar="DIR",
                    help="CLAM's data folder (its --data_root_dir) or TRIDENT's job folder")
    ex.add_argument("--slides", nargs="+", default=None, metavar="SLIDE_ID", help="only these slides (default: all)")
    ex.add_argument("--quiet", action="store_true", help="no per-slide lines")
    ex.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from wsitools.cli.encoders import store_failure
    from wsitools.errors import DataError
    from wsitools.export import export_store
    from wsitools.feature_store import features_root_hint, list_feature_stores
    from wsitools.io import output_folder

    stores = list_feature_stores(args.features)
    if args.slides is not None:
        missing = [s for s in args.slides if s not in stores]
        if missing:
            raise DataError(f"--slides: no feature store in {args.features} for {', '.join(missing)}")
        stores = {s: stores[s] for s in args.slides}
    if not stores:
        raise DataError(
            f"feature directory {args.features}: holds no feature stores (*.h5){features_root_hint(args.features)}"
        )
    failed, first = [], None
    final = Path(args.out)
    with output_folder(final) as folder:  # a new --out appears whole, once every store is exported
        for path in stores.values():
            try:
                result = export_store(path, folder, to=args.to, like=first)
            except Exception as exc:  # one bad store never stops the others
                log.debug("export failed for %s", path, exc_info=True)
                print(f"wsitools export: error: {store_failure(str(path), exc)}", file=sys.stderr)
                failed.append(str(path))
                continue
            first = first or result
            if not args.quiet:
                paths = ", ".join(str(final / p.relative_to(folder)) for p in result.paths)
                print(f"{result.slide_id}: {result.n_tiles} tiles -> {paths}")
    if failed:
        print(f"wsitools export: {len(failed)} of {len(stores)} stores failed: {' '.join(failed)}", file=sys.stderr)
        return 1
    return 0
