"""Training and cross-validated evaluation of slide-level MIL heads.

One run = one head on one cohort: for each fold, train on the training slides (one bag per
step, AdamW, class-weighted loss or class-balanced sampling), stop early on the validation
loss, keep the best epoch's weights, and predict the fold's test slides. The output directory
(layout in docs/formats.md, "MIL heads") is written under a temporary name and renamed when complete.

Choices where the papers are silent (documented in docs/mil.md):
- Training steps see at most ``bag_size`` patches per bag (a fresh random subset every step,
  512 by default), which is both an augmentation and what makes 10k-patch bags train at
  over a hundred bags per second on a 2-core CPU; validation, test and prediction always use whole bags.
- Instance dropout: each training step also drops a random ``instance_dropout`` fraction (0.7 by
  default) of the bag's patches, so no single patch can carry the decision and the attention
  learns to rank all the evidence, not just its strongest patch.
- The validation loss used for early stopping is class-balanced (inverse-frequency weights of
  the validation set), so the majority class cannot dominate model selection.

The head and every bag live on one ``device`` (``auto``: CUDA when available). Bags are read on
the CPU (by loader workers), pinned when the device is a GPU and copied without blocking; the
saved weights are always CPU tensors. Training is plain float32: the heads are small, and on a
CPU it is bit-for-bit what it was before there was a device option.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsitools import __version__
from wsitools.errors import DataError
from wsitools.io import atomic_path, write_json_atomic
from wsitools.metrics import classification_metrics, mean_sd, metrics_report
from wsitools.mil.config import Balance, TrainConfig
from wsitools.mil.data import (
    Cohort,
    Fold,
    RowLayout,
    bag_info,
    build_cohort,
    class_weights,
    patient_kfold,
    read_coords,
    read_features,
    read_labels,
    row_layout,
    sample_index,
    user_folds,
)
from wsitools.mil.heads import HeadConfig, HeadName, PromptKind, create_head, save_head
from wsitools.attention import write_attention
from wsitools.mil.predict import write_predictions_csv
from wsitools.text import TaskDescription, embed_texts, load_task, resolve_text_model, text_model_key

log = logging.getLogger(__name__)

CACHE_BYTES = 1 << 30
"""Whole bags kept in memory per training run (per loader worker), in bytes."""


class BagDataset(torch.utils.data.Dataset):
    """Bags read from their feature stores; a key is ``(index, draw)``.

    ``draw`` seeds the random subset of rows for a training step (an ``instance_dropout``
    fraction dropped, at most ``bag_size`` kept), so a run is reproducible whatever the number
    of loader workers; ``draw=None`` reads the whole bag. Each store's row layout is looked up
    once (per loader worker) and its sampled rows are then read through a memory map alone.
    Bags read whole (validation, test, and training steps of bags no larger than ``bag_size``)
    are kept in memory up to ``cache_bytes`` in all, so small cohorts are read from disk once:
    opening an h5 file took a third of a small bag's training step.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: np.ndarray,
        sizes: Sequence[int],
        *,
        bag_size: int | None,
        instance_dropout: float = 0.0,
        ivp_paths: Sequence[Path] | None = None,
        cache_bytes: int = CACHE_BYTES,
    ):
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sizes = list(sizes)
        self.bag_size = bag_size
        self.instance_dropout = instance_dropout
        self.ivp_paths = list(ivp_paths) if ivp_paths is not None else None
        self._layouts: dict[int, RowLayout | None] = {}
        self.cache_bytes = cache_bytes
        self._cache: dict[Path, torch.Tensor] = {}
        self._cached = 0

    def __len__(self) -> int:
        return len(self.paths)

    def _whole(self, path: Path) -> torch.Tensor:
        """The whole bag of ``path``, from memory when it was read before and fitted."""
        x = self._cache.get(path)
        if x is None:
            x = read_features(path)
            if self._cached + x.nbytes <= self.cache_bytes:
                self._cache[path] = x
                self._cached += x.nbytes
        return x

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        i, draw = key
        rng = np.random.default_rng(draw) if draw is not None else None
        index = None
        if rng is not None:
            index = sample_index(self.sizes[i], self.bag_size, rng, instance_dropout=self.instance_dropout)
        if index is None:
            x = self._whole(self.paths[i])
        else:
            if i not in self._layouts:
                self._layouts[i] = row_layout(self.paths[i])
            x = read_features(self.paths[i], index, layout=self._layouts[i])
        ivp = None
        if self.ivp_paths is not None:
            ivp = self._whole(self.ivp_paths[i])
            if rng is not None:
                sub = sample_index(len(ivp), self.bag_size, rng, instance_dropout=self.instance_dropout)
                ivp = ivp if sub is None else ivp[torch.from_numpy(sub)]
        return x, ivp, int(self.labels[i])


def _loader(
    dataset: BagDataset, keys: Sequence[tuple[int, int | None]], workers: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, int]]:
    """Bags in the order of ``keys``, moved to ``device`` (from pinned memory, without blocking,
    when it is a GPU: the copy overlaps the previous step)."""
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=list(keys),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        pin_memory=device.type == "cuda",
    )
    for x, ivp, y in loader:
        yield (
            x.to(device, non_blocking=True),
            ivp.to(device, non_blocking=True) if ivp is not None else None,
            y,
        )


def epoch_keys(train: np.ndarray, labels: np.ndarray, *, balance: Balance, rng: np.random.Generator) -> list[tuple[int, int]]:
    """One epoch's training keys: a permutation of the training bags, or (``sampling``) as many
    draws with replacement with each class equally likely; each with a seed for its subset."""
    if balance == "sampling":
        counts = np.bincount(labels[train])
        p = 1.0 / counts[labels[train]]
        order = rng.choice(train, size=len(train), replace=True, p=p / p.sum())
    else:
        order = rng.permutation(train)
    draws = rng.integers(0, 2**31 - 1, size=len(order))
    return [(int(i), int(d)) for i, d in zip(order, draws)]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the head's parameters, fused (one kernel per step on CPU and GPU alike: on a
    512-patch abmil step it takes about half the time of the per-tensor loop)."""
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: BagDataset,
    keys: Sequence[tuple[int, int]],
    *,
    step_weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    workers: int = 0,
) -> float:
    """One pass over ``keys``, one bag per optimiser step; returns the mean (class-weighted) loss.

    Each step's loss is ``weight[y] * CE``: with one bag per step a weighted mean would cancel
    the weight, so it is applied as a factor. ``model`` and ``step_weights`` are on ``device``.
    The losses are summed in float64 on the device (no GPU synchronisation per step; the same
    sum as adding them up as Python floats).
    """
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x, ivp, y in _loader(dataset, keys, workers, device):
        out = model(x, ivp)
        loss = step_weights[y] * F.cross_entropy(out.logits[None], torch.tensor([y], device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    return float(total) / max(1, len(keys))


@dataclass
class Evaluation:
    """Whole-bag predictions of one model on a set of slides."""

    index: np.ndarray
    probs: np.ndarray  # [n, C]
    attention: list[np.ndarray]
    loss: float  # class-balanced mean cross-entropy


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: BagDataset,
    index: np.ndarray,
    *,
    device: torch.device = torch.device("cpu"),
    workers: int = 0,
) -> Evaluation:
    """Predict whole bags in eval mode (``model`` on ``device``); the loss weights each class by
    its inverse frequency here. Results are gathered on the device and copied back once."""
    model.eval()
    probs, attention, losses = [], [], []
    for x, ivp, y in _loader(dataset, [(int(i), None) for i in index], workers, device):
        out = model(x, ivp)
        probs.append(torch.softmax(out.logits, dim=-1))
        attention.append(out.attention)
        losses.append(F.cross_entropy(out.logits[None], torch.tensor([y], device=device)))
    labels = dataset.labels[index]
    probs_np = torch.stack(probs).cpu().numpy()
    weights = class_weights(labels, probs_np.shape[1])[labels]
    per_bag = torch.stack(losses).cpu().numpy().astype(np.float64)
    loss = float(np.sum(weights * per_bag) / np.sum(weights))
    return Evaluation(
        index=np.asarray(index), probs=probs_np, attention=[a.cpu().numpy() for a in attention], loss=loss
    )


@dataclass
class FoldResult:
    """A trained fold: its model (best epoch restored, on the training device), curves and test evaluation."""

    fold: Fold
    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    test: Evaluation
    seconds: float = 0.0


def train_fold(
    cohort: Cohort,
    fold: Fold,
    head_config: HeadConfig,
    config: TrainConfig,
    *,
    text_embeddings: torch.Tensor | None = None,
    device: torch.device = torch.device("cpu"),
    progress: bool = False,
) -> FoldResult:
    """Train one head on ``device`` on ``fold.train``, early-stopped on ``fold.val``; evaluate on
    ``fold.test``. The head is initialised on the CPU (seeded) and then moved, so its initial
    weights do not depend on the device."""
    from tqdm import tqdm

    for part in ("train", "val", "test"):
        if len(getattr(fold, part)) == 0:
            raise DataError(f"fold {fold.index}: the {part} part is empty (too few patients for this split)")
    if len(np.unique(cohort.labels[fold.train])) < 2:
        raise DataError(f"fold {fold.index}: the training part holds a single class")
    torch.manual_seed(config.seed * 1009 + fold.index)
    rng = np.random.default_rng([config.seed, fold.index])
    model = create_head(head_config, text_embeddings=text_embeddings).to(device)
    optimizer = make_optimizer(model, config)
    dataset = BagDataset(
        cohort.paths, cohort.labels, cohort.sizes, bag_size=config.bag_size,
        instance_dropout=config.instance_dropout, ivp_paths=cohort.ivp_paths,
    )
    n_classes = len(cohort.classes)
    step_weights = (
        torch.from_numpy(class_weights(cohort.labels[fold.train], n_classes))
        if config.balance == "weights"
        else torch.ones(n_classes)
    ).to(device)
    best_loss, best_epoch, best_state = math.inf, -1, None
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = tqdm(range(config.epochs), desc=f"fold {fold.index}", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        keys = epoch_keys(fold.train, cohort.labels, balance=config.balance, rng=rng)
        train_loss = train_epoch(
            model, optimizer, dataset, keys, step_weights=step_weights, device=device, workers=config.workers
        )
        val = evaluate(model, dataset, fold.val, device=device, workers=config.workers)
        scores = classification_metrics(cohort.labels[fold.val], val.probs)
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val.loss,
                "val_auroc": scores["auroc"],
                "val_balanced_accuracy": scores["balanced_accuracy"],
                "seconds": time.perf_counter() - t0,
            }
        )
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val.loss:.3f}")
        if val.loss < best_loss - 1e-6:
            best_loss, best_epoch = val.loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch + 1 >= config.min_epochs and epoch - best_epoch >= config.patience:
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    test = evaluate(model, dataset, fold.test, device=device, workers=config.workers)
    return FoldResult(
        fold=fold, model=model, history=history, best_epoch=best_epoch, test=test, seconds=time.perf_counter() - start
    )


def plot_curves(path: Path, histories: dict[int, list[dict[str, float]]], best: dict[int, int], *, title: str) -> None:
    """Training and validation loss per epoch, one colour per fold, best epoch marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for k, hist in histories.items():
        epochs = [h["epoch"] for h in hist]
        line = ax.plot(epochs, [h["train_loss"] for h in hist], "--", label=f"fold {k} train")[0]
        ax.plot(epochs, [h["val_loss"] for h in hist], "-", color=line.get_color(), label=f"fold {k} val")
        ax.axvline(best[k], color=line.get_color(), alpha=0.3, linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def task_text_embeddings(
    task: TaskDescription, *, text_model: str | os.PathLike[str] | None, cache_dir: str | os.PathLike[str] | None
) -> torch.Tensor:
    """TTP's frozen embeddings: the task text and each class description, [1 + C, E]."""
    return torch.from_numpy(embed_texts(task.prompts(), model=text_model, cache_dir=cache_dir))


def train(
    *,
    features_dir: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    task: str | os.PathLike[str] | TaskDescription | None = None,
    head: HeadName = "abmil",
    prompts: Sequence[PromptKind] = (),
    config: TrainConfig = TrainConfig(),
    head_options: dict[str, Any] | None = None,
    ivp_features_dir: str | os.PathLike[str] | None = None,
    text_model: str | os.PathLike[str] | None = None,
    text_cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    strict: bool = False,
    allow_empty_classes: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Cross-validate ``head`` on a labelled cohort and write the run to ``out_dir``.

    ``task`` (a task YAML or :class:`TaskDescription`) names the classes in logit order and
    describes them; heads that use no text (``abmil``, ``meanpool``, ``pathotune`` without
    ``ttp``) can do without it, and then the classes are the labels found in the table, sorted
    (recorded as ``classes`` with every head). Folds come from the labels table's
    ``split``/``fold`` column if it has one, else from patient-level stratified k-fold. A task
    class without a usable labelled slide is an error (a warning with ``allow_empty_classes``).
    ``device``: ``auto`` (CUDA when available), ``cpu`` or
    ``cuda`` (a :class:`~wsitools.errors.ModelError` when there is no GPU). Returns the content
    of ``metrics.json``.
    """
    from wsitools.device import resolve_device

    dev = resolve_device(device)
    if task is None and "ttp" in prompts:
        raise DataError("the ttp prompt embeds the task and class descriptions: give a task (--task TASK.yaml)")
    task = task if isinstance(task, TaskDescription) or task is None else load_task(task)
    task_name = task.name if task is not None else ""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DataError(f"output {out_dir} exists; use --overwrite to replace it")
    if ivp_features_dir is not None and "ivp" not in prompts:
        raise DataError("--ivp-features is used by the 'ivp' prompt; add ivp to --prompts")
    rows = read_labels(labels)
    classes = task.classes if task is not None else tuple(sorted({r.label for r in rows}))
    cohort = build_cohort(
        rows, features_dir, classes, ivp_features_dir=ivp_features_dir, strict=strict,
        allow_empty_classes=allow_empty_classes,
    )
    if cohort.splits is not None or cohort.folds is not None:
        folds = user_folds(cohort, val_fraction=config.val_fraction, seed=config.seed)
    else:
        folds = patient_kfold(
            cohort.labels, cohort.patients, n_folds=config.folds, val_fraction=config.val_fraction, seed=config.seed,
            classes=cohort.classes,
        )
    text_embeddings = None
    text_info: dict[str, Any] | None = None
    if "ttp" in prompts:
        assert task is not None  # checked above
        text_embeddings = task_text_embeddings(task, text_model=text_model, cache_dir=text_cache_dir)
        model_dir = resolve_text_model(text_model)
        text_info = {"model": str(model_dir), "model_key": text_model_key(model_dir), "prompts": task.prompts()}
    head_config = HeadConfig(
        head=head,
        in_dim=cohort.dim,
        n_classes=len(classes),
        prompts=tuple(prompts),
        text_dim=int(text_embeddings.shape[1]) if text_embeddings is not None else None,
        ivp_in_dim=cohort.ivp_dim,
        **(head_options or {}),
    )
    meta = {
        "classes": list(classes),
        "task": task.to_dict() if task is not None else None,
        "encoder": cohort.encoder,
        "encoder_hash": cohort.encoder_hash,
        "encoder_weights": cohort.encoder_weights,
        "text": text_info,
        "train": asdict(config),
        "package_version": __version__,
    }
    log.info(
        "training %s%s on %d slides (%d patients), %d folds, %d-d features, on %s",
        head, f" [{','.join(head_config.prompts)}]" if head_config.prompts else "",
        len(cohort), len(set(cohort.patients)), len(folds), cohort.dim, dev,
    )
    oof_rows: list[dict[str, Any]] = []
    fold_reports, histories, best_epochs, curve_rows = [], {}, {}, []
    with atomic_path(out_dir, overwrite=overwrite) as tmp:
        (tmp / "attention").mkdir(parents=True)
        for fold in folds:
            result = train_fold(
                cohort, fold, head_config, config, text_embeddings=text_embeddings, device=dev, progress=progress
            )
            fold_dir = tmp / f"fold_{fold.index}"
            save_head(result.model, fold_dir, meta={**meta, "fold": fold.index, "best_epoch": result.best_epoch})
            rows = []
            for j, i in enumerate(result.test.index):
                sid = cohort.slide_ids[i]
                row = {
                    "slide_id": sid,
                    "patient_id": cohort.patients[i],
                    "label": cohort.classes[cohort.labels[i]],
                    "fold": fold.index,
                    "probs": result.test.probs[j],
                }
                rows.append(row)
                bag = bag_info(cohort.paths[i], check_values=False)
                write_attention(
                    tmp / "attention" / f"{sid}.h5",
                    slide_id=sid,
                    attention=result.test.attention[j],
                    coords=read_coords(cohort.paths[i]),
                    classes=cohort.classes,
                    probs=result.test.probs[j],
                    feature_path=bag.path,
                    provenance=bag.attrs,
                    meta={"head": head, "task": task_name, "fold": fold.index, "label": row["label"]},
                )
            write_predictions_csv(fold_dir / "predictions.csv", rows, cohort.classes)
            oof_rows.extend(rows)
            report = metrics_report(
                cohort.labels[fold.test], result.test.probs, class_names=cohort.classes, n_boot=config.n_boot, seed=config.seed
            )
            report.update(fold=fold.index, best_epoch=result.best_epoch, epochs_run=len(result.history),
                          n_train=len(fold.train), n_val=len(fold.val), seconds=round(result.seconds, 2))
            write_json_atomic(fold_dir / "metrics.json", report)
            fold_reports.append(report)
            fold_curves = [{"fold": fold.index, **h} for h in result.history]
            _write_csv(fold_dir / "curves.csv", fold_curves)
            plot_curves(fold_dir / "curves.png", {fold.index: result.history}, {fold.index: result.best_epoch},
                        title=f"{task_name} {head} fold {fold.index}".strip())
            curve_rows.extend(fold_curves)
            histories[fold.index], best_epochs[fold.index] = result.history, result.best_epoch
            log.info("fold %d: test AUROC %s, best epoch %d", fold.index, report["auroc"], result.best_epoch)

        oof_labels = np.array([classes.index(r["label"]) for r in oof_rows])
        oof_probs = np.stack([r["probs"] for r in oof_rows])
        summary = {
            "task": task_name or None,
            "head": head,
            "prompts": list(head_config.prompts),
            "encoder": cohort.encoder,
            "classes": list(classes),
            "n_slides": len(cohort),
            "n_patients": len(set(cohort.patients)),
            "pooled": metrics_report(oof_labels, oof_probs, class_names=classes, n_boot=config.n_boot, seed=config.seed),
            "folds": fold_reports,
            "mean_over_folds": mean_sd(fold_reports),
            "skipped": cohort.skipped,
        }
        write_predictions_csv(tmp / "predictions.csv", oof_rows, classes)
        write_json_atomic(tmp / "metrics.json", summary)
        _write_csv(tmp / "curves.csv", curve_rows)
        plot_curves(tmp / "curves.png", histories, best_epochs, title=f"{task_name} {head}".strip())
        _write_splits(tmp / "splits.csv", cohort, folds)
        write_json_atomic(
            tmp / "run.json",
            {
                **meta,
                "head_config": head_config.to_dict(),
                "features_dir": str(Path(features_dir).resolve()),
                "ivp_features_dir": str(Path(ivp_features_dir).resolve()) if ivp_features_dir else None,
                "labels": str(Path(labels).resolve()),
                "split_source": "labels table" if (cohort.splits or cohort.folds) else "patient stratified k-fold",
                "n_folds": len(folds),
                "device": str(dev),
                "skipped": cohort.skipped,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
    return summary


def _write_splits(path: Path, cohort: Cohort, folds: Sequence[Fold]) -> None:
    rows = []
    for fold in folds:
        for part in ("train", "val", "test"):
            for i in getattr(fold, part):
                rows.append({"fold": fold.index, "part": part, "slide_id": cohort.slide_ids[i],
                             "patient_id": cohort.patients[i], "label": cohort.classes[cohort.labels[i]]})
    _write_csv(path, rows)
