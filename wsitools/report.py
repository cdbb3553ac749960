"""The workflow's report: the QC summary of a cohort, the metrics table of its heads, and the
ROC and outcome figures (written as TSV and HTML tables through :mod:`wsitools.tables`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from wsitools.errors import DataError, one_line
from wsitools.io import atomic_path
from wsitools.metrics import METRICS, REGRESSION_METRICS, roc_points
from wsitools.tables import read_table, write_html_table, write_table
from wsitools.text import TaskType

QC_COLUMNS = (
    "slide_id",
    "status",
    "reason",
    "mpp",
    "mpp_target",
    "level",
    "level_downsample",
    "tissue_area_mm2",
    "n_tiles",
    "slide_path",
)
"""Columns of ``results/qc/summary.tsv``, one row per slide of the cohort: the fields of the
slide's ``{slide_id}.qc.json`` (``mpp`` is the slide's level-0 resolution, ``level`` the pyramid
level read; empty where a failed slide has no value)."""

USABLE_STATUS = "ok"
"""The QC status of a slide that goes on to feature extraction and training."""


def read_qc(path: str | os.PathLike[str]) -> dict[str, Any]:
    """One slide's ``{slide_id}.qc.json`` as written by ``wsitools tile``."""
    try:
        qc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"QC file {path} cannot be read: {exc}") from None
    if not isinstance(qc, dict) or "status" not in qc:
        raise DataError(f"QC file {path} has no 'status'")
    return qc


def _qc_row(qc: Mapping[str, Any], slide_id: str) -> dict[str, str]:
    def text(key: str) -> str:
        value = qc.get(key)
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value).replace("\t", " ").replace("\n", " ")

    row = {c: text(c) for c in QC_COLUMNS}
    row["slide_id"] = slide_id
    return row


def write_qc_summary(
    qc_files: Iterable[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    thumbnails: str | os.PathLike[str] | None = None,
) -> list[dict[str, str]]:
    """Gather per-slide QC files into one table (``QC_COLUMNS``), sorted by slide id.

    The slide id is the QC file's name (``{slide_id}.qc.json``), so a QC file that lacks it
    still lands on the right row. With ``thumbnails``, each slide's tissue thumbnail
    (``{slide_id}.tissue.png`` beside its QC file, absent for a slide that could not be read)
    is copied there as ``{slide_id}.png``, a folder the workflow's report shows.
    """
    rows = []
    pictures = {}
    for path in qc_files:
        path = Path(path)
        if not path.name.endswith(".qc.json"):
            raise DataError(f"{path} is not a {{slide_id}}.qc.json file")
        slide_id = path.name[: -len(".qc.json")]
        rows.append(_qc_row(read_qc(path), slide_id))
        picture = path.with_name(f"{slide_id}.tissue.png")
        if picture.is_file():
            pictures[slide_id] = picture
    rows.sort(key=lambda r: r["slide_id"])
    if thumbnails is not None:
        with atomic_path(thumbnails, overwrite=True) as tmp:
            tmp.mkdir()
            for slide_id, picture in pictures.items():
                shutil.copyfile(picture, tmp / f"{slide_id}.png")
    write_table(out, rows, QC_COLUMNS)
    return rows


def write_qc_html(summary: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The QC table (``results/qc/summary.tsv``) as an HTML page for the report; slides left out
    (status other than ``ok``) are tinted red."""
    rows = read_table(summary)
    missing = [c for c in ("slide_id", "status") if rows and c not in rows[0]]
    if missing:
        raise DataError(f"QC table {summary} has no column {', '.join(missing)} (not a wsitools QC summary)")
    counts = _status_counts(rows)
    write_html_table(
        out, rows, QC_COLUMNS, title=f"QC summary: {len(rows)} slides",
        note=", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        + ". Rows tinted red are slides left out of feature extraction, training and heatmaps (the reason "
        "column says why); mpp is the slide's own resolution (um/px at level 0), mpp_target the tiles'.",
        left_out=[r["status"] != USABLE_STATUS for r in rows],
    )
    return rows


def usable_slides(summary: str | os.PathLike[str]) -> list[str]:
    """Ids of the slides whose QC status is ``ok``, in table order."""
    return [r["slide_id"] for r in read_table(summary) if r["status"] == USABLE_STATUS]


def _status_counts(rows: Iterable[Mapping[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def qc_report(summary: str | os.PathLike[str], *, tiles_dir: str | None = None) -> str:
    """A short text summary of a QC table: counts per status, and each unusable slide's reason;
    for a slide whose tiling process was killed (out of memory, a time limit: perhaps not the
    slide's fault, and its failed record keeps the workflow from trying again), how to retry it."""
    rows = read_table(summary)
    counts = _status_counts(rows)
    lines = [
        f"QC: {len(rows)} slides: "
        + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        + f" (table: {summary})"
    ]
    for r in rows:
        if r["status"] != USABLE_STATUS:
            lines.append(f"  left out: {r['slide_id']} ({r['status']}): {r['reason'] or 'no reason given'}")
            if tiles_dir is not None and "tiling was killed by signal" in r["reason"]:
                lines.append(f"    to try it again: snakemake ... -R {tiles_dir}/{r['slide_id']}.qc.json")
    return "\n".join(lines)


def head_of(path: str | os.PathLike[str]) -> tuple[str, str, str]:
    """(task, encoder, head) of a file in ``heads/{task}/{encoder}/{head}/``."""
    parts = Path(path).parts
    if len(parts) < 4:
        raise DataError(f"{path} is not inside heads/{{task}}/{{encoder}}/{{head}}/")
    return parts[-4], parts[-3], parts[-2]


def _number(value: Any) -> str:
    return "" if value is None else f"{float(value):.4f}"


TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": METRICS,
    "survival": ("c_index", "uno_c"),
    "regression": REGRESSION_METRICS,
}
"""The metrics of each task type in the metrics table (``metrics.json`` of every head)."""


def fold_poolings(folds: Sequence[Mapping[str, Any]]) -> str:
    """How many of a run's folds (``metrics.json``'s ``folds``) kept each pooling, e.g.
    ``attention 3, mean 2`` (docs/mil.md, "Pooling selection"); a fold that does not record it
    pooled by attention."""
    counts = Counter(str(f.get("pooling") or "attention") for f in folds)
    return ", ".join(f"{p} {counts[p]}" for p in sorted(counts, key=lambda p: (p != "attention", p)))


def write_metrics_table(
    metrics_files: Iterable[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    html_out: str | os.PathLike[str] | None = None,
) -> list[dict[str, str]]:
    """One row per trained head: cross-validated metrics from each ``metrics.json``.

    Per metric of the head's task type (:data:`TASK_METRICS`): the value over the pooled
    out-of-fold predictions with its bootstrap 95 % interval (``_lo``, ``_hi``), and the mean
    and standard deviation over the folds where it is defined (``_fold_n`` of ``n_folds``: a
    fold of one class has no AUROC); the columns of the other types stay empty. With
    ``html_out``, also :func:`write_metrics_html` for the report.
    """
    from wsitools.mil.run_folder import read_metrics

    rows = []
    used: list[str] = []
    for path in metrics_files:
        task, encoder, head = head_of(path)
        try:
            m = read_metrics(path)
            pooled, folds = m["pooled"], m["mean_over_folds"]
            task_type = m.get("task_type") or "classification"
            row = {"task": task, "task_type": task_type, "encoder": encoder, "head": head,
                   "prompts": ",".join(m.get("prompts") or []),
                   "n_slides": str(m["n_slides"]), "n_patients": str(m["n_patients"]),
                   "n_folds": str(len(m["folds"])), "pooling": fold_poolings(m["folds"])}
            for name in TASK_METRICS[task_type]:
                lo, hi = pooled.get(f"{name}_ci95") or (None, None)
                row.update({name: _number(pooled.get(name)), f"{name}_lo": _number(lo),
                            f"{name}_hi": _number(hi),
                            f"{name}_fold_mean": _number(folds[name]["mean"]),
                            f"{name}_fold_sd": _number(folds[name]["sd"]),
                            f"{name}_fold_n": str(folds[name]["n_folds"])})
            if task_type not in used:
                used.append(task_type)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"metrics file {path} cannot be read: {exc!r}") from None
        rows.append(row)
    names = [n for t in TASK_METRICS if t in (used or ["classification"]) for n in TASK_METRICS[t]]
    columns = ["task", "task_type", "encoder", "head", "prompts", "n_slides", "n_patients", "n_folds", "pooling"] + [
        f"{name}{suffix}" for name in names
        for suffix in ("", "_lo", "_hi", "_fold_mean", "_fold_sd", "_fold_n")
    ]
    write_table(out, [{c: r.get(c, "") for c in columns} for r in rows], columns)
    if html_out is not None:
        write_metrics_html(rows, html_out)
    return rows


def _with_interval(value: str, lo: str, hi: str) -> str:
    return f"{value} [{lo}, {hi}]" if value and lo and hi else value


def _over_folds(mean: str, sd: str, n: str, of: str) -> str:
    """``mean ± sd (n folds)``, or ``(n of k folds)`` where the metric is undefined in some."""
    if not mean:
        return ""
    return mean + (f" ± {sd}" if sd else "") + (f" ({n} folds)" if n == of else f" ({n} of {of} folds)")


def write_metrics_html(rows: Sequence[Mapping[str, str]], out: str | os.PathLike[str]) -> None:
    """The metrics table (rows of :func:`write_metrics_table`) as an HTML page for the report:
    per metric of the heads' task types the pooled out-of-fold value with its bootstrap 95 %
    interval, and the mean and standard deviation over the folds where it is defined, with their
    number (empty for a head of another type)."""
    types = [t for t in TASK_METRICS if any(r.get("task_type", "classification") == t for r in rows)]
    names = [n for t in (types or ["classification"]) for n in TASK_METRICS[t]]
    shown = []
    for r in rows:
        row = {k: r[k] for k in ("task", "task_type", "encoder", "head", "prompts", "n_slides", "n_patients",
                                 "pooling")}
        for name in names:
            if name not in r:
                continue
            row[name] = _with_interval(r[name], r[f"{name}_lo"], r[f"{name}_hi"])
            row[f"{name} over folds"] = _over_folds(
                r[f"{name}_fold_mean"], r[f"{name}_fold_sd"], r[f"{name}_fold_n"], r["n_folds"])
        shown.append(row)
    columns = ["task", "task_type", "encoder", "head", "prompts", "n_slides", "n_patients", "pooling"] + [
        c for name in names for c in (name, f"{name} over folds")
    ]
    write_html_table(
        out, [{c: r.get(c, "") for c in columns} for r in shown], columns,
        title="Cross-validated metrics of every head",
        note="Each metric over the pooled out-of-fold predictions, with its bootstrap 95 % interval in "
        "brackets, and its mean ± standard deviation over the folds where it is defined (a fold of one class "
        "has no AUROC), with their number in parentheses. AUROC is one-vs-rest macro for "
        "more than two classes; c_index is Harrell's concordance, uno_c Uno's. pooling counts the folds that kept "
        "each pooling (attention, or the mean: uniform attention, flat heatmaps). metrics.tsv holds the "
        "same numbers, one per column.",
    )


def plot_roc(predictions_files: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> None:
    """ROC curves of the out-of-fold predictions of several heads of one task, in one figure.

    One panel per class (one-vs-rest; a single panel for the second class of a two-class
    task), one curve per (encoder, head), with its AUROC in the legend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from wsitools.metrics import binary_auroc
    from wsitools.mil.run_folder import read_predictions

    runs = []
    for path in predictions_files:
        table = read_predictions(path)
        if not table or "label" not in table[0]:
            raise DataError(f"predictions {path} have no rows with a 'label' column")
        classes = [c[len("prob_"):] for c in table[0] if c.startswith("prob_")]
        if len(classes) < 2:
            raise DataError(f"predictions {path} have no prob_{{class}} columns of two or more classes")
        if runs and classes != runs[0][1]:
            raise DataError(f"predictions {path} are of classes {', '.join(classes)}, not {', '.join(runs[0][1])}")
        labels = np.array([r["label"] for r in table])
        try:
            probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in table])
        except (TypeError, ValueError) as exc:
            raise DataError(f"predictions {path}: a probability is not a number ({one_line(exc)})") from None
        runs.append(("/".join(head_of(path)[1:]), classes, labels, probs))
    classes = runs[0][1]
    panels = classes[1:] if len(classes) == 2 else classes
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, cls in zip(axes[0], panels):
        for name, run_classes, labels, probs in runs:
            positive = labels == cls
            scores = probs[:, run_classes.index(cls)]
            fpr, tpr = roc_points(positive, scores)
            ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUROC {binary_auroc(positive, scores):.3f})")
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
               title=f"{cls} vs " + ("rest" if len(classes) > 2 else classes[0]), aspect="equal")
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    with atomic_path(out, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_outcomes(
    predictions_files: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *, task_type: TaskType
) -> None:
    """The out-of-fold predictions of several heads of one survival or regression task, one
    panel per (encoder, head): Kaplan-Meier curves of the high- and low-risk groups (risk above
    the fold head's training median, i.e. > 0) with the log-rank p-value, or predicted against
    true values with the Pearson correlation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from wsitools.metrics import regression_metrics
    from wsitools.mil.run_folder import read_predictions
    from wsitools.survival import draw_risk_groups

    need = ("time", "event", "risk") if task_type == "survival" else ("label", "prediction")
    runs = []
    for path in predictions_files:
        table = read_predictions(path)
        if not table or any(c not in table[0] for c in need):
            raise DataError(f"predictions {path} have no rows with columns {', '.join(need)} (a {task_type} head's)")
        runs.append(("/".join(head_of(path)[1:]), {c: np.array([float(r[c]) for r in table]) for c in need}))
    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 4.2), squeeze=False)
    for ax, (name, cols) in zip(axes[0], runs):
        if task_type == "survival":
            draw_risk_groups(ax, cols["time"], cols["event"], cols["risk"] > 0, title=name)
            continue
        y, p = cols["label"], cols["prediction"]
        ax.scatter(y, p, s=12, alpha=0.7)
        lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], color="0.7", lw=1, ls="--")
        ax.set(xlabel="true", ylabel="predicted (out of fold)",
               title=f"{name} (Pearson {regression_metrics(y, p)['pearson']:.3f})")
    fig.tight_layout()
    with atomic_path(out, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
