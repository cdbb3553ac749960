"""``wsitools encoders`` (list cards, ``fetch`` weights) and ``wsitools extract`` (feature stores).

torch and timm are imported inside the handlers, so other sub-commands start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from wsitools.cli.options import (
    PatchStoreDirs,
    input_file,
    non_negative_int,
    positive_float,
    positive_int,
    show_progress,
)
from wsitools.errors import StoreError, WsiToolsError, one_line
from wsitools.types import DEFAULT_FEATURE_DTYPE, FEATURE_DTYPES

log = logging.getLogger(__name__)


def _models_dir_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--models-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="folder of model cards and weights (default: $WSITOOLS_MODELS, else the repo's models/)",
    )
    return parent


def register(subparsers: Any) -> None:
    models_dir = _models_dir_option()
    enc = subparsers.add_parser(
        "encoders",
        parents=[models_dir],
        help="list encoder model cards (and whether their weights are present); fetch weights",
        description="List the model cards of the models directory. `encoders fetch NAME` downloads a card's weights.",
    )
    enc.add_argument("--verify", action="store_true", help="also check the sha256 of present weight files")
    enc.set_defaults(func=_list)
    actions = enc.add_subparsers(dest="encoders_action", metavar="ACTION")
    fetch = actions.add_parser(
        "fetch",
        parents=[models_dir],
        help="download the weight files of cards, verifying sha256",
        description=(
            "Download each weight file of the named cards into the models directory, verifying its sha256. "
            "Hugging Face files of gated models need HF_TOKEN set to an access token of an account that "
            "accepted the model's terms."
        ),
    )
    fetch.add_argument("names", nargs="+", metavar="NAME", help="card names or card files")
    fetch.add_argument("--force", action="store_true", help="download even if the file is present and valid")
    fetch.add_argument("--timeout", type=positive_float, default=60.0, help="network timeout in seconds (default 60)")
    fetch.set_defaults(func=_fetch)

    ext = subparsers.add_parser(
        "extract",
        parents=[models_dir],
        help="extract features of patch stores into h5 feature stores",
        description=(
            "Write OUT/{encoder}/{slide_id}.h5 for each patch store. OUT is the features root. "
            "Stores whose features already match (encoder hash, store hash) are reused."
        ),
    )
    ext.add_argument("stores", nargs="+", metavar="STORE", action=PatchStoreDirs,
                     help="patch stores (tiles/{slide_id}.zarr, written by wsitools tile)")
    ext.add_argument("--encoder", required=True, help="card name, card file (.yaml) or timm:NAME")
    ext.add_argument("--weights", type=input_file, metavar="CKPT", help="local checkpoint for --encoder timm:NAME")
    ext.add_argument("--out", required=True, metavar="DIR", help="features root: writes DIR/{encoder}/{slide_id}.h5")
    ext.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    ext.add_argument("--batch-size", type=positive_int, default=128, help="tiles per forward pass (default 128)")
    ext.add_argument("--workers", type=non_negative_int, default=None, help="DataLoader processes that read and decode tiles (default: CPUs - 1, at most 8; 0: in the main process)")
    ext.add_argument("--precision", choices=["card", "fp32"], default="card",
                     help="card: compute in the card's precision on a GPU (default); fp32: float32 compute "
                     "everywhere, parity with a float32 reference forward")
    ext.add_argument("--dtype", choices=FEATURE_DTYPES, default=DEFAULT_FEATURE_DTYPE,
                     help=f"stored dtype of the features: float32, what CLAM and TRIDENT read as it is, or "
                     f"float16, half the disk ({DEFAULT_FEATURE_DTYPE})")
    ext.add_argument("--compile", action="store_true", help="torch.compile the encoder (GPU, large cohorts)")
    ext.add_argument("--overwrite", action="store_true", help="recompute even when a matching h5 exists")
    ext.add_argument("--quiet", action="store_true", help="no progress bar or per-store lines")
    ext.set_defaults(func=_extract)


def store_failure(store: str, exc: Exception) -> str:
    """One line naming the store and what went wrong, also for an error raised in a loader worker
    (whose message carries the worker's traceback) or by a codec (a corrupt chunk)."""
    text = one_line(exc)
    if not isinstance(exc, WsiToolsError) and not text.startswith(type(exc).__name__):
        text = f"{type(exc).__name__}: {text}"
    return text if str(store) in text else f"{store}: {text}"


def _list(args: argparse.Namespace) -> int:
    """List the cards (a broken one as a row with its reason); exit 2 when a card is broken, else
    1 when ``--verify`` found a wrong checksum, else 0."""
    from wsitools.encoders import default_models_dir, scan_cards
    from wsitools.encoders.loading import verify_weight

    directory = getattr(args, "models_dir", None) or default_models_dir()
    print(f"models directory: {directory}")
    rows = [("NAME", "MODEL", "DIM", "LICENCE", "WEIGHTS")]
    wrong = broken = 0
    for path, card in scan_cards(directory):
        if isinstance(card, WsiToolsError):
            rows.append((path.stem, "-", "-", "-", f"BROKEN: {str(card).removeprefix(f'{path.resolve()}: ')}"))
            broken += 1
            continue
        states = []
        for w in card.weights:
            if not w.path.is_file():
                states.append(f"{w.role}: missing")
            elif args.verify:
                try:
                    verify_weight(card, w)
                    states.append(f"{w.role}: ok" if w.sha256 else f"{w.role}: present (sha256 not pinned)")
                except WsiToolsError:
                    states.append(f"{w.role}: WRONG CHECKSUM")
                    wrong += 1
            else:
                states.append(f"{w.role}: present")
        licence = (card.license or "-") + (" (gated)" if card.access == "gated" else "")
        rows.append((card.name, card.model, str(card.dim), licence, ", ".join(states) or "random (test model)"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(r[:4])) + "  " + r[4])
    # a script checking the cards or the weights gets it from the exit status
    if broken:
        print(f"{broken} card(s) could not be read (BROKEN above)", file=sys.stderr)
    if wrong:
        print(f"{wrong} weight file(s) with a wrong checksum", file=sys.stderr)
    return 2 if broken else 1 if wrong else 0


def _fetch(args: argparse.Namespace) -> int:
    from wsitools.encoders import fetch_card, find_card

    models_dir = getattr(args, "models_dir", None)
    for name in args.names:
        card = find_card(name, models_dir=models_dir)
        if not card.weights:
            print(f"{card.name}: no weight files (random-weight test model), nothing to fetch")
        for result in fetch_card(card, force=args.force, timeout=args.timeout):
            sha = f" sha256 {result.sha256}" if result.sha256 else ""
            print(f"{card.name}: {result.weight.role} {result.weight.path}: {result.status}{sha}")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from wsitools.encoders import load_encoder
    from wsitools.feature_store import check_target, feature_store_path
    from wsitools.features import extract_features
    from wsitools.store import PatchStore

    encoder = load_encoder(
        args.encoder,
        device=args.device,
        models_dir=getattr(args, "models_dir", None),
        weights=args.weights,
        precision=args.precision,
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)  # an unusable --out fails here, once, not per store
    if not args.quiet:
        print(f"encoder {encoder.name} ({encoder.encoder_hash}) on {encoder.device}", file=sys.stderr)
    ready, failed, refused = [], [], []
    for store in args.stores:  # every output is checked before any store is extracted
        try:
            opened = PatchStore.open(store)
        except Exception as exc:  # one bad store never stops the others
            _report_failure(store, exc)
            failed.append(store)
            continue
        try:
            check_target(feature_store_path(args.out, encoder.name, opened.slide_id))
        except WsiToolsError as exc:  # an output the user must fix: exit 2, the other stores go on
            _report_failure(store, exc)
            refused.append(store)
            continue
        ready.append((store, opened))
    ready = _one_store_per_slide(ready, refused)
    while ready:  # popped, so a finished store's coordinates are not kept
        store, opened = ready.pop(0)
        try:
            result = extract_features(
                opened,
                encoder,
                args.out,
                batch_size=args.batch_size,
                workers=args.workers,
                compile=args.compile,
                dtype=args.dtype,
                overwrite=args.overwrite,
                progress=show_progress(quiet=args.quiet),
            )
        except Exception as exc:  # one bad store never stops the others
            _report_failure(store, exc)
            failed.append(store)
            continue
        if not args.quiet:
            rate = f", {result.patches_per_s:.0f} patches/s" if result.status == "computed" else ""
            print(f"{result.slide_id}: {result.n_tiles} tiles -> {result.path} ({result.status}{rate})")
    if failed or refused:
        bad = [s for s in args.stores if s in failed or s in refused]
        if len(args.stores) > 1:
            print(f"wsitools extract: {len(bad)} of {len(args.stores)} stores failed: {' '.join(bad)}",
                  file=sys.stderr)
        return 2 if refused else 1
    return 0


def _one_store_per_slide(ready: list[tuple[str, Any]], refused: list[str]) -> list[tuple[str, Any]]:
    """``ready`` without the stores of a slide id that two different stores share (both would
    write one feature store): each is refused, naming the other. A store given twice is kept once."""
    by_id: dict[str, dict[Any, str]] = {}
    for store, opened in ready:
        by_id.setdefault(opened.slide_id, {}).setdefault(opened.path, store)
    kept, seen = [], set()
    for store, opened in ready:
        if opened.path in seen:
            continue
        seen.add(opened.path)
        paths = by_id[opened.slide_id]
        if len(paths) > 1:
            others = " ".join(s for p, s in paths.items() if p != opened.path)
            _report_failure(store, StoreError(
                f"{store}: slide {opened.slide_id} is also the slide of {others}; both would write its feature "
                "store: give one of them"
            ))
            refused.append(store)
        else:
            kept.append((store, opened))
    return kept


def _report_failure(store: str, exc: Exception) -> None:
    log.debug("extraction failed for %s", store, exc_info=True)
    print(f"wsitools extract: error: {store_failure(store, exc)}", file=sys.stderr)
