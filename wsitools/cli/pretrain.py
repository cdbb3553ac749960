"""``wsitools pretrain puzzle`` (PuzzleTuning prompt pretraining) and ``wsitools tune pathotune``
(patch-level PathoTune prompt tuning).

torch and timm are imported inside the handlers, so other sub-commands start fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wsitools.cli.options import (
    fraction, input_file, non_negative_float, non_negative_int, positive_float, positive_int, show_progress,
)


def register(subparsers: Any) -> None:
    pre = subparsers.add_parser(
        "pretrain",
        help="prompt pretraining of a frozen ViT on patch stores (PuzzleTuning)",
        description="Prompt pretraining on patch stores. `pretrain puzzle` runs PuzzleTuning.",
    )
    pre_actions = pre.add_subparsers(dest="pretrain_method", metavar="METHOD", required=True)
    pz = pre_actions.add_parser(
        "puzzle",
        help="PuzzleTuning: train prompt tokens by multiple-puzzle restoration",
        description=(
            "Train the prompt tokens of a frozen ViT (and an MAE-style decoder) to restore puzzles "
            "made of tiles from patch stores. Writes OUT/config.json, log.csv, checkpoints/, "
            "previews/, the promptstate file (official format) and an encoder card OUT/NAME.yaml "
            "usable at once with `wsitools extract --encoder OUT/NAME.yaml`."
        ),
    )
    pz.add_argument("--stores", nargs="+", required=True, metavar="DIR",
                    help="patch stores (*.zarr) or folders of them; tiles are drawn across all")
    pz.add_argument("--out", required=True, metavar="DIR", help="run folder")
    pz.add_argument("--encoder", default="vitb16-imagenet", metavar="CARD",
                    help="encoder card (name or .yaml) of the ViT to prompt (default vitb16-imagenet)")
    pz.add_argument("--models-dir", metavar="DIR", help="folder of model cards (default: $WSITOOLS_MODELS or models/)")
    pz.add_argument("--epochs", type=positive_int, default=200, help="epochs (default 200)")
    pz.add_argument("--batch-size", type=positive_int, default=64, help="images per step on the device (default 64)")
    pz.add_argument("--accum-steps", type=positive_int, default=2,
                    help="micro-batches per optimiser step (default 2, as the official command)")
    pz.add_argument("--group-size", type=positive_int, default=None,
                    help="puzzle group G: images whose relation patches are shuffled together (default: the batch)")
    pz.add_argument("--warmup-epochs", type=non_negative_int, default=None,
                    help="warm-up epochs for the lr and the curriculum (default: a tenth of the epochs)")
    pz.add_argument("--steps-per-epoch", type=positive_int, default=None,
                    help="optimiser steps per epoch (default: one pass over all tiles)")
    pz.add_argument("--base-lr", type=positive_float, default=1.5e-4, help="lr per 256 images (default 1.5e-4)")
    pz.add_argument("--strategy", choices=["loop", "decay", "fixed"], default="loop",
                    help="curriculum: loop (default, the official command: puzzle size 32 in the warm-up, "
                    "then 16, 32, 112 for 3 epochs each, ratio constant), decay (puzzle size fixed, ratio "
                    "--ratio in the warm-up then falling linearly 0.75 -> 0.2), fixed (size and ratio constant)")
    pz.add_argument("--ratio", type=fraction, default=0.25,
                    help="fix-position ratio of loop and fixed, and of decay's warm-up (default 0.25)")
    pz.add_argument("--fixed-patch-size", type=positive_int, default=None, metavar="PX",
                    help="puzzle size of the decay and fixed strategies (default: the smallest, 16 at 224 px)")
    pz.add_argument("--prompt-tokens", type=positive_int, default=None, help="prompt tokens per layer (default: the card's, else 20)")
    pz.add_argument("--prompt-mode", choices=["deep", "shallow"], default=None, help="default: the card's, else deep")
    pz.add_argument("--decoder-dim", type=positive_int, default=512, help="decoder width (default 512)")
    pz.add_argument("--decoder-depth", type=positive_int, default=8, help="decoder blocks (default 8)")
    pz.add_argument("--decoder-heads", type=positive_int, default=16, help="decoder heads (default 16)")
    pz.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                    help="auto: bf16 autocast on a GPU (fp16 where bf16 is missing), fp32 on CPU")
    pz.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    pz.add_argument("--workers", type=non_negative_int, default=None, help="DataLoader processes that read and decode tiles; several set the batch order (default: CPUs - 1, at most 8, or with --resume the run's own; 0: in the main process)")
    pz.add_argument("--seed", type=non_negative_int, default=0, help="seed of sampling, shuffles and init (default 0)")
    pz.add_argument("--name", default=None, help="name of the exported card (default BACKBONE-puzzletuned)")
    pz.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    pz.add_argument("--stop-after-epochs", type=positive_int, default=None, metavar="N",
                    help="stop (checkpointed) once N epochs are done, e.g. within a cluster time limit; "
                    "continue later with --resume")
    pz.add_argument("--quiet", action="store_true", help="no progress bar")
    pz.set_defaults(func=_puzzle)

    tune = subparsers.add_parser(
        "tune",
        help="prompt tuning of a frozen encoder on labelled tiles (PathoTune)",
        description="Prompt tuning on labelled tiles. `tune pathotune` runs patch-level PathoTune.",
    )
    tune_actions = tune.add_subparsers(dest="tune_method", metavar="METHOD", required=True)
    pt = tune_actions.add_parser(
        "pathotune",
        help="PathoTune: TVP/TTP/IVP prompts + classifier on a frozen ViT",
        description=(
            "Tune PathoTune prompts (any of tvp, ttp, ivp) and a classifier on a frozen ViT. --data is "
            "a folder of class folders (optionally split into train/ val/ test/), or a CSV or TSV table "
            "slide_id,x,y,label[,split] naming tiles of the patch stores given with --stores. "
            "Writes OUT/pathotune.safetensors, pathotune.json, metrics.json, log.csv, "
            "predictions.csv, split.csv, an encoder card OUT/NAME.yaml, and checkpoints/ after "
            "each epoch, from which --resume continues an interrupted run."
        ),
    )
    pt.add_argument("--data", required=True, metavar="PATH",
                    help="class-folder root, or a tile-label table (.csv or .tsv)")
    pt.add_argument("--stores", nargs="+", metavar="DIR", help="patch stores for a tile-label table")
    pt.add_argument("--encoder", required=True, metavar="CARD", help="the frozen ViT's encoder card")
    pt.add_argument("--ivp-encoder", metavar="CARD", default=None,
                    help="second frozen encoder whose features feed IVP (default: --encoder)")
    pt.add_argument("--prompts", default="tvp,ttp,ivp", help="prompt kinds, comma-separated (default tvp,ttp,ivp)")
    pt.add_argument("--task", type=input_file, metavar="YAML", default=None,
                    help="task description with class descriptions (needed for ttp; fixes the class order)")
    pt.add_argument("--text-model", default=None, help="text encoder directory (default: bundled all-MiniLM-L6-v2)")
    pt.add_argument("--out", required=True, metavar="DIR", help="output folder")
    pt.add_argument("--models-dir", metavar="DIR",
                    help="folder of model cards (default: $WSITOOLS_MODELS, else the repo's models/)")
    pt.add_argument("--epochs", type=positive_int, default=20,
                    help="training epochs; the one of lowest validation loss is kept (default 20)")
    pt.add_argument("--batch-size", type=positive_int, default=32,
                    help="tiles per optimiser step (default 32)")
    pt.add_argument("--lr", type=positive_float, default=1e-3,
                    help="AdamW peak learning rate, after a linear warm-up, with a cosine decay (default 1e-3)")
    pt.add_argument("--weight-decay", type=non_negative_float, default=1e-4,
                    help="AdamW weight decay (default 1e-4)")
    pt.add_argument("--n-tvp", type=positive_int, default=8, help="TVP tokens per layer (default 8)")
    pt.add_argument("--n-ivp", type=positive_int, default=4, help="IVP tokens (default 4)")
    pt.add_argument("--val-fraction", type=fraction, default=0.15,
                    help="tiles of each class held out for choosing the epoch, when the data has no split "
                    "(default 0.15)")
    pt.add_argument("--test-fraction", type=fraction, default=0.15,
                    help="tiles of each class held out for the test report, when the data has no split (default 0.15)")
    pt.add_argument("--no-augment", action="store_true", help="no random crops and flips in training")
    pt.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                    help="auto: bf16 autocast on a GPU (fp16 where bf16 is missing), fp32 on CPU")
    pt.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    pt.add_argument("--workers", type=non_negative_int, default=None, help="DataLoader processes that read and decode tiles (default: CPUs - 1, at most 8; 0: in the main process)")
    pt.add_argument("--seed", type=non_negative_int, default=0, help="seed of the split, init and augmentation (default 0)")
    pt.add_argument("--name", default=None, help="name of the encoder card (default BACKBONE-pathotune-TASK)")
    pt.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    pt.add_argument("--stop-after-epochs", type=positive_int, default=None, metavar="N",
                    help="stop (checkpointed) once N epochs are done, e.g. within a cluster time limit; "
                    "continue later with --resume")
    pt.add_argument("--quiet", action="store_true", help="no progress bar")
    pt.set_defaults(func=_pathotune)


def _card_only(option: str, value: str | None, command: str) -> None:
    """Refuse ``timm:NAME`` for an encoder option of a training command: ``extract`` takes its
    checkpoint with ``--weights``; these train on top of a card, whose files they pin."""
    from wsitools.errors import ConfigError

    if value is not None and value.startswith("timm:"):
        raise ConfigError(
            f"{option} {value}: {command} starts from a model card, not timm:NAME; write a card for the "
            "checkpoint (docs/encoders.md, \"Model card fields\")"
        )


def _puzzle(args: argparse.Namespace) -> int:
    from wsitools.puzzle.train import PuzzleTrainConfig, train_puzzle

    _card_only("--encoder", args.encoder, "pretrain puzzle")
    config = PuzzleTrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, accum_steps=args.accum_steps,
        group_size=args.group_size, warmup_epochs=args.warmup_epochs,
        steps_per_epoch=args.steps_per_epoch, base_lr=args.base_lr, strategy=args.strategy,
        ratio=args.ratio, fixed_patch_size=args.fixed_patch_size, prompt_tokens=args.prompt_tokens,
        prompt_mode=args.prompt_mode,
        decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
        decoder_heads=args.decoder_heads, precision=args.precision, seed=args.seed,
        num_workers=args.workers,
    )
    result = train_puzzle(
        args.stores, args.out, backbone=args.encoder, config=config, resume=args.resume,
        device=args.device, models_dir=args.models_dir, name=args.name,
        progress=show_progress(quiet=args.quiet),
        stop_after_epochs=args.stop_after_epochs,
    )
    print(f"epochs done\t{result.epochs_done}/{args.epochs}")
    print(f"steps done\t{result.steps_done}")
    print(f"final loss\t{result.final_loss:.5f}")
    print(f"images/s\t{result.images_per_second:.1f}")
    print(f"promptstate\t{result.promptstate or 'not yet: continue with --resume'}")
    print(f"encoder card\t{result.card or 'not yet: continue with --resume'}")
    return 0


def _pathotune(args: argparse.Namespace) -> int:
    from wsitools.errors import DataError
    from wsitools.pathotune import PathoTuneTrainConfig, folder_tiles, parse_prompts, store_tiles, tune_pathotune
    from wsitools.tables import TILE_TABLE_SUFFIXES, is_tile_table
    from wsitools.text import load_task

    _card_only("--encoder", args.encoder, "tune pathotune")
    _card_only("--ivp-encoder", args.ivp_encoder, "tune pathotune")
    task = load_task(args.task) if args.task else None
    if task is not None and task.type != "classification":
        raise DataError(f"task {args.task}: patch-level prompt tuning classifies tiles; this is a {task.type} task")
    data_path = Path(args.data)
    if is_tile_table(data_path):
        if not args.stores:
            raise DataError(f"{data_path}: a tile-label table needs --stores with the patch stores it names")
        data = store_tiles(data_path, args.stores, task_classes=task.classes if task is not None else None)
    else:
        if args.stores:
            raise DataError(f"{data_path}: --stores goes with a tile-label table ({' or '.join(TILE_TABLE_SUFFIXES)}) "
                            "as --data, not with a folder of class folders")
        data = folder_tiles(data_path)
    config = PathoTuneTrainConfig(
        prompts=parse_prompts(args.prompts), n_tvp=args.n_tvp, n_ivp=args.n_ivp, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        augment=not args.no_augment, seed=args.seed, precision=args.precision,
        num_workers=args.workers, text_model=args.text_model,
    )
    result = tune_pathotune(
        data, args.out, backbone=args.encoder, task=task,
        ivp_encoder=args.ivp_encoder, config=config, resume=args.resume, device=args.device,
        models_dir=args.models_dir, name=args.name,
        progress=show_progress(quiet=args.quiet),
        stop_after_epochs=args.stop_after_epochs,
    )
    print(f"epochs done\t{result.epochs_done}/{args.epochs}")
    keys = ("auroc", "balanced_accuracy", "f1", "accuracy")
    print("split\t" + "\t".join(keys))
    print("val (untrained)\t" + "\t".join(f"{result.untrained[k]:.4f}" for k in keys))
    print(f"val (epoch {result.best_epoch})\t" + "\t".join(f"{result.best[k]:.4f}" for k in keys))
    if result.test is not None:
        print("test\t" + "\t".join("nan" if result.test[k] is None else f"{result.test[k]:.4f}" for k in keys))
    print(f"encoder card\t{result.card or 'not yet: continue with --resume'}")
    return 0
