"""The training scaffold that PuzzleTuning, PathoTune and the MIL heads are built on.

A trainer keeps its model, its data, its loss and what is particular to its method; the
machinery around them is here, written once:

- :func:`adamw`: the optimiser over a module's trainable parameters, optionally without weight
  decay on biases and norms (the MAE/PuzzleTuning rule);
- :class:`Schedule`: the learning rate per optimiser step, a linear warm-up then a half-cycle
  cosine, or constant. A pure function of the step, so a resumed run gets exactly the rate it
  would have had without the interruption;
- :class:`Stepper`: turns each loss into optimiser steps: precision (autocast, and a gradient
  scaler for float16), gradient accumulation, the scheduled rate, the step count;
- :class:`Checkpoints`: a run's resumable checkpoints, one folder per epoch
  (``epoch-NNNN/trainable.safetensors``, ``optimizer.pt``, ``state.json``), written atomically,
  read without running pickled code, and refused, naming the setting, when another run's
  settings wrote them;
- :func:`epoch_generator`: the random stream of an epoch as a pure function of (seed, epoch),
  so shuffles and augmentations need no saved random state to resume exactly;
- :class:`CsvLog`: the run's log table, rewritten atomically after each epoch;
- :func:`check_run_folder`, :func:`clear_outputs` and :func:`earlier_cards`: a run folder holds
  one run (another run's folder is refused; what an earlier run of the same kind left, its card
  whatever its name among it, is removed at a fresh start);
- :func:`tile_geometries`: the tile sizes and resolutions of the patch stores a run trains on;
- :class:`BestState`: a copy of the weights of the epoch with the lowest validation loss, and
  early stopping (``patience`` epochs without improvement, never before ``min_epochs``).

A trainer's loop then reads::

    stepper = Stepper(adamw(model, lr=..., weight_decay=...), schedule=Schedule(...), device=dev)
    best = BestState(model, patience=..., min_epochs=...)
    for epoch in range(epochs):
        model.train()
        for batch in loader:
            with stepper.autocast():
                loss = my_loss(model, batch)
            stepper.backward(loss)
        best.update(epoch, my_validation_loss(model))
        if best.should_stop(epoch):
            break
    best.restore()
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import re
import shutil
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import yaml
from torch import nn

from wsitools.device import TrainPrecision, autocast, training_amp_dtype
from wsitools.encoders.checkpoint import check_optimizer_state, read_checkpoint, read_state_dict
from wsitools.errors import ConfigError, ModelError, one_line
from wsitools.feature_store import TileGeometry
from wsitools.io import atomic_path, not_written_by, sha256_file, stable_hash, write_safetensors, write_torch
from wsitools.tables import write_table

if TYPE_CHECKING:
    from wsitools.store import PatchStore

log = logging.getLogger(__name__)

Decay = Literal["all", "matrices"]
ScheduleKind = Literal["cosine", "constant"]

CHECKPOINT_RE = re.compile(r"epoch-(\d{4,})")
"""A checkpoint folder's name: the number of epochs done, zero-padded to at least 4 digits."""

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt")
"""The files of a checkpoint whose sha256 its ``state.json`` records."""


def learning_rate_at(
    step: int, *, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0
) -> float:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then a half-cycle cosine down
    to ``min_lr`` at ``total_steps`` (the MAE/PuzzleTuning schedule, stepped per iteration)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each optimiser step: ``cosine`` (:func:`learning_rate_at`) or
    ``constant`` (``base_lr`` throughout; the other fields are unused)."""

    base_lr: float
    kind: ScheduleKind = "constant"
    total_steps: int = 0
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "constant"):
            raise ConfigError(f"learning-rate schedule must be cosine or constant, got {self.kind!r}")

    def at(self, step: int) -> float:
        if self.kind == "constant":
            return self.base_lr
        return learning_rate_at(
            step, base_lr=self.base_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
            min_lr=self.min_lr,
        )


def epoch_generator(seed: int, epoch: int, *, stream: int = 31337) -> torch.Generator:
    """A CPU generator seeded from (``seed``, ``epoch``, ``stream``): each random stream of an
    epoch (tile order, augmentation, puzzles) is then fixed by the run's seed and the epoch alone,
    so a run resumed at any epoch draws what the uninterrupted run drew. Distinct ``stream``
    numbers give independent streams within one epoch."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, epoch, stream]).integers(2**62)))


def adamw(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    decay: Decay = "all",
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW over the parameters of ``model`` that require a gradient, in their module order.

    ``decay="matrices"`` puts biases and 1-D weights (norms) in a second group without weight
    decay, as the PuzzleTuning/MAE code does; ``"all"`` decays every parameter. ``fused`` runs
    one kernel per step (the MIL heads' many small steps gain most from it).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups: list[dict[str, Any]]
    if decay == "matrices":
        no_decay = [p for n, p in named if p.ndim <= 1 or n.endswith(".bias")]
        kept = {id(p) for p in no_decay}
        groups = [
            {"params": [p for _, p in named if id(p) not in kept], "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    elif decay == "all":
        groups = [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    else:
        raise ConfigError(f"weight decay must apply to 'all' or 'matrices', got {decay!r}")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


class Stepper:
    """One optimiser's steps: each loss is backpropagated (scaled for float16 autocast, divided
    by ``accum_steps``), and every ``accum_steps`` losses make one step at the scheduled rate.

    ``precision`` follows :func:`wsitools.device.training_amp_dtype` (``fp32`` never autocasts;
    on a CPU ``auto`` is fp32 and bf16/fp16 are refused). ``step`` counts optimiser steps done (restored on resume);
    ``lr`` is the rate of the last step taken.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        schedule: Schedule,
        device: torch.device,
        precision: TrainPrecision = "fp32",
        accum_steps: int = 1,
    ):
        if accum_steps < 1:
            raise ConfigError(f"accum_steps must be at least 1, got {accum_steps}")
        self.optimizer = optimizer
        self.schedule = schedule
        self.device = device
        self.amp_dtype = training_amp_dtype(precision, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16 else None
        self.accum_steps = accum_steps
        self.step = 0
        self.lr = schedule.at(0)
        self._pending = 0

    @property
    def precision(self) -> str:
        """The forward pass's arithmetic on this device, ``fp32``, ``bf16`` or ``fp16`` (what
        ``auto`` came to): what a resumed run must share, whatever the option said."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's precision context (a no-op in fp32)."""
        return autocast(self.device, self.amp_dtype)

    def backward(self, loss: torch.Tensor) -> bool:
        """Backpropagate one (micro-)batch's ``loss``; True when it completed an optimiser step."""
        if self.accum_steps > 1:
            loss = loss / self.accum_steps
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self._pending += 1
        if self._pending < self.accum_steps:
            return False
        self.lr = self.schedule.at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending = 0
        self.step += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else {}}

    def load_state_dict(self, state: Mapping[str, Any], *, step: int, source: str) -> None:
        """Restore the optimiser (checked first) and scaler states written by :meth:`state_dict`."""
        optimizer_state = check_optimizer_state(state.get("optimizer"), source=source)
        try:
            self.optimizer.load_state_dict(optimizer_state)
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise ModelError(f"{source}: does not fit this run's optimizer ({one_line(exc)})") from None
        self.step = step
        self._pending = 0


@dataclass(frozen=True)
class Resumed:
    """What :meth:`Checkpoints.restore` read besides the tensors: the epochs done and the
    trainer's own JSON record saved with them (``extra``)."""

    epochs_done: int
    extra: dict[str, Any]


def _flat(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``settings`` as JSON would read it back, nested keys joined with dots."""
    out: dict[str, Any] = {}
    for key, value in json.loads(json.dumps(settings, sort_keys=True, default=str)).items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _settings_difference(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The settings that differ between two runs, as ``name: before -> now`` (dotted names), or
    for lists of records (the patch stores, the image files) the records added, removed and
    changed (a list that one run did not record counts as empty)."""
    a, b = _flat(before), _flat(now)
    missing = "(not set)"
    return [
        _records_difference(k, a.get(k) or [], b.get(k) or []) if _records_either(a.get(k), b.get(k))
        else f"{k}: {json.dumps(a.get(k, missing))} -> {json.dumps(b.get(k, missing))}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k, missing) != b.get(k, missing)
    ]


MAX_SHOWN_DIFFERENCES = 6
"""How many differing settings a refused resume names (the rest are counted)."""
MAX_SHOWN_RECORDS = 3
"""How many added, removed or changed records (patch stores) a refused resume names per kind."""


def _records(value: Any) -> bool:
    """Whether a setting is a list of records, each a list named by its first item (a patch
    store as [path, tiling hash, tile count], an image file as [path, fingerprint])."""
    return isinstance(value, list) and all(isinstance(r, list) and r for r in value)


def _records_either(before: Any, now: Any) -> bool:
    """Whether two values of a setting (None: not recorded) are lists of records, one of them
    not empty: a list one run did not record is compared as an empty one."""
    return _records([] if before is None else before) and _records([] if now is None else now) and bool(before or now)


def _records_difference(key: str, before: list[list[Any]], now: list[list[Any]]) -> str:
    """``key: 2 added (a, b), 1 removed (c)``: the records of two lists that differ, by name
    (the first few of each kind, then how many more), not both lists whole (a cohort's
    hundreds of stores)."""
    a, b = {str(r[0]): r for r in before}, {str(r[0]): r for r in now}
    kinds = (("added", [n for n in b if n not in a]), ("removed", [n for n in a if n not in b]),
             ("changed", [n for n in b if n in a and a[n] != b[n]]))
    parts = []
    for kind, names in kinds:
        if names:
            more = f" and {len(names) - MAX_SHOWN_RECORDS} more" if len(names) > MAX_SHOWN_RECORDS else ""
            parts.append(f"{len(names)} {kind} ({', '.join(names[:MAX_SHOWN_RECORDS])}{more})")
    return f"{key}: {', '.join(parts)}"


def check_same_settings(
    path: Path, *, written: Any, written_hash: str, settings: Mapping[str, Any], remedy: str
) -> None:
    """Refuse to resume from ``path``, written by a run whose settings hash to ``written_hash``
    (``written``: those settings, when recorded), unless ``settings`` hash the same: a
    :class:`ConfigError` naming ``path`` and each setting that differs, then ``remedy``."""
    what = settings_change(written=written, written_hash=written_hash, settings=settings)
    if what is not None:
        raise ConfigError(
            f"{path}: was written by a run with other settings ({what}); resume with the same settings {remedy}"
        )


def settings_change(*, written: Any, written_hash: str, settings: Mapping[str, Any]) -> str | None:
    """What differs between the recorded settings (``written``, hashing to ``written_hash``) and
    ``settings``, in words (the first few settings, else the hashes); None when they are the same."""
    if written_hash == stable_hash(settings):
        return None
    differ = _settings_difference(written, settings) if isinstance(written, dict) else []
    shown = differ[:MAX_SHOWN_DIFFERENCES]
    if len(differ) > len(shown):  # e.g. the folder of another kind of run: the first few say enough
        shown.append(f"and {len(differ) - len(shown)} more")
    return "; ".join(shown) if shown else f"settings hash {written_hash} -> {stable_hash(settings)}"


def check_run_folder(folder: Path, *, own: Sequence[str], kind: str) -> None:
    """Refuse a run folder that holds an entry a run of ``kind`` never writes (``own``: glob
    patterns of its outputs; hidden temporaries aside): the folder of another run (a MIL
    training run, the other tuner), whose files this run would overwrite (its ``metrics.json``,
    ``predictions.csv``) while it still looked finished. A :class:`ConfigError` naming the folder
    and the first such entry, before any work; so is a file where the folder goes."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: is a file, where the {kind} run's folder goes; choose another --out")
    if not folder.is_dir():
        return
    if (foreign := not_written_by(folder, own=[*own, ".*"], writer=f"a {kind} run")) is not None:
        raise ConfigError(f"{folder}: {foreign} (another run's folder?); choose a new or empty --out")


def clear_outputs(folder: Path, outputs: Sequence[str]) -> list[Path]:
    """Remove the files of ``folder`` whose path in it fully matches one of ``outputs`` (regular
    expressions naming the final outputs a run writes once its last epoch is done): what an
    earlier run in the folder left there, which beside a run started afresh would look like its
    finished result until the new run overwrites it at its end. A warning names them; returns
    them."""
    if not folder.is_dir():
        return []
    patterns = [re.compile(p) for p in outputs]
    old = sorted(p for p in folder.rglob("*")
                 if p.is_file() and any(r.fullmatch(p.relative_to(folder).as_posix()) for r in patterns))
    for p in old:
        p.unlink()
    if old:
        log.warning("%s: starting afresh, so the outputs of an earlier run there are removed: %s", folder,
                    ", ".join(p.relative_to(folder).as_posix() for p in old))
    return old


def earlier_cards(folder: Path, *, role: str, keep: Collection[Path] = ()) -> list[str]:
    """The encoder cards an earlier tuning run left directly in ``folder``, whatever their name,
    and the weight files of ``role`` they name there: the names of both, for :func:`clear_outputs`.

    A tuner writes its card beside its own weight file and names that file relative to the card
    (a bare file name); a card listing a ``role`` file so is an earlier run's result. Beside a run
    started afresh under another name it would be a second card in the folder, whose weights the
    new run replaces or removes. Other YAML files (a task file, a card naming its weights
    elsewhere) and the files in ``keep`` (the cards and weights this run reads) are not among them.
    """
    if not folder.is_dir():
        return []
    kept = {p.resolve() for p in keep}
    found: list[str] = []
    for path in sorted(folder.glob("*.yaml")):
        if path.resolve() in kept or not path.is_file():
            continue
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # not a card
        weights = data.get("weights") if isinstance(data, dict) else None
        entries = weights if isinstance(weights, list) else []
        files = [w.get("file") for w in entries if isinstance(w, dict) and w.get("role") == role]
        here = [f for f in files if isinstance(f, str) and f and f == Path(f).name]
        if here:
            found += [path.name, *(f for f in here if (folder / f).resolve() not in kept)]
    return found


def tile_geometries(stores: Sequence[PatchStore]) -> dict[str, int]:
    """How many of ``stores`` hold tiles of each size and resolution (``64 px tiles at 0.5
    um/px``: count), most first, for a run's record. Stores of several are trained on together
    (PuzzleTuning pretrains across magnifications; the tiles are resized to the model's input),
    but a field of view twice as wide is other data: a mix is logged as a warning."""
    counts: dict[str, int] = {}
    for store in stores:
        key = TileGeometry.of(store.attrs).describe()
        counts[key] = counts.get(key, 0) + 1
    groups = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    if len(groups) > 1:
        log.warning("the patch stores hold tiles of %d sizes or resolutions, trained on together: %s", len(groups),
                    "; ".join(f"{k} ({n} store{'s' if n > 1 else ''})" for k, n in groups.items()))
    return groups


def describe_geometries(geometries: Mapping[str, int]) -> str:
    """``64 px tiles at 0.5 um/px: 3; ...``: :func:`tile_geometries` in words, for a card's description."""
    return "; ".join(f"{k}: {n}" for k, n in geometries.items())


@dataclass(frozen=True)
class Checkpoints:
    """The resumable checkpoints under ``root``: ``epoch-NNNN/`` with the trainable tensors
    (``trainable.safetensors``), the optimiser and scaler states (``optimizer.pt``) and
    ``state.json`` (epochs and steps done, the settings that shape the run and their hash, the
    sha256 of the two other files, and the trainer's own ``extra`` record). Each is written under
    a temporary name and renamed when complete; the last ``keep`` stay."""

    root: Path
    keep: int = 2

    def found(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (epochs done, folder), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = CHECKPOINT_RE.fullmatch(p.name)
            if m and (p / "state.json").is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(
        self,
        *,
        epoch: int,
        tensors: Mapping[str, torch.Tensor],
        stepper: Stepper,
        settings: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the checkpoint after ``epoch`` epochs, then drop all but the last ``keep``.

        ``settings`` (JSON-serialisable) are what a resumed run must share with this one;
        ``extra`` is the trainer's own record (e.g. its log rows), returned by :meth:`restore`."""
        final = self.root / f"epoch-{epoch:04d}"
        state = {
            "epochs_done": epoch, "steps_done": stepper.step, "schedule_hash": stable_hash(settings),
            "settings": json.loads(json.dumps(settings, default=str)), "extra": dict(extra or {}),
        }
        with atomic_path(final, overwrite=True) as tmp:
            tmp.mkdir()
            write_safetensors(tmp / "trainable.safetensors", tensors)
            write_torch(tmp / "optimizer.pt", stepper.state_dict())
            state["sha256"] = {name: sha256_file(tmp / name) for name in CHECKPOINT_FILES}
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
        for _, old in self.found()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def recorded_settings(self, path: Path) -> dict[str, Any]:
        """The settings checkpoint ``path`` was written with ({} when unreadable: :meth:`restore`
        then says what is wrong with it)."""
        try:
            return dict(json.loads((path / "state.json").read_text()).get("settings") or {})
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def restore(
        self, path: Path, *, tensors: Mapping[str, torch.Tensor], stepper: Stepper, settings: Mapping[str, Any]
    ) -> Resumed:
        """Copy checkpoint ``path`` into the live ``tensors`` and ``stepper``.

        A checkpoint written with other ``settings`` is a :class:`ConfigError` naming the folder
        and the settings that differ; a damaged one a :class:`ModelError` naming its file (a file
        whose sha256 is not the one ``state.json`` records, where it records them: one flipped
        bit would otherwise go on into the run's result)."""
        try:
            state = json.loads((path / "state.json").read_text())
            done, steps = int(state["epochs_done"]), int(state["steps_done"])
            written_hash, extra = str(state["schedule_hash"]), dict(state.get("extra") or {})
            recorded = dict(state.get("sha256") or {})
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ModelError(f"{path / 'state.json'}: not a checkpoint state ({one_line(exc)})") from None
        check_same_settings(path, written=state.get("settings"), written_hash=written_hash, settings=settings,
                            remedy=f"or start the run over: remove {self.root} or choose another --out")
        saved = read_state_dict(path / "trainable.safetensors", tensors)
        opt_path = path / "optimizer.pt"
        optimizer = read_checkpoint(opt_path)
        for name, digest in recorded.items():  # after reading: a file that is no checkpoint is named as such
            if name in CHECKPOINT_FILES and (actual := sha256_file(path / name)) != digest:
                raise ModelError(
                    f"{path / name}: checksum mismatch: its sha256 is {actual}, {path / 'state.json'} records "
                    f"{digest}: damaged since it was written; remove {path} to resume from the checkpoint before "
                    "it, or start the run over"
                )
        stepper.load_state_dict(optimizer, step=steps, source=str(opt_path))
        with torch.no_grad():
            for k, p in tensors.items():
                p.copy_(saved[k].to(p.device))
        return Resumed(epochs_done=done, extra=extra)


@dataclass(frozen=True)
class CsvLog:
    """A run's log table: one row per step or epoch, ``columns`` in order; ``int_columns`` are
    written as integers, the others as floats (``repr``, so they read back exactly)."""

    path: Path
    columns: tuple[str, ...]
    int_columns: frozenset[str] = frozenset()

    def write(self, rows: Sequence[Mapping[str, float]]) -> None:
        """Replace the table with ``rows`` (a comma-separated :func:`~wsitools.tables.write_table`,
        atomic: a reader never sees half a table)."""
        write_table(
            self.path,
            [{k: str(int(row[k])) if k in self.int_columns else repr(float(row[k])) for k in self.columns} for row in rows],
            self.columns,
            dialect="csv",
        )

    def read(self) -> list[dict[str, float]]:
        """The rows written before, as floats (none when there is no table yet); a table that is
        not one is a :class:`ConfigError` naming it."""
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            try:
                rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
            except (TypeError, ValueError, csv.Error) as exc:
                raise ConfigError(f"{self.path}: not the log this run writes ({exc}); restore it or start afresh") from None
        if rows and set(rows[0]) != set(self.columns):
            raise ConfigError(f"{self.path}: not the log this run writes (columns {', '.join(rows[0])})")
        return rows


class BestState:
    """A copy of ``module``'s state at the epoch with the lowest validation loss, and early
    stopping.

    An epoch improves when its loss is below the best by more than ``min_delta``. With
    ``patience``, :meth:`should_stop` is true once ``patience`` epochs have passed since the
    best one, but never before ``min_epochs`` epochs have run (epochs count from 0).
    """

    def __init__(
        self, module: nn.Module, *, min_delta: float = 0.0, patience: int | None = None, min_epochs: int = 0
    ):
        self.module = module
        self.min_delta = min_delta
        self.patience = patience
        self.min_epochs = min_epochs
        self.loss = math.inf
        self.epoch = -1
        self._state: dict[str, torch.Tensor] | None = None

    def record(self, epoch: int, loss: float) -> None:
        """Take the module's current state as the best, whatever its loss."""
        self.loss, self.epoch = loss, epoch
        self._state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def update(self, epoch: int, loss: float) -> bool:
        """Record the current state if ``loss`` improves on the best; True when it did."""
        if loss < self.loss - self.min_delta:
            self.record(epoch, loss)
            return True
        return False

    def should_stop(self, epoch: int) -> bool:
        """Whether training should end after ``epoch`` (always false without ``patience``)."""
        return (
            self.patience is not None
            and epoch + 1 >= self.min_epochs
            and epoch - self.epoch >= self.patience
        )

    def kept_tensors(self) -> dict[str, torch.Tensor]:
        """The kept copy's tensors, for a checkpoint to save or to be read into (a copy of the
        module's current state is taken first when none is kept yet)."""
        if self._state is None:
            self._state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        return self._state

    def summary(self) -> dict[str, float]:
        """The best epoch and its loss: with :meth:`kept_tensors`, all a resumed run needs to
        keep choosing and stopping as the uninterrupted run would."""
        return {"epoch": self.epoch, "loss": self.loss}

    def load_summary(self, summary: Mapping[str, float]) -> None:
        """Take back what :meth:`summary` gave (the kept tensors are restored separately)."""
        self.epoch, self.loss = int(summary["epoch"]), float(summary["loss"])

    def restore(self) -> None:
        """Load the best state back into the module."""
        if self._state is None:
            raise ModelError("the validation loss was never finite: no epoch to keep (lower the learning rate)")
        self.module.load_state_dict(self._state)
