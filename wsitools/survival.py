"""Survival analysis for slide-level risk scores, in numpy (checked against scikit-survival in
the tests): Kaplan-Meier curves, the log-rank test, Harrell's and Uno's concordance index and
the cumulative/dynamic time-dependent AUC, with percentile bootstrap intervals.

Conventions: ``time`` is the follow-up time (>= 0), ``event`` 1 for an observed event and 0 for
censoring, ``risk`` a score where higher means an earlier event (a Cox head's log hazard ratio).

- A pair (i, j) is *comparable* when i had an event and ``time_i < time_j``, or the times are
  equal and j was censored (an event precedes a censoring at the same time). It is concordant
  when ``risk_i > risk_j``; tied risks count one half.
- Uno's C weights each comparable pair by ``1 / G(time_i)^2``, G being the Kaplan-Meier
  estimate of the censoring distribution (right-continuous; events at a time leave the risk set
  before censorings at that time), so that heavy censoring does not tilt the estimate towards
  the early events; pairs with ``time_i >= tau`` are left out when a horizon ``tau`` is given.
- The time-dependent AUC at ``t`` (cumulative cases ``time <= t`` with an event, dynamic
  controls ``time > t``) weights each case by ``1 / G(time_i)`` (Uno et al. 2007).
- Intervals resample slides with replacement, or whole patients when each slide's patient is
  given (:func:`wsitools.metrics.bootstrap_samples`: a patient drawn twice counts each of its
  slides twice). Every statistic here is a ratio of two sums over
  pairs, ``sum_ij c_i c_j N_ij / sum_ij c_i c_j D_ij`` with ``c`` the resample's counts (the
  censoring weights stay those of the whole sample). The pairs are set up once as runs of slides
  sorted by risk, one run per earlier slide ``i`` (:class:`PairRuns`), so a resample's sums are
  prefix sums of its counts read at the runs' bounds: O(N log N) for a concordance index, O(N)
  for an AUC, never a matrix of all pairs. Sums of counts are exact, so Harrell's C and its
  interval are exactly those of the pair matrices.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsitools.metrics import bootstrap_samples, json_float


def _arrays(time: np.ndarray, event: np.ndarray, risk: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    if t.ndim != 1 or t.shape != e.shape:
        raise ValueError(f"time {t.shape} and event {e.shape} must be 1-D of one length")
    if risk is None:
        return t, e
    r = np.asarray(risk, dtype=np.float64)
    if r.shape != t.shape:
        raise ValueError(f"risk {r.shape} and time {t.shape} differ in shape")
    if not np.isfinite(r).all():
        raise ValueError(f"risk holds {int((~np.isfinite(r)).sum())} values that are not finite")
    return t, e, r


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Kaplan-Meier estimate: the distinct times and the survival probability just after each."""
    t, e = _arrays(time, event)
    times, inverse = np.unique(t, return_inverse=True)
    deaths = np.bincount(inverse, weights=e.astype(np.float64), minlength=len(times))
    leaving = np.bincount(inverse, minlength=len(times)).astype(np.float64)
    at_risk = len(t) - np.r_[0.0, np.cumsum(leaving)[:-1]]
    return times, np.cumprod(1.0 - deaths / at_risk)


def censoring_survival(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate of the censoring distribution G (censorings are its events; the
    subjects with an event at a time leave the risk set before that time's censorings)."""
    t, e = _arrays(time, event)
    times, inverse = np.unique(t, return_inverse=True)
    censored = np.bincount(inverse, weights=(~e).astype(np.float64), minlength=len(times))
    deaths = np.bincount(inverse, weights=e.astype(np.float64), minlength=len(times))
    leaving = censored + deaths
    at_risk = len(t) - np.r_[0.0, np.cumsum(leaving)[:-1]] - deaths
    ratio = np.divide(censored, at_risk, out=np.zeros_like(censored), where=censored > 0)
    return times, np.cumprod(1.0 - ratio)


def _ipcw(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """``1 / G(time_i)`` for the slides with an event, 0 for censored ones.

    G reaches 0 only at the last follow-up time, when an event there ties with the last
    censorings (whole months and censoring at the study's end make this common). Such events
    get weight 0: the weighted statistics are truncated just before the last follow-up time, as
    Uno's C is with ``tau`` (every statistic stays defined instead of the whole report losing it).
    """
    times, g = censoring_survival(time, event)
    at = g[np.searchsorted(times, time, side="right") - 1]
    return np.where(event & (at > 0), 1.0 / np.where(at > 0, at, 1.0), 0.0)


def logrank_test(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """Two-group log-rank test: the chi-squared statistic (1 degree of freedom) and its p-value.
    ``group`` is boolean; NaN when a group is empty or there is no event."""
    from scipy.stats import chi2

    t, e = _arrays(time, event)
    g = np.asarray(group).astype(bool)
    if g.all() or not g.any() or not e.any():
        return math.nan, math.nan
    times, inverse = np.unique(t, return_inverse=True)
    n_times = len(times)
    d = np.bincount(inverse, weights=e.astype(np.float64), minlength=n_times)
    d1 = np.bincount(inverse, weights=(e & g).astype(np.float64), minlength=n_times)
    out = np.bincount(inverse, minlength=n_times).astype(np.float64)
    out1 = np.bincount(inverse, weights=g.astype(np.float64), minlength=n_times)
    n = len(t) - np.r_[0.0, np.cumsum(out)[:-1]]
    n1 = g.sum() - np.r_[0.0, np.cumsum(out1)[:-1]]
    expected = d * n1 / n
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(n > 1, d * (n1 / n) * (1.0 - n1 / n) * (n - d) / (n - 1.0), 0.0)
    v = float(var.sum())
    if v <= 0:
        return math.nan, math.nan
    stat = float((d1.sum() - expected.sum()) ** 2 / v)
    return stat, float(chi2.sf(stat, 1))


BOOT_BLOCK_BYTES = 4 * 2**20
"""Size of one block of resample counts (float64) summed at a time: the counts of all resamples
are never held at once (n_boot x N: 80 MB at 10 000 slides and 1 000 resamples)."""


@dataclass(frozen=True)
class PairRuns:
    """Pairs (i, j) of a pair statistic, set up for fast sums: each ``query`` slide ``i`` (the
    earlier event, the case) is paired with a run of ``order``, slides sorted by risk within each
    run: ``order[start:end]`` are all its partners ``j``, ``order[start:below]`` those of lower
    risk and ``order[below:upto]`` those of equal risk (``i`` concordant, or half)."""

    order: np.ndarray
    query: np.ndarray
    start: np.ndarray
    below: np.ndarray
    upto: np.ndarray
    end: np.ndarray


def _runs(query: np.ndarray, query_run: np.ndarray, partners: np.ndarray, partner_run: np.ndarray,
          risk_rank: np.ndarray) -> PairRuns:
    """Each slide of ``query`` paired with the slides of ``partners`` that have its run number
    (``query_run``, ``partner_run``: one per slide of each); ``risk_rank``: every slide's dense
    rank of risk (ties share one)."""
    span = int(risk_rank.max()) + 1 if len(risk_rank) else 1
    key = partner_run * span + risk_rank[partners]
    by_key = np.argsort(key, kind="stable")
    key = key[by_key]
    base, own = query_run * span, query_run * span + risk_rank[query]
    return PairRuns(order=partners[by_key], query=query, start=np.searchsorted(key, base, side="left"),
                    below=np.searchsorted(key, own, side="left"), upto=np.searchsorted(key, own, side="right"),
                    end=np.searchsorted(key, base + span, side="left"))


def _concordance_runs(time: np.ndarray, event: np.ndarray, risk: np.ndarray, candidates: np.ndarray) -> list[PairRuns]:
    """The comparable pairs of a concordance index, ``i`` among ``candidates`` (slides with an
    event), as one :class:`PairRuns` per bit of the pairs' order ranks.

    A slide's order rank orders the times, an event before the censorings of its time: j is
    comparable to the event i when its rank is higher (ties in rank, events at one time, are not
    comparable). Each such pair is counted once, at the highest bit in which the two ranks
    differ, where i's is 0 and j's 1 and the bits above are equal: the run of i at that bit is
    the slides whose rank has that bit set and i's bits above it. About log2(N) runs per slide."""
    _, time_rank = np.unique(time, return_inverse=True)
    _, order_rank = np.unique(2 * time_rank + ~event, return_inverse=True)
    risk_rank = np.unique(risk, return_inverse=True)[1]
    families = []
    for bit in range(int(order_rank.max(initial=0)).bit_length()):
        later = ((order_rank >> bit) & 1).astype(bool)
        query, partners = candidates[~later[candidates]], np.flatnonzero(later)
        families.append(_runs(query, order_rank[query] >> (bit + 1), partners, order_rank[partners] >> (bit + 1),
                              risk_rank))
    return families


def _pair_sums(families: Sequence[PairRuns], weight: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sum_ij c_i c_j N_ij`` and ``sum_ij c_i c_j D_ij`` for each row ``c`` of ``counts``, with
    ``D_ij = weight_i`` for each pair of ``families`` and ``N_ij`` its concordance credit (1
    below ``i``'s risk, 1/2 at it) times ``D_ij``: the prefix sums of the counts along each
    family's order, read at the runs' bounds."""
    num, den = np.zeros(len(counts)), np.zeros(len(counts))
    for runs in families:
        prefix = np.zeros((len(counts), len(runs.order) + 1))
        np.cumsum(counts[:, runs.order], axis=1, out=prefix[:, 1:])
        lead = counts[:, runs.query] * weight[runs.query]
        twice_credit = prefix[:, runs.below] + prefix[:, runs.upto] - 2.0 * prefix[:, runs.start]
        num += 0.5 * (lead * twice_credit).sum(axis=1)
        den += (lead * (prefix[:, runs.end] - prefix[:, runs.start])).sum(axis=1)
    return num, den


def _pair_ratio(
    families: Sequence[PairRuns],
    weight: np.ndarray,
    size: int,
    *,
    n_boot: int,
    seed: int,
    level: float = 0.95,
    groups: Sequence[Hashable] | None = None,
) -> tuple[float, float, float]:
    """``sum N / sum D`` of a pair statistic (:func:`_pair_sums`) and its percentile interval
    over ``n_boot`` resamples: the same ratio under each resample's counts ``c`` of every slide
    (drawn by :func:`~wsitools.metrics.bootstrap_samples`, over the slides' ``groups`` when
    given), a block of resamples at a time (:data:`BOOT_BLOCK_BYTES`)."""
    num, den = _pair_sums(families, weight, np.ones((1, size)))
    value = float(num[0] / den[0]) if den[0] > 0 else math.nan
    draws = bootstrap_samples(size, n_boot=n_boot, seed=seed, groups=groups)
    block = max(1, BOOT_BLOCK_BYTES // (8 * max(size, 1)))
    parts = []
    while batch := list(itertools.islice(draws, block)):
        counts = np.stack([np.bincount(idx, minlength=size) for idx in batch]).astype(np.float64)
        num, den = _pair_sums(families, weight, counts)
        parts.append(num[den > 0] / den[den > 0])
    values = np.concatenate(parts) if parts else np.zeros(0)
    if not len(values):
        return value, math.nan, math.nan
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return value, float(lo), float(hi)


def _concordance(t: np.ndarray, e: np.ndarray, r: np.ndarray, weight: np.ndarray, **boot: Any) -> tuple[float, float, float]:
    """A (weighted) concordance index with its interval (:func:`_pair_ratio`)."""
    candidates = np.flatnonzero(e & (weight > 0))
    return _pair_ratio(_concordance_runs(t, e, r, candidates), weight, len(t), **boot)


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index (NaN without a comparable pair)."""
    t, e, r = _arrays(time, event, risk)
    return _concordance(t, e, r, np.ones(len(t)), n_boot=0, seed=0)[0]


def uno_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray, *, tau: float | None = None) -> float:
    """Uno's IPCW concordance index, truncated at ``tau`` when given, and always before an event
    at the last follow-up time where the censoring distribution reaches zero (NaN without a pair)."""
    t, e, r = _arrays(time, event, risk)
    return _concordance(t, e, r, _uno_weights(t, e, tau), n_boot=0, seed=0)[0]


def _uno_weights(t: np.ndarray, e: np.ndarray, tau: float | None) -> np.ndarray:
    w = _ipcw(t, e) ** 2
    if tau is not None:
        w = np.where(t < tau, w, 0.0)
    return w


def _time_auc(t: np.ndarray, e: np.ndarray, r: np.ndarray, at: float, ipcw: np.ndarray, **boot: Any) -> tuple[float, float, float]:
    """The cumulative/dynamic AUC at ``at`` with its interval (:func:`_pair_ratio`): rows are
    the cases (an event by ``at``, weighted by ``1 / G(time)``), columns the controls."""
    case, control = np.flatnonzero(e & (t <= at)), np.flatnonzero(t > at)
    risk_rank = np.unique(r, return_inverse=True)[1]
    runs = _runs(case, np.zeros(len(case), np.int64), control, np.zeros(len(control), np.int64), risk_rank)
    return _pair_ratio([runs], ipcw, len(t), **boot)


def time_auc(time: np.ndarray, event: np.ndarray, risk: np.ndarray, at: float) -> float:
    """Cumulative/dynamic AUC at time ``at``: cases had their event by ``at`` (weighted by
    ``1 / G(time)``), controls were still event-free after it; NaN without either."""
    t, e, r = _arrays(time, event, risk)
    return _time_auc(t, e, r, at, _ipcw(t, e), n_boot=0, seed=0)[0]


def auc_times(time: np.ndarray, event: np.ndarray) -> list[float]:
    """The times the report evaluates the time-dependent AUC at: the quartiles of the event
    times, keeping those before the last follow-up time (where controls remain)."""
    t, e = _arrays(time, event)
    if not e.any():
        return []
    quartiles = np.quantile(t[e], [0.25, 0.5, 0.75])
    return sorted({float(q) for q in quartiles if q < t.max()})


def survival_metrics(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> dict[str, float]:
    """Point estimates without intervals (per-epoch validation): Harrell's and Uno's C."""
    t, e, r = _arrays(time, event, risk)
    return {"c_index": harrell_c(t, e, r), "uno_c": uno_c(t, e, r)}


def survival_report(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    *,
    times: Sequence[float] | None = None,
    high_risk: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, Any]:
    """A JSON-ready report of risk scores against outcomes.

    Harrell's C (``c_index``) and Uno's C (``uno_c``) with their intervals (resampling the
    slides' ``groups``, e.g. their patients, when given); the time-dependent
    AUC at ``times`` (default :func:`auc_times`) with intervals; counts and the censored share;
    and, with ``high_risk`` (boolean groups), the log-rank test between the groups and each
    group's size and median survival time. Undefined values are ``null``.
    """
    t, e, r = _arrays(time, event, risk)
    report: dict[str, Any] = {"n": int(len(t)), "n_events": int(e.sum()),
                              "censored_fraction": json_float(float(1.0 - e.mean())) if len(t) else None}
    ipcw = _ipcw(t, e)
    boot = {"n_boot": n_boot, "seed": seed, "level": level, "groups": groups}
    for name, weight in (("c_index", np.ones(len(t))), ("uno_c", ipcw**2)):
        value, lo, hi = _concordance(t, e, r, weight, **boot)
        report[name] = json_float(value)
        report[f"{name}_ci95"] = [json_float(lo), json_float(hi)]
    rows = []
    for at in auc_times(t, e) if times is None else times:
        value, lo, hi = _time_auc(t, e, r, float(at), ipcw, **boot)
        rows.append({"time": json_float(at), "auc": json_float(value), "auc_ci95": [json_float(lo), json_float(hi)]})
    report["time_auc"] = rows
    if high_risk is not None:
        g = np.asarray(high_risk).astype(bool)
        stat, p = logrank_test(t, e, g)
        report["risk_groups"] = {
            "n_high": int(g.sum()),
            "n_low": int((~g).sum()),
            "median_time_high": json_float(median_survival(t[g], e[g])),
            "median_time_low": json_float(median_survival(t[~g], e[~g])),
            "logrank_chi2": json_float(stat),
            "logrank_p": None if math.isnan(p) else float(f"{p:.6g}"),
        }
    return report


def median_survival(time: np.ndarray, event: np.ndarray) -> float:
    """The first time the Kaplan-Meier curve reaches 0.5 or below (NaN if it never does)."""
    if len(time) == 0:
        return math.nan
    times, surv = kaplan_meier(time, event)
    below = np.flatnonzero(surv <= 0.5)
    return float(times[below[0]]) if len(below) else math.nan


def draw_risk_groups(ax: Any, time: np.ndarray, event: np.ndarray, high: np.ndarray, *, title: str) -> float:
    """Draw the Kaplan-Meier curves of the high- and low-risk groups (censorings marked) with
    the log-rank p-value onto the matplotlib axes ``ax``; returns the p-value."""
    t, e = _arrays(time, event)
    g = np.asarray(high).astype(bool)
    for name, members, colour in (("high risk", g, "tab:red"), ("low risk", ~g, "tab:blue")):
        if not members.any():
            continue
        times, surv = kaplan_meier(t[members], e[members])
        ax.step(np.r_[0.0, times], np.r_[1.0, surv], where="post", color=colour,
                label=f"{name} (n={int(members.sum())})")
        censored = members & ~e
        ax.plot(t[censored], surv[np.searchsorted(times, t[censored], side="right") - 1], "|", color=colour,
                markersize=8)
    _, p = logrank_test(t, e, g)
    ax.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.02), title=title)
    ax.text(0.98, 0.97, f"log-rank p = {'n/a' if math.isnan(p) else f'{p:.3g}'}", transform=ax.transAxes,
            ha="right", va="top", fontsize=9)
    ax.legend(loc="lower left", fontsize=8)
    return p
