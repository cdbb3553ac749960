"""The run folder of ``wsitools train``: path, write, read, verify.

One run is one head cross-validated on one cohort (layout in docs/formats.md, "MIL heads"):

- ``run.json``: the run's record (settings and provenance), written last;
- ``metrics.json``, ``predictions.csv``, ``curves.csv``, ``curves.png``: the out-of-fold
  results, and ``km.png`` for a survival task; ``splits.csv``: every fold's parts;
- ``fold_{k}/``: the head folder of fold ``k`` (:mod:`wsitools.mil.head_folder`) with the same
  four result files for that fold alone;
- ``attention/{slide_id}.h5``: attention files (:mod:`wsitools.attention`).

A run is written whole or not at all: :func:`writing` hands out a temporary sibling of the
output folder, and renames it into place only when the block ends without an error *and* the
run's record has been written (:func:`write_record`, after everything else). The readers
(:func:`check_run`, :func:`head_folders`, :func:`load_heads`) accept a run only when its
record is there and every fold head it counts is, so the folder of a ``train`` that was killed
(the temporary it leaves behind, or a run copied in part) is refused with one line naming it.
The prediction tables (``predictions.csv``, also written by ``wsitools predict``) and the
metrics file are written and read here too, for the workflow's report.

A resumable run (``wsitools train --resume``) is written instead into a stable hidden sibling,
``.{name}.partial/`` (:func:`partial_dir`), that outlives a killed ``train``: its record
``partial.json`` (:func:`read_partial`, :func:`write_partial`) holds the run's settings and the
folds finished so far, and is removed just before the folder is renamed into place. Having no
``run.json``, a partial folder is never taken for a finished run. A run of the same output
folder written without ``--resume`` removes it once finished; ``wsitools clean`` lists it as
resumable state or removes it as obsolete (:func:`partial_state`).

One ``train`` at a time writes a run: :func:`locked` holds an exclusive lock on the file
``.{name}.lock`` beside the output folder (:func:`lock_path`) while it trains, so a second
``train`` (``--resume`` or not) of the same ``--out`` is refused at once instead of writing the
same partial folder, or losing the race to rename its run into place after all its training.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wsitools.errors import DataError, ModelError, one_line
from wsitools.feature_store import TileGeometry
from wsitools.io import atomic_path, check_own_folder, not_an_output, pid_alive, remove_path, write_json_atomic
from wsitools.mil.head_folder import WEIGHTS_FILE, SavedHead, load_head
from wsitools.tables import write_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

RECORD_FILE = "run.json"
PARTIAL_RECORD = "partial.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
SPLITS_FILE = "splits.csv"
CURVES_FILE = "curves.csv"
CURVES_PLOT = "curves.png"
RISK_GROUPS_PLOT = "km.png"
ATTENTION_DIR = "attention"
RUN_ENTRIES = (
    METRICS_FILE, PREDICTIONS_FILE, SPLITS_FILE, CURVES_FILE, CURVES_PLOT, RISK_GROUPS_PLOT, ATTENTION_DIR, "fold_*",
)
"""The entries of a run folder besides its record (glob patterns): ``train --overwrite`` replaces
no folder holding anything else."""
RECORD_FIELDS = {"package_version": str, "n_folds": int, "head_config": dict, "task_type": str}
"""Fields every run's :data:`RECORD_FILE` holds, with the type of their values."""


def fold_dir(run_dir: str | os.PathLike[str], index: int) -> Path:
    """The head folder of fold ``index`` in a training run: ``{run_dir}/fold_{index}``."""
    return Path(run_dir) / f"fold_{int(index)}"


def attention_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The folder of a run's attention files, ``{run_dir}/attention``."""
    return Path(run_dir) / ATTENTION_DIR


def partial_dir(out_dir: str | os.PathLike[str]) -> Path:
    """The folder a resumable run of ``out_dir`` is written into: ``.{name}.partial`` beside it."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.partial"


def lock_path(out_dir: str | os.PathLike[str]) -> Path:
    """The lock file of the run ``out_dir``: ``.{name}.lock`` beside it (not in it: the run
    folder appears only when complete, and ``--overwrite`` replaces it as a whole), in the
    folder above it with its links resolved, so that two paths to one run share one lock."""
    out_dir = Path(os.path.abspath(out_dir))
    return out_dir.parent.resolve() / f".{out_dir.name}.lock"


@contextmanager
def locked(out_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on the run ``out_dir`` for the block (``flock`` on
    :func:`lock_path`, created with the folder above it where missing): a :class:`DataError`
    naming the folder and the process that holds it when another one does. The kernel lets go
    of the lock when its process ends, killed or not; the lock file is removed when the block
    ends. On a file system that cannot lock files the block runs unlocked, with a warning."""
    lock = lock_path(out_dir)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _take_lock(lock, Path(out_dir))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # before letting go: a process waiting on this file takes the next one
        os.close(fd)


def _take_lock(lock: Path, out_dir: Path) -> int:
    """An open descriptor of ``lock`` holding its exclusive lock, with this host and process id
    written in it (what a refused run names)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = lock.read_text().strip()
            except OSError:
                holder = ""
            held_by = f" by process {holder}" if holder else ""
            raise DataError(
                f"{out_dir}: another wsitools train is writing this run (its lock {lock} is held{held_by}); "
                "wait for it to end, or give another --out"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.warning("%s: cannot be locked (%s); a second train of %s at the same time would not be noticed",
                        lock, exc.strerror, out_dir)
            return fd
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)  # its holder removed the file while letting go: lock the one there now


@contextmanager
def writing(out_dir: str | os.PathLike[str], *, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Yield a folder (with its ``attention/``) to write the run ``out_dir`` into, and rename it
    to ``out_dir`` when the block ends; an existing ``out_dir`` is replaced only with
    ``overwrite``, and only when it is empty or an earlier run: anything else is refused first
    (:func:`check_replaceable`). The folder is a run-unique
    temporary, removed on an error or when the block did not write the run's record; with
    ``resume`` it is :func:`partial_dir`, created when missing (a partial folder without its
    :data:`PARTIAL_RECORD` is started afresh: it was cut off before it recorded anything) and
    kept on an error, for the next run to continue. A run written without ``resume`` removes the
    partial folder a killed resumable run of ``out_dir`` left, once it has replaced that run."""
    out_dir = Path(out_dir)
    if overwrite:
        check_replaceable(out_dir)
    if not resume:
        with atomic_path(out_dir, overwrite=overwrite) as tmp:
            attention_dir(tmp).mkdir(parents=True)
            yield tmp
            _check_written(out_dir, tmp)
        remove_path(partial_dir(out_dir))  # a killed resumable run's state, of a run now replaced
        return
    folder = partial_dir(out_dir)
    if not (folder / PARTIAL_RECORD).is_file():
        remove_path(folder)
    attention_dir(folder).mkdir(parents=True, exist_ok=True)
    yield folder
    _check_written(out_dir, folder)
    (folder / PARTIAL_RECORD).unlink(missing_ok=True)
    with atomic_path(out_dir, overwrite=overwrite) as tmp:
        os.rename(folder, tmp)


def check_replaceable(out_dir: str | os.PathLike[str]) -> None:
    """Refuse an ``out_dir`` that ``train --overwrite`` may not replace, whose files the run would
    delete (:func:`~wsitools.io.check_own_folder`): a file, or a folder that is neither empty nor
    a training run (:func:`~wsitools.io.not_an_output`: its :data:`RECORD_FILE` holds
    :data:`RECORD_FIELDS`, and it holds nothing but :data:`RUN_ENTRIES`)."""
    check_own_folder(
        out_dir, writes="train --overwrite replaces its --out as a whole",
        foreign=lambda folder: not_an_output(
            folder, record=RECORD_FILE, fields=RECORD_FIELDS, own=RUN_ENTRIES, what="training run", writer="train"
        ),
    )


def _check_written(out_dir: Path, folder: Path) -> None:
    if not (folder / RECORD_FILE).is_file():
        raise RuntimeError(f"{out_dir}: the run was written without its {RECORD_FILE}")


def read_partial(folder: Path) -> dict[str, Any] | None:
    """The record of the partial folder ``folder`` (``settings``, ``settings_hash`` and
    ``folds_done``, the indices of the folds written whole), or ``None`` when it has none yet;
    a :class:`ModelError` naming the file when it is damaged."""
    path = folder / PARTIAL_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record["folds_done"] = [int(k) for k in record["folds_done"]]
        record["settings_hash"] = str(record["settings_hash"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: not a readable partial-run record ({one_line(exc)})") from None
    return record


def partial_state(folder: Path) -> tuple[bool, str] | None:
    """What ``wsitools clean`` says of ``folder`` when it is the partial folder of a run
    (``.{name}.partial/`` with its ``attention/``; None for any other folder): whether it is
    obsolete, and why. Kept: one a ``train`` of the run may be writing (its lock file names a
    process that is alive on this host, or one of another host, which cannot be checked), and
    resumable state (``train --resume`` continues it). Obsolete: one without a readable
    :data:`PARTIAL_RECORD` (nothing a resumed run can use), and one older than the finished run
    beside it (that run, trained without ``--resume``, replaced the one it belonged to)."""
    name = folder.name
    stem = name[1:-len(".partial")]
    if not (name.startswith(".") and name.endswith(".partial") and stem and attention_dir(folder).is_dir()):
        return None
    out_dir = folder.parent / stem
    holder = _lock_holder(lock_path(out_dir))
    if holder is not None:
        return False, f"a train of {out_dir} may be writing it (its lock is held by process {holder})"
    record_path = folder / PARTIAL_RECORD
    try:
        record = read_partial(folder)
    except ModelError as exc:
        return True, f"obsolete: {one_line(exc)}"
    if record is None:
        return True, f"obsolete: it has no {PARTIAL_RECORD} (cut off before its first fold)"
    finished = out_dir / RECORD_FILE
    if finished.is_file() and finished.stat().st_mtime >= record_path.stat().st_mtime:
        return True, f"obsolete: {out_dir} was trained again and finished after it"
    folds = ", ".join(map(str, record["folds_done"])) or "none yet"
    return False, (f"resumable: a train --resume of {out_dir} with the same settings reads its finished folds "
                   f"back ({folds}); remove it by hand to discard them")


def _lock_holder(lock: Path) -> str | None:
    """The ``PID on HOST`` written in a run's lock file (:func:`locked`) when that process may
    still hold it: alive on this host, or on another host; None when there is no lock file or its
    process is gone."""
    try:
        holder = lock.read_text().strip()
    except FileNotFoundError:
        return None
    pid, _, host = holder.partition(" on ")
    if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
        return None
    return holder or "unknown"


def write_partial(folder: Path, record: Mapping[str, Any]) -> None:
    """Replace the record of the partial folder ``folder`` (atomically)."""
    write_json_atomic(folder / PARTIAL_RECORD, dict(record))


def write_predictions(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], classes: Sequence[str]
) -> None:
    """A predictions table: one row per bag (slide, or patient with its slides), columns in the
    order of the rows' keys; a classification head's rows hold ``probs`` (written as ``pred``
    and ``prob_{class}`` columns in class order, after the other columns, to 6 decimals), a
    survival or regression head's rows (``classes`` empty) their ``risk`` or ``prediction``
    (floats written exactly, as the shortest text that reads back as the same number: targets of
    1e6 and more, or times in seconds, must recompute the reported metrics)."""
    if not classes:
        columns = list(rows[0]) if rows else ["slide_id"]
        table = [{k: repr(float(v)) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    else:
        keys = [k for k in rows[0] if k != "probs"] if rows else ["slide_id"]
        prob_columns = [f"prob_{c}" for c in classes]
        columns = [*keys, "pred", *prob_columns]
        table = []
        for r in rows:
            probs = np.asarray(r["probs"])
            table.append({**{k: r[k] for k in keys}, "pred": classes[int(probs.argmax())],
                          **{c: f"{p:.6f}" for c, p in zip(prob_columns, probs)}})
    write_table(path, table, columns, dialect="csv")


def read_predictions(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a predictions table (:func:`write_predictions`); a :class:`DataError`
    naming the file when it cannot be read."""
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"predictions {path} cannot be read: {exc!r}") from None


def read_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A run's (or a fold's) ``metrics.json``; a :class:`DataError` naming the file when it is
    missing or not a JSON object."""
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"metrics file {path} cannot be read: {exc!r}") from None
    if not isinstance(metrics, dict):
        raise DataError(f"metrics file {path} cannot be read: not a JSON object")
    return metrics


def write_results(
    folder: Path,
    *,
    predictions: Sequence[Mapping[str, Any]],
    classes: Sequence[str],
    metrics: Mapping[str, Any],
    curves: Sequence[Mapping[str, Any]],
    best_epochs: Mapping[int, int],
    title: str,
    loss_name: str,
) -> None:
    """The results of one fold (``folder`` its head folder) or of the whole run (out-of-fold):
    ``predictions.csv``, ``metrics.json``, ``curves.csv`` (one row per fold and epoch, columns
    in the order of the rows' keys) and ``curves.png`` (:func:`plot_curves`)."""
    write_predictions(folder / PREDICTIONS_FILE, predictions, classes)
    write_json_atomic(folder / METRICS_FILE, dict(metrics))
    write_table(folder / CURVES_FILE, curves, list(curves[0]), dialect="csv")
    histories: dict[int, list[Mapping[str, Any]]] = {}
    for row in curves:
        histories.setdefault(int(row["fold"]), []).append(row)
    plot_curves(folder / CURVES_PLOT, histories, best_epochs, title=title, loss_name=loss_name)


def read_curves(folder: Path) -> list[dict[str, Any]]:
    """The rows of ``folder``'s ``curves.csv`` (:func:`write_results`): ``fold`` and ``epoch``
    as integers, ``pooling`` as it is, the other columns as floats (written as their ``repr``, so
    exactly the values written)."""
    path = folder / CURVES_FILE
    try:
        with open(path, newline="") as f:
            return [{k: int(v) if k in ("fold", "epoch") else v if k == "pooling" else float(v)
                     for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise DataError(f"curves {path} cannot be read: {exc!r}") from None


def write_splits(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``splits.csv``: one row per slide and fold, ``fold, part, slide_id, patient_id, label``."""
    write_table(run_dir / SPLITS_FILE, rows, ("fold", "part", "slide_id", "patient_id", "label"), dialect="csv")


def write_record(run_dir: Path, record: Mapping[str, Any]) -> None:
    """``run.json``, the run's settings and provenance; written last, it marks the run as
    complete (:func:`check_run`)."""
    write_json_atomic(run_dir / RECORD_FILE, dict(record))


def curves_figure(
    histories: Mapping[int, Sequence[Mapping[str, Any]]], best: Mapping[int, int], *, title: str, loss_name: str,
) -> Figure:
    """Training and validation loss per epoch, one colour per fold, best epoch marked; the legend
    names each fold's pooling where its rows record it (``fold 2 val (mean pooling)``: the
    training pooling selection kept, the only one whose curves are kept)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for k, hist in histories.items():
        epochs = [h["epoch"] for h in hist]
        pooling = f" ({hist[0]['pooling']} pooling)" if hist and "pooling" in hist[0] else ""
        line = ax.plot(epochs, [h["train_loss"] for h in hist], "--", label=f"fold {k} train{pooling}")[0]
        ax.plot(epochs, [h["val_loss"] for h in hist], "-", color=line.get_color(), label=f"fold {k} val{pooling}")
        ax.axvline(best[k], color=line.get_color(), alpha=0.3, linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel(loss_name)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_curves(
    path: Path, histories: Mapping[int, Sequence[Mapping[str, Any]]], best: Mapping[int, int], *, title: str,
    loss_name: str,
) -> None:
    """Write :func:`curves_figure` as PNG."""
    fig = curves_figure(histories, best, title=title, loss_name=loss_name)
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png")


def plot_risk_groups(run_dir: Path, time: np.ndarray, event: np.ndarray, high: np.ndarray, *, title: str) -> None:
    """``km.png``: Kaplan-Meier curves of the out-of-fold high- and low-risk groups with the
    log-rank p-value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from wsitools.survival import draw_risk_groups

    fig = Figure(figsize=(6, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    draw_risk_groups(fig.add_subplot(1, 1, 1), time, event, high, title=title)
    fig.tight_layout()
    with atomic_path(run_dir / RISK_GROUPS_PLOT, overwrite=True) as tmp:
        fig.savefig(tmp, format="png")


def _fold_heads(run_dir: Path) -> list[Path]:
    """The ``fold_{k}/`` folders of ``run_dir`` that hold a head's weights, in fold order."""
    folds = [p for p in run_dir.glob("fold_*") if p.name[5:].isdigit() and (p / WEIGHTS_FILE).is_file()]
    return sorted(folds, key=lambda p: int(p.name[5:]))


def check_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The record of a finished run (``run.json``), after checking that the run is complete:
    its record, its results and as many fold heads as the record counts. A :class:`ModelError`
    naming the folder otherwise (one that is not a run at all, or an unfinished one: a
    ``train`` stopped while writing it)."""
    run_dir = Path(run_dir)
    record_path = run_dir / RECORD_FILE
    folds = _fold_heads(run_dir)
    if not record_path.is_file():
        if folds:
            raise ModelError(
                f"{run_dir}: an unfinished training run (fold heads without the {RECORD_FILE} that "
                "wsitools train writes last); train into a new or empty folder, or remove this one first"
            )
        raise ModelError(f"{run_dir}: no trained head (model.safetensors) here or in fold_*/")
    try:
        record = json.loads(record_path.read_text())
        n_folds = int(record["n_folds"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{record_path}: not a readable run record ({type(exc).__name__}: {exc})") from None
    missing = [name for name in (METRICS_FILE, PREDICTIONS_FILE) if not (run_dir / name).is_file()]
    if len(folds) != n_folds or missing:
        found = f"{len(folds)} of its {n_folds} fold heads" + (f", no {' or '.join(missing)}" if missing else "")
        raise ModelError(f"{run_dir}: an unfinished training run ({found}); train it again with --overwrite")
    return record


def head_folders(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The head folders of ``model_dir``: itself when it is one head folder, else the fold
    heads of a finished run (:func:`check_run`), in fold order."""
    model_dir = Path(model_dir)
    if (model_dir / WEIGHTS_FILE).is_file():
        return [model_dir]
    check_run(model_dir)
    return _fold_heads(model_dir)


def load_heads(model_dir: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> list[SavedHead]:
    """The heads of a finished training run (``fold_*/``, in fold order) or of one head folder,
    on ``device``; :class:`ModelError` when they disagree on classes, feature width, task type,
    bags (slide or patient) or the encoder or tiles of their training features (they could not
    be averaged)."""
    heads = [load_head(p, device=device) for p in head_folders(model_dir)]
    first = heads[0]
    for h in heads[1:]:
        if h.classes != first.classes or h.config.in_dim != first.config.in_dim or h.task_type != first.task_type:
            raise ModelError(f"{model_dir}: the fold heads disagree on classes or feature width")
        if h.bag != first.bag:
            raise ModelError(f"{model_dir}: the fold heads disagree on the bags (slide or patient)")
        if h.meta.get("encoder_hash") != first.meta.get("encoder_hash"):
            raise ModelError(f"{model_dir}: the fold heads were trained on features of different encoders")
        if TileGeometry.of(h.meta) != TileGeometry.of(first.meta):
            raise ModelError(f"{model_dir}: the fold heads were trained on features of different tiles "
                             f"({TileGeometry.of(first.meta).describe()}, {TileGeometry.of(h.meta).describe()})")
    return heads
