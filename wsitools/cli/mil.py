"""``wsitools train``, ``predict`` and ``heatmap``: slide-level MIL heads and their attention maps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from wsitools.cli.options import (
    feature_store_dir,
    fraction,
    input_file,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    show_progress,
)
from wsitools.errors import DataError, WsiToolsError, one_line
from wsitools.types import slide_id_from_path

if TYPE_CHECKING:
    from wsitools.heatmap import HeatmapFiles



def _prompt_list(text: str) -> tuple[str, ...]:
    kinds = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    bad = [k for k in kinds if k not in ("tvp", "ttp", "ivp")]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"prompts must be a comma-separated subset of tvp,ttp,ivp, got {text!r}")
    return kinds


def register(sub: argparse._SubParsersAction) -> None:
    from wsitools.heatmap import (
        ABSOLUTE_MAX,
        COLOUR_MAPS,
        DEFAULT_CMAP,
        DEFAULT_MAX_SIDE,
        DEFAULT_MIN_SIDE,
        DEFAULT_THUMBNAIL_MPP,
        SCALES,
    )
    from wsitools.mil.config import BAGS, POOLING_CHOICES, TrainConfig

    d = TrainConfig()
    t = sub.add_parser(
        "train",
        help="cross-validate an attention-MIL head on a labelled cohort of feature stores",
        description="Train a slide-level head (abmil, pathotune with TVP/TTP/IVP prompts, or a mean-pooling "
        "linear probe) for classification, survival (Cox) or regression (the task file's type) with "
        "patient-level stratified k-fold (or the labels table's split/fold column). "
        "Writes per-fold weights (safetensors + JSON), metrics.json with bootstrap 95% intervals, "
        "predictions.csv, training curves and attention/{slide_id}.h5 into --out.",
    )
    t.add_argument("--features", required=True, metavar="DIR", type=feature_store_dir, help="feature stores: DIR/{slide_id}.h5")
    t.add_argument("--labels", required=True, type=input_file, metavar="FILE",
                   help="CSV/TSV with slide_id, label (a class; a number for regression) or time and event "
                   "(survival), optional patient_id and split (train/val/test) or fold")
    t.add_argument("--task", default=None, type=input_file, metavar="TASK.yaml",
                   help="task description: name, type (classification, survival, regression), description, "
                   "optional stain, classes with descriptions (or high/low risk / target descriptions); "
                   "required for survival and regression and with the ttp prompt (default without: "
                   "classification, the classes are the labels, sorted)")
    t.add_argument("--head", choices=["abmil", "pathotune", "meanpool"], default="abmil",
                   help="gated-attention MIL, the same with PathoTune prompts, or a linear probe on the "
                   "mean feature (abmil; docs/mil.md)")
    t.add_argument("--prompts", type=_prompt_list, default=None, metavar="tvp,ttp,ivp",
                   help="PathoTune prompt kinds (default for pathotune: tvp,ttp; add ivp with --ivp-features)")
    t.add_argument("--ivp-features", metavar="DIR", type=feature_store_dir, default=None,
                   help="a second encoder's feature stores for the IVP refine module (default: the slide's own bag)")
    t.add_argument("--bag", choices=BAGS, default="slide",
                   help="one bag per slide, or per patient: all slides of a patient_id concatenated, attention "
                   "across them, one prediction per patient (its slides must share the label; slide)")
    t.add_argument("--folds", type=positive_int, default=d.folds, help=f"folds of patient-level k-fold ({d.folds})")
    t.add_argument("--val-fraction", type=fraction, default=d.val_fraction,
                   help=f"patients of each training part held out for early stopping ({d.val_fraction})")
    t.add_argument("--seed", type=non_negative_int, default=d.seed, help=f"seed of splits, init and sampling ({d.seed})")
    t.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"maximum epochs ({d.epochs})")
    t.add_argument("--patience", type=positive_int, default=d.patience,
                   help=f"stop after this many epochs without a lower validation loss ({d.patience})")
    t.add_argument("--min-epochs", type=non_negative_int, default=d.min_epochs,
                   help=f"epochs trained before early stopping may stop a fold ({d.min_epochs})")
    t.add_argument("--lr", type=positive_float, default=d.lr, help=f"AdamW learning rate ({d.lr:g})")
    t.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay, help=f"AdamW weight decay ({d.weight_decay:g})")
    t.add_argument("--bag-size", type=non_negative_int, default=d.bag_size,
                   help=f"patches sampled per bag per training step; 0 = all ({d.bag_size})")
    t.add_argument("--instance-dropout", type=fraction, default=d.instance_dropout,
                   help="fraction of a bag's patches dropped at random in each training step, so the "
                   f"attention spreads over all the evidence; 0 = none ({d.instance_dropout})")
    t.add_argument("--pooling", choices=list(POOLING_CHOICES), default=d.pooling,
                   help="select: train each fold twice, pooling by attention and by the mean, and keep "
                   "the one with the lower validation loss; attention: attention pooling alone (abmil, pathotune; "
                   f"{d.pooling})")
    t.add_argument("--balance", choices=["weights", "sampling"], default=d.balance,
                   help="class-weighted loss or class-balanced bag sampling (weights)")
    t.add_argument("--dim", type=positive_int, default=128, help="head width d (128)")
    t.add_argument("--dropout", type=fraction, default=0.25, help="dropout (0.25)")
    t.add_argument("--n-tvp", type=positive_int, default=8, help="TVP tokens (8)")
    t.add_argument("--n-ivp", type=positive_int, default=4, help="IVP tokens (4)")
    t.add_argument("--text-prior", action="store_true",
                   help="pathotune with ttp, for features in the text model's own space (a vision-language "
                   "encoder whose text tower is --text-model): patches resembling a class description get "
                   "more attention from the start (off)")
    t.add_argument("--text-model", default=None, metavar="DIR",
                   help="sentence-transformers / Hugging Face model directory for TTP (default: bundled MiniLM)")
    t.add_argument("--text-cache", default=None, metavar="DIR",
                   help="text embedding cache (default $WSITOOLS_CACHE/text or ~/.cache/wsitools/text)")
    t.add_argument("--workers", type=non_negative_int, default=d.workers, help=f"DataLoader processes that read feature bags (default {d.workers}: in the main process)")
    t.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default 1: robust when other processes share the cores)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the head trains: auto = a CUDA GPU when there is one, else the CPU (auto)")
    t.add_argument("--bootstrap", type=non_negative_int, default=d.n_boot, help=f"bootstrap resamples for 95%% intervals ({d.n_boot})")
    t.add_argument("--strict", action="store_true",
                   help="a labelled slide without a usable feature store is an error (default: warn and skip)")
    t.add_argument("--allow-empty-classes", action="store_true",
                   help="a task class without a usable labelled slide, or without training slides in a fold of "
                   "a split or fold column, is a warning (default: an error)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    t.add_argument("--resume", action="store_true",
                   help="write the run into .NAME.partial beside --out and reuse the folds an interrupted run "
                   "with the same settings finished there")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--out", required=True, metavar="DIR", help="output, e.g. heads/{task}/{encoder}/{head}")
    t.set_defaults(func=run_train)

    p = sub.add_parser(
        "predict",
        help="predict slides (no labels needed) with a trained head or k-fold ensemble",
        description="Average the probabilities and attention of every fold head in --model (or of one head "
        "folder) on each feature store; write predictions.csv and attention/{slide_id}.h5 into --out.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="a `wsitools train` output, or one fold_K folder")
    p.add_argument("--features", required=True, metavar="DIR", type=feature_store_dir, help="feature stores: DIR/{slide_id}.h5")
    p.add_argument("--slides", nargs="+", default=None, metavar="SLIDE_ID", help="only these slides (default: all)")
    p.add_argument("--patients", default=None, type=input_file, metavar="FILE",
                   help="for heads trained with --bag patient: a CSV/TSV with slide_id and patient_id (the labels "
                   "table or samples sheet) saying which slides to pool; one prediction per patient")
    p.add_argument("--ivp-features", metavar="DIR", type=feature_store_dir, default=None, help="second encoder's features, if the head used them")
    p.add_argument("--strict", action="store_true", help="an unusable slide is an error (default: warn and skip)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default 1: robust when other processes share the cores)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the heads run: auto = a CUDA GPU when there is one, else the CPU (auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: predictions.csv, predict.json, attention/")
    p.set_defaults(func=run_predict)

    h = sub.add_parser(
        "heatmap",
        help="draw attention heatmaps over slide thumbnails, top-tile montages, and QuPath detections",
        description="For each attention file, write {slide_id}.heatmap.png (attention per tile over the slide "
        "thumbnail, with a colour bar saying what the colours mean), {slide_id}.top_tiles.png (the most "
        "attended tiles from the patch store, captioned with their level-0 x, y; none where every head pooled "
        "by the mean, whose weights are uniform) and {slide_id}.attention.geojson (one QuPath detection per "
        "tile with the attention and the prediction as measurements: File > Import objects in QuPath 0.4 or "
        "later; in QuPath's frame, which starts at the slide's OpenSlide bounds). Slide and patch store paths "
        "default to those recorded in the attention file.",
    )
    h.add_argument("--attention", nargs="+", required=True, metavar="PATH",
                   help="attention .h5 files, or directories of them (e.g. heads/.../attention)")
    h.add_argument("--slide", default=None, metavar="PATH",
                   help="the slide file (one attention file), or a directory holding {slide_id}.* slides "
                   "(the slide id the attention file records)")
    h.add_argument("--store", default=None, metavar="PATH",
                   help="the patch store {slide_id}.zarr, or a directory of them: how the slide was read "
                   "(backend, mpp override) and the tiles of the montage (default: recorded in the attention file)")
    h.add_argument("--mpp", type=positive_float, default=DEFAULT_THUMBNAIL_MPP,
                   help=f"heatmap resolution in um/px, within --min-side and --max-side ({DEFAULT_THUMBNAIL_MPP:g})")
    h.add_argument("--min-side", type=positive_int, default=DEFAULT_MIN_SIDE, metavar="PX",
                   help=f"draw a small slide finer, so its long side has at least PX px ({DEFAULT_MIN_SIDE})")
    h.add_argument("--max-side", type=positive_int, default=DEFAULT_MAX_SIDE, metavar="PX",
                   help=f"draw a large slide coarser, so its long side has at most PX px ({DEFAULT_MAX_SIDE})")
    h.add_argument("--top-k", type=non_negative_int, default=16, help="tiles in the montage; 0 = no montage (16)")
    h.add_argument("--alpha", type=fraction, default=0.5, help="heatmap opacity (0.5)")
    h.add_argument("--scale", choices=SCALES, default="rank",
                   help="colour scale: rank = percentile within the slide; minmax = linear between the slide's "
                   "least and most attended tile; absolute = attention x number of tiles (1 = uniform) on a fixed "
                   f"log scale 1-{ABSOLUTE_MAX:g}, comparable across slides (rank)")
    h.add_argument("--cmap", choices=COLOUR_MAPS, default=DEFAULT_CMAP,
                   help=f"colour map; all but turbo and jet are perceptually uniform ({DEFAULT_CMAP})")
    h.add_argument("--quiet", action="store_true", help="no progress bar")
    h.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: {slide_id}.heatmap.png, {slide_id}.top_tiles.png and "
                        "{slide_id}.attention.geojson")
    h.set_defaults(func=run_heatmap)


DEFAULT_PROMPTS = ("tvp", "ttp")
"""Prompts of ``--head pathotune`` without ``--prompts``: IVP is left out, as its slide-level path
let the head learn small cohorts by heart (docs/mil.md, "The PathoTune head at slide level")."""

DEFAULT_THREADS = 1
"""Torch CPU threads of ``train`` and ``predict`` unless ``--threads`` says otherwise: a second
thread gains these small heads little on an idle machine and, when another process is busy on
the cores, makes them many times slower (docs/benchmarks.md, "Threads")."""


def _set_threads(threads: int | None) -> None:
    """Pin torch's CPU threads (``DEFAULT_THREADS`` unless given)."""
    import torch

    torch.set_num_threads(max(1, threads or DEFAULT_THREADS))


HEADLINE = {
    "classification": ("auroc", "balanced_accuracy", "f1"),
    "survival": ("c_index", "uno_c"),
    "regression": ("pearson", "spearman", "mae"),
}
"""The pooled metrics ``wsitools train`` prints, by task type."""


def run_train(args: argparse.Namespace) -> int:
    from wsitools.mil.config import TrainConfig
    from wsitools.mil.train import train

    _set_threads(args.threads)
    prompts = args.prompts
    if args.head == "pathotune" and prompts is None:
        prompts = DEFAULT_PROMPTS
    if args.head != "pathotune" and prompts:
        raise DataError(f"--prompts applies to the pathotune head, not {args.head}")
    if args.text_prior and (args.head != "pathotune" or "ttp" not in prompts):
        raise DataError("--text-prior is part of the ttp prompt: use it with --head pathotune and ttp in --prompts")
    config = TrainConfig(
        epochs=args.epochs,
        patience=args.patience,
        min_epochs=args.min_epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        bag_size=args.bag_size or None,
        instance_dropout=args.instance_dropout,
        pooling=args.pooling,
        balance=args.balance,
        folds=args.folds,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        n_boot=args.bootstrap,
    )
    head_options = {"dim": args.dim, "dropout": args.dropout}
    if args.head == "pathotune":
        head_options.update(n_tvp=args.n_tvp, n_ivp=args.n_ivp, text_prior=args.text_prior)
    summary = train(
        features_dir=args.features,
        labels=args.labels,
        task=args.task,
        out_dir=args.out,
        head=args.head,
        prompts=prompts or (),
        bag=args.bag,
        config=config,
        head_options=head_options,
        ivp_features_dir=args.ivp_features,
        text_model=args.text_model,
        text_cache_dir=args.text_cache,
        device=args.device,
        strict=args.strict,
        allow_empty_classes=args.allow_empty_classes,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=show_progress(quiet=args.quiet),
    )
    pooled = summary["pooled"]  # one value over every fold's held-out predictions, not a fold mean
    for name in HEADLINE[summary["task_type"]]:
        lo, hi = pooled[f"{name}_ci95"]
        print(f"{name}\t{pooled[name]}\tpooled out-of-fold, 95% CI [{lo}, {hi}]")
    for row in pooled.get("time_auc", []):
        lo, hi = row["auc_ci95"]
        print(f"auc@{row['time']:g}\t{row['auc']}\tpooled out-of-fold, 95% CI [{lo}, {hi}]")
    if "risk_groups" in pooled:
        print(f"logrank_p\t{pooled['risk_groups']['logrank_p']}\t(high vs low risk, {args.out}/km.png)")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} slides (see {args.out}/run.json)", file=sys.stderr)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from wsitools.mil.predict import predict

    _set_threads(args.threads)
    results = predict(
        args.model,
        args.features,
        args.out,
        slides=args.slides,
        patients=args.patients,
        ivp_features_dir=args.ivp_features,
        device=args.device,
        strict=args.strict,
        overwrite=args.overwrite,
        progress=show_progress(quiet=args.quiet),
    )
    from wsitools.mil.predict import PatientPrediction

    what = "patient" if results and isinstance(results[0], PatientPrediction) else "slide"
    print(f"predicted {len(results)} {what}{'s' if len(results) != 1 else ''} into {Path(args.out) / 'predictions.csv'}")
    return 0


def _attention_files(paths: list[str]) -> list[Path]:
    """The attention files ``--attention`` names (files, and the ``*.h5`` of folders), each once."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.glob("*.h5") if not f.name.startswith(".")))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"attention {p}: no such file or directory")
    if not files:
        raise DataError(f"no attention files in {', '.join(paths)}")
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def _slides_by_id(slide_arg: str | None) -> dict[str, Path] | None:
    """The slide files of the folder ``--slide`` names, by slide id (the first in name order
    where ids repeat): listed once for all the attention files of a run, not once per slide;
    None when ``--slide`` is not a folder."""
    if slide_arg is None or not Path(slide_arg).is_dir():
        return None
    found: dict[str, Path] = {}
    for f in sorted(Path(slide_arg).iterdir()):
        if not f.name.startswith(".") and f.is_file():
            found.setdefault(slide_id_from_path(f.name), f)
    return found


def _slide_for(slide_arg: str | None, slide_id: str, n_files: int, slides: dict[str, Path] | None) -> Path | None:
    if slide_arg is None:
        return None
    path = Path(slide_arg)
    if slides is not None:
        found = slides.get(slide_id)
        if found is None:
            raise DataError(f"slide {slide_id}: no slide file named {slide_id}.* (or with that id) in {path}")
        return found
    if n_files > 1:
        raise DataError("--slide names one file but several attention files were given; pass a directory")
    return path


def _store_for(store_arg: str | None, slide_id: str, n_files: int) -> Path | None:
    if store_arg is None:
        return None
    path = Path(store_arg)
    if path.suffix == ".zarr":
        if n_files > 1:
            raise DataError("--store names one patch store but several attention files were given; pass a directory")
        return path
    store = path / f"{slide_id}.zarr"
    if not store.exists():
        raise DataError(f"slide {slide_id}: no patch store {store.name} in --store {path}")
    return store


def _attention_ids(files: list[Path]) -> dict[Path, str]:
    """The slide id each attention file records (:func:`attention_slide_id`); a :class:`DataError`
    naming both files where two are of one slide: their heatmaps would overwrite each other in
    ``--out`` (a training run's and a prediction's attention, given together)."""
    from wsitools.attention import attention_slide_id

    ids: dict[Path, str] = {}
    seen: dict[str, Path] = {}
    for f in files:
        slide_id = ids[f] = attention_slide_id(f)
        if slide_id in seen:
            raise DataError(
                f"attention files {seen[slide_id]} and {f} are both of slide {slide_id}, whose heatmap files "
                "would overwrite each other; draw them into separate --out folders"
            )
        seen[slide_id] = f
    return ids


def run_heatmap(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from wsitools.io import output_folder

    if args.min_side > args.max_side:
        raise DataError(f"--min-side {args.min_side} is larger than --max-side {args.max_side}")
    for option, given in (("--slide", args.slide), ("--store", args.store)):
        if given is not None and not Path(given).exists():
            raise DataError(f"{option} {given}: no such file or folder")
    files = _attention_files(args.attention)
    ids = _attention_ids(files)
    slides = _slides_by_id(args.slide)
    final = Path(args.out)
    failed = 0
    with output_folder(final) as folder:  # a new --out appears whole, once every slide is drawn
        for f in tqdm(files, desc="heatmap", unit="slide", disable=not show_progress(quiet=args.quiet)):
            try:
                out = _draw_one(f, ids[f], folder, args, n_files=len(files), slides=slides)
            except WsiToolsError as exc:
                failed += 1
                print(f"{ids[f]}\tfailed\t{one_line(exc)}", file=sys.stderr)
                continue
            montage = final / out.montage.name if out.montage else "-"
            print(f"{out.slide_id}\t{final / out.heatmap.name}\t{final / out.geojson.name}\t{montage}\t{out.seconds:.1f}s")
    if failed:
        print(f"{failed} of {len(files)} heatmaps failed", file=sys.stderr)
    return 1 if failed else 0


def _draw_one(
    attention: Path, slide_id: str, folder: Path, args: argparse.Namespace, *, n_files: int,
    slides: dict[str, Path] | None,
) -> HeatmapFiles:
    """The heatmap files of slide ``slide_id`` (the id ``attention`` records) in ``folder``, drawn
    as the heatmap command's ``args`` say; ``--slide DIR`` and ``--store DIR`` are looked up by that id."""
    from wsitools.heatmap import draw_heatmap

    return draw_heatmap(
        attention,
        folder,
        slide_path=_slide_for(args.slide, slide_id, n_files, slides),
        store_path=_store_for(args.store, slide_id, n_files),
        mpp=args.mpp,
        min_side=args.min_side,
        max_side=args.max_side,
        top_k=args.top_k,
        alpha=args.alpha,
        scale=args.scale,
        cmap=args.cmap,
    )
