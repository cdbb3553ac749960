"""PuzzleTuning training: puzzles from patch stores, prompts + decoder trained, everything resumable.

Output folder layout::

    out/
      config.json                 the run's settings, backbone card, tile geometries and curriculum
      log.csv                     per optimiser step: epoch, step, loss, lr, patch_size, ratio
      checkpoints/epoch-NNNN/     trainable.safetensors + optimizer.pt + state.json (last 2 kept)
      previews/epoch-NNNN.png     a few images: original | puzzle | restoration
      {name}_promptstate.pth      the learned prompts, official format  } written once every
      {name}.yaml                 an encoder card using them            } epoch is done

The learning rate (warm-up + cosine per optimiser step), the curriculum (per epoch), the order
of tiles, their augmentation and the puzzles are pure functions of (seed, epoch, step), so a run
resumed from its last checkpoint continues exactly as if it had not been interrupted. A run that
starts afresh (no checkpoint) removes an earlier run's log and previews, and its promptstate and
card whatever their name (not a card this run reads as its backbone), so nothing of that run
passes for this one's result.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from wsitools.device import TrainPrecision
from wsitools.encoders.cards import check_card_name, check_new_card_name
from wsitools.errors import ConfigError
from wsitools.io import atomic_path, loader_workers, stable_hash, write_json_atomic
from wsitools.puzzle.backbone import PuzzleBackbone, export_promptstate, load_puzzle_backbone
from wsitools.puzzle.curriculum import Curriculum, PuzzleStage, Strategy, default_patch_sizes
from wsitools.encoders.transforms import prepare_input
from wsitools.puzzle.data import TileStream, augmented, open_stores
from wsitools.puzzle.model import PuzzleTuningModel
from wsitools.puzzle.shuffle import PuzzleError, check_puzzle_setting, fix_position_shuffle
from wsitools.training import (
    Checkpoints,
    CsvLog,
    Schedule,
    Stepper,
    adamw,
    check_run_folder,
    clear_outputs,
    describe_geometries,
    earlier_cards,
    epoch_generator,
    tile_geometries,
)

log = logging.getLogger(__name__)

LOG_COLUMNS = ("epoch", "step", "loss", "lr", "patch_size", "ratio")

BATCH_ORDER_WORKERS = "loader_workers"
"""The schedule's record of the loader workers (0 recorded as 1, the same order): several each
read whole windows of batches and the DataLoader interleaves their batches, so the batch order
(and the puzzles each image gets) depends on their number. A resumed run keeps it; another count
is refused. Checkpoints of earlier versions do not record it and resume with any count."""
RUN_FILES = ("config.json", "log.csv", "checkpoints", "previews", "*_promptstate.pth", "*.yaml")
"""What a run writes into its folder (the layout above); a folder holding anything else is
another run's and is refused."""


def _final_outputs(name: str, *, earlier: Sequence[str]) -> list[str]:
    """What a run of card ``name`` writes besides its checkpoints and config.json, and the cards
    and promptstates of ``earlier`` runs' (:func:`~wsitools.training.earlier_cards`), as regular
    expressions of paths in the run folder: at a fresh start, an earlier run's are removed."""
    return [re.escape("log.csv"), r"previews/epoch-\d{4,}\.png",
            *(re.escape(f) for f in (f"{name}_promptstate.pth", f"{name}.yaml", *earlier))]


@dataclass(frozen=True)
class PuzzleTrainConfig:
    """Settings of a PuzzleTuning run (defaults: the official public training command: batch 64
    with gradient accumulation 2, the ``loop`` curriculum at a constant fix-position ratio 0.25).

    ``batch_size`` is per step on the device; ``accum_steps`` micro-batches make one optimiser
    step, and the learning rate is ``base_lr * batch_size * accum_steps / 256``. ``strategy``,
    the ratios and the patch sizes set the curriculum (:class:`Curriculum`).
    ``group_size`` (None: the batch) is the puzzle group G. ``warmup_epochs`` (None: a tenth of
    the epochs) serves both the learning rate and the curriculum. ``steps_per_epoch`` (None: one
    pass over all tiles) counts optimiser steps. ``patch_sizes`` (None: the image size's divisors
    that are multiples of the ViT token size, (16, 32, 112) at 224 px) and ``warmup_patch_size``
    (None: the second size, 32 at 224 px) and ``fixed_patch_size`` (None: the smallest size) set
    the puzzle sizes.
    """

    epochs: int = 200
    batch_size: int = 64
    accum_steps: int = 2
    group_size: int | None = None
    warmup_epochs: int | None = None
    steps_per_epoch: int | None = None
    base_lr: float = 1.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    strategy: Strategy = "loop"
    ratio: float = 0.25
    ratio_max: float = 0.75
    ratio_min: float = 0.2
    patch_sizes: tuple[int, ...] | None = None
    warmup_patch_size: int | None = None
    fixed_patch_size: int | None = None
    epochs_per_size: int = 3
    prompt_tokens: int | None = None
    prompt_mode: Literal["deep", "shallow"] | None = None
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    precision: TrainPrecision = "auto"
    seed: int = 0
    num_workers: int | None = None
    keep_checkpoints: int = 2
    preview_images: int = 4

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "accum_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        group = self.group
        if self.batch_size % group:
            raise ConfigError(
                f"puzzle group size {group} must divide the batch size {self.batch_size}"
            )
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")

    @property
    def group(self) -> int:
        return self.group_size or self.batch_size

    @property
    def warmup(self) -> int:
        return self.epochs // 10 if self.warmup_epochs is None else self.warmup_epochs

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size * self.accum_steps / 256

    def curriculum(self, *, image_size: int, token_size: int) -> Curriculum:
        sizes = self.patch_sizes or default_patch_sizes(image_size, token_size)
        warm = self.warmup_patch_size or (sizes[1] if len(sizes) > 1 else sizes[0])
        for p in (*sizes, warm, *([self.fixed_patch_size] if self.fixed_patch_size else [])):
            check_puzzle_setting(
                batch_size=self.batch_size, height=image_size, width=image_size,
                ratio=self.ratio, patch_size=p, group_size=self.group,
            )
            if p % token_size:
                raise PuzzleError(
                    f"puzzle patch size {p} must be a multiple of the ViT token size {token_size}"
                )
        return Curriculum(
            total_epochs=self.epochs,
            warmup_epochs=self.warmup,
            patch_sizes=tuple(sizes),
            warmup_patch_size=warm,
            fixed_patch_size=self.fixed_patch_size,
            epochs_per_size=self.epochs_per_size,
            strategy=self.strategy,
            ratio=self.ratio,
            ratio_max=self.ratio_max,
            ratio_min=self.ratio_min,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["patch_sizes"] = list(self.patch_sizes) if self.patch_sizes else None
        return d

    def schedule_dict(self) -> dict[str, Any]:
        """The settings a resumed run must share with the original (all but the bookkeeping)."""
        d = self.to_dict()
        for key in ("num_workers", "keep_checkpoints", "preview_images"):
            d.pop(key)
        return d


@dataclass
class PuzzleRunResult:
    out_dir: Path
    epochs_done: int
    steps_done: int
    promptstate: Path | None  # None until every epoch is done
    card: Path | None
    final_loss: float
    images_per_second: float
    log_rows: list[dict[str, float]] = field(default_factory=list)


def write_preview(path: Path, rows: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """A PNG grid, one row per image: original | puzzle | restoration ([3, H, W] tensors in [0, 1])."""
    tiles = [torch.cat([a, b, c], dim=2) for a, b, c in rows]
    grid = torch.cat(tiles, dim=1).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    with atomic_path(path, overwrite=True) as tmp:
        Image.fromarray(np.ascontiguousarray(grid)).save(tmp, format="PNG")


def train_puzzle(
    stores: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    backbone: str | os.PathLike[str] = "vitb16-imagenet",
    config: PuzzleTrainConfig = PuzzleTrainConfig(),
    resume: bool = False,
    device: str | torch.device = "auto",
    models_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    progress: bool = True,
    stop_after_epochs: int | None = None,
) -> PuzzleRunResult:
    """Train prompt tokens (and the decoder) by multiple-puzzle restoration; see the module doc.

    Args:
        stores: patch stores (``*.zarr``) or folders of them; tiles are drawn across all.
        out_dir: the run folder. Without ``resume`` it must not hold checkpoints yet.
        backbone: an encoder card (name or YAML path) of a (prompted) ViT.
        config: the training settings.
        resume: continue from the last checkpoint in ``out_dir`` (same settings required).
        name: the exported card's name (default ``{backbone card}-puzzletuned``).
        stop_after_epochs: stop (after checkpointing) once this many epochs are done in total,
            as an interruption would; the schedule still spans ``config.epochs``, and the
            promptstate and card (None in the result) wait for the run to be complete.
    """
    from tqdm import tqdm

    if name is not None:
        check_card_name(name)
    out = Path(out_dir)
    check_run_folder(out, own=RUN_FILES, kind="PuzzleTuning")  # before advice to resume another kind's run
    checkpoints = Checkpoints(out / "checkpoints", keep=config.keep_checkpoints)
    existing = checkpoints.found()
    if existing and not resume:
        raise PuzzleError(
            f"{out}: holds checkpoints of an earlier run; pass --resume to continue it or choose another --out"
        )
    store_list = open_stores(stores)
    geometries = tile_geometries(store_list)
    bb: PuzzleBackbone = load_puzzle_backbone(
        backbone, prompt_tokens=config.prompt_tokens, prompt_mode=config.prompt_mode,
        device=device, models_dir=models_dir,
    )
    card_name = check_new_card_name(
        name or f"{bb.card.name}-puzzletuned", models_dir=models_dir, backbone=bb.card.name,
        advice="choose another --name" if name else "pass --name",
    )
    dev = bb.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the decoder's initial weights
        model = PuzzleTuningModel(
            bb.model, decoder_dim=config.decoder_dim, decoder_depth=config.decoder_depth,
            decoder_heads=config.decoder_heads,
        )
    model.to(dev)
    image_size = model.image_size[0]
    curriculum = config.curriculum(image_size=image_size, token_size=model.token_size)
    tiles_per_step = config.batch_size * config.accum_steps
    n_tiles = sum(len(st) for st in store_list)
    steps_per_epoch = config.steps_per_epoch or n_tiles // tiles_per_step
    if steps_per_epoch < 1 or n_tiles < config.batch_size:  # given steps draw the tiles again, a batch at least
        need = (f"one optimiser step of {config.batch_size} x {config.accum_steps} tiles (--batch-size x --accum-steps)"
                if config.steps_per_epoch is None else f"one batch of {config.batch_size} tiles (--batch-size)")
        raise PuzzleError(f"{', '.join(map(str, stores))}: {n_tiles} tiles, too few for {need}")
    stream = TileStream(
        store_list, batch_size=config.batch_size, image_size=image_size, seed=config.seed,
        steps=steps_per_epoch * config.accum_steps,
    )
    recorded = checkpoints.recorded_settings(existing[-1][1]) if resume and existing else None
    workers = config.num_workers
    if workers is None and recorded is not None:  # the batch order depends on it: keep the run's
        workers = recorded.get(BATCH_ORDER_WORKERS)
    workers = loader_workers() if workers is None else int(workers)
    loader = DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=dev.type == "cuda",
        persistent_workers=False,
    )
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = curriculum.warmup_epochs * steps_per_epoch
    stepper = Stepper(
        adamw(model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, decay="matrices"),
        schedule=Schedule(config.lr, kind="cosine", total_steps=total_steps, warmup_steps=warmup_steps,
                          min_lr=config.min_lr),
        device=dev, precision=config.precision, accum_steps=config.accum_steps,
    )
    schedule = {
        # the arithmetic run, not the option: auto is fp32 on a CPU, bf16 or fp16 on a GPU
        "config": {**config.schedule_dict(), "precision": stepper.precision},
        "name": card_name,
        "backbone_card": str(bb.card.source or bb.card.name),
        "backbone_sha256": bb.weight_sha256,
        "steps_per_epoch": steps_per_epoch,
        # Each store by path, tiling and size: other tiles at the same path are other data.
        "stores": sorted([str(s.path), s.params_hash, len(s)] for s in store_list),
    }
    if recorded is None or BATCH_ORDER_WORKERS in recorded:  # earlier versions' checkpoints lack it
        schedule[BATCH_ORDER_WORKERS] = max(1, workers)  # 0 and 1 read the windows in the same order
    schedule_hash = stable_hash(schedule)

    log_table = CsvLog(out / "log.csv", LOG_COLUMNS, int_columns=frozenset({"epoch", "step", "patch_size"}))
    start_epoch, rows = 0, []
    if resume and existing:
        restored = checkpoints.restore(
            existing[-1][1], tensors=model.trainable_state(), stepper=stepper, settings=schedule
        )
        start_epoch = restored.epochs_done
        # The log's rows travel in the checkpoint (log.csv is a copy for people); checkpoints
        # written before they did take them from log.csv.
        rows = restored.extra.get("rows") or [r for r in log_table.read() if r["step"] <= stepper.step]
        log.info("resuming %s at epoch %d, step %d", out, start_epoch, stepper.step)
    else:
        if resume:
            log.info("no checkpoint in %s: starting from the beginning", out)
        earlier = earlier_cards(out, role="prompts", keep=bb.card.files())
        clear_outputs(out, _final_outputs(card_name, earlier=earlier))

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / "config.json",
        {**schedule, "schedule_hash": schedule_hash, "tile_geometries": geometries, "curriculum": curriculum.to_dict(),
         "lr": config.lr, "total_steps": total_steps, "warmup_steps": warmup_steps,
         "image_size": image_size, "num_workers": workers,
         "amp": str(stepper.amp_dtype) if stepper.amp_dtype else "fp32", "device": str(dev)},
    )
    log.info("%s", curriculum.describe())
    log.info(
        "PuzzleTuning %s: %d tiles in %d stores, %d epochs x %d steps of %d x %d images, lr %.3g",
        bb.card.name, int(stream.lengths.sum()), len(store_list), config.epochs, steps_per_epoch,
        config.batch_size, config.accum_steps, config.lr,
    )

    last_epoch = config.epochs if stop_after_epochs is None else min(config.epochs, stop_after_epochs)
    images, seconds = 0, 0.0
    last: _LastBatch | None = None
    model.train()
    for epoch in range(start_epoch, last_epoch):
        stage = curriculum.at(epoch)
        stream.set_epoch(epoch)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", disable=not progress, leave=False)
        t0 = time.perf_counter()
        last = _train_epoch(
            model, loader, stepper, rows, card=bb.card, stage=stage, epoch=epoch, group_size=config.group,
            generator=epoch_generator(config.seed, epoch), bar=bar,
        )
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds += time.perf_counter() - t0
        images += steps_per_epoch * tiles_per_step
        bar.close()
        log_table.write(rows)
        _write_epoch_preview(out / "previews" / f"epoch-{epoch + 1:04d}.png", model, last, k=config.preview_images)
        checkpoints.save(
            epoch=epoch + 1, tensors=model.trainable_state(), stepper=stepper, settings=schedule, extra={"rows": rows}
        )
        log.info(
            "epoch %d/%d: loss %.4f, patch %d px, fix ratio %.3f, lr %.3g",
            epoch + 1, config.epochs, rows[-1]["loss"] if rows else float("nan"),
            stage.patch_size, stage.ratio, rows[-1]["lr"] if rows else 0.0,
        )

    done = max(start_epoch, last_epoch)
    result = PuzzleRunResult(
        out_dir=out, epochs_done=done, steps_done=stepper.step, promptstate=None, card=None,
        final_loss=rows[-1]["loss"] if rows else float("nan"),
        images_per_second=images / seconds if seconds else 0.0, log_rows=rows,
    )
    if done < config.epochs:  # stopped early: only the checkpoints, so nothing unfinished looks finished
        log.info("%s: %d of %d epochs done; continue with --resume", out, done, config.epochs)
        return result
    if last is not None and not _features_finite(bb, last.images):
        raise PuzzleError(
            f"{out}: the trained prompts give NaN or inf features after {stepper.step} steps; training diverged: "
            "lower the learning rate (--base-lr); nothing was exported"
        )
    promptstate, card_path = export_promptstate(
        bb.model.prompt_tokens, out, card=bb.card, weight_sha256=bb.weight_sha256, name=card_name,
        description=(
            f"{bb.card.name} with {bb.card.prompt_tokens} {bb.card.prompt_mode} prompt tokens "
            f"trained by PuzzleTuning (wsitools) for {done} of {config.epochs} epochs "
            f"({stepper.step} steps) on {len(store_list)} patch stores "
            f"({describe_geometries(geometries)})."
        ),
    )
    return dataclasses.replace(result, promptstate=promptstate, card=card_path)


@dataclass
class _LastBatch:
    """An epoch's last micro-batch, for its preview: images, their puzzles, the model output."""

    images: torch.Tensor
    puzzled: torch.Tensor
    output: Any


def _train_epoch(
    model: PuzzleTuningModel,
    loader: DataLoader,
    stepper: Stepper,
    rows: list[dict[str, float]],
    *,
    card: Any,
    stage: PuzzleStage,
    epoch: int,
    group_size: int,
    generator: torch.Generator,
    bar: Any,
) -> _LastBatch:
    """One epoch of puzzle restoration at ``stage``: a log row appended to ``rows`` per
    optimiser step (the mean loss of its micro-batches); a non-finite loss stops the run."""
    dev = stepper.device
    losses: list[float] = []
    for item in loader:
        batch = augmented(item, dev)
        puzzled, mask = fix_position_shuffle(
            batch, ratio=stage.ratio, patch_size=stage.patch_size, group_size=group_size, generator=generator
        )
        with stepper.autocast():
            output = model(batch, prepare_input(card, puzzled), mask)
        losses.append(float(output.loss.detach()))
        if not math.isfinite(losses[-1]):
            raise PuzzleError(
                f"the loss became {losses[-1]} at epoch {epoch}, step {stepper.step}; lower the learning "
                "rate or use fp32/bf16 (the last good checkpoint is kept)"
            )
        if stepper.backward(output.loss):
            rows.append({
                "epoch": float(epoch), "step": float(stepper.step - 1), "loss": float(np.mean(losses)),
                "lr": stepper.lr, "patch_size": float(stage.patch_size), "ratio": stage.ratio,
            })
            losses = []
            bar.update(1)
            bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}")
    return _LastBatch(batch, puzzled, output)


def _features_finite(bb: PuzzleBackbone, images: torch.Tensor) -> bool:
    """Whether the trained backbone gives finite features (float32) for ``images``: the loss is
    read before each step, so a last step that blew the prompts up shows only here."""
    was_training = bb.model.training
    bb.model.eval()
    try:
        with torch.no_grad():
            return bool(torch.isfinite(bb.model.forward_features(prepare_input(bb.card, images.float()))).all())
    finally:
        bb.model.train(was_training)


def _write_epoch_preview(path: Path, model: PuzzleTuningModel, last: _LastBatch, *, k: int) -> None:
    """The preview of the first ``k`` images of an epoch's last batch (:func:`write_preview`)."""
    k = min(k, last.images.shape[0])
    out = last.output
    with torch.no_grad():
        restored = model.restoration(
            last.puzzled[:k], dataclasses.replace(out, pred=out.pred[:k].detach(), relation=out.relation[:k])
        )
    write_preview(
        path, list(zip(last.images[:k].float().cpu(), last.puzzled[:k].float().cpu(), restored.float().cpu()))
    )
