"""Patch-level PathoTune: tune TVP/TTP/IVP prompts and a classifier on labelled tiles.

The backbone (any ViT encoder card) and the IVP encoder stay frozen; the prompts, the TTP
projection, the IVP refine module and the classifier are trained with AdamW, a linear warm-up
and a cosine decay per step, cross-entropy, and (on a GPU) autocast. The epoch with the lowest
validation loss is kept. Output folder::

    out/
      pathotune.safetensors, pathotune.json, {name}.yaml   (see wsitools.pathotune.encoder)
      log.csv            epoch, train_loss, val_loss, val_auroc, val_balanced_accuracy, val_f1, val_accuracy, lr
      metrics.json       validation (untrained and best epoch) and test reports with 95 % CIs
      predictions.csv    per test tile (or validation tile when there is no test split): name, split, label,
                         prob_{class} per class in the class order of metrics.json
      split.csv          the split used: name, label, split
      checkpoints/epoch-NNNN/   the training state after each epoch (last 2 kept; wsitools.training)

Every epoch ends with a checkpoint: the trainable weights, the kept best weights, the optimiser,
the step count and the log rows. The learning rate is a pure function of the step, and the tile
order and augmentation of an epoch are pure functions of (seed, epoch), so a run resumed from its
last checkpoint (``resume=True``, ``wsitools tune pathotune --resume``) ends with the same
weights and log as a run that was never interrupted. The outputs above but ``log.csv`` and the
checkpoints are written only when the last epoch is done, the model first and ``metrics.json``
last (so a folder with it holds the whole result); a run that starts afresh (no checkpoint)
first removes those an earlier run left (its card too, whatever its name, and its log).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from wsitools.device import TrainPrecision, autocast
from wsitools.encoders import Encoder, load_encoder
from wsitools.encoders.cards import check_card_name, check_new_card_name
from wsitools.encoders.transforms import prepare_input, random_resized_crop_flip
from wsitools.errors import ConfigError, DataError, ModelError
from wsitools.io import loader_workers, stable_hash, write_json_atomic
from wsitools.metrics import classification_metrics, metrics_report
from wsitools.pathotune.data import LabelledTiles, TileDataset, check_given_split, stratified_split
from wsitools.pathotune.encoder import CONFIG_FILE, WEIGHTS_FILE, save_pathotune
from wsitools.pathotune.model import PathoTuneConfig, PathoTunePrompts, PathoTuneViT, PromptKind, parse_prompts
from wsitools.tables import write_table
from wsitools.text import TaskDescription, embed_texts
from wsitools.training import (
    BestState,
    Checkpoints,
    CsvLog,
    Resumed,
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

SHUFFLE_STREAM, AUGMENT_STREAM = 1, 2
"""The :func:`~wsitools.training.epoch_generator` streams of an epoch's tile order and augmentation."""


@dataclass(frozen=True)
class PathoTuneTrainConfig:
    """Settings of a patch-level tuning run (our defaults; the paper gives none).

    ``num_workers`` (None: :func:`wsitools.io.loader_workers`) are the DataLoader processes that
    read and decode tiles; ``keep_checkpoints`` the epoch checkpoints kept in the run folder.
    """

    prompts: tuple[PromptKind, ...] = ("tvp", "ttp", "ivp")
    n_tvp: int = 8
    n_ivp: int = 4
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int | None = None  # None: 1, or 0 for a one-epoch run
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    augment: bool = True
    seed: int = 0
    precision: TrainPrecision = "auto"
    num_workers: int | None = None
    text_model: str | None = None
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", parse_prompts(tuple(self.prompts)))
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch size must be positive ({self.epochs}, {self.batch_size})")
        if not 0 <= self.warmup < self.epochs:
            raise ConfigError(f"warm-up epochs ({self.warmup}) must lie in [0, epochs={self.epochs})")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")

    @property
    def warmup(self) -> int:
        return min(1, self.epochs - 1) if self.warmup_epochs is None else self.warmup_epochs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompts"] = list(self.prompts)
        return d

    def schedule_dict(self) -> dict[str, Any]:
        """The settings a resumed run must share with the original (all but the bookkeeping)."""
        d = self.to_dict()
        for key in ("num_workers", "keep_checkpoints"):
            d.pop(key)
        return d


@dataclass
class PathoTuneResult:
    """A tuning run's outcome. ``card`` and ``weights`` are None (and ``test`` too) when the run
    stopped before its last epoch (``stop_after_epochs``): it continues with ``resume=True``."""

    out_dir: Path
    card: Path | None
    weights: Path | None
    epochs_done: int
    best_epoch: int
    untrained: dict[str, float]  # validation metrics of the frozen model with its untrained head
    best: dict[str, float]  # validation metrics at the best epoch so far
    test: dict[str, Any] | None  # metrics report on the test split


@torch.no_grad()
def predict(
    model: PathoTuneViT, loader: DataLoader, *, device: torch.device, amp: torch.dtype | None
) -> tuple[np.ndarray, np.ndarray, float]:
    """(probabilities [n, C], labels [n], mean cross-entropy) over a loader, in eval mode."""
    model.eval()
    probs, labels, loss_sum = [], [], 0.0
    for x, y in loader:
        x = prepare_input(model.backbone_card, x.to(device))
        y = y.to(device)
        with autocast(device, amp):
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        labels.append(y.cpu().numpy())
    p, lab = np.concatenate(probs), np.concatenate(labels)
    return p, lab, loss_sum / max(1, len(lab))


def tune_pathotune(
    data: LabelledTiles,
    out_dir: str | os.PathLike[str],
    *,
    backbone: str | os.PathLike[str],
    task: TaskDescription | None = None,
    ivp_encoder: str | os.PathLike[str] | None = None,
    text_embeddings: np.ndarray | None = None,
    config: PathoTuneTrainConfig = PathoTuneTrainConfig(),
    resume: bool = False,
    device: str | torch.device = "auto",
    models_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    progress: bool = True,
    stop_after_epochs: int | None = None,
) -> PathoTuneResult:
    """Tune PathoTune prompts on labelled tiles and save the model, its card and its metrics.

    Args:
        data: labelled tiles (:func:`~wsitools.pathotune.data.folder_tiles` or
            :func:`~wsitools.pathotune.data.store_tiles`).
        out_dir: the run folder. Without ``resume`` it must not hold checkpoints yet.
        backbone: the frozen ViT's encoder card (name or YAML path).
        task: the task and class descriptions; required for TTP, and its class order is used.
        ivp_encoder: the second frozen encoder for IVP (default: the backbone itself).
        text_embeddings: TTP's embeddings of ``task.prompts()`` [1 + C, E] when already
            computed (default: :func:`wsitools.text.embed_texts` with ``config.text_model``).
        resume: continue from the last checkpoint in ``out_dir`` (same settings and data
            required); without one, start from the beginning.
        name: the encoder card's name (default ``{backbone}-pathotune-{task or classes}``).
        stop_after_epochs: stop (after checkpointing) once this many epochs are done in total,
            as an interruption would; the schedule still spans ``config.epochs``.
    """
    if name is not None:
        check_card_name(name)  # as given, before any training: it names the card file and feature folder
    out = Path(out_dir)
    check_run_folder(out, own=RUN_FILES, kind="PathoTune")  # before advice to resume another kind's run
    checkpoints = Checkpoints(out / "checkpoints", keep=config.keep_checkpoints)
    existing = checkpoints.found()
    if existing and not resume:
        raise ConfigError(
            f"{out}: holds checkpoints of an earlier run; pass --resume to continue it or choose another --out"
        )
    prompts = config.prompts
    if "ttp" in prompts and task is None:
        raise DataError("TTP prompts need a task description (--task TASK.yaml) with class descriptions")
    if ivp_encoder is not None and "ivp" not in prompts:
        raise DataError("an IVP encoder was given but the 'ivp' prompt is not used")
    if task is not None:
        named = f"the task file {task.source}" if task.source else f"the task {task.name!r}"
        data = data.relabel(task.classes, task=named)
    stores = data.patch_stores()
    geometries = tile_geometries(stores) if stores else None
    backbone_enc: Encoder = load_encoder(backbone, device=device, models_dir=models_dir)
    card_name = check_new_card_name(
        name or _safe_name(f"{backbone_enc.name}-pathotune-{task.name if task else '-'.join(data.classes)}"),
        models_dir=models_dir, backbone=backbone_enc.name, advice="choose another --name" if name else "pass --name",
    )
    dev = backbone_enc.device
    ivp: Encoder | None = None
    if "ivp" in prompts:
        ivp = backbone_enc if ivp_encoder is None else load_encoder(ivp_encoder, device=dev, models_dir=models_dir)
    text = _text_embeddings(task, text_embeddings, config) if "ttp" in prompts else None
    model, trainable = _build_model(backbone_enc, ivp, text, classes=data.classes, config=config)

    split = data.split if data.split is not None else stratified_split(
        data.labels, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed,
        classes=data.classes,
    )
    parts = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    if len(parts["train"]) < 2 or len(parts["val"]) == 0:
        raise DataError(
            f"PathoTune needs at least 2 training tiles and 1 validation tile; the split has "
            f"{len(parts['train'])} and {len(parts['val'])}"
        )
    if data.split is not None:
        check_given_split(data, split)
    size = backbone_enc.card.input_size
    workers = loader_workers() if config.num_workers is None else config.num_workers

    def loader(part: str, *, shuffle: torch.Generator | None = None) -> DataLoader:
        # Training drops a last, smaller batch (a batch of one would break the BatchNorm).
        train = shuffle is not None
        return DataLoader(
            TileDataset(data, parts[part], size), batch_size=config.batch_size, shuffle=train,
            num_workers=workers, generator=shuffle, pin_memory=dev.type == "cuda",
            drop_last=train and len(parts[part]) > config.batch_size,
        )

    val_loader = loader("val")
    steps_per_epoch = len(loader("train", shuffle=torch.Generator()))
    stepper = Stepper(
        adamw(trainable, lr=config.lr, weight_decay=config.weight_decay),
        schedule=Schedule(config.lr, kind="cosine", total_steps=config.epochs * steps_per_epoch,
                          warmup_steps=config.warmup * steps_per_epoch),
        device=dev, precision=config.precision,
    )
    amp = stepper.amp_dtype
    images = data.image_files()
    settings = {
        # the arithmetic run, not the option: auto is fp32 on a CPU, bf16 or fp16 on a GPU
        "config": {**config.schedule_dict(), "precision": stepper.precision},
        "name": card_name,
        "backbone": {"name": backbone_enc.name, "encoder_hash": backbone_enc.encoder_hash},
        "ivp_encoder": {"name": ivp.name, "encoder_hash": ivp.encoder_hash} if ivp is not None else None,
        "task": task.to_dict() if task is not None else None,
        "text_embeddings": hashlib.sha256(text.numpy().tobytes()).hexdigest()[:16] if text is not None else None,
        "data": {"classes": list(data.classes), "tiles": stable_hash([data.names, data.labels.tolist()]),
                 "split": stable_hash(split.tolist()),
                 # each store by path, tiling and size, as PuzzleTuning's: other tiles at the same path are other data
                 "stores": sorted([str(st.path), st.params_hash, len(st)] for st in stores),
                 # each image file by path and fingerprint: another image under the same name is other data
                 **({"images": images} if images else {})},
        "steps_per_epoch": steps_per_epoch,
    }

    best = BestState(trainable)
    if resume and existing:
        resumed = checkpoints.restore(
            existing[-1][1], tensors=_checkpoint_tensors(trainable, best), stepper=stepper, settings=settings
        )
        rows, summary = _resumed_record(resumed, existing[-1][1])
        start = resumed.epochs_done
        best.load_summary(summary)
        log.info("resuming %s after epoch %d (step %d)", out, start, stepper.step)
    else:
        if resume:
            log.info("no checkpoint in %s: starting from the beginning", out)
        read = [f for enc in (backbone_enc, ivp) if enc is not None for f in enc.card.files()]
        earlier = earlier_cards(out, role="pathotune", keep=read)
        clear_outputs(out, [re.escape(f) for f in (*FINAL_FILES, f"{card_name}.yaml", *earlier, "log.csv")])
        p0, y0, loss0 = predict(model, val_loader, device=dev, amp=amp)
        start, rows = 0, [_log_row(0, math.nan, {"loss": loss0, **classification_metrics(y0, p0)}, 0.0)]
        best.record(0, loss0)
    untrained = _row_metrics(rows[0])
    log.info("PathoTune %s (%s) on %s: untrained val %s", backbone_enc.name, ",".join(prompts),
             ", ".join(data.classes), _fmt(untrained))

    out.mkdir(parents=True, exist_ok=True)
    log_table = CsvLog(out / "log.csv", LOG_COLUMNS, int_columns=LOG_INT_COLUMNS)
    last_epoch = config.epochs if stop_after_epochs is None else min(config.epochs, stop_after_epochs)
    for epoch in range(start + 1, last_epoch + 1):
        train_loss = _train_epoch(
            model, loader("train", shuffle=epoch_generator(config.seed, epoch, stream=SHUFFLE_STREAM)), stepper,
            augment=epoch_generator(config.seed, epoch, stream=AUGMENT_STREAM) if config.augment else None,
            size=size, desc=f"epoch {epoch}", progress=progress,
        )
        if not math.isfinite(train_loss):
            raise ModelError(
                f"{out}: the training loss became {train_loss} in epoch {epoch}; training diverged: lower the "
                "learning rate (--lr) (the checkpoints of the epochs before are kept)"
            )
        p, yv, val_loss = predict(model, val_loader, device=dev, amp=amp)
        rows.append(_log_row(epoch, train_loss, {"loss": val_loss, **classification_metrics(yv, p)}, stepper.lr))
        log.info("epoch %d/%d: train loss %.4f, val %s", epoch, config.epochs, train_loss, _fmt(_row_metrics(rows[-1])))
        best.update(epoch, val_loss)
        log_table.write(rows)
        checkpoints.save(
            epoch=epoch, tensors=_checkpoint_tensors(trainable, best), stepper=stepper, settings=settings,
            extra={"best": best.summary(), "rows": rows},
        )
    if start >= last_epoch:  # nothing trained now: the log as the checkpoint recorded it
        log_table.write(rows)
    done = max(start, last_epoch)
    best_metrics = _row_metrics(rows[best.epoch])
    if done < config.epochs:
        log.info("stopped after epoch %d of %d; continue with --resume", done, config.epochs)
        return PathoTuneResult(out_dir=out, card=None, weights=None, epochs_done=done, best_epoch=best.epoch,
                               untrained=untrained, best=best_metrics, test=None)
    best.restore()
    report_part = "test" if len(parts["test"]) else "val"
    p, yt, _ = predict(model, loader(report_part), device=dev, amp=amp)
    # The model first and metrics.json last: a run killed in between has no metrics of a model it lacks.
    weights, card = save_pathotune(
        out, model, backbone=backbone_enc, ivp=ivp, name=card_name,
        meta={"task": task.to_dict() if task else None, "text_model": config.text_model,
              "training": config.to_dict(), "best_epoch": best.epoch, "tile_geometries": geometries},
        trained_on=_geometry_words(geometries),
    )
    report = _write_reports(
        out, data, split, parts, report_part=report_part, probs=p, labels=yt, seed=config.seed,
        summary={"val_untrained": untrained, "val_best": best_metrics, "best_epoch": best.epoch},
    )
    return PathoTuneResult(
        out_dir=out, card=card, weights=weights, epochs_done=done, best_epoch=best.epoch, untrained=untrained,
        best=best_metrics, test=report if report_part == "test" else None,
    )


def _write_reports(
    out: Path,
    data: LabelledTiles,
    split: np.ndarray,
    parts: Mapping[str, np.ndarray],
    *,
    report_part: str,
    probs: np.ndarray,
    labels: np.ndarray,
    seed: int,
    summary: Mapping[str, Any],
) -> dict[str, Any]:
    """split.csv, predictions.csv (of ``report_part``) and metrics.json (``summary`` plus the
    report of ``report_part`` with its intervals); the report."""
    write_table(out / "split.csv",
                [{"name": data.names[i], "label": data.classes[data.labels[i]], "split": split[i]} for i in range(len(data))],
                ["name", "label", "split"], dialect="csv")
    report = metrics_report(labels, probs, class_names=list(data.classes), seed=seed)
    prob_columns = [f"prob_{c}" for c in data.classes]  # as the MIL heads name them
    write_table(
        out / "predictions.csv",
        [{"name": data.names[i], "split": report_part, "label": data.classes[labels[k]],
          **dict(zip(prob_columns, map(float, probs[k])))} for k, i in enumerate(parts[report_part])],
        ["name", "split", "label", *prob_columns], dialect="csv",
    )
    write_json_atomic(
        out / "metrics.json",
        {"classes": list(data.classes), **summary, "report_split": report_part, report_part: report,
         "n_tiles": {k: int(len(v)) for k, v in parts.items()}},
    )
    return report


def _text_embeddings(
    task: TaskDescription | None, given: np.ndarray | None, config: PathoTuneTrainConfig
) -> torch.Tensor:
    """TTP's text embeddings of the task and its classes [1 + C, E] (given, or embedded now)."""
    assert task is not None
    emb = embed_texts(task.prompts(), model=config.text_model) if given is None else given
    if emb.ndim != 2 or emb.shape[0] != len(task.prompts()):
        raise DataError(f"text embeddings must be [{len(task.prompts())}, E] (task + classes), got {emb.shape}")
    return torch.as_tensor(np.asarray(emb, np.float32))


def _build_model(
    backbone: Encoder, ivp: Encoder | None, text: torch.Tensor | None, *, classes: tuple[str, ...],
    config: PathoTuneTrainConfig,
) -> tuple[PathoTuneViT, PathoTunePrompts]:
    """The prompted model and its trainable part, initialised from ``config.seed``."""
    vit = backbone.model
    if not (hasattr(vit, "blocks") and hasattr(vit, "embed_dim")):  # a CNN has blocks too, but no tokens
        raise ModelError(f"{backbone.name}: PathoTune needs a ViT backbone card, not {type(vit).__name__}")
    pconfig = PathoTuneConfig(
        prompts=config.prompts, classes=classes, embed_dim=int(vit.embed_dim), depth=len(vit.blocks),
        n_tvp=config.n_tvp, n_ivp=config.n_ivp,
        text_dim=int(text.shape[1]) if text is not None else None,
        ivp_dim=ivp.dim if ivp is not None else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        trainable = PathoTunePrompts(pconfig)
    if text is not None:
        trainable.set_text_embeddings(text)
    return PathoTuneViT(backbone, trainable.to(backbone.device), ivp=ivp), trainable


def _train_epoch(
    model: PathoTuneViT,
    loader: DataLoader,
    stepper: Stepper,
    *,
    augment: torch.Generator | None,
    size: int,
    desc: str,
    progress: bool,
) -> float:
    """One pass over the training tiles (random crops and flips drawn from ``augment`` when
    given); the mean training loss."""
    from tqdm import tqdm

    model.train()
    dev = stepper.device
    losses = []
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = x.to(dev, non_blocking=True)
        if augment is not None:  # on the device: resizing each image on the CPU would starve a GPU
            x = random_resized_crop_flip(x, size=size, generator=augment)
        x, y = prepare_input(model.backbone_card, x), y.to(dev)
        with stepper.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        stepper.backward(loss)
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def _checkpoint_tensors(trainable: PathoTunePrompts, best: BestState) -> dict[str, torch.Tensor]:
    """What an epoch checkpoint holds besides the optimiser: the live trainable state and the
    kept best one (the same tensors the model uses, so a restore fills them in place)."""
    return {
        **{f"model.{k}": v for k, v in trainable.state_dict().items()},
        **{f"best.{k}": v for k, v in best.kept_tensors().items()},
    }


def _resumed_record(resumed: Resumed, path: Path) -> tuple[list[dict[str, float]], dict[str, float]]:
    """The log rows (untrained + one per epoch done) and the best-epoch summary saved with a
    checkpoint, checked against its epochs done."""
    source = path / "state.json"
    try:
        rows = [{k: int(r[k]) if k in LOG_INT_COLUMNS else float(r[k]) for k in LOG_COLUMNS}
                for r in resumed.extra["rows"]]
        best = {"epoch": int(resumed.extra["best"]["epoch"]), "loss": float(resumed.extra["best"]["loss"])}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{source}: not a PathoTune checkpoint record ({exc!r})") from None
    if len(rows) != resumed.epochs_done + 1 or not 0 <= best["epoch"] <= resumed.epochs_done:
        raise ModelError(
            f"{source}: its {len(rows)} log rows and best epoch {best['epoch']} do not fit "
            f"{resumed.epochs_done} epochs done"
        )
    return rows, best


FINAL_FILES = (WEIGHTS_FILE, CONFIG_FILE, "split.csv", "predictions.csv", "metrics.json")
"""What a run writes when its last epoch is done, besides its card, in this order: metrics.json
last, so a folder that has it holds the whole result (the workflow's declared output). At a
fresh start an earlier run's are removed, with its card (whatever its name) and its log."""
RUN_FILES = (*FINAL_FILES, "*.yaml", "log.csv", "checkpoints")
"""What a run writes into its folder (the layout above); a folder holding anything else is
another run's (a MIL training run also has ``metrics.json`` and ``predictions.csv``) and is refused."""
_METRIC_KEYS = ("auroc", "balanced_accuracy", "f1", "accuracy")
LOG_COLUMNS = ("epoch", "train_loss", "val_loss", *(f"val_{k}" for k in _METRIC_KEYS), "lr")
LOG_INT_COLUMNS = frozenset({"epoch"})
"""The columns of :data:`LOG_COLUMNS` that hold integers, in log.csv and in a checkpoint's record."""


def _row_metrics(row: Mapping[str, float]) -> dict[str, float]:
    """The validation metrics of a log row (as :func:`classification_metrics` gave them, with the loss)."""
    return {"loss": row["val_loss"], **{k: row[f"val_{k}"] for k in _METRIC_KEYS}}


def _log_row(epoch: int, train_loss: float, val: dict[str, float], lr: float) -> dict[str, float]:
    """One row of log.csv: the epoch's mean training loss, its validation metrics, its last rate."""
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
            **{f"val_{k}": val[k] for k in _METRIC_KEYS}, "lr": lr}


def _geometry_words(geometries: Mapping[str, int] | None) -> str | None:
    """``tiles of 3 patch stores (64 px tiles at 0.5 um/px: 3)``, for the card's description."""
    if geometries is None:
        return None
    return f"tiles of {sum(geometries.values())} patch stores ({describe_geometries(geometries)})"


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in m.items())


def _safe_name(name: str) -> str:
    """The default card name (from the backbone, task or class names) as a valid card name
    (:func:`~wsitools.encoders.cards.check_card_name`): other characters become ``-``, runs of
    ``.`` one ``.``, at most 100 characters, starting and ending with a letter or digit."""
    cleaned = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]", "-", name))
    return cleaned[:100].strip("-._") or "pathotune"
