"""Training and cross-validated evaluation of slide-level MIL heads.

One run = one head on one cohort: for each fold, train on the training slides (AdamW), stop
early on the validation loss, keep the best epoch's weights, and predict the fold's test slides.
The run folder (layout in docs/formats.md, "MIL heads") is written through
:mod:`wsitools.mil.run_folder`, whole or not at all. The task type
(:class:`~wsitools.text.TaskDescription`) sets the loss:

- classification: one bag per step, cross-entropy with class weights or class-balanced sampling;
- survival: one risk output, the negative Cox partial log-likelihood (Breslow ties) over a
  mini-batch of ``survival_batch`` bags per step (one bag alone has no risk set to compare
  with); the risks are reported standardised by the fold model's own training slides' risks
  (minus their median, over their standard deviation), so that the folds' risks can be pooled,
  and the high/low risk groups split at that median (0);
- regression: one output, the Huber loss on the target standardised with the training part's
  mean and standard deviation (recorded with the head), one bag per step.

A bag is one slide by default; with ``bag="patient"`` it is all slides of a patient concatenated
(:class:`PatientBagDataset`, :mod:`wsitools.mil.patients`), one prediction per patient.

Choices where the papers are silent (documented in docs/mil.md):
- Training steps see at most ``bag_size`` patches per bag (a fresh random subset every step,
  512 by default), which is both an augmentation and what makes 10k-patch bags train at
  over a hundred bags per second on a 2-core CPU; validation, test and prediction always use whole bags.
- Instance dropout: each training step can also drop a random ``instance_dropout`` fraction (0
  by default) of the bag's patches, so no single patch can carry the decision and the attention
  learns to rank all the evidence, not just its strongest patch.
- Features are centred per dimension and brought to at most unit scale by one overall scale, from
  the training bags' statistics (:func:`feature_statistics`, saved with the head), so the recipe
  holds whatever unit and origin the encoder gives its features.
- The validation loss used for early stopping is class-balanced (inverse-frequency weights of
  the validation set), so the majority class cannot dominate model selection.

The head and every bag live on one ``device`` (``auto``: CUDA when available). Bags are read on
the CPU (by loader workers), pinned when the device is a GPU and copied without blocking; the
saved weights are always CPU tensors. Training is plain float32: the heads are small, and on a
CPU it is bit-for-bit what it was before there was a device option.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsitools import __version__
from wsitools.errors import DataError, ModelError, StoreError, one_line
from wsitools.metrics import (
    METRICS,
    REGRESSION_METRICS,
    classification_metrics,
    json_float,
    mean_sd_of,
    metrics_report,
    regression_metrics,
    regression_report,
)
from wsitools.mil.config import Bag, Balance, TrainConfig
from wsitools.feature_store import FeatureStore, RowLayout, read_coords, read_features, row_layout
from wsitools.labels import classes_from_labels, read_labels
from wsitools.mil.data import Cohort, build_cohort, class_weights, sample_index
from wsitools.mil import head_folder, run_folder
from wsitools.mil.folds import Fold, patient_kfold, user_folds
from wsitools.mil.heads import (
    HeadConfig, HeadName, Pooling, PromptKind, attention_pools, create_head, feature_scalings, set_pooling,
)
from wsitools.mil.patients import (
    PatientCohort,
    SlideGroup,
    check_patient_targets,
    entry_row,
    entry_slides,
    patient_cohort,
    write_patient_attention,
)
from wsitools.mil.predict import OUTPUT_NAMES, to_predictions
from wsitools.attention import pooling_attrs, write_attention
from wsitools.survival import harrell_c, survival_report
from wsitools.text import TaskDescription, TaskType, embed_texts, load_task, resolve_text_model, text_model_key
from wsitools.io import check_out_apart, remove_path, stable_hash
from wsitools.training import BestState, Schedule, Stepper, adamw, settings_change

log = logging.getLogger(__name__)

CACHE_BYTES = 1 << 30
"""Whole bags kept in memory by a fold's :class:`BagDataset`, in bytes: by the main process and
by each of its loaders' workers (:class:`BagLoader`) apart."""


class BagDataset(torch.utils.data.Dataset):
    """Bags read from their feature stores; a key is ``(index, draw)``, an item ``(x, ivp, index)``.

    ``draw`` seeds the random subset of rows for a training step (an ``instance_dropout``
    fraction dropped, at most ``bag_size`` kept), so a run is reproducible whatever the number
    of loader workers; ``draw=None`` reads the whole bag. Each store's row layout is looked up
    once (per loader worker) and its sampled rows are then read through a memory map alone.
    Bags read whole (validation, test, and training steps of bags no larger than ``bag_size``)
    are kept in memory up to ``cache_bytes`` in all in each process that reads bags (the main
    one, and each worker of a :class:`BagLoader`, which lasts the fold), so small cohorts are
    read from disk once per fold: opening an h5 file took a third of a small bag's training step.
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
        """The bag's rows (a training subset with ``draw``), its IVP bag, and its index."""
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
        return x, ivp, i


class PatientBagDataset(BagDataset):
    """Patient bags: item ``i`` is the concatenation of the feature stores of ``groups[i]``
    (and of their IVP stores), in the group's slide order.

    A training draw samples its rows over the whole patient bag (``sizes`` are the patients'
    total rows), so a patient with more tissue does not get more rows per step than the
    ``bag_size`` cap allows; each slide's sampled rows are then read from its own store.
    """

    def __init__(self, groups: Sequence[SlideGroup], labels: np.ndarray, **options: Any):
        super().__init__(
            [g.paths[0] for g in groups], labels, [sum(g.sizes) for g in groups],
            ivp_paths=[g.ivp_paths[0] for g in groups] if groups and groups[0].ivp_paths is not None else None,
            **options,
        )
        self.groups = list(groups)
        self._path_layouts: dict[Path, RowLayout | None] = {}

    def _rows(self, path: Path, index: np.ndarray | None, n: int) -> torch.Tensor:
        """Rows ``index`` of one slide's store (all of them for ``None`` or every row)."""
        if index is None or len(index) == n:
            return self._whole(path)
        if path not in self._path_layouts:
            self._path_layouts[path] = row_layout(path)
        return read_features(path, index, layout=self._path_layouts[path])

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The patient bag's rows (a training subset with ``draw``), its IVP bag, and its index."""
        i, draw = key
        group = self.groups[i]
        rng = np.random.default_rng(draw) if draw is not None else None
        index = None
        if rng is not None:
            index = sample_index(self.sizes[i], self.bag_size, rng, instance_dropout=self.instance_dropout)
        starts = np.concatenate([[0], np.cumsum(group.sizes)])
        parts = []
        for k, path in enumerate(group.paths):
            rows = None
            if index is not None:
                rows = index[(index >= starts[k]) & (index < starts[k + 1])] - starts[k]
                if len(rows) == 0:
                    continue
            parts.append(self._rows(path, rows, group.sizes[k]))
        x = torch.cat(parts)
        ivp = None
        if group.ivp_paths is not None:
            ivp = torch.cat([self._whole(p) for p in group.ivp_paths])
            if rng is not None:
                sub = sample_index(len(ivp), self.bag_size, rng, instance_dropout=self.instance_dropout)
                ivp = ivp if sub is None else ivp[torch.from_numpy(sub)]
        return x, ivp, i


def bag_dataset(cohort: Cohort, config: TrainConfig) -> BagDataset:
    """The training dataset of ``cohort``: one bag per slide, or per patient for a
    :class:`~wsitools.mil.patients.PatientCohort`."""
    options: dict[str, Any] = {"bag_size": config.bag_size, "instance_dropout": config.instance_dropout}
    if isinstance(cohort, PatientCohort):
        return PatientBagDataset(cohort.groups, cohort.labels, **options)
    return BagDataset(cohort.paths, cohort.labels, cohort.sizes, ivp_paths=cohort.ivp_paths, **options)


def feature_statistics(dataset: BagDataset, index: np.ndarray) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The standardisation of the bags ``index`` of ``dataset`` (``features``, and ``ivp`` for
    a second IVP encoder's bags): each dimension's mean, and one scale for all dimensions, the
    root mean square over dimensions of their standard deviations, or 1 where that is smaller
    (both [D]).

    Each bag weighs the same, not each patch, so that a few very large bags do not set the
    statistics of all: the mean is the mean of the bag means, a dimension's variance the mean
    within-bag variance plus the variance of the bag means (the law of total variance, without
    cancellation). One scale rather than one per dimension: it removes the encoder's unit and
    origin and keeps its geometry, the relative spread of its dimensions. Dividing each
    dimension by its own deviation blows up the near-constant units of sparse CNN features to
    the size of the informative ones: on the efficientnet-lite0 features of the quality
    benchmark's ``real`` task the attention mass on the planted region fell to 0.70 with it,
    0.77 with one scale (AUROC 1.0 with both). Features smaller than unit scale are centred but
    not enlarged: the recipe's learning rate and initialisation hold for features up to unit
    scale, and enlarging those features (0.34 there) made the head learn in effect three times
    faster and early stopping keep epochs of less concentrated attention: 0.77 against 0.87
    (abmil) and 0.72 against 0.93 (PathoTune) on seed 0. Larger features are brought to unit
    scale, where the recipe is at home.

    Each bag contributes the rows of one training draw (at most ``bag_size``, seeded by the
    bag's index, so the statistics do not depend on the run's seed): statistics of hundreds of
    rows per bag are as good as those of the whole bag, and reading every training bag whole
    once per fold would cost as much as an epoch of validation and fill the bag cache that
    validation uses.
    """
    moments: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"features": [], "ivp": []}
    for i in index:
        x, ivp, _ = dataset[(int(i), int(i))]
        for name, bag in (("features", x), ("ivp", ivp)):
            if bag is not None:
                bag = bag.to(torch.float64)
                moments[name].append((bag.mean(0), bag.var(0, correction=0)))
    out = {}
    for name, parts in moments.items():
        if not parts:
            continue
        means = torch.stack([m for m, _ in parts])
        mean = means.mean(0)
        var = torch.stack([v for _, v in parts]).mean(0) + means.var(0, correction=0)
        rms = float(var.mean().sqrt())
        scale = torch.full_like(var, max(rms, 1.0))
        out[name] = (mean.to(torch.float32), scale.to(torch.float32))
    return out


def standardise(model: nn.Module, dataset: BagDataset, index: np.ndarray) -> None:
    """Set the head's feature standardisation from the bags ``index`` (its training part)."""
    scalings = feature_scalings(model)
    if not scalings:
        return
    stats = feature_statistics(dataset, index)
    for name, scaling in scalings.items():
        mean, scale = stats[name]
        scaling.set(mean.to(scaling.mean.device), scale.to(scaling.scale.device))


Item = tuple[torch.Tensor, torch.Tensor | None, int]
"""A bag as read: its rows, its IVP bag (or ``None``), and its index."""


class _Keys(torch.utils.data.Sampler):
    """The keys of a :class:`BagLoader`'s current pass."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int | None]] = []

    def __iter__(self) -> Iterator[tuple[int, int | None]]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class BagLoader:
    """The bags of ``dataset`` for the keys of each pass, in their order, moved to ``device``
    (from pinned memory, without blocking, when it is a GPU: the copy overlaps the previous step).

    One per fold and role (training steps, whole-bag evaluation): its ``workers`` processes
    are kept from pass to pass, and with them the whole bags each has kept in memory
    (:class:`BagDataset`), so a validation bag is read from its store once per fold, not once
    per epoch (a pass over the same keys gives each bag to the same worker again). They end
    when the loader is freed. One pass at a time: a new pass ends the one before.

    Each pass takes one number from torch's global random generator, the one a data loader
    takes when it starts its workers: the head's dropout draws follow in that generator, so a
    run's results do not depend on the loader's workers or on how many passes they serve.
    """

    def __init__(self, dataset: BagDataset, *, workers: int, device: torch.device):
        self.dataset = dataset
        self.device = device
        self._keys = _Keys()
        self._loader = torch.utils.data.DataLoader(
            dataset,
            sampler=self._keys,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # the workers' seeds; the pass's number is drawn below
        )

    def __call__(self, keys: Sequence[tuple[int, int | None]]) -> Iterator[Item]:
        """A pass over ``keys``: the bags (on the device), in their order."""
        self._keys.keys = list(keys)
        torch.empty((), dtype=torch.int64).random_()
        return self._moved(iter(self._loader))

    def _moved(self, bags: Iterator[Item]) -> Iterator[Item]:
        for x, ivp, i in bags:
            yield (
                x.to(self.device, non_blocking=True),
                ivp.to(self.device, non_blocking=True) if ivp is not None else None,
                int(i),
            )


@dataclass(frozen=True)
class FoldBags:
    """A fold's two loaders of its bags (:class:`BagLoader`), each kept for the fold: the
    training steps' (``train``) and the whole bags' (``whole``: validation every epoch, then test)."""

    train: BagLoader
    whole: BagLoader

    @classmethod
    def of(cls, dataset: BagDataset, *, workers: int, device: torch.device) -> FoldBags:
        """Both loaders of ``dataset``, with ``workers`` processes each."""
        return cls(*(BagLoader(dataset, workers=workers, device=device) for _ in range(2)))


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


def make_stepper(model: nn.Module, config: TrainConfig, *, device: torch.device) -> Stepper:
    """Fused AdamW over the head's parameters (one kernel per step on CPU and GPU alike, which
    suits the many small steps of a head) at a constant learning rate, in float32."""
    return Stepper(
        adamw(model, lr=config.lr, weight_decay=config.weight_decay, fused=True),
        schedule=Schedule(config.lr, kind="constant"), device=device,
    )


StepLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A training loss: the outputs ``[B, C]`` of a step's bags and their cohort indices ``[B]`` -> scalar."""


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood per event, Breslow's handling of tied times: each
    event's risk against the log-sum-exp of the risks of every bag still at risk at its time
    (``time >= its time``). Zero (with a gradient of zero) when the bags hold no event."""
    order = torch.argsort(time)
    r, t, e = risk[order], time[order].contiguous(), event[order]
    at_risk = torch.logcumsumexp(r.flip(0), dim=0).flip(0)  # log sum_{k >= j} exp(r_k), times ascending
    first = torch.searchsorted(t, t, right=False)  # the first bag at each time: ties share one risk set
    n_events = e.sum()
    return -((r - at_risk[first]) * e).sum() / n_events.clamp(min=1.0)


def classification_loss(labels: torch.Tensor, weights: torch.Tensor) -> StepLoss:
    """Cross-entropy times the class weight of each bag's label (``labels``, ``weights`` on the
    device). With one bag per step a weighted *mean* would cancel the weight, so it is a factor."""

    def loss(outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        y = labels[index]
        return (weights[y] * F.cross_entropy(outputs, y, reduction="none")).mean()

    return loss


def survival_loss(targets: torch.Tensor) -> StepLoss:
    """:func:`cox_loss` of the step's bags; ``targets`` [n, 2] (time, event) on the device."""

    def loss(outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return cox_loss(outputs[:, 0], targets[index, 0], targets[index, 1])

    return loss


def regression_loss(targets: torch.Tensor) -> StepLoss:
    """Huber loss (delta 1, i.e. one standard deviation of the training targets) against the
    standardised ``targets`` [n] on the device: squared near the target, linear for outliers."""

    def loss(outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return F.huber_loss(outputs[:, 0], targets[index], delta=1.0)

    return loss


def step_groups(n_keys: int, batch: int) -> list[int]:
    """Sizes of the optimiser steps of an epoch of ``n_keys`` bags: ``batch`` 1 gives one bag per
    step; larger, the epoch is cut into ``ceil(n_keys / batch)`` steps of nearly equal size (no
    leftover step of one or two bags, whose risk set would be almost empty)."""
    if batch <= 1:
        return [1] * n_keys
    n_steps = max(1, math.ceil(n_keys / batch))
    return [len(part) for part in np.array_split(np.arange(n_keys), n_steps) if len(part)]


def train_epoch(
    model: nn.Module,
    stepper: Stepper,
    bags: BagLoader,
    keys: Sequence[tuple[int, int]],
    *,
    step_loss: StepLoss,
    batch: int = 1,
) -> float:
    """One pass of ``bags`` over ``keys`` in optimiser steps of ``batch`` bags (:func:`step_groups`)
    on the stepper's device; returns the mean step loss. Each bag is run on its own (bags differ in
    size) and the step's outputs are stacked for ``step_loss``. The losses are summed in
    float64 on the device (no GPU synchronisation per step).
    """
    model.train()
    device = stepper.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    groups = step_groups(len(keys), batch)
    steps = bags(keys)
    for size in groups:
        outputs, index = [], []
        for _ in range(size):
            x, ivp, i = next(steps)
            outputs.append(model(x, ivp).logits)
            index.append(i)
        loss = step_loss(torch.stack(outputs), torch.tensor(index, device=device))
        stepper.backward(loss)
        total += loss.detach()
    return float(total) / max(1, len(groups))


@dataclass
class Evaluation:
    """Whole-bag outputs of one model on a set of slides."""

    index: np.ndarray
    outputs: np.ndarray  # [n, C] logits (classification) or [n, 1] risk / standardised value
    attention: list[np.ndarray]
    loss: float  # the task's validation loss (see :func:`evaluate`)

    @property
    def probs(self) -> np.ndarray:
        """Class probabilities [n, C] (softmax of the logits)."""
        return torch.softmax(torch.from_numpy(self.outputs), dim=-1).numpy()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    bags: BagLoader,
    index: np.ndarray,
    *,
    task_type: TaskType = "classification",
    targets: torch.Tensor | None = None,
) -> Evaluation:
    """Predict the whole bags ``index`` of ``bags`` in eval mode (``model`` on the loader's
    device). The loss: cross-entropy with each class weighted by its inverse frequency here
    (classification), the Cox loss of all the bags together (survival), the mean Huber loss
    (regression; ``targets`` standardised, on the device). Results are gathered on the device
    and copied back once."""
    model.eval()
    device = bags.device
    outputs, attention = [], []
    for x, ivp, _ in bags([(int(i), None) for i in index]):
        out = model(x, ivp)
        outputs.append(out.logits)
        attention.append(out.attention)
    stacked = torch.stack(outputs)
    at = torch.as_tensor(np.asarray(index), device=device)
    if task_type == "classification":
        labels = bags.dataset.labels[index]
        per_bag = F.cross_entropy(stacked, torch.from_numpy(labels).to(device), reduction="none")
        weights = class_weights(labels, stacked.shape[1])[labels]
        loss = float(np.sum(weights * per_bag.cpu().numpy().astype(np.float64)) / np.sum(weights))
    else:
        assert targets is not None
        step = survival_loss(targets) if task_type == "survival" else regression_loss(targets)
        loss = float(step(stacked, at))
    return Evaluation(
        index=np.asarray(index), outputs=stacked.float().cpu().numpy(),
        attention=[a.cpu().numpy() for a in attention], loss=loss,
    )


@dataclass
class FoldResult:
    """A trained fold: its model (best epoch restored, on the training device), curves, test
    evaluation, and how its outputs become predictions (``scale``: the risk offset of a survival
    head, the target mean and standard deviation of a regression head)."""

    fold: Fold
    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    test: Evaluation
    seconds: float = 0.0
    scale: dict[str, float] = field(default_factory=dict)
    pooling: Pooling = "attention"
    pooling_val_loss: dict[str, float] = field(default_factory=dict)
    """With pooling selection, each pooling's best validation loss (the lower one was kept)."""

    def predictions(self) -> np.ndarray:
        """The test slides' predictions: class probabilities [n, C], or the risk / value [n]."""
        return to_predictions(self.test.outputs, self.scale)


def _fold_targets(cohort: Cohort, fold: Fold) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The targets a fold trains on, and the scale recorded with its head: survival times as their
    ranks, regression targets standardised with the training part's mean and standard deviation."""
    if cohort.task_type == "survival":
        # The Cox loss depends on the order of the times alone: their dense ranks are exact in
        # float32, where distinct times above 2**24 (e.g. seconds) would round into ties.
        ranks = np.unique(cohort.targets[:, 0], return_inverse=True)[1]
        return torch.from_numpy(np.stack([ranks, cohort.targets[:, 1]], axis=1).astype(np.float32)), {}
    if cohort.task_type == "regression":
        values = cohort.targets[fold.train]
        mean, sd = float(values.mean()), float(values.std())
        if sd == 0:
            raise DataError(f"fold {fold.index}: the training slides all have the label {mean:g}; nothing to regress")
        return torch.from_numpy(((cohort.targets - mean) / sd).astype(np.float32)), {"target_mean": mean, "target_sd": sd}
    return None, {}


def _check_fold(cohort: Cohort, fold: Fold) -> None:
    for part in ("train", "val", "test"):
        if len(getattr(fold, part)) == 0:
            raise DataError(f"fold {fold.index}: the {part} part is empty (too few patients for this split)")
    if cohort.task_type == "classification" and len(np.unique(cohort.labels[fold.train])) < 2:
        raise DataError(f"fold {fold.index}: the training part holds a single class")
    if cohort.task_type == "survival":
        for part in ("train", "val"):
            if cohort.targets[getattr(fold, part), 1].sum() < 1:
                raise DataError(f"fold {fold.index}: the {part} part holds no event (too few events for this split)")


def _check_fold_classes(cohort: Cohort, folds: Sequence[Fold], *, table: Any, allow: bool) -> None:
    """Every class of the cohort must have training slides in every fold. Stratified k-fold sees
    to it; the labels table's own ``split`` or ``fold`` column may not (a class only in ``test``,
    or in one fold only), and the head would then be trained without the class but tested and
    applied with it. A :class:`DataError` naming the labels table ``table`` and each such class
    and fold, or with ``allow`` (``--allow-empty-classes``, which admits classes without any
    usable slide) a warning."""
    if cohort.task_type != "classification":
        return
    column = "split" if cohort.splits is not None else "fold"
    problems = []
    for fold in folds:
        missing = set(np.unique(cohort.labels)) - set(np.unique(cohort.labels[fold.train]))
        tested = f" (test fold {cohort.folds[fold.test[0]]})" if cohort.folds is not None else ""
        for c in sorted(missing):
            n_val, n_test = (int((cohort.labels[part] == c).sum()) for part in (fold.val, fold.test))
            problems.append(f"class {cohort.classes[c]!r} in fold {fold.index}{tested} ({n_val} in val, {n_test} in test)")
    if not problems:
        return
    listing = "; ".join(problems)
    if allow:
        log.warning("labels table %s: the %s column leaves a fold without training slides of a class (trained "
                    "without it, tested with it all the same): %s", table, column, listing)
        return
    raise DataError(
        f"labels table {table}: the {column} column leaves a fold without training slides of a class: {listing}; "
        "the head would be tested with a class it never learnt: put slides of every class into the training part "
        "of every fold, or pass --allow-empty-classes"
    )


def _check_fold_targets(cohort: Cohort, folds: Sequence[Fold], *, table: Any) -> None:
    """A regression fold whose training slides all have one value has nothing to learn (and no
    spread to standardise its target with): a :class:`DataError` naming the labels table
    ``table`` and the fold, before any fold trains. A value rare enough to fall in one fold's
    val or test part alone needs fewer folds (or other splits in the table's own column)."""
    if cohort.task_type != "regression":
        return
    for fold in folds:
        values = np.unique(cohort.targets[fold.train])
        if len(values) < 2:
            fix = ("change the table's split or fold column" if cohort.splits is not None or cohort.folds is not None
                   else "use fewer folds (--folds)")
            raise DataError(
                f"labels table {table}: the training slides of fold {fold.index} all have the label {values[0]:g}; "
                f"nothing to regress: the other values are on too few slides to be in every fold's training part; "
                f"label more slides with other values or {fix}"
            )


def _val_scores(cohort: Cohort, val: Evaluation, targets: torch.Tensor | None) -> dict[str, float]:
    """The validation metrics logged per epoch."""
    if cohort.task_type == "classification":
        scores = classification_metrics(cohort.labels[val.index], val.probs)
        return {"val_auroc": scores["auroc"], "val_balanced_accuracy": scores["balanced_accuracy"]}
    if cohort.task_type == "survival":
        t = cohort.targets[val.index]
        return {"val_c_index": harrell_c(t[:, 0], t[:, 1], val.outputs[:, 0])}
    assert targets is not None
    scores = regression_metrics(targets[val.index].numpy(), val.outputs[:, 0])
    return {"val_pearson": scores["pearson"], "val_mae_sd": scores["mae"]}


def fold_loss(
    cohort: Cohort, fold: Fold, config: TrainConfig, *, targets: torch.Tensor | None, device: torch.device
) -> tuple[StepLoss, int]:
    """A fold's training loss and its bags per optimiser step: the class-weighted (or, with
    ``balance`` ``sampling``, unweighted) cross-entropy of one bag; the Cox loss of
    ``survival_batch`` bags; the Huber loss of one bag (``targets`` on ``device``)."""
    if cohort.task_type == "classification":
        n_classes = len(cohort.classes)
        weights = (
            torch.from_numpy(class_weights(cohort.labels[fold.train], n_classes))
            if config.balance == "weights"
            else torch.ones(n_classes)
        ).to(device)
        return classification_loss(torch.from_numpy(cohort.labels).to(device), weights), 1
    assert targets is not None
    if cohort.task_type == "survival":
        return survival_loss(targets), config.survival_batch
    return regression_loss(targets), 1


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
    weights do not depend on the device.

    With pooling selection (``config.pooling`` ``select``) a head with attention pools is trained
    twice from the same initial weights and batches, pooling by attention and by the mean
    (:func:`set_pooling`), and the one whose best epoch has the lower validation loss is kept
    (attention on a tie): attention finds a few deciding tiles, the mean a signal spread over
    every tile, and neither is known before training (docs/mil.md, "Pooling selection")."""
    _check_fold(cohort, fold)
    bags = FoldBags.of(bag_dataset(cohort, config), workers=config.workers, device=device)
    targets, scale = _fold_targets(cohort, fold)
    targets_dev = targets.to(device) if targets is not None else None
    start = time.perf_counter()
    fits = [_fit(cohort, fold, head_config, config, bags=bags, targets=targets_dev, pooling="attention",
                 text_embeddings=text_embeddings, device=device, progress=progress)]
    if config.pooling == "select" and attention_pools(fits[0].model):
        fits.append(_fit(cohort, fold, head_config, config, bags=bags, targets=targets_dev, pooling="mean",
                         text_embeddings=text_embeddings, device=device, progress=progress))
    fit = min(fits, key=lambda f: f.best.loss)  # the first, attention, on a tie
    model = fit.model
    test = evaluate(model, bags.whole, fold.test, task_type=cohort.task_type, targets=targets_dev)
    if cohort.task_type == "survival":
        seen = np.sort(np.concatenate([fold.train, fold.val]))
        own = evaluate(model, bags.whole, seen, task_type="survival", targets=targets_dev)
        risks = own.outputs[:, 0].astype(np.float64)
        scale = {"risk_offset": float(np.median(risks)), "risk_scale": float(max(risks.std(), 1e-6))}
    return FoldResult(
        fold=fold, model=model, history=fit.history, best_epoch=fit.best.epoch, test=test, pooling=fit.pooling,
        seconds=time.perf_counter() - start, scale=scale,
        pooling_val_loss={f.pooling: f.best.loss for f in fits} if len(fits) > 1 else {},
    )


@dataclass
class _Fit:
    """One training of a fold's head: the model (best epoch restored), its pooling (``mean`` for
    a head without attention pools), curves and best epoch."""

    model: nn.Module
    pooling: Pooling
    history: list[dict[str, float]]
    best: BestState


def _fit(
    cohort: Cohort,
    fold: Fold,
    head_config: HeadConfig,
    config: TrainConfig,
    *,
    bags: FoldBags,
    targets: torch.Tensor | None,
    pooling: Pooling,
    text_embeddings: torch.Tensor | None,
    device: torch.device,
    progress: bool,
) -> _Fit:
    """Train a head pooling by ``pooling`` on ``fold.train``, early-stopped on ``fold.val`` (the
    best epoch restored). The seeds depend on the run's seed and the fold only, so the trainings
    of one fold start from the same weights and draw the same batches."""
    from tqdm import tqdm

    torch.manual_seed(config.seed * 1009 + fold.index)
    rng = np.random.default_rng([config.seed, fold.index])
    model = create_head(head_config, text_embeddings=text_embeddings).to(device)
    set_pooling(model, pooling)
    stepper = make_stepper(model, config, device=device)
    standardise(model, bags.train.dataset, fold.train)
    step_loss, batch = fold_loss(cohort, fold, config, targets=targets, device=device)
    best = BestState(model, min_delta=1e-6, patience=config.patience, min_epochs=config.min_epochs)
    history: list[dict[str, float]] = []
    label = f"fold {fold.index}" + (" (mean pooling)" if pooling == "mean" else "")
    bar = tqdm(range(config.epochs), desc=label, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        keys = epoch_keys(fold.train, cohort.labels, balance=config.balance, rng=rng)
        train_loss = train_epoch(model, stepper, bags.train, keys, step_loss=step_loss, batch=batch)
        val = evaluate(model, bags.whole, fold.val, task_type=cohort.task_type, targets=targets)
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val.loss,
                **_val_scores(cohort, val, targets.cpu() if targets is not None else None),
                "seconds": time.perf_counter() - t0,
            }
        )
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val.loss:.3f}")
        best.update(epoch, val.loss)
        if best.should_stop(epoch):
            break
    best.restore()
    # A head without attention pools (meanpool) pools by the mean whatever was asked.
    return _Fit(model=model, pooling=pooling if attention_pools(model) else "mean", history=history, best=best)


LOSS_NAMES: dict[TaskType, str] = {
    "classification": "cross-entropy",
    "survival": "Cox partial likelihood (neg. log, per event)",
    "regression": "Huber loss (standardised target)",
}
"""The y-axis label of each task type's training curves."""

METRIC_NAMES: dict[TaskType, tuple[str, ...]] = {
    "classification": METRICS,
    "survival": ("c_index", "uno_c"),
    "regression": REGRESSION_METRICS,
}
"""The scalar metrics of each task type, averaged over folds in ``metrics.json``."""


def task_text_embeddings(
    task: TaskDescription, *, text_model: str | os.PathLike[str] | None, cache_dir: str | os.PathLike[str] | None
) -> torch.Tensor:
    """TTP's frozen embeddings of ``task.prompts()``: the task text, then each class description
    (or a survival/regression task's high/low descriptions), [K, E]."""
    return torch.from_numpy(embed_texts(task.prompts(), model=text_model, cache_dir=cache_dir))


def _fold_report(
    cohort: Cohort, index: np.ndarray, preds: np.ndarray, config: TrainConfig, *, auc_times: Sequence[float] = ()
) -> dict[str, Any]:
    """The metrics of predictions ``preds`` of the slides ``index`` (one fold or pooled);
    ``auc_times``: where a survival report's time-dependent AUC is taken (default: the
    quartiles of the event times). The intervals resample patients, each with all its slides
    (a patient's slides are not independent cases)."""
    groups = [cohort.patients[i] for i in index]
    if cohort.task_type == "classification":
        return metrics_report(cohort.labels[index], preds, class_names=cohort.classes, n_boot=config.n_boot,
                              seed=config.seed, groups=groups)
    if cohort.task_type == "regression":
        return regression_report(cohort.targets[index], preds, n_boot=config.n_boot, seed=config.seed, groups=groups)
    t = cohort.targets[index]
    return survival_report(t[:, 0], t[:, 1], preds, times=list(auc_times) or None, high_risk=preds > 0,
                           n_boot=config.n_boot, seed=config.seed, groups=groups)


def _prediction_row(cohort: Cohort, i: int, fold: int, pred: np.ndarray) -> dict[str, Any]:
    row = entry_row(cohort, i)
    if cohort.task_type == "classification":
        return {**row, "label": cohort.classes[cohort.labels[i]], "fold": fold, "probs": pred}
    if cohort.task_type == "survival":
        return {**row, "time": cohort.targets[i, 0], "event": int(cohort.targets[i, 1]), "fold": fold, "risk": float(pred)}
    return {**row, "label": cohort.targets[i], "fold": fold, "prediction": float(pred)}


def _headline(cohort: Cohort) -> tuple[str, ...]:
    """The metrics logged per fold and printed by the CLI."""
    return {"classification": METRICS[:3], "survival": ("c_index", "uno_c"),
            "regression": ("pearson", "spearman", "mae")}[cohort.task_type]


def _label_text(cohort: Cohort, i: int) -> str:
    """A slide's label as text: its class, its target value, or ``time`` with ``+`` if censored."""
    if cohort.task_type == "classification":
        return cohort.classes[cohort.labels[i]]
    if cohort.task_type == "regression":
        return f"{cohort.targets[i]:g}"
    return f"{cohort.targets[i, 0]:g}{'' if cohort.targets[i, 1] else '+'}"


def split_rows(cohort: Cohort, folds: Sequence[Fold]) -> list[dict[str, Any]]:
    """The rows of ``splits.csv``: every slide of every fold's parts, with its patient and label."""
    rows = []
    for fold in folds:
        for part in ("train", "val", "test"):
            for i in getattr(fold, part):
                rows.extend({"fold": fold.index, "part": part, "slide_id": slide_id,
                             "patient_id": cohort.patients[i], "label": _label_text(cohort, int(i))}
                            for slide_id in entry_slides(cohort, int(i)))
    return rows


@dataclass
class RunSetup:
    """What a run fixes before its first fold: the task, the cohort (slide or patient bags) and
    its folds, the head's config and TTP embeddings, and the metadata saved with every head."""

    task: TaskDescription | None
    cohort: Cohort
    n_slides: int
    folds: list[Fold]
    head_config: HeadConfig
    text_embeddings: torch.Tensor | None
    meta: dict[str, Any]

    @property
    def task_name(self) -> str:
        return self.task.name if self.task is not None else ""

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names in logit order (none for survival and regression)."""
        return tuple(self.meta["classes"])

    @property
    def title(self) -> str:
        """The figures' title: the task and the head."""
        return f"{self.task_name} {self.head_config.head}".strip()


def _check_options(
    out_dir: Path, *, overwrite: bool, prompts: Sequence[PromptKind], ivp_features_dir: Any, task_type: TaskType,
    config: TrainConfig, bag: Bag,
) -> None:
    """Refuse settings that cannot make a run, before anything is read."""
    if out_dir.exists() and not overwrite:
        raise DataError(f"output {out_dir} exists; use --overwrite to replace it")
    if overwrite:
        run_folder.check_replaceable(out_dir)
    if ivp_features_dir is not None and "ivp" not in prompts:
        raise DataError("--ivp-features is used by the 'ivp' prompt; add ivp to --prompts")
    if task_type != "classification" and config.balance == "sampling":
        raise DataError(f"--balance sampling balances classes; a {task_type} task has none (leave the default)")
    if bag not in ("slide", "patient"):
        raise DataError(f"bag (--bag) must be slide or patient, got {bag!r}")


def _cohort_and_folds(
    task: TaskDescription | None, *, labels: Any, features_dir: Any, ivp_features_dir: Any, bag: Bag,
    config: TrainConfig, strict: bool, allow_empty_classes: bool, task_file: Any,
) -> tuple[Cohort, tuple[str, ...], int, list[Fold]]:
    """The cohort (its bags checked), its classes, its number of slides and its folds: the
    labels table's own splits or folds, else patient-level stratified k-fold. ``task_file``:
    the file ``task`` was read from, if any (named in errors about the classes)."""
    task_type: TaskType = task.type if task is not None else "classification"
    rows = read_labels(labels, task_type=task_type)
    if bag == "patient":
        check_patient_targets(rows, labels, task_type=task_type)
    if task_type != "classification":
        classes: tuple[str, ...] = ()
    else:
        classes = (task.classes if task is not None
                   else classes_from_labels(((r.slide_id, r.label) for r in rows), where=f"labels table {labels}",
                                           unlabelled="leave its row out", column="label"))
    cohort = build_cohort(
        rows, features_dir, classes, ivp_features_dir=ivp_features_dir, strict=strict,
        allow_empty_classes=allow_empty_classes, task_type=task_type, labels_file=labels, task_file=task_file,
    )
    n_slides = len(cohort)
    if bag == "patient":
        cohort = patient_cohort(cohort)
    if cohort.splits is not None or cohort.folds is not None:
        folds = user_folds(cohort, val_fraction=config.val_fraction, seed=config.seed)
        _check_fold_classes(cohort, folds, table=labels, allow=allow_empty_classes)
    else:
        folds = patient_kfold(
            cohort.labels, cohort.patients, n_folds=config.folds, val_fraction=config.val_fraction, seed=config.seed,
            classes=cohort.classes,
        )
    _check_fold_targets(cohort, folds, table=labels)
    return cohort, classes, n_slides, folds


def setup_run(
    task: TaskDescription | None,
    *,
    features_dir: Any,
    labels: Any,
    head: HeadName,
    prompts: Sequence[PromptKind],
    bag: Bag,
    config: TrainConfig,
    head_options: dict[str, Any] | None,
    ivp_features_dir: Any,
    text_model: Any,
    text_cache_dir: Any,
    strict: bool,
    allow_empty_classes: bool,
    task_file: Any = None,
) -> RunSetup:
    """Read the labels and bags, make the folds, embed the TTP texts and configure the head
    (``task_file``: the file ``task`` was read from, if any)."""
    cohort, classes, n_slides, folds = _cohort_and_folds(
        task, labels=labels, features_dir=features_dir, ivp_features_dir=ivp_features_dir, bag=bag, config=config,
        strict=strict, allow_empty_classes=allow_empty_classes, task_file=task_file,
    )
    task_type = cohort.task_type
    text_embeddings = None
    text_info: dict[str, Any] | None = None
    if "ttp" in prompts:
        assert task is not None  # checked by train()
        text_embeddings = task_text_embeddings(task, text_model=text_model, cache_dir=text_cache_dir)
        model_dir = resolve_text_model(text_model)
        text_info = {"model": str(model_dir), "model_key": text_model_key(model_dir), "prompts": task.prompts()}
    head_config = HeadConfig(
        head=head,
        in_dim=cohort.dim,
        n_classes=len(classes) if task_type == "classification" else 1,
        prompts=tuple(prompts),
        text_dim=int(text_embeddings.shape[1]) if text_embeddings is not None else None,
        ivp_in_dim=cohort.ivp_dim,
        n_texts=int(text_embeddings.shape[0]) if text_embeddings is not None and task_type != "classification" else None,
        **(head_options or {}),
    )
    meta = {
        "classes": list(classes),
        "task_type": task_type,
        "bag": bag,
        "task": task.to_dict() if task is not None else None,
        "encoder": cohort.encoder,
        "encoder_hash": cohort.encoder_hash,
        "encoder_weights": cohort.encoder_weights,
        "tile_size": cohort.tiles.tile_size,
        "mpp_target": cohort.tiles.mpp,
        "text": text_info,
        "train": asdict(config),
        "package_version": __version__,
    }
    return RunSetup(task, cohort, n_slides, folds, head_config, text_embeddings, meta)


def _write_attention(folder: Path, setup: RunSetup, result: FoldResult, preds: np.ndarray) -> None:
    """The attention file of each test bag of a fold (one per slide of a patient bag)."""
    cohort, task_type = setup.cohort, setup.cohort.task_type
    for j, i in enumerate(int(i) for i in result.test.index):
        sid = cohort.slide_ids[i]
        outputs, values = (
            (setup.classes, preds[j]) if task_type == "classification" else ((OUTPUT_NAMES[task_type],), preds[j:j + 1])
        )
        meta = {"head": setup.head_config.head, "task": setup.task_name, "task_type": task_type,
                "fold": result.fold.index, "label": _label_text(cohort, i), **pooling_attrs([result.pooling])}
        if isinstance(cohort, PatientCohort):
            bags = [FeatureStore.open_bag(p, check_values=False) for p in cohort.groups[i].paths]
            write_patient_attention(
                folder, patient_id=sid, bags=bags, coords=[read_coords(b.path) for b in bags],
                attention=result.test.attention[j], classes=outputs, probs=values, meta=meta,
            )
            continue
        bag = FeatureStore.open_bag(cohort.paths[i], check_values=False)
        write_attention(
            folder / f"{sid}.h5", slide_id=sid, attention=result.test.attention[j], coords=read_coords(bag.path),
            classes=outputs, probs=values, feature_path=bag.path, provenance=bag.attrs, meta=meta,
        )


def _fold_predictions(setup: RunSetup, result: FoldResult) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A fold's test predictions and their rows in the predictions tables."""
    preds = result.predictions()
    rows = [_prediction_row(setup.cohort, int(i), result.fold.index, preds[j]) for j, i in enumerate(result.test.index)]
    return preds, rows


@dataclass
class FoldOutput:
    """What a written fold adds to the run's out-of-fold results."""

    rows: list[dict[str, Any]]
    index: np.ndarray
    preds: np.ndarray
    report: dict[str, Any]
    curves: list[dict[str, Any]]
    best_epoch: int


def _write_fold(run_dir: Path, setup: RunSetup, result: FoldResult, config: TrainConfig) -> FoldOutput:
    """Write a trained fold into the run: its head folder with its results, and the attention of
    its test bags."""
    cohort, fold, k = setup.cohort, result.fold, result.fold.index
    head_folder.save_head(
        result.model, run_folder.fold_dir(run_dir, k),
        meta={**setup.meta, **result.scale, "fold": k, "best_epoch": result.best_epoch, "pooling": result.pooling},
    )
    preds, rows = _fold_predictions(setup, result)
    auc_times = setup.task.auc_times if setup.task is not None else ()
    report = _fold_report(cohort, result.test.index, preds, config, auc_times=auc_times)
    report.update(fold=k, best_epoch=result.best_epoch, pooling=result.pooling, epochs_run=len(result.history),
                  n_train=len(fold.train), n_val=len(fold.val), seconds=round(result.seconds, 2), **result.scale)
    if result.pooling_val_loss:
        report["pooling_val_loss"] = {p: json_float(v) if math.isfinite(v) else None
                                      for p, v in result.pooling_val_loss.items()}
    curves = [{"fold": k, "pooling": result.pooling, **h} for h in result.history]
    output = FoldOutput(rows, result.test.index, preds, report, curves, result.best_epoch)
    _write_fold_results(run_dir, setup, result, output)
    log.info("fold %d: test %s, best epoch %d (%s pooling)", k,
             ", ".join(f"{m} {report[m]}" for m in _headline(cohort)), result.best_epoch, result.pooling)
    return output


def _write_fold_results(run_dir: Path, setup: RunSetup, result: FoldResult, output: FoldOutput) -> None:
    """A fold's results in the run ``run_dir``: the attention files of its test bags and its head
    folder's result files."""
    _write_attention(run_folder.attention_dir(run_dir), setup, result, output.preds)
    run_folder.write_results(
        run_folder.fold_dir(run_dir, result.fold.index), predictions=output.rows, classes=setup.classes, metrics=output.report, curves=output.curves,
        best_epochs={result.fold.index: output.best_epoch}, title=f"{setup.title} fold {result.fold.index}",
        loss_name=LOSS_NAMES[setup.cohort.task_type],
    )


SCALE_KEYS = ("risk_offset", "risk_scale", "target_mean", "target_sd")
"""The keys of a fold's prediction scale (:attr:`FoldResult.scale`) in its head's metadata."""


def _read_fold(
    run_dir: Path, setup: RunSetup, fold: Fold, config: TrainConfig, *, device: torch.device
) -> FoldOutput:
    """A fold written whole by an earlier, interrupted run of the same settings, read back from
    ``run_dir``: its head, curves and metrics. Its test outputs are computed again from the
    saved head (a forward pass over the fold's test bags), because the predictions table holds
    them rounded and the pooled results must be those of an uninterrupted run; its predictions
    table, plot and attention files are written again from them, so that one the interrupted run
    left missing or damaged is not carried into the finished run."""
    folder = run_folder.fold_dir(run_dir, fold.index)
    saved = head_folder.load_head(folder, device=device)
    scale = {k: float(saved.meta[k]) for k in SCALE_KEYS if k in saved.meta}
    targets, _ = _fold_targets(setup.cohort, fold)
    test = evaluate(
        saved.model, BagLoader(bag_dataset(setup.cohort, config), workers=config.workers, device=device), fold.test,
        task_type=setup.cohort.task_type, targets=targets.to(device) if targets is not None else None,
    )
    curves = run_folder.read_curves(folder)
    best_epoch = int(saved.meta["best_epoch"])
    result = FoldResult(fold=fold, model=saved.model, history=curves, best_epoch=best_epoch, test=test, scale=scale,
                        pooling=saved.pooling)
    preds, rows = _fold_predictions(setup, result)
    report = run_folder.read_metrics(folder / run_folder.METRICS_FILE)
    output = FoldOutput(rows, test.index, preds, report, curves, best_epoch)
    _write_fold_results(run_dir, setup, result, output)
    log.info("fold %d: read back from %s", fold.index, folder)
    return output


def resume_settings(setup: RunSetup, config: TrainConfig) -> dict[str, Any]:
    """What a fold's results depend on, recorded in a partial run so that a resumed run reuses
    only folds trained with the same: the training settings (not ``workers``, which changes no
    result), the head, task, encoder and text model, the cohort (slide ids, patients, labels or
    targets, and each feature store's path, size and modification time) and the folds (hashed,
    as a cohort has thousands of slides)."""
    cohort = setup.cohort
    if isinstance(cohort, PatientCohort):
        paths = [p for g in cohort.groups for p in (*g.paths, *(g.ivp_paths or ()))]
    else:
        paths = [*cohort.paths, *(cohort.ivp_paths or [])]
    stats = [(str(Path(p).resolve()), os.stat(p)) for p in paths]
    stores = [[path, st.st_size, st.st_mtime_ns] for path, st in stats]
    targets = cohort.targets.tolist() if cohort.targets is not None else None
    return {
        **{k: v for k, v in setup.meta.items() if k != "train"},
        "train": {k: v for k, v in asdict(config).items() if k != "workers"},
        "head_config": setup.head_config.to_dict(),
        "cohort": stable_hash([cohort.slide_ids, cohort.patients, cohort.labels.tolist(), targets, stores]),
        "folds": stable_hash([[f.index, f.train.tolist(), f.val.tolist(), f.test.tolist()] for f in setup.folds]),
    }


def _read_back(
    run_dir: Path, setup: RunSetup, fold: Fold, config: TrainConfig, *, device: torch.device
) -> FoldOutput | None:
    """:func:`_read_fold`, or ``None`` with a warning naming what is wrong where the fold's files
    no longer read back whole (a head whose weights fail their checksum, a cut-off table: damaged
    since they were written): the fold is then no longer marked done, and is trained again."""
    try:
        return _read_fold(run_dir, setup, fold, config, device=device)
    except (ModelError, DataError, StoreError) as exc:
        log.warning("fold %d: cannot be read back (%s); training it again", fold.index, one_line(exc))
    record = run_folder.read_partial(run_dir)
    assert record is not None
    record["folds_done"] = [k for k in record["folds_done"] if k != fold.index]
    run_folder.write_partial(run_dir, record)
    return None


def _folds_done(folder: Path, settings: dict[str, Any]) -> set[int]:
    """The folds an interrupted run wrote whole into the partial folder ``folder``. When that run
    had other settings (another cohort, labels, folds or options: a rerun after the inputs
    changed) its folds cannot be reused: the folder is emptied with a warning naming what
    differs, and the run starts afresh. A new partial folder is given its record."""
    record = run_folder.read_partial(folder)
    if record is not None:
        change = settings_change(written=record.get("settings"), written_hash=record["settings_hash"], settings=settings)
        if change is None:
            return set(record["folds_done"])
        log.warning("%s: written by a run with other settings (%s); starting afresh", folder, change)
        for entry in folder.iterdir():
            remove_path(entry)
        run_folder.attention_dir(folder).mkdir()
    run_folder.write_partial(folder, {"settings": settings, "settings_hash": stable_hash(settings), "folds_done": []})
    return set()


def _mark_done(folder: Path, index: int) -> None:
    """Record in the partial folder ``folder`` that fold ``index`` is written whole."""
    record = run_folder.read_partial(folder)
    assert record is not None
    record["folds_done"] = sorted({*record["folds_done"], index})
    run_folder.write_partial(folder, record)


def _write_pooled(run_dir: Path, setup: RunSetup, outputs: Sequence[FoldOutput], config: TrainConfig) -> dict[str, Any]:
    """Write the run's out-of-fold results (and a survival run's risk groups); returns the
    content of ``metrics.json``."""
    cohort, task_type = setup.cohort, setup.cohort.task_type
    index = np.concatenate([o.index for o in outputs])
    preds = np.concatenate([o.preds for o in outputs])
    auc_times = setup.task.auc_times if setup.task is not None else ()
    folds = [o.report for o in outputs]
    summary = {
        "task": setup.task_name or None,
        "task_type": task_type,
        "head": setup.head_config.head,
        "prompts": list(setup.head_config.prompts),
        "bag": setup.meta["bag"],
        "encoder": cohort.encoder,
        "classes": list(setup.classes),
        "n_slides": setup.n_slides,
        "n_patients": len(set(cohort.patients)),
        "pooled": _fold_report(cohort, index, preds, config, auc_times=auc_times),
        "folds": folds,
        "mean_over_folds": mean_sd_of(folds, METRIC_NAMES[task_type]),
        "skipped": cohort.skipped,
    }
    if task_type == "survival":
        t = cohort.targets[index]
        run_folder.plot_risk_groups(run_dir, t[:, 0], t[:, 1], preds > 0, title=f"{setup.title}: out-of-fold risk groups")
    run_folder.write_results(
        run_dir, predictions=[r for o in outputs for r in o.rows], classes=setup.classes, metrics=summary,
        curves=[c for o in outputs for c in o.curves], best_epochs={o.report["fold"]: o.best_epoch for o in outputs},
        title=setup.title, loss_name=LOSS_NAMES[task_type],
    )
    run_folder.write_splits(run_dir, split_rows(cohort, setup.folds))
    return summary


def train(
    *,
    features_dir: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    task: str | os.PathLike[str] | TaskDescription | None = None,
    head: HeadName = "abmil",
    prompts: Sequence[PromptKind] = (),
    bag: Bag = "slide",
    config: TrainConfig = TrainConfig(),
    head_options: dict[str, Any] | None = None,
    ivp_features_dir: str | os.PathLike[str] | None = None,
    text_model: str | os.PathLike[str] | None = None,
    text_cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    strict: bool = False,
    allow_empty_classes: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Cross-validate ``head`` on a labelled cohort and write the run to ``out_dir``.

    ``task`` (a task YAML or :class:`TaskDescription`) sets the task type (classification by
    default, survival, regression), names the classes in logit order and describes them; heads
    that use no text (``abmil``, ``meanpool``, ``pathotune`` without ``ttp``) can do without it
    for classification, and then the classes are the labels found in the table, sorted
    (recorded as ``classes`` with every head). Survival and regression need the task. Folds
    come from the labels table's ``split``/``fold`` column if it has one, else from
    patient-level stratified k-fold (on the class, or on the event indicator for survival). A
    task class without a usable labelled slide, or without a training slide in a fold of the
    table's own split or fold column, is an error (a warning with ``allow_empty_classes``). ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``
    (a :class:`~wsitools.errors.ModelError` when there is no GPU). ``bag``: ``slide`` (one bag
    per slide) or ``patient`` (all slides of a patient concatenated into one bag, whose slides
    must agree on the label; predictions are then one row per patient, and each slide's slice of
    the attention goes to its own attention file; :mod:`wsitools.mil.patients`). The run folder
    is written whole or not at all (:mod:`wsitools.mil.run_folder`). With ``resume`` it is
    written into a partial folder beside ``out_dir`` that a killed run leaves behind, and a
    later run with ``resume`` and the same settings reads the folds finished there back instead
    of training them again (:func:`resume_settings`; other settings are a
    :class:`~wsitools.errors.ConfigError`); each fold seeds itself from the seed and its index,
    so the run folder is the one an uninterrupted run writes. A second ``train`` of the same
    ``out_dir`` while this one runs is a :class:`~wsitools.errors.DataError` naming the folder
    (:func:`~wsitools.mil.run_folder.locked`). Returns the content of ``metrics.json``.
    """
    from wsitools.device import resolve_device

    dev = resolve_device(device)
    if task is None and "ttp" in prompts:
        raise DataError("the ttp prompt embeds the task and class descriptions: give a task (--task TASK.yaml)")
    out_dir = Path(out_dir)
    task_file = None if isinstance(task, TaskDescription) else task
    check_out_apart(out_dir, {"--features": features_dir, "--labels": labels, "--ivp-features": ivp_features_dir,
                              "--task": task_file, "--text-model": text_model, "--text-cache": text_cache_dir})
    task = task if isinstance(task, TaskDescription) or task is None else load_task(task)
    with run_folder.locked(out_dir):  # the folder's state is checked, and the run written, by one train alone
        _check_options(out_dir, overwrite=overwrite, prompts=prompts, ivp_features_dir=ivp_features_dir,
                       task_type=task.type if task is not None else "classification", config=config, bag=bag)
        setup = setup_run(
            task, features_dir=features_dir, labels=labels, head=head, prompts=prompts, bag=bag, config=config,
            head_options=head_options, ivp_features_dir=ivp_features_dir, text_model=text_model,
            text_cache_dir=text_cache_dir, strict=strict, allow_empty_classes=allow_empty_classes, task_file=task_file,
        )
        cohort, head_config = setup.cohort, setup.head_config
        log.info(
            "training %s%s (%s) on %d slides (%d patients, %s bags), %d folds, %d-d features, on %s",
            head, f" [{','.join(head_config.prompts)}]" if head_config.prompts else "", cohort.task_type,
            setup.n_slides, len(set(cohort.patients)), bag, len(setup.folds), cohort.dim, dev,
        )
        with run_folder.writing(out_dir, overwrite=overwrite, resume=resume) as tmp:
            done = _folds_done(tmp, resume_settings(setup, config)) if resume else set()
            outputs = []
            for fold in setup.folds:
                if fold.index in done:
                    output = _read_back(tmp, setup, fold, config, device=dev)
                    if output is not None:
                        outputs.append(output)
                        continue
                result = train_fold(cohort, fold, head_config, config, text_embeddings=setup.text_embeddings,
                                    device=dev, progress=progress)
                outputs.append(_write_fold(tmp, setup, result, config))
                if resume:
                    _mark_done(tmp, fold.index)
            summary = _write_pooled(tmp, setup, outputs, config)
            run_folder.write_record(
                tmp, _record(setup, features_dir=features_dir, ivp_features_dir=ivp_features_dir, labels=labels, device=dev)
            )
    return summary


def _record(
    setup: RunSetup, *, features_dir: Any, ivp_features_dir: Any, labels: Any, device: torch.device
) -> dict[str, Any]:
    """The content of ``run.json``: the heads' metadata, the head config, the inputs, where the
    folds came from, the device, the slides left out, and when the run finished."""
    cohort = setup.cohort
    return {
        **setup.meta,
        "head_config": setup.head_config.to_dict(),
        "features_dir": str(Path(features_dir).resolve()),
        "ivp_features_dir": str(Path(ivp_features_dir).resolve()) if ivp_features_dir else None,
        "labels": str(Path(labels).resolve()),
        "split_source": "labels table" if (cohort.splits or cohort.folds) else "patient stratified k-fold",
        "n_folds": len(setup.folds),
        "device": str(device),
        "skipped": cohort.skipped,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
