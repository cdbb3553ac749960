"""Training settings of a MIL run, importable without torch (the CLI reads its defaults here)."""

from __future__ import annotations

import math
from numbers import Integral, Real
from dataclasses import dataclass
from typing import Literal

from wsitools.errors import ConfigError

Balance = Literal["weights", "sampling"]
Bag = Literal["slide", "patient"]
PoolingChoice = Literal["select", "attention"]
POOLING_CHOICES: tuple[str, ...] = ("select", "attention")
"""How an attention head pools: ``select`` trains it twice in each fold, pooling by attention and
by the mean, and keeps the one of lower best validation loss (the default; docs/mil.md, "Pooling
selection"); ``attention`` trains attention pooling alone."""
BAGS: tuple[str, ...] = ("slide", "patient")
"""What one bag is: a slide's feature store (the default), or all slides of a patient
concatenated (:mod:`wsitools.mil.patients`; docs/mil.md, "Patient-level bags")."""


OPTIONS: dict[str, str] = {
    "epochs": "--epochs", "patience": "--patience", "min_epochs": "--min-epochs", "lr": "--lr",
    "weight_decay": "--weight-decay", "bag_size": "--bag-size", "instance_dropout": "--instance-dropout",
    "balance": "--balance", "folds": "--folds", "val_fraction": "--val-fraction", "seed": "--seed",
    "workers": "--workers", "n_boot": "--bootstrap", "pooling": "--pooling",
}
"""The option of ``wsitools train`` that sets each :class:`TrainConfig` field (``survival_batch``
has none)."""


def named(field: str) -> str:
    """A field as an error names it: with the option that sets it, ``val_fraction
    (--val-fraction)``, since the config is built from the command line and from Python alike."""
    return f"{field} ({OPTIONS[field]})" if field in OPTIONS else field


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and evaluation settings of a run (saved in ``run.json``).

    Early stopping ends a fold once ``patience`` epochs have passed without a lower validation
    loss, but never before ``min_epochs`` epochs (all of them when ``epochs`` is smaller); the
    best epoch's weights are kept. The defaults were chosen on benchmarks/bench_mil_quality.py
    (docs/mil.md, "Quality benchmark and the choice of defaults"). ``survival_batch`` is the
    number of bags per optimiser step of a survival head (the Cox loss compares each event with
    the bags of its step still at risk; docs/mil.md, "Survival").

    ``pooling``: :data:`POOLING_CHOICES` (no effect on ``meanpool``, which has no attention).

    ``bag_size`` None trains on whole bags (what ``wsitools train --bag-size 0`` gives);
    ``n_boot`` 0 computes no bootstrap intervals (their bounds are null in ``metrics.json``), a
    quick run's setting. Every other bad value is a :class:`ConfigError` naming the field and
    its option of ``wsitools train`` (:func:`named`), as the command line refuses it.
    """

    epochs: int = 100
    patience: int = 20
    min_epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-4
    bag_size: int | None = 512
    instance_dropout: float = 0.0
    balance: Balance = "weights"
    folds: int = 5
    val_fraction: float = 0.2
    seed: int = 0
    workers: int = 0
    n_boot: int = 1000
    survival_batch: int = 16
    pooling: PoolingChoice = "select"

    def __post_init__(self) -> None:
        for name in ("epochs", "patience", "min_epochs", "bag_size", "folds", "seed", "workers", "n_boot", "survival_batch"):
            value = getattr(self, name)
            if not (isinstance(value, Integral) and not isinstance(value, bool)) and not (name == "bag_size" and value is None):
                raise ConfigError(f"{named(name)} must be a whole number, got {value!r}")
        for name in ("lr", "weight_decay", "instance_dropout", "val_fraction"):
            value = getattr(self, name)
            if not isinstance(value, Real) or isinstance(value, bool):
                raise ConfigError(f"{named(name)} must be a number, got {value!r}")
        if self.seed < 0:
            raise ConfigError(f"{named('seed')} must be at least 0, got {self.seed}")
        if self.epochs < 1 or self.patience < 1:
            raise ConfigError(f"{named('epochs')} and {named('patience')} must be at least 1")
        if self.min_epochs < 0:
            raise ConfigError(f"{named('min_epochs')} must be at least 0, got {self.min_epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"{named('lr')} must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"{named('weight_decay')} must be a finite number >= 0, got {self.weight_decay}")
        if self.bag_size is not None and self.bag_size < 1:
            raise ConfigError(f"{named('bag_size')} must be at least 1, or None for whole bags (--bag-size 0), got {self.bag_size}")
        if self.n_boot < 0:
            raise ConfigError(f"{named('n_boot')} must be at least 0 (0: no bootstrap intervals), got {self.n_boot}")
        if self.workers < 0:
            raise ConfigError(f"{named('workers')} must be at least 0, got {self.workers}")
        if self.pooling not in POOLING_CHOICES:
            raise ConfigError(f"{named('pooling')} must be one of {', '.join(POOLING_CHOICES)}, got {self.pooling!r}")
        if self.balance not in ("weights", "sampling"):
            raise ConfigError(f"{named('balance')} must be 'weights' or 'sampling', got {self.balance!r}")
        if not 0.0 <= self.instance_dropout < 1.0:
            raise ConfigError(f"{named('instance_dropout')} must lie in [0, 1), got {self.instance_dropout}")
        if self.survival_batch < 2:
            raise ConfigError(f"survival_batch must be at least 2 (a Cox risk set compares bags), got {self.survival_batch}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{named('val_fraction')} must lie in (0, 1), got {self.val_fraction}")
