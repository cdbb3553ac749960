"""``wsitools export``: feature stores into the folder layouts of CLAM and TRIDENT.

torch and h5py are imported inside the handler, so other sub-commands start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsitools.cli.options import feature_store_dir

if TYPE_CHECKING:
    from wsitools.feature_store import FeatureStore

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
            ".../features_{encoder}/{slide_id}.h5. Features are written float32. An export is one encoder's features "
            "(for clam, of one tile size and resolution): those most stores share; stores of others fail alone, "
            "and stores without tiles are skipped with a warning. The export replaces an earlier one in OUT as a "
            "whole; an OUT holding other files is refused."
        ),
    )
    ex.add_argument("--to", required=True, choices=["clam", "trident"], help="the layout to write")
    ex.add_argument("--features", required=True, metavar="DIR", type=feature_store_dir,
                    help="a folder of feature stores DIR/{slide_id}.h5 (features/{encoder})")
    ex.add_argument("--out", required=True, metavar="DIR",
                    help="CLAM's dataset folder (the data_dir of its Generic_MIL_Dataset, under --data_root_dir) or "
                         "a TRIDENT job folder, the export's own (it is replaced as a whole)")
    ex.add_argument("--slides", nargs="+", default=None, metavar="SLIDE_ID", help="only these slides (default: all)")
    ex.add_argument("--quiet", action="store_true", help="no per-slide lines")
    ex.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from wsitools.cli.encoders import store_failure
    from wsitools.errors import DataError
    from wsitools.export import ExportKind, export_folder, export_store, majority_kind
    from wsitools.feature_store import features_root_hint, list_feature_stores
    from wsitools.io import check_out_apart

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
    final = Path(args.out)
    check_out_apart(final, {"--features": args.features})
    failed: list[str] = []

    def fail(path: Path, exc: Exception, *, folder: Path | None = None) -> None:  # one bad store never stops the others
        log.debug("export failed for %s", path, exc_info=True)
        line = store_failure(str(path), exc)
        if folder is not None:  # the file named as it would have been, not in the folder the export is built in
            line = line.replace(str(folder), str(final))
        print(f"wsitools export: error: {line}", file=sys.stderr)
        failed.append(str(path))

    opened = _with_tiles(stores.values(), fail=fail)
    if not opened and not failed:
        raise DataError(
            f"feature directory {args.features}: none of its {len(stores)} stores holds tiles; nothing exported"
        )
    exported = 0
    if opened:
        expect = majority_kind([ExportKind.of(store, to=args.to) for store in opened.values()])
        with export_folder(final, to=args.to) as folder:  # replaces --out as a whole once every store is exported
            for path, store in opened.items():
                try:
                    result = export_store(store, folder, to=args.to, expect=expect)
                except Exception as exc:
                    fail(path, exc, folder=folder)
                    continue
                exported += 1
                if not args.quiet:
                    paths = ", ".join(str(final / p.relative_to(folder)) for p in result.paths)
                    print(f"{result.slide_id}: {result.n_tiles} tiles -> {paths}")
    if failed:
        kept = "" if exported else f"; nothing exported, {final} left as it was"
        print(f"wsitools export: {len(failed)} of {len(stores)} stores failed: {' '.join(failed)}{kept}",
              file=sys.stderr)
        return 1
    return 0


def _with_tiles(paths: Iterable[Path], *, fail: Callable[[Path, Exception], None]) -> dict[Path, FeatureStore]:
    """The stores that can be exported, opened (each file once: :func:`export_store` takes them
    as they are); a store that cannot be opened is reported to ``fail``, and one without tiles
    (a slide without tissue) is skipped with a warning naming it."""
    from wsitools.export import open_store

    opened: dict[Path, FeatureStore] = {}
    for path in paths:
        try:
            store = open_store(path)
        except Exception as exc:
            fail(path, exc)
            continue
        if store.n == 0:
            log.warning("slide %s: feature store %s holds no tiles (no tissue found); skipped, as a MIL head "
                        "cannot use an empty bag", store.slide_id, path)
        else:
            opened[path] = store
    return opened
