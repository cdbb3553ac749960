"""Survival metrics of a cohort: the package's pair statistics against whole pair matrices.

``wsitools.survival.survival_report`` (Harrell's and Uno's C and the time-dependent AUCs, each
with a bootstrap interval) sums each resample's pairs as prefix sums of its counts along runs of
slides sorted by risk, never a matrix of pairs. The baseline is the formulation it replaced,
written here: every pair matrix built whole (N x N float64), the bootstrap as
``c^T N c / c^T D c`` over whole matrices. Both run in one process, one thread, taking turns; reported per cohort size: wall time,
peak traced memory (numpy's arrays are traced) and the largest difference between the two
reports' values and interval bounds (both rounded to 6 places, as the report writes them).

    python benchmarks/bench_survival.py [--sizes 1000 2000 4000] [--n-boot 1000] [--events 0.5]
"""

from __future__ import annotations

import argparse
import math
import os
import time
import tracemalloc

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from wsitools import survival as S  # noqa: E402


def concordance_matrices(t: np.ndarray, e: np.ndarray, r: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """N (credit times weight) and D (the weight of each comparable pair, ``i`` the event)."""
    earlier = (t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & ~e[None, :])
    d = np.where(earlier & e[:, None] & (weight[:, None] > 0), weight[:, None], 0.0)
    return d * ((r[:, None] > r[None, :]) + 0.5 * (r[:, None] == r[None, :])), d


def whole_matrix_report(t: np.ndarray, e: np.ndarray, r: np.ndarray, *, n_boot: int, seed: int) -> list[float]:
    """The baseline: each metric and its interval from whole N x N pair matrices."""
    ipcw = S._ipcw(t, e)
    size = len(t)

    def ratio_and_interval(n: np.ndarray, d: np.ndarray) -> list[float]:
        rng = np.random.default_rng(seed)
        values = []
        for start in range(0, n_boot, 100):
            b = min(100, n_boot - start)
            counts = np.stack([np.bincount(rng.integers(0, size, size=size), minlength=size) for _ in range(b)])
            counts = counts.astype(np.float64)
            num = np.einsum("bi,bi->b", counts @ n, counts)
            den = np.einsum("bi,bi->b", counts @ d, counts)
            values.extend((num[den > 0] / den[den > 0]).tolist())
        lo, hi = np.percentile(values, [2.5, 97.5]) if values else (math.nan, math.nan)
        return [round(float(v), 6) for v in (n.sum() / d.sum(), lo, hi)]  # as the report rounds them

    out: list[float] = []
    for weight in (np.ones(size), ipcw**2):
        out += ratio_and_interval(*concordance_matrices(t, e, r, weight))
    for at in S.auc_times(t, e):
        case, control = e & (t <= at), t > at
        d = np.where(case[:, None] & control[None, :], ipcw[:, None], 0.0)
        credit = (r[:, None] > r[None, :]) + 0.5 * (r[:, None] == r[None, :])
        out += ratio_and_interval(d * credit, d)
    return out


def package_report(t: np.ndarray, e: np.ndarray, r: np.ndarray, *, n_boot: int, seed: int) -> list[float]:
    rep = S.survival_report(t, e, r, n_boot=n_boot, seed=seed)
    out = [rep["c_index"], *rep["c_index_ci95"], rep["uno_c"], *rep["uno_c_ci95"]]
    for row in rep["time_auc"]:
        out += [row["auc"], *row["auc_ci95"]]
    return [math.nan if v is None else float(v) for v in out]


def measure(fn, *args, **kwargs) -> tuple[list[float], float, float]:
    tracemalloc.start()
    t0 = time.perf_counter()
    values = fn(*args, **kwargs)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return values, seconds, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000], help="cohort sizes (slides)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000, as training)")
    parser.add_argument("--events", type=float, default=0.5, help="share of slides with an event (default 0.5)")
    args = parser.parse_args()
    print("| slides | package s | whole matrices s | time ratio | package MiB | whole matrices MiB | memory ratio | max difference |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        rng = np.random.default_rng(n)
        t = np.round(rng.exponential(24.0, n))  # whole months: ties, as real follow-up has
        e = rng.random(n) < args.events
        r = rng.normal(size=n) - 0.05 * t
        ours, ours_s, ours_mb = measure(package_report, t, e, r, n_boot=args.n_boot, seed=0)
        base, base_s, base_mb = measure(whole_matrix_report, t, e, r, n_boot=args.n_boot, seed=0)
        diff = float(np.nanmax(np.abs(np.array(ours) - np.array(base))))
        print(f"| {n} | {ours_s:.1f} | {base_s:.1f} | {base_s / ours_s:.1f}x | {ours_mb:.0f} | {base_mb:.0f} | "
              f"{base_mb / ours_mb:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
