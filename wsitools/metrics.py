"""Classification and regression metrics with bootstrap confidence intervals, in plain numpy (checked against
scikit-learn in the tests; the bootstrap calls them on every resample, where scikit-learn's
validated functions cost about 40 times more).

Used by the MIL heads (slide level) and by patch-level prompt tuning. Conventions:

- labels are integer class indices ``0..C-1``; scores are class probabilities ``[n, C]``;
- AUROC is the Mann-Whitney statistic with average ranks for ties; for more than two classes it
  is the unweighted mean of the one-vs-rest AUROCs of the classes that occur in ``y_true``
  (a class absent from the sample has no defined AUROC and is left out of the mean);
- balanced accuracy is the mean recall over the classes present in ``y_true``;
- F1 is macro F1 over all ``C`` classes (also for two classes, so it is symmetric in the class
  order); a class never predicted and never true adds nothing;
- 95 % intervals are percentile bootstrap intervals over slides (or patches) resampled with
  replacement, or over patients when each row's patient is given (:func:`bootstrap_samples`);
  resamples where a metric is undefined (one class only) are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import numpy as np

METRICS = ("auroc", "balanced_accuracy", "f1", "accuracy")
"""The scalar metrics :func:`classification_metrics` returns, in report order."""


def _as_labels(y_true: np.ndarray) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    return y.astype(np.int64)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, ties sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Start index of each run of equal values, and its length.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    lengths = np.diff(np.r_[starts, len(values)])
    mean_rank = starts + (lengths + 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, lengths)
    return ranks


def binary_auroc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve for a binary problem; NaN when one class is missing."""
    pos = np.asarray(is_positive, dtype=bool)
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(scores)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """AUROC: binary for two classes (score = probability of class 1), else one-vs-rest macro."""
    y = _as_labels(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probs must be [n, C] with n = {len(y)}, got shape {p.shape}")
    if p.shape[1] == 2:
        return binary_auroc(y == 1, p[:, 1])
    per_class = [binary_auroc(y == c, p[:, c]) for c in range(p.shape[1]) if (y == c).any()]
    per_class = [a for a in per_class if not math.isnan(a)]
    return float(np.mean(per_class)) if per_class else math.nan


def roc_points(is_positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates of a binary ROC curve, one point per distinct score,
    from (0, 0) to (1, 1); tied scores make one step."""
    pos = np.asarray(is_positive, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    tp, fp = np.cumsum(pos[order]), np.cumsum(~pos[order])
    last_of_tie = np.r_[s[order][1:] != s[order][:-1], True]
    tpr = np.r_[0.0, tp[last_of_tie] / max(1, int(pos.sum()))]
    fpr = np.r_[0.0, fp[last_of_tie] / max(1, int((~pos).sum()))]
    return fpr, tpr


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``[C, C]``: row = true class, column = predicted class."""
    y, p = _as_labels(y_true), _as_labels(y_pred)
    if y.shape != p.shape:
        raise ValueError(f"y_true {y.shape} and y_pred {p.shape} differ in shape")
    return np.bincount(y * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes that occur in ``y_true``."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return math.nan
    return float(np.mean(np.diag(cm)[present] / support[present]))


def f1_macro(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over classes that are true or predicted at least once."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # 2TP + FP + FN
    used = denom > 0
    if not used.any():
        return math.nan
    return float(np.mean(2.0 * tp[used] / denom[used]))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUROC, balanced accuracy, macro F1 and accuracy; the prediction is the arg-max class."""
    y = _as_labels(y_true)
    p = np.asarray(probs, dtype=np.float64)
    n_classes = p.shape[1]
    pred = p.argmax(axis=1)
    return {
        "auroc": auroc(y, p),
        "balanced_accuracy": balanced_accuracy(y, pred, n_classes),
        "f1": f1_macro(y, pred, n_classes),
        "accuracy": float(np.mean(pred == y)) if len(y) else math.nan,
    }


def bootstrap_samples(
    n_rows: int, *, n_boot: int, seed: int, groups: Sequence[Hashable] | None = None
) -> Iterator[np.ndarray]:
    """The row indices of ``n_boot`` bootstrap resamples of ``n_rows`` rows (seeded).

    Without ``groups`` each resample draws ``n_rows`` rows with replacement. With ``groups``
    (each row's group, e.g. the patient of each slide) it draws as many groups as there are,
    with replacement, each bringing all its rows: a patient's slides are not independent, and
    resampling them one by one would make intervals too narrow when patients have several
    slides. Groups are numbered in the order they first occur, so with one row per group the
    resamples are exactly those without ``groups``.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n_boot):
            yield rng.integers(0, n_rows, size=n_rows)
        return
    if len(groups) != n_rows:
        raise ValueError(f"groups has {len(groups)} entries for {n_rows} rows")
    number: dict[Hashable, int] = {}
    codes = np.array([number.setdefault(g, len(number)) for g in groups], dtype=np.int64)
    members = np.argsort(codes, kind="stable")  # rows grouped, group 0 first
    sizes = np.bincount(codes, minlength=len(number))
    starts = np.cumsum(sizes) - sizes
    for _ in range(n_boot):
        drawn = rng.integers(0, len(number), size=len(number))
        lengths = sizes[drawn]
        offsets = np.cumsum(lengths) - lengths
        yield members[np.repeat(starts[drawn] - offsets, lengths) + np.arange(int(lengths.sum()))]


def percentile_bootstrap(
    metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    y: np.ndarray,
    p: np.ndarray,
    *,
    n_boot: int,
    seed: int,
    level: float,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every metric ``metrics(y, p)`` returns.

    Resamples whole cases (or, with ``groups``, whole groups of cases: :func:`bootstrap_samples`)
    with replacement ``n_boot`` times (seeded, so reports are reproducible); a resample where a
    metric is undefined (NaN) is left out for that metric, and a metric never defined gets
    (NaN, NaN).
    """
    draws: dict[str, list[float]] = {}
    for idx in bootstrap_samples(len(y), n_boot=n_boot, seed=seed, groups=groups):
        for name, value in metrics(y[idx], p[idx]).items():
            values = draws.setdefault(name, [])
            if not math.isnan(value):
                values.append(value)
    tail = (1.0 - level) / 2.0 * 100.0
    out: dict[str, tuple[float, float]] = {}
    for name, values in draws.items():
        lo, hi = np.percentile(values, [tail, 100.0 - tail]) if values else (math.nan, math.nan)
        out[name] = (float(lo), float(hi))
    return out


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of each metric in :data:`METRICS` (over slides, or over
    the ``groups`` of the slides, e.g. their patients: :func:`bootstrap_samples`)."""
    y = _as_labels(y_true)
    p = np.asarray(probs, dtype=np.float64)
    out = percentile_bootstrap(classification_metrics, y, p, n_boot=n_boot, seed=seed, level=level, groups=groups)
    return {name: out.get(name, (math.nan, math.nan)) for name in METRICS}


def json_float(x: float) -> float | None:
    """A number for a JSON report: to 6 significant digits (errors of targets near 1e-7 are not
    zero), NaN (undefined) as null."""
    return None if math.isnan(x) else float(f"{float(x):.6g}")


def metrics_report(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    class_names: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, Any]:
    """A JSON-ready report: each metric with its 95 % interval (resampling ``groups``, e.g. the
    slides' patients, when given: :func:`bootstrap_samples`), the confusion matrix, counts.

    Undefined values (e.g. AUROC of a single-class sample) are written as ``null``.
    """
    y = _as_labels(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[1] != len(class_names):
        raise ValueError(f"probs have {p.shape[1]} columns for {len(class_names)} classes")
    point = classification_metrics(y, p)
    ci = bootstrap_ci(y, p, n_boot=n_boot, seed=seed, groups=groups)
    report: dict[str, Any] = {"n": int(len(y))}
    for name in METRICS:
        report[name] = json_float(point[name])
        report[f"{name}_ci95"] = [json_float(v) for v in ci[name]]
    report["confusion_matrix"] = {
        "classes": list(class_names),
        "rows_true_cols_pred": confusion_matrix(y, p.argmax(axis=1), len(class_names)).tolist(),
    }
    report["support"] = {c: int((y == i).sum()) for i, c in enumerate(class_names)}
    return report


def mean_sd(reports: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean and sample standard deviation of each classification metric over fold reports."""
    return mean_sd_of(reports, METRICS)

REGRESSION_METRICS = ("pearson", "spearman", "mae", "rmse")
"""The scalar metrics :func:`regression_metrics` returns, in report order."""


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / den) if den > 0 else math.nan


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation (Pearson on average ranks), mean absolute and root mean
    squared error; a correlation is NaN when either side is constant."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if y.ndim != 1 or y.shape != p.shape:
        raise ValueError(f"y_true {y.shape} and y_pred {p.shape} must be 1-D of one length")
    if not (np.isfinite(y).all() and np.isfinite(p).all()):
        raise ValueError("y_true and y_pred must be finite")
    if not len(y):
        return {name: math.nan for name in REGRESSION_METRICS}
    return {
        "pearson": _correlation(y, p),
        "spearman": _correlation(average_ranks(y), average_ranks(p)),
        "mae": float(np.mean(np.abs(y - p))),
        "rmse": float(np.sqrt(np.mean((y - p) ** 2))),
    }


def regression_report(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, Any]:
    """A JSON-ready report: each of :data:`REGRESSION_METRICS` with its percentile bootstrap
    interval over slides, or over their ``groups`` (e.g. patients) when given
    (:func:`bootstrap_samples`; resamples where a metric is undefined are skipped)."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    point = regression_metrics(y, p)
    intervals = percentile_bootstrap(regression_metrics, y, p, n_boot=n_boot, seed=seed, level=level, groups=groups)
    report: dict[str, Any] = {"n": int(len(y))}
    for name in REGRESSION_METRICS:
        lo, hi = intervals.get(name, (math.nan, math.nan))
        report[name] = json_float(point[name])
        report[f"{name}_ci95"] = [json_float(lo), json_float(hi)]
    return report


def mean_sd_of(reports: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Mean and sample standard deviation of the metrics ``names`` over fold reports (nulls skipped)."""
    out: dict[str, dict[str, float | None]] = {}
    for name in names:
        values = np.array([r[name] for r in reports if r.get(name) is not None], dtype=np.float64)
        out[name] = {
            "mean": json_float(float(values.mean())) if len(values) else None,
            "sd": json_float(float(values.std(ddof=1))) if len(values) > 1 else None,
            "n_folds": int(len(values)),
        }
    return out
