"""Do the slide-level heads' defaults hold on cohorts they were not tuned to?

Each cohort is a set of h5 feature stores written through the package's own writer
(``wsitools.mil.synthetic.write_synthetic_store``) with a labels table and a task file, with a
planted signal of known strength. Each head is trained exactly as a user gets it: ``python -m
wsitools train --features ... --labels ... --head HEAD --out ...`` with no tuning option (5-fold
patient-level cross-validation, every default), ``--task`` only for ``pathotune`` (its default
prompts, TVP + TTP, embed the task's texts). In the same run, on the same folds (read back from
the run's ``splits.csv``), simple baselines are fitted on each fold's training and validation
slides: mean-pooled features, standardised, then scikit-learn's logistic regression (``meanlr``),
and the same on max-pooled features (``maxlr``); both with class-balanced weights (what the
heads' default ``--balance weights`` does), C = 1. Reported per cohort and head: pooled
out-of-fold AUROC (one-vs-rest macro for more than two classes) and balanced accuracy, the best
baseline's, the differences, and the head's wall time.

Cohorts (every bag: N(0, I) background patches; positives / classes k >= 1 carry "key" patches
shifted by ``shift`` along a unit direction of their class; each slide adds its own
N(0, nuisance^2 I) offset; ``scale`` and ``offset`` are applied last, to every value):

- ``control``: 80 slides (40 + 40), 64-d, 100-400 patches, 5 % keys, shift 4: what the other
  cohorts change one thing of.
- ``imb1to9``: 200 slides, 20 positive; 64-d, 100-400 patches, 5 % keys, shift 4.
- ``imb1to19``: 200 slides, 10 positive; as ``imb1to9``.
- ``classes5``: 150 slides, five classes of 30 (one without keys, four key directions).
- ``tiny20``: 20 slides (10 + 10), 5 % keys.
- ``cohort300``: 300 slides, 50-200 patches, 5 % keys.
- ``bags20to20k``: 60 slides, 20-20 000 patches (log-uniform) in one cohort, 3 % keys (>= 1).
- ``wide2560``: 80 slides of 2560-d features (a 64-d cohort mapped by a random orthonormal basis,
  plus N(0, 0.1^2) in every dimension: foundation-model widths with most variance in few directions).
- ``d384x100``: 80 slides of 384-d features, every value times 100.
- ``offset50``: 80 slides of 64-d features centred at 50.
- ``allpatch``: 80 slides whose positives shift every patch by 0.3 (signal in all patches).
- ``focal1pct``: 80 slides, 200-2 000 patches, 1 % keys (>= 1): tumour foci.
- ``smallbags``: 110 slides of 30-60 32-d patches, every patch of the positives shifted by 0.3:
  a diffuse phenotype in small bags (tissue microarray cores, biopsies).

    python benchmarks/bench_heads_defaults.py [--cohorts imb1to9 ...] [--heads abmil pathotune]
        [--seed 0] [--jobs 2] [--out DIR]
    python benchmarks/bench_heads_defaults.py --report [--out DIR]

The heads are those of the package on ``PYTHONPATH`` (this checkout when it is not set), so
``PYTHONPATH=OTHER_CHECKOUT ... --out DIR2`` measures another version on the same cohorts.
Every head runs on one torch thread (the CLI's default); ``--jobs`` trains that many heads at a
time. Cohorts and runs are cached under ``--out`` (a run already there is read back, not
repeated); the table is printed at the end, one row per cohort and head, and every result is
appended to ``DIR/results.jsonl``, whose table ``--report`` prints.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / ".cache" / "bench_heads_defaults"
HEADS = ("abmil", "pathotune")


@dataclass(frozen=True)
class Cohort:
    """A synthetic feature cohort: class sizes, bag sizes, width and the planted signal."""

    counts: tuple[int, ...]  # slides per class; class 0 carries no keys
    tiles: tuple[int, int]  # bag sizes, drawn log-uniformly between the two
    key_share: float  # share of a keyed bag's patches that are keys (1.0: every patch)
    shift: float
    dim: int = 64
    wide: int | None = None  # map the dim-d features into this width
    nuisance: float = 0.1
    scale: float = 1.0
    offset: float = 0.0


COHORTS: dict[str, Cohort] = {
    "control": Cohort((40, 40), (100, 400), 0.05, 4.0),
    "imb1to9": Cohort((180, 20), (100, 400), 0.05, 4.0),
    "imb1to19": Cohort((190, 10), (100, 400), 0.05, 4.0),
    "classes5": Cohort((30, 30, 30, 30, 30), (100, 400), 0.05, 4.0),
    "tiny20": Cohort((10, 10), (100, 400), 0.05, 4.0),
    "cohort300": Cohort((150, 150), (50, 200), 0.05, 4.0),
    "bags20to20k": Cohort((30, 30), (20, 20_000), 0.03, 4.0),
    "wide2560": Cohort((40, 40), (100, 400), 0.05, 4.0, wide=2560),
    "d384x100": Cohort((40, 40), (100, 400), 0.05, 4.0, dim=384, scale=100.0),
    "offset50": Cohort((40, 40), (100, 400), 0.05, 4.0, offset=50.0),
    "allpatch": Cohort((40, 40), (100, 400), 1.0, 0.3),
    "focal1pct": Cohort((40, 40), (200, 2000), 0.01, 4.0),
    "smallbags": Cohort((55, 55), (30, 60), 1.0, 0.3, dim=32),
}
CLASS_TEXTS = (
    ("normal", "benign tissue without tumour"),
    ("tumour", "carcinoma with atypical tumour cells"),
    ("subtype_b", "tumour of the second subtype"),
    ("subtype_c", "tumour of the third subtype"),
    ("subtype_d", "tumour of the fourth subtype"),
)


def make_bags(spec: Cohort, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """The cohort's bags [N, D] (float32) and their class indices, in a random order."""
    n_classes = len(spec.counts)
    directions = rng.standard_normal((n_classes, spec.dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    basis = None
    if spec.wide is not None:
        basis = np.linalg.qr(rng.standard_normal((spec.wide, spec.dim)))[0].T.astype(np.float32)
    labels = rng.permutation(np.repeat(np.arange(n_classes), spec.counts))
    lo, hi = np.log(spec.tiles[0]), np.log(spec.tiles[1])
    bags = []
    for y in labels:
        n = int(round(np.exp(rng.uniform(lo, hi))))
        x = rng.standard_normal((n, spec.dim), dtype=np.float32)
        x += (spec.nuisance * rng.standard_normal(spec.dim)).astype(np.float32)
        if y > 0:
            k = n if spec.key_share >= 1.0 else max(1, int(round(spec.key_share * n)))
            rows = rng.choice(n, size=k, replace=False)
            x[rows] += (spec.shift * directions[y]).astype(np.float32)
        if basis is not None:
            x = x @ basis + 0.1 * rng.standard_normal((n, basis.shape[1]), dtype=np.float32)
        bags.append((x * spec.scale + spec.offset).astype(np.float32))
    return bags, labels


def write_cohort(name: str, seed: int, folder: Path) -> Path:
    """Write cohort ``name`` for ``seed`` (feature stores, labels.csv, task.yaml); cached."""
    from wsitools.mil.synthetic import write_synthetic_store

    if (folder / "cohort.json").is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    spec = COHORTS[name]
    bags, labels = make_bags(spec, np.random.default_rng([seed, 11]))
    (folder / "features").mkdir(parents=True)
    classes = CLASS_TEXTS[: len(spec.counts)]
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "label"])
        for i, (x, y) in enumerate(zip(bags, labels)):
            sid = f"slide_{i:04d}"
            write_synthetic_store(folder / "features" / f"{sid}.h5", x)
            w.writerow([sid, classes[y][0]])
    lines = [f"name: {name}", "description: H&E whole-slide image; classify the tissue", "classes:"]
    lines += [f"  {c}: {d}" for c, d in classes]
    (folder / "task.yaml").write_text("\n".join(lines) + "\n")
    (folder / "cohort.json").write_text(json.dumps({"n_slides": len(bags), "seed": seed}))
    return folder


def run_head(folder: Path, head: str, out: Path) -> float:
    """Train ``head`` with every default through the command line; its wall time in seconds
    (read back from the run when it is already there)."""
    record = out / "bench.json"
    if record.is_file():
        return float(json.loads(record.read_text())["seconds"])
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "wsitools", "train", "--features", str(folder / "features"),
           "--labels", str(folder / "labels.csv"), "--head", head, "--quiet", "--out", str(out / "run")]
    if head == "pathotune":
        cmd += ["--task", str(folder / "task.yaml")]
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    # Run from the output folder: ``python -m`` puts the working directory first on the path,
    # and a checkout there would shadow the PYTHONPATH asked for.
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    record.write_text(json.dumps({"seconds": seconds}))
    return seconds


def read_predictions(run: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """A run's out-of-fold slide ids, class indices, probabilities [n, C] and class names."""
    classes = json.loads((run / "run.json").read_text())["classes"]
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ids = [r["slide_id"] for r in rows]
    y = np.array([classes.index(r["label"]) for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    return ids, y, probs, classes


def pooled(bags: dict[str, np.ndarray], how: str) -> dict[str, np.ndarray]:
    """Each bag's mean or max feature."""
    return {sid: (x.mean(0) if how == "mean" else x.max(0)) for sid, x in bags.items()}


def baseline_probs(
    run: Path, features: dict[str, np.ndarray], classes: list[str]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Standardised logistic regression (class-balanced, C = 1) on pooled ``features``, fitted on
    each fold's training and validation slides of ``run`` and applied to its test slides."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with open(run / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ids, ys, probs = [], [], []
    for fold in sorted({r["fold"] for r in rows}):
        part = [r for r in rows if r["fold"] == fold]
        fit = [r for r in part if r["part"] != "test"]
        test = [r for r in part if r["part"] == "test"]
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000))
        model.fit(np.stack([features[r["slide_id"]] for r in fit]), [classes.index(r["label"]) for r in fit])
        p = np.zeros((len(test), len(classes)))
        p[:, model.classes_] = model.predict_proba(np.stack([features[r["slide_id"]] for r in test]))
        ids += [r["slide_id"] for r in test]
        ys += [classes.index(r["label"]) for r in test]
        probs.append(p)
    return ids, np.array(ys), np.concatenate(probs)


def load_bags(folder: Path) -> dict[str, np.ndarray]:
    """The cohort's whole bags by slide id, as float64."""
    import h5py

    out = {}
    for path in sorted((folder / "features").glob("*.h5")):
        with h5py.File(path, "r") as f:
            out[path.stem] = f["features"][...].astype(np.float64)
    return out


def evaluate(name: str, seed: int, heads: list[str], out: Path, jobs: int) -> list[dict]:
    """Train every head on cohort ``name`` and score it and the baselines on the same folds."""
    from wsitools.metrics import classification_metrics

    folder = write_cohort(name, seed, out / "cohorts" / f"{name}_s{seed}")
    runs = {h: out / "runs" / f"{name}_s{seed}" / h for h in heads}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        seconds = dict(zip(heads, pool.map(lambda h: run_head(folder, h, runs[h]), heads)))
    bags = load_bags(folder)
    feats = {"meanlr": pooled(bags, "mean"), "maxlr": pooled(bags, "max")}
    rows = []
    for head in heads:
        run = runs[head] / "run"
        _, y, probs, classes = read_predictions(run)
        m = classification_metrics(y, probs)
        base = {}
        for bname, f in feats.items():
            t0 = time.perf_counter()
            _, by, bp = baseline_probs(run, f, classes)
            base[bname] = {**classification_metrics(by, bp), "seconds": time.perf_counter() - t0}
        best = max(base, key=lambda b: base[b]["auroc"])
        metrics = json.loads((run / "metrics.json").read_text())
        rows.append({
            "cohort": name, "seed": seed, "head": head, "auroc": m["auroc"],
            "bacc": m["balanced_accuracy"], "baseline": best, "base_auroc": base[best]["auroc"],
            "base_bacc": base[best]["balanced_accuracy"],
            "meanlr_auroc": base["meanlr"]["auroc"], "maxlr_auroc": base["maxlr"]["auroc"],
            "seconds": seconds[head],
            "best_epochs": [f["best_epoch"] for f in metrics["folds"]],
            "epochs_run": [f["epochs_run"] for f in metrics["folds"]],
        })
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| cohort | seed | head | AUROC | bal. acc. | baseline | its AUROC | its bal. acc. | ΔAUROC | Δbal. acc. | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cohort']} | {r['seed']} | {r['head']} | {r['auroc']:.3f} | {r['bacc']:.3f} | {r['baseline']} | "
            f"{r['base_auroc']:.3f} | {r['base_bacc']:.3f} | {r['auroc'] - r['base_auroc']:+.3f} | "
            f"{r['bacc'] - r['base_bacc']:+.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", nargs="+", choices=sorted(COHORTS), default=list(COHORTS))
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=["abmil"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--report", action="store_true", help="print the table of every run recorded under --out")
    args = parser.parse_args()
    args.out = args.out.resolve()
    if args.report:
        recorded = {}
        for line in (args.out / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            recorded[(r["cohort"], r["seed"], r["head"])] = r  # the latest of each
        order = {name: i for i, name in enumerate(COHORTS)}
        print(table(sorted(recorded.values(), key=lambda r: (order[r["cohort"]], r["seed"], r["head"]))))
        return
    rows = []
    for name in args.cohorts:
        rows += evaluate(name, args.seed, args.heads, args.out, args.jobs)
        r = rows[-len(args.heads):]
        for x in r:
            print(json.dumps(x), flush=True)
    with open(args.out / "results.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
