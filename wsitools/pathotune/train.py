"""Patch-level PathoTune: tune TVP/TTP/IVP prompts and a classifier on labelled tiles.

The backbone (any ViT encoder card) and the IVP encoder stay frozen; the prompts, the TTP
projection, the IVP refine module and the classifier are trained with AdamW, a linear warm-up
and a cosine decay per step, cross-entropy, and (on a GPU) autocast. The epoch with the lowest
validation loss is kept. Output folder::

    out/
      pathotune.safetensors, pathotune.json, {name}.yaml   (see wsitools.pathotune.encoder)
      log.csv            epoch, train_loss, val_loss, val_auroc, val_balanced_accuracy, val_f1, val_accuracy, lr
      metrics.json       validation (untrained and best epoch) and test reports with 95 % CIs
      predictions.csv    per test tile (or validation tile when there is no test split): name, label, probabilities
      split.csv          the split used: name, label, split
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from wsitools.encoders import Encoder, load_encoder
from wsitools.encoders.transforms import prepare_input, random_resized_crop_flip, to_unit_float
from wsitools.device import TrainPrecision, autocast
from wsitools.errors import ConfigError, DataError, ModelError
from wsitools.io import atomic_path, available_cpus, write_json_atomic
from wsitools.metrics import classification_metrics, metrics_report
from wsitools.pathotune.data import LabelledTiles, stratified_split
from wsitools.pathotune.encoder import save_pathotune
from wsitools.pathotune.model import PathoTuneConfig, PathoTunePrompts, PathoTuneViT, PromptKind, parse_prompts
from wsitools.text import TaskDescription, embed_texts
from wsitools.training import BestState, CsvLog, Schedule, Stepper, adamw

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class PathoTuneTrainConfig:
    """Settings of a patch-level tuning run (our defaults; the paper gives none)."""

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

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", parse_prompts(tuple(self.prompts)))
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch size must be positive ({self.epochs}, {self.batch_size})")
        if not 0 <= self.warmup < self.epochs:
            raise ConfigError(f"warm-up epochs ({self.warmup}) must lie in [0, epochs={self.epochs})")

    @property
    def warmup(self) -> int:
        return min(1, self.epochs - 1) if self.warmup_epochs is None else self.warmup_epochs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompts"] = list(self.prompts)
        return d


@dataclass
class PathoTuneResult:
    out_dir: Path
    card: Path
    weights: Path
    best_epoch: int
    untrained: dict[str, float]  # validation metrics of the frozen model with its untrained head
    best: dict[str, float]  # validation metrics at the best epoch
    test: dict[str, Any] | None  # metrics report on the test split


class _TileDataset(Dataset):
    """Tiles of a split as [0, 1] float [3, S, S] at the backbone's input size, with labels."""

    def __init__(self, tiles: LabelledTiles, indices: np.ndarray, size: int):
        self.tiles, self.indices, self.size = tiles, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        i = int(self.indices[k])
        return to_unit_float(self.tiles.read(i)[None], size=self.size)[0], int(self.tiles.labels[i])


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


def _write_rows(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with atomic_path(path, overwrite=True) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def tune_pathotune(
    data: LabelledTiles,
    out_dir: str | os.PathLike[str],
    *,
    backbone: str | os.PathLike[str],
    task: TaskDescription | None = None,
    ivp_encoder: str | os.PathLike[str] | None = None,
    text_embeddings: np.ndarray | None = None,
    config: PathoTuneTrainConfig = PathoTuneTrainConfig(),
    device: str | torch.device = "auto",
    models_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    progress: bool = True,
) -> PathoTuneResult:
    """Tune PathoTune prompts on labelled tiles and save the model, its card and its metrics.

    Args:
        data: labelled tiles (:func:`~wsitools.pathotune.data.folder_tiles` or
            :func:`~wsitools.pathotune.data.store_tiles`).
        backbone: the frozen ViT's encoder card (name or YAML path).
        task: the task and class descriptions; required for TTP, and its class order is used.
        ivp_encoder: the second frozen encoder for IVP (default: the backbone itself).
        text_embeddings: TTP's embeddings of ``task.prompts()`` [1 + C, E] when already
            computed (default: :func:`wsitools.text.embed_texts` with ``config.text_model``).
        name: the encoder card's name (default ``{backbone}-pathotune-{task or classes}``).
    """
    from tqdm import tqdm

    out = Path(out_dir)
    prompts = config.prompts
    if "ttp" in prompts and task is None:
        raise DataError("TTP prompts need a task description (--task TASK.yaml) with class descriptions")
    if ivp_encoder is not None and "ivp" not in prompts:
        raise DataError("an IVP encoder was given but the 'ivp' prompt is not used")
    if task is not None:
        data = data.relabel(task.classes)
    backbone_enc: Encoder = load_encoder(backbone, device=device, models_dir=models_dir)
    dev = backbone_enc.device
    ivp: Encoder | None = None
    if "ivp" in prompts:
        ivp = backbone_enc if ivp_encoder is None else load_encoder(ivp_encoder, device=dev, models_dir=models_dir)
    text = None
    if "ttp" in prompts:
        assert task is not None
        emb = embed_texts(task.prompts(), model=config.text_model) if text_embeddings is None else text_embeddings
        if emb.ndim != 2 or emb.shape[0] != len(task.prompts()):
            raise DataError(f"text embeddings must be [{len(task.prompts())}, E] (task + classes), got {emb.shape}")
        text = torch.as_tensor(np.asarray(emb, np.float32))
    vit = backbone_enc.model
    if not hasattr(vit, "blocks"):
        raise ModelError(f"{backbone_enc.name}: PathoTune needs a ViT backbone card, not {type(vit).__name__}")
    pconfig = PathoTuneConfig(
        prompts=prompts, classes=data.classes, embed_dim=int(vit.embed_dim), depth=len(vit.blocks),
        n_tvp=config.n_tvp, n_ivp=config.n_ivp,
        text_dim=int(text.shape[1]) if text is not None else None,
        ivp_dim=ivp.dim if ivp is not None else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        trainable = PathoTunePrompts(pconfig)
    if text is not None:
        trainable.set_text_embeddings(text)
    model = PathoTuneViT(backbone_enc, trainable.to(dev), ivp=ivp)

    split = data.split if data.split is not None else stratified_split(
        data.labels, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed
    )
    parts = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    if len(parts["train"]) < 2 or len(parts["val"]) == 0:
        raise DataError(
            f"PathoTune needs at least 2 training tiles and 1 validation tile; the split has "
            f"{len(parts['train'])} and {len(parts['val'])}"
        )
    size = backbone_enc.card.input_size
    workers = config.num_workers if config.num_workers is not None else min(4, max(0, available_cpus() - 1))
    gen = torch.Generator().manual_seed(config.seed)

    def loader(part: str, train: bool) -> DataLoader:
        # Training drops a last, smaller batch (a batch of one would break the BatchNorm).
        return DataLoader(
            _TileDataset(data, parts[part], size), batch_size=config.batch_size, shuffle=train,
            num_workers=workers, generator=gen if train else None, pin_memory=dev.type == "cuda",
            drop_last=train and len(parts[part]) > config.batch_size,
        )

    train_loader, val_loader = loader("train", True), loader("val", False)
    steps_per_epoch = len(train_loader)
    stepper = Stepper(
        adamw(trainable, lr=config.lr, weight_decay=config.weight_decay),
        schedule=Schedule(config.lr, kind="cosine", total_steps=config.epochs * steps_per_epoch,
                          warmup_steps=config.warmup * steps_per_epoch),
        device=dev, precision=config.precision,
    )
    amp = stepper.amp_dtype

    p0, y0, loss0 = predict(model, val_loader, device=dev, amp=amp)
    untrained = {"loss": loss0, **classification_metrics(y0, p0)}
    log.info("PathoTune %s (%s) on %s: untrained val %s", backbone_enc.name, ",".join(prompts),
             ", ".join(data.classes), _fmt(untrained))
    rows = [_log_row(0, math.nan, untrained, 0.0)]
    val_metrics = {0: untrained}
    best = BestState(trainable)
    best.record(0, loss0)
    aug = torch.Generator().manual_seed(config.seed + 1)
    for epoch in range(1, config.epochs + 1):
        model.train()
        losses = []
        for x, y in tqdm(train_loader, desc=f"epoch {epoch}", disable=not progress, leave=False):
            if config.augment:
                x = random_resized_crop_flip(x, size=size, generator=aug)
            x, y = prepare_input(backbone_enc.card, x.to(dev, non_blocking=True)), y.to(dev)
            with stepper.autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            stepper.backward(loss)
            losses.append(float(loss.detach()))
        p, yv, val_loss = predict(model, val_loader, device=dev, amp=amp)
        val_metrics[epoch] = {"loss": val_loss, **classification_metrics(yv, p)}
        rows.append(_log_row(epoch, float(np.mean(losses)), val_metrics[epoch], stepper.lr))
        log.info("epoch %d/%d: train loss %.4f, val %s", epoch, config.epochs, np.mean(losses),
                 _fmt(val_metrics[epoch]))
        best.update(epoch, val_loss)
    best.restore()
    best_epoch, best_metrics = best.epoch, val_metrics[best.epoch]

    out.mkdir(parents=True, exist_ok=True)
    CsvLog(out / "log.csv", LOG_COLUMNS, int_columns=frozenset({"epoch"})).write(rows)
    _write_rows(out / "split.csv", ["name", "label", "split"],
                [[data.names[i], data.classes[data.labels[i]], split[i]] for i in range(len(data))])
    report_part = "test" if len(parts["test"]) else "val"
    p, yt, _ = predict(model, loader(report_part, False), device=dev, amp=amp)
    report = metrics_report(yt, p, class_names=list(data.classes), seed=config.seed)
    _write_rows(
        out / "predictions.csv", ["name", "split", "label", *(f"p_{c}" for c in data.classes)],
        [[data.names[i], report_part, data.classes[yt[k]], *map(float, p[k])] for k, i in enumerate(parts[report_part])],
    )
    write_json_atomic(
        out / "metrics.json",
        {"classes": list(data.classes), "val_untrained": untrained, "val_best": best_metrics,
         "best_epoch": best_epoch, "report_split": report_part, report_part: report,
         "n_tiles": {k: int(len(v)) for k, v in parts.items()}},
    )
    card_name = name or f"{backbone_enc.name}-pathotune-{task.name if task else '-'.join(data.classes)}"
    weights, card = save_pathotune(
        out, model, backbone=backbone_enc, ivp=ivp, name=_safe_name(card_name),
        meta={"task": task.to_dict() if task else None, "text_model": config.text_model,
              "training": config.to_dict(), "best_epoch": best_epoch},
    )
    return PathoTuneResult(
        out_dir=out, card=card, weights=weights, best_epoch=best_epoch, untrained=untrained,
        best=best_metrics, test=report if report_part == "test" else None,
    )


_METRIC_KEYS = ("auroc", "balanced_accuracy", "f1", "accuracy")
LOG_COLUMNS = ("epoch", "train_loss", "val_loss", *(f"val_{k}" for k in _METRIC_KEYS), "lr")


def _log_row(epoch: int, train_loss: float, val: dict[str, float], lr: float) -> dict[str, float]:
    """One row of log.csv: the epoch's mean training loss, its validation metrics, its last rate."""
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
            **{f"val_{k}": val[k] for k in _METRIC_KEYS}, "lr": lr}


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in m.items())


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", name).strip("-.") or "pathotune"
    return cleaned[:100]
