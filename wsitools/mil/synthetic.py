"""Synthetic feature-bag cohorts with known key instances, for tests and benchmarks.

Negative bags hold only "background" features drawn from N(0, I); positive bags are the same
plus a few planted instances drawn from N(mu, I), ``mu`` being ``shift`` times a unit vector
that depends only on the feature width (so a head trained on one cohort applies to another).
The planted rows are returned, so tests can check where the attention goes. Files follow the
feature store contract (docs/formats.md): ``{slide_id}.h5`` with ``features`` and ``coords``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsitools.feature_store import FORMAT_VERSION, KIND, write_feature_store
from wsitools.tables import write_table


@dataclass(frozen=True)
class SyntheticBag:
    """One written bag: its id, label, patient, file, and the rows of planted instances."""

    slide_id: str
    label: str
    patient_id: str
    path: Path
    planted: np.ndarray


def write_synthetic_store(
    path: str | os.PathLike[str],
    features: np.ndarray,
    *,
    coords: np.ndarray | None = None,
    encoder: str = "synthetic",
    tile_size_level0: float = 448.0,
    chunks: tuple[int, int] | None = None,
) -> Path:
    """Write a feature store of ``features`` for slide ``path.stem`` through
    :func:`wsitools.feature_store.write_feature_store` (``coords`` on a square grid of
    ``tile_size_level0`` px if not given; 224 px tiles at 0.5 um/px without overlap, the tile
    geometry ``wsitools extract`` records; ``chunks`` as there)."""
    path = Path(path)
    n = len(features)
    if coords is None:
        side = int(np.ceil(np.sqrt(n)))
        grid = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1)
        coords = (grid * tile_size_level0).astype(np.int64)
    attrs = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "encoder": encoder,
        "slide_id": path.stem,
        "tile_size": 224,
        "tile_size_level0": float(tile_size_level0),
        "mpp_target": 0.5,
        "overlap": 0,
    }
    return write_feature_store(path, features, coords, attrs, chunks=chunks)


def make_bag_cohort(
    out_dir: str | os.PathLike[str],
    *,
    n_slides: int = 40,
    n_tiles: int | tuple[int, int] = (80, 160),
    dim: int = 32,
    n_planted: int | tuple[int, int] = (4, 8),
    shift: float = 3.0,
    nuisance: float = 0.0,
    positive_fraction: float = 0.5,
    slides_per_patient: int = 1,
    dtype: str = "float32",
    seed: int = 0,
    labels_path: str | os.PathLike[str] | None = None,
) -> list[SyntheticBag]:
    """Write ``n_slides`` bags into ``out_dir`` (labels ``neg``/``pos``) and, if asked, a labels CSV.

    Bag sizes and planted counts are drawn uniformly from the given (low, high) ranges. With
    ``nuisance`` > 0 every slide adds its own N(0, nuisance^2 I) shift to all its rows (a stain or
    scanner effect), which hides the planted instances from the bag mean.
    """
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(dim).standard_normal(dim)  # the same for every cohort of this width
    mu = shift * direction / np.linalg.norm(direction)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def draw(spec: int | tuple[int, int]) -> int:
        return int(spec) if isinstance(spec, int) else int(rng.integers(spec[0], spec[1] + 1))

    n_patients = -(-n_slides // slides_per_patient)
    n_pos = int(round(positive_fraction * n_patients))
    patient_pos = rng.permutation(np.r_[np.ones(n_pos, bool), np.zeros(n_patients - n_pos, bool)])
    is_pos = np.repeat(patient_pos, slides_per_patient)[:n_slides]  # a patient's slides share its label
    bags = []
    for s in range(n_slides):
        n = draw(n_tiles)
        feats = rng.standard_normal((n, dim))
        if nuisance > 0:
            feats += nuisance * rng.standard_normal(dim)
        planted = np.array([], dtype=np.int64)
        if is_pos[s]:
            planted = np.sort(rng.choice(n, size=min(n, draw(n_planted)), replace=False))
            feats[planted] += mu
        slide_id = f"slide_{s:03d}"
        path = write_synthetic_store(out_dir / f"{slide_id}.h5", feats.astype(dtype))
        bags.append(
            SyntheticBag(
                slide_id=slide_id,
                label="pos" if is_pos[s] else "neg",
                patient_id=f"patient_{s // slides_per_patient:03d}",
                path=path,
                planted=planted,
            )
        )
    if labels_path is not None:
        columns = ("slide_id", "label", "patient_id")
        write_table(labels_path, [{c: getattr(b, c) for c in columns} for b in bags], columns, dialect="csv")
    return bags


@dataclass(frozen=True)
class OutcomeBag:
    """One written bag of an outcome cohort: its share of key instances (the planted signal),
    their rows, and its survival time, event indicator and regression target."""

    slide_id: str
    patient_id: str
    path: Path
    share: float
    planted: np.ndarray
    time: float
    event: int
    value: float


def _censoring_rate(hazards: np.ndarray, fraction: float) -> float:
    """The rate of exponential censoring that censors ``fraction`` of subjects with exponential
    event times of these ``hazards`` in expectation (P(censored) = mu / (mu + hazard)), by bisection."""
    lo, hi = 0.0, 1e6 * float(hazards.max())
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if np.mean(mid / (mid + hazards)) < fraction else (lo, mid)
    return (lo + hi) / 2.0


def make_outcome_cohort(
    out_dir: str | os.PathLike[str],
    *,
    n_slides: int = 60,
    n_tiles: int | tuple[int, int] = (40, 80),
    dim: int = 16,
    shift: float = 5.0,
    share: tuple[float, float] = (0.0, 0.3),
    log_hazard_ratio: float = 5.0,
    censored: float = 0.3,
    noise: float = 0.1,
    slides_per_patient: int = 1,
    seed: int = 0,
    task_type: str = "survival",
    labels_path: str | os.PathLike[str] | None = None,
) -> list[OutcomeBag]:
    """Write ``n_slides`` bags whose outcome depends on their share of key instances.

    Each slide draws a share ``s`` uniformly from ``share``, and that share of its rows is
    planted from N(mu, I) as in :func:`make_bag_cohort`. Survival: event times are exponential
    with hazard ``0.1 exp(log_hazard_ratio * (s - lo) / (hi - lo))``, censored by an independent
    exponential time whose rate censors the ``censored`` fraction in expectation. Regression:
    the target is ``10 s + noise * N(0, 1)``. A patient's slides share one share and outcome.
    The labels table (``labels_path``) has ``time`` and ``event`` (survival) or a numeric
    ``label`` (regression).
    """
    if task_type not in ("survival", "regression"):
        raise ValueError(f"task_type must be survival or regression, got {task_type!r}")
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(dim).standard_normal(dim)
    mu = shift * direction / np.linalg.norm(direction)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_patients = -(-n_slides // slides_per_patient)
    lo, hi = share
    shares = rng.uniform(lo, hi, size=n_patients)
    hazards = 0.1 * np.exp(log_hazard_ratio * (shares - lo) / (hi - lo))
    event_times = rng.exponential(1.0 / hazards)
    censor_times = rng.exponential(1.0 / _censoring_rate(hazards, censored), size=n_patients)
    values = 10.0 * shares + noise * rng.standard_normal(n_patients)
    bags = []
    for s in range(n_slides):
        p = s // slides_per_patient
        n = int(n_tiles) if isinstance(n_tiles, int) else int(rng.integers(n_tiles[0], n_tiles[1] + 1))
        feats = rng.standard_normal((n, dim))
        planted = np.sort(rng.choice(n, size=int(round(shares[p] * n)), replace=False))
        feats[planted] += mu
        slide_id = f"slide_{s:03d}"
        bags.append(
            OutcomeBag(
                slide_id=slide_id,
                patient_id=f"patient_{p:03d}",
                path=write_synthetic_store(out_dir / f"{slide_id}.h5", feats.astype(np.float32)),
                share=float(shares[p]),
                planted=planted,
                time=float(min(event_times[p], censor_times[p])),
                event=int(event_times[p] <= censor_times[p]),
                value=float(values[p]),
            )
        )
    if labels_path is not None:
        columns = ("slide_id", "patient_id", "time", "event") if task_type == "survival" else ("slide_id", "patient_id", "label")
        rows = [{"slide_id": b.slide_id, "patient_id": b.patient_id, "time": f"{b.time:.6g}", "event": b.event,
                 "label": f"{b.value:.6g}"} for b in bags]
        write_table(labels_path, rows, columns, dialect="csv")
    return bags
