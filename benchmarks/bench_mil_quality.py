"""Quality of the slide-level MIL heads on a family of bag tasks, against a plain gated ABMIL.

Every task is a cohort of h5 feature stores (``wsitools.mil.synthetic.write_synthetic_store``)
with a labels table; the package's heads are trained through the public ``wsitools.mil.train.train``
(5-fold patient-level cross-validation, the recipe under test), so the numbers are what a user
gets. The reference is Ilse et al.'s gated attention MIL written here in plain torch (Linear(D, 128)
+ ReLU, gated attention, Linear(128, C); Adam lr 1e-3, weight decay 1e-4, whole bags, no dropout,
at most 100 epochs, early stopping after 30 epochs without a lower validation loss, best epoch
kept) on the same folds. Reported per task and head: pooled out-of-fold AUROC (mean over seeds,
its spread, and the mean 95 % bootstrap interval) and the attention mass on the key patches of
the bags that carry them (mean over those bags; the key fraction is what uniform attention gets).

Tasks (each seed draws a new cohort; "keys" are the patches that decide the label):

- ``key3pct``: 80 slides, 64-d, 200-800 patches; positives hold 3 % keys (at least 4) shifted
  along one direction; every slide also carries its own random shift (stain/scanner nuisance)
  that defeats mean pooling.
- ``key1to3``: 100 slides, 64-d, 100-500 patches; positives hold 1-3 keys; per-slide nuisance.
- ``many``: 60 slides, 64-d, 100-400 patches; positives hold 30-50 % weakly shifted keys.
- ``batch``: 100 slides, 128-d, 200-600 patches, 5 % keys; four scanner batches each add a
  strong shift to all their slides, plus a per-slide shift.
- ``proportion``: 80 slides, 64-d; every bag holds patches of a kind (a strong shift), 5-15 %
  of the bag in negatives and 25-40 % in positives: the label is how much, not whether.
- ``multiclass``: 120 slides, 64-d, four classes: none, or 3-5 % keys along one of three directions.
- ``cohort1000``: 1000 slides, 64-d, 100-300 patches, 3 % keys; per-slide nuisance.
- ``bags20k``: 40 slides, 64-d, 5 000-20 000 patches, 3 % keys; per-slide nuisance.
- ``wide1536``: the ``key3pct`` recipe with 60 slides, in 1536-d, as foundation-model features are:
  the 64-d patches mapped into 1536-d by a random orthonormal basis, plus N(0, 0.1^2 I) in all
  1536 dimensions (wide, but with most of the variance in a few directions; isotropic 1536-d
  noise makes 60 slides unlearnable for every head and the reference alike).
- ``ivp2enc`` (prompt-informative, IVP): 60 slides; the first encoder (64-d) barely sees the keys
  (shift 1), a second encoder (32-d, same patches) sees them clearly (shift 4); IVP reads it.
- ``ttptext`` (prompt-informative, TTP): 60 slides of 384-d features in the text encoder's space;
  1-3 keys among 100-400 patches shifted by 5 along the MiniLM embedding of the positive class's
  description. Knowing that direction separates the bags (the most text-like patch of each bag,
  standardised within it, scores AUROC 0.996 on 200 bags; 0.77 at shift 3), learning it from 48
  training bags of 384-d features is what the heads without the text must do.
- ``real``: efficientnet-lite0 features of 40 synthetic slides (``wsitools.synthetic.make_cohort``:
  half carry a planted region of another tissue texture), tiled and extracted by ``wsitools tile``
  and ``wsitools extract``; keys are the tiles whose centre lies in the planted region. Made once
  under ``DIR/cohorts/real/source`` and shared by the seeds.

    python benchmarks/bench_mil_quality.py [--tasks key3pct many ...] [--heads abmil reference ...]
        [--seeds 0 1 2] [--jobs 2] [--set lr=1e-3 instance_dropout=0 ...] [--out DIR]

Without ``--tasks``/``--heads``/``--seeds`` each task runs its default heads and seeds, plus its
ablation heads (other prompt subsets) on its first seed. Every run is one torch thread; ``--jobs``
runs that many in parallel processes. Results are appended to ``DIR/results.jsonl`` (a run already
there for the same task, seed, head and recipe is not repeated) and printed as a markdown table;
``--report`` prints the table of everything recorded.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / ".cache" / "bench_mil_quality"
SUBSETS = ["tvp", "ttp", "ivp", "tvp,ttp", "tvp,ivp", "ttp,ivp", "tvp,ttp,ivp"]
ALL_HEADS = ["meanpool", "abmil", *[f"pathotune[{s}]" for s in SUBSETS], "reference"]
FEW_HEADS = ["meanpool", "abmil", "pathotune[tvp,ttp,ivp]", "reference"]


@dataclass
class Bag:
    features: np.ndarray
    label: int
    keys: np.ndarray  # rows that decide the label (empty in bags without any)
    ivp: np.ndarray | None = None


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]
    descriptions: tuple[str, ...]
    make: Callable[[np.random.Generator, Path], list[Bag]]  # (rng, the task's folder for inputs shared by seeds)
    seeds: tuple[int, ...] = (0, 1)
    heads: tuple[str, ...] = tuple(FEW_HEADS)
    ablation: tuple[str, ...] = ()  # further heads, run on the first seed only
    description: str = "synthetic feature bags"
    default: bool = True  # in the run without --tasks
    text_space: bool = False  # features live in the text encoder's space: ttp heads get --text-prior


def unit(dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim)
    return v / np.linalg.norm(v)


def key_bags(
    rng: np.random.Generator,
    *,
    n_slides: int,
    n_tiles: tuple[int, int],
    dim: int,
    keys: Callable[[int, np.random.Generator], int],
    shift: float,
    nuisance: float,
    directions: list[np.ndarray],
    batches: np.ndarray | None = None,
    dtype: str = "float32",
) -> list[Bag]:
    """Class 0: background N(0, I) only; class k >= 1: ``keys(n)`` rows shifted by ``shift`` along
    ``directions[k - 1]``. Every slide adds its own N(0, nuisance^2 I) shift (and its batch's)."""
    n_classes = len(directions) + 1
    labels = rng.permutation(np.arange(n_slides) % n_classes)
    out = []
    for s, y in enumerate(labels):
        n = int(rng.integers(n_tiles[0], n_tiles[1] + 1))
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x += (nuisance * rng.standard_normal(dim)).astype(np.float32)
        if batches is not None:
            x += batches[s % len(batches)]
        rows = np.array([], dtype=np.int64)
        if y > 0:
            rows = np.sort(rng.choice(n, size=min(n, keys(n, rng)), replace=False))
            x[rows] += (shift * directions[y - 1]).astype(np.float32)
        out.append(Bag(x.astype(dtype), int(y), rows))
    return out


def widen(bags: list[Bag], width: int, rng: np.random.Generator, *, noise: float) -> list[Bag]:
    """The bags' features mapped into ``width`` dimensions by one random orthonormal basis of
    their own width, plus N(0, noise^2 I) in every dimension."""
    dim = bags[0].features.shape[1]
    basis = np.linalg.qr(rng.standard_normal((width, dim)))[0].T.astype(np.float32)  # [dim, width]
    out = []
    for b in bags:
        x = b.features.astype(np.float32) @ basis
        x += noise * rng.standard_normal(x.shape, dtype=np.float32)
        out.append(Bag(x.astype(b.features.dtype), b.label, b.keys, b.ivp))
    return out


def pct(frac: float, least: int) -> Callable[[int, np.random.Generator], int]:
    return lambda n, rng: max(least, int(round(frac * n)))


def between(lo: int, hi: int) -> Callable[[int, np.random.Generator], int]:
    return lambda n, rng: int(rng.integers(lo, hi + 1))


def fraction(lo: float, hi: float) -> Callable[[int, np.random.Generator], int]:
    return lambda n, rng: int(round(rng.uniform(lo, hi) * n))


def make_proportion(rng: np.random.Generator, _: Path) -> list[Bag]:
    labels = rng.permutation(np.arange(80) % 2)
    u = unit(64, 1)
    out = []
    for y in labels:
        n = int(rng.integers(200, 601))
        x = rng.standard_normal((n, 64), dtype=np.float32) + (0.3 * rng.standard_normal(64)).astype(np.float32)
        share = rng.uniform(0.25, 0.40) if y else rng.uniform(0.05, 0.15)
        rows = np.sort(rng.choice(n, size=int(round(share * n)), replace=False))
        x[rows] += (3.0 * u).astype(np.float32)
        out.append(Bag(x, int(y), rows))
    return out


def make_batch(rng: np.random.Generator, _: Path) -> list[Bag]:
    batches = np.stack([3.0 * unit(128, 100 + b) for b in range(4)]).astype(np.float32)
    return key_bags(rng, n_slides=100, n_tiles=(200, 600), dim=128, keys=pct(0.05, 4), shift=5.0,
                    nuisance=0.3, directions=[unit(128, 1)], batches=batches)


def make_ivp2enc(rng: np.random.Generator, _: Path) -> list[Bag]:
    bags = key_bags(rng, n_slides=60, n_tiles=(200, 600), dim=64, keys=pct(0.03, 4), shift=1.0,
                    nuisance=0.2, directions=[unit(64, 1)])
    v = unit(32, 2)
    for bag in bags:  # the second encoder sees the same patches, and the keys clearly
        second = rng.standard_normal((len(bag.features), 32), dtype=np.float32)
        second[bag.keys] += (4.0 * v).astype(np.float32)
        bag.ivp = second
    return bags


TTP_CLASSES = ("benign", "tumour")
TTP_DESCRIPTIONS = ("benign tissue, normal glands and stroma", "invasive carcinoma with atypical nuclei and mitoses")


def make_ttptext(rng: np.random.Generator, _: Path) -> list[Bag]:
    from wsitools.text import embed_texts

    text = embed_texts([f"{c}: {d}" for c, d in zip(TTP_CLASSES, TTP_DESCRIPTIONS)])
    direction = text[1] / np.linalg.norm(text[1])
    return key_bags(rng, n_slides=60, n_tiles=(100, 400), dim=text.shape[1], keys=between(1, 3), shift=5.0,
                    nuisance=0.3, directions=[direction])


def make_real(rng: np.random.Generator, shared: Path) -> list[Bag]:
    """efficientnet-lite0 features of synthetic slides with planted regions (made once under ``shared``)."""
    from wsitools.feature_store import FeatureStore
    from wsitools.synthetic import Region

    root = shared / "source"
    features = root / "features" / "efficientnet-lite0-imagenet"
    if not (root / "done").is_file():
        from wsitools.synthetic import make_cohort

        make_cohort(root, n_slides=40, size=(3072, 2304), seed=0)
        slides = sorted(str(p) for p in (root / "slides").glob("*.svs"))
        run = [sys.executable, "-m", "wsitools"]
        subprocess.run([*run, "tile", "--out", str(root / "tiles"), "--workers", "1", "--quiet", *slides], check=True)
        stores = sorted(str(p) for p in (root / "tiles").glob("*.zarr"))
        subprocess.run([*run, "extract", "--encoder", "efficientnet-lite0-imagenet", "--out", str(root / "features"),
                        "--workers", "0", "--quiet", *stores], check=True)
        (root / "done").write_text("")
    truth = json.loads((root / "truth.json").read_text())
    labels = {r["slide_id"]: r["label"] for r in csv.DictReader(open(root / "samples.tsv"), delimiter="\t")}
    out = []
    for sid in sorted(labels):
        store = FeatureStore.open(features / f"{sid}.h5")
        x, coords = store.load()
        x = x.astype(np.float32)
        half = float(store.attrs["tile_size_level0"]) / 2
        planted = [Region(**r) for r in truth[sid] if r["texture"] == "other"]
        inside = np.zeros(len(x), bool)
        for region in planted:
            inside |= region.contains(coords[:, 0] + half - 0.5, coords[:, 1] + half - 0.5)
        out.append(Bag(x, int(labels[sid] == "positive"), np.flatnonzero(inside)))
    return out


def _tasks() -> dict[str, Task]:
    neg_pos = ("neg", "pos")
    desc = ("background patches only", "a few patches of another kind")
    u64 = unit(64, 1)
    prompted = "pathotune[tvp,ttp,ivp]"
    big = ("abmil", prompted, "reference")
    tasks = [
        Task("key3pct", neg_pos, desc, lambda r, _: key_bags(r, n_slides=80, n_tiles=(200, 800), dim=64, keys=pct(0.03, 4),
                                                          shift=5.0, nuisance=0.2, directions=[u64]),
             seeds=(0, 1), ablation=tuple(f"pathotune[{s}]" for s in SUBSETS[:-1])),
        Task("key1to3", neg_pos, desc, lambda r, _: key_bags(r, n_slides=100, n_tiles=(100, 500), dim=64, keys=between(1, 3),
                                                          shift=8.0, nuisance=0.2, directions=[u64]), seeds=(0, 1)),
        Task("many", neg_pos, desc, lambda r, _: key_bags(r, n_slides=60, n_tiles=(100, 400), dim=64, keys=fraction(0.3, 0.5),
                                                       shift=0.7, nuisance=0.2, directions=[u64])),
        Task("batch", neg_pos, desc, make_batch),
        Task("proportion", ("low", "high"), ("few patches of the kind", "many patches of the kind"), make_proportion),
        Task("multiclass", ("none", "a", "b", "c"), ("background only", "kind a", "kind b", "kind c"),
             lambda r, _: key_bags(r, n_slides=120, n_tiles=(200, 600), dim=64, keys=fraction(0.03, 0.05), shift=5.0,
                                nuisance=0.2, directions=[unit(64, k) for k in (1, 2, 3)])),
        Task("ivp2enc", neg_pos, desc, make_ivp2enc, seeds=(0, 1),
             heads=("abmil", "pathotune[ivp]", prompted, "reference"),
             ablation=("pathotune[tvp]", "pathotune[tvp,ivp]")),
        Task("ttptext", TTP_CLASSES, TTP_DESCRIPTIONS, make_ttptext, seeds=(0, 1),
             heads=("abmil", "pathotune[ttp]", prompted, "reference"), ablation=("pathotune[tvp]", "pathotune[tvp,ttp]"),
             description="H&E whole-slide image; is there invasive carcinoma", text_space=True),
        Task("real", ("negative", "positive"), ("only DAB and haematoxylin stained tissue",
                                                 "a region of eosin-dominant, differently textured tissue"),
             make_real, seeds=(0, 1)),
        Task("cohort1000", neg_pos, desc, lambda r, _: key_bags(r, n_slides=1000, n_tiles=(100, 300), dim=64,
                                                             keys=pct(0.03, 2), shift=4.0, nuisance=0.2, directions=[u64]),
             seeds=(0,), heads=big, default=False),
        Task("bags20k", neg_pos, desc, lambda r, _: key_bags(r, n_slides=40, n_tiles=(5000, 20000), dim=64, keys=pct(0.03, 4),
                                                          shift=5.0, nuisance=0.2, directions=[u64]),
             seeds=(0,), heads=big, default=False),
        Task("wide1536", neg_pos, desc, lambda r, _: widen(key_bags(r, n_slides=60, n_tiles=(200, 800), dim=64,
                                                                 keys=pct(0.03, 4), shift=5.0, nuisance=0.2,
                                                                 directions=[u64]), 1536, r, noise=0.1),
             seeds=(0,), heads=("meanpool", *big), default=False),
    ]
    return {t.name: t for t in tasks}


TASKS = _tasks()


def write_cohort(task: Task, seed: int, folder: Path) -> Path:
    """Write the task's cohort for ``seed`` as feature stores + labels + task YAML (cached)."""
    from wsitools.mil.synthetic import write_synthetic_store

    done = folder / "cohort.json"
    if done.is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    bags = task.make(np.random.default_rng([seed, 7]), folder.parent)
    (folder / "features").mkdir(parents=True)
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "label", "patient_id"])
        for i, bag in enumerate(bags):
            sid = f"slide_{i:04d}"
            write_synthetic_store(folder / "features" / f"{sid}.h5", bag.features)
            if bag.ivp is not None:
                (folder / "ivp").mkdir(exist_ok=True)
                write_synthetic_store(folder / "ivp" / f"{sid}.h5", bag.ivp, encoder="second")
            w.writerow([sid, task.classes[bag.label], f"patient_{i:04d}"])
    lines = [f"name: {task.name}", f"description: {task.description}", "classes:"]
    lines += [f"  {c}: {d}" for c, d in zip(task.classes, task.descriptions)]
    (folder / "task.yaml").write_text("\n".join(lines) + "\n")
    keys = {f"slide_{i:04d}": b.keys.tolist() for i, b in enumerate(bags)}
    done.write_text(json.dumps({"keys": keys}))
    return folder


def key_mass(attention: dict[str, np.ndarray], keys: dict[str, list[int]]) -> tuple[float, float, float]:
    """Over bags that have keys: mean attention on the key rows, mean key fraction, and mean
    top-k precision (the share of key rows among the k most attended, k = number of keys)."""
    mass, share, topk = [], [], []
    for sid, a in attention.items():
        if keys[sid]:
            mass.append(float(a[keys[sid]].sum()))
            share.append(len(keys[sid]) / len(a))
            top = np.argsort(-a, kind="stable")[: len(keys[sid])]
            topk.append(float(np.isin(top, keys[sid]).mean()))
    if not mass:
        return float("nan"), float("nan"), float("nan")
    return float(np.mean(mass)), float(np.mean(share)), float(np.mean(topk))


def run_package_head(folder: Path, head: str, seed: int, overrides: dict[str, object], out: Path, *,
                     text_space: bool = False) -> dict:
    """Train ``head`` (``pathotune[subset]`` for prompts) through ``wsitools.mil.train.train``;
    ``text_space``: the features live in the text encoder's space, so ttp heads use the text prior
    (``wsitools train --text-prior``)."""
    from wsitools.attention import read_attention
    from wsitools.mil.config import TrainConfig
    from wsitools.mil.train import train

    name, prompts = head, ()
    if head.startswith("pathotune["):
        name, prompts = "pathotune", tuple(head[len("pathotune["):-1].split(","))
    ivp_dir = folder / "ivp" if "ivp" in prompts and (folder / "ivp").is_dir() else None
    config = dataclasses.replace(TrainConfig(seed=seed, n_boot=1000), **overrides)
    head_options = {"text_prior": True} if text_space and "ttp" in prompts else None
    summary = train(features_dir=folder / "features", labels=folder / "labels.csv", task=folder / "task.yaml",
                    out_dir=out, head=name, prompts=prompts, config=config, head_options=head_options,
                    ivp_features_dir=ivp_dir, overwrite=True, progress=False)
    attention = {}
    for p in (out / "attention").glob("*.h5"):
        attention[p.stem] = read_attention(p).attention
    best = [f["best_epoch"] for f in summary["folds"]]
    ran = [f["epochs_run"] for f in summary["folds"]]
    return {"pooled": summary["pooled"], "attention": attention, "best_epochs": best, "epochs_run": ran}


def run_reference(folder: Path, seed: int, n_boot: int = 1000) -> dict:
    """Ilse et al.'s gated ABMIL, trained here on the same patient-level folds as the package."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from wsitools.feature_store import feature_path, read_features
    from wsitools.labels import read_labels
    from wsitools.mil.folds import patient_kfold
    from wsitools.metrics import metrics_report
    from wsitools.text import load_task

    classes = load_task(folder / "task.yaml").classes
    rows = read_labels(folder / "labels.csv")
    bags = []
    for r in rows:
        bags.append(read_features(feature_path(folder / "features", r.slide_id)))
    labels = np.array([classes.index(r.label) for r in rows])
    folds = patient_kfold(labels, [r.patient_id for r in rows], n_folds=5, val_fraction=0.2, seed=seed)

    class GatedABMIL(nn.Module):
        def __init__(self, dim: int, n_classes: int, hidden: int = 128):
            super().__init__()
            self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
            self.v, self.u, self.w = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 1)
            self.out = nn.Linear(hidden, n_classes)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.embed(x)
            a = torch.softmax(self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1), dim=0)
            return self.out(a @ h), a

    def val_loss(model: nn.Module, index: np.ndarray) -> float:
        model.eval()
        with torch.no_grad():
            return float(np.mean([F.cross_entropy(model(bags[i])[0][None], torch.tensor([labels[i]])).item()
                                  for i in index]))

    probs, attention, order, best_epochs = [], {}, [], []
    for fold in folds:
        torch.manual_seed(seed * 1009 + fold.index)
        rng = np.random.default_rng([seed, fold.index])
        model = GatedABMIL(bags[0].shape[1], len(classes))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        best, best_epoch, state = np.inf, -1, None
        for epoch in range(100):
            model.train()
            for i in rng.permutation(fold.train):
                loss = F.cross_entropy(model(bags[i])[0][None], torch.tensor([labels[i]]))
                opt.zero_grad()
                loss.backward()
                opt.step()
            loss = val_loss(model, fold.val)
            if loss < best - 1e-6:
                best, best_epoch, state = loss, epoch, {k: v.clone() for k, v in model.state_dict().items()}
            elif epoch - best_epoch >= 30:
                break
        model.load_state_dict(state)
        model.eval()
        best_epochs.append(best_epoch)
        with torch.no_grad():
            for i in fold.test:
                logits, a = model(bags[i])
                probs.append(torch.softmax(logits, -1).numpy())
                attention[rows[i].slide_id] = a.numpy()
                order.append(i)
    pooled = metrics_report(labels[order], np.stack(probs), class_names=classes, n_boot=n_boot, seed=seed)
    return {"pooled": pooled, "attention": attention, "best_epochs": best_epochs}


def run_one(job: tuple[str, int, str, dict[str, object], str, str]) -> dict:
    """One (task, seed, head) run in this process, one torch thread."""
    import torch

    torch.set_num_threads(1)
    task_name, seed, head, overrides, recipe, out = job
    folder = Path(out) / "cohorts" / task_name / f"seed{seed}"
    keys = json.loads((folder / "cohort.json").read_text())["keys"]
    t0 = time.perf_counter()
    if head == "reference":
        result = run_reference(folder, seed)
    else:
        result = run_package_head(folder, head, seed, overrides, Path(out) / "runs" / f"{task_name}-{seed}-{head}-{recipe}",
                                  text_space=TASKS[task_name].text_space)
    mass, share, topk = key_mass(result.pop("attention"), keys)
    pooled = result.pop("pooled")
    return {"task": task_name, "seed": seed, "head": head, "recipe": recipe if head != "reference" else "reference",
            "auroc": pooled["auroc"], "auroc_ci95": pooled["auroc_ci95"], "key_mass": mass, "key_share": share, "key_topk": topk,
            "seconds": round(time.perf_counter() - t0, 1), **result}


def parse_value(text: str) -> object:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def table(results: list[dict], heads: list[str]) -> str:
    """Markdown: one row per task, one column per head: mean AUROC (sd over seeds) [mean CI] / key mass."""
    by: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        by.setdefault((r["task"], r["head"]), []).append(r)
    tasks = list(dict.fromkeys(r["task"] for r in results))
    lines = ["| task | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for t in tasks:
        cells = []
        for h in heads:
            rs = by.get((t, h), [])
            if not rs:
                cells.append("")
                continue
            auc = np.array([r["auroc"] for r in rs], dtype=float)
            lo = np.mean([r["auroc_ci95"][0] for r in rs])
            hi = np.mean([r["auroc_ci95"][1] for r in rs])
            sd = f" ±{auc.std(ddof=1):.2f}" if len(rs) > 1 else ""
            cells.append(f"{auc.mean():.3f}{sd} [{lo:.2f}, {hi:.2f}] / {np.mean([r['key_mass'] for r in rs]):.2f}")
        share = np.mean([r["key_share"] for r in results if r["task"] == t])
        lines.append(f"| {t} (keys {share:.1%}, n={len({r['seed'] for r in results if r['task'] == t})}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=[t for t in TASKS if TASKS[t].default],
                    help="default: all but the big ones (cohort1000, bags20k, wide1536)")
    ap.add_argument("--heads", nargs="+", choices=ALL_HEADS, default=None, help="default: each task's own list")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default: each task's own seeds")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="TrainConfig fields for the package heads (default: the package defaults)")
    ap.add_argument("--recipe", default="default", help="name of the recipe in the results")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (each one torch thread)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--report", action="store_true",
                    help="run nothing: print the table of DIR/results.jsonl for --tasks, --seeds and --recipe")
    args = ap.parse_args()
    if args.report:
        lines = [json.loads(line) for line in open(args.out / "results.jsonl")]
        results = [r for r in lines if r["task"] in args.tasks and r["recipe"] in (args.recipe, "reference")
                   and (args.seeds is None or r["seed"] in args.seeds)]
        print(table(results, [h for h in ALL_HEADS if any(r["head"] == h for r in results)]))
        return
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.recipe):
        ap.error(f"--recipe {args.recipe!r}: use letters, digits, '.', '_' and '-' (it names run folders)")
    overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for name in args.tasks:
        task = TASKS[name]
        seeds = args.seeds if args.seeds is not None else task.seeds
        for seed in seeds:
            write_cohort(task, seed, args.out / "cohorts" / name / f"seed{seed}")
            heads = args.heads or (task.heads + task.ablation if seed == seeds[0] else task.heads)
            for head in heads:
                jobs.append((name, seed, head, overrides, args.recipe, str(args.out)))
    done_path = args.out / "results.jsonl"
    done = set()
    if done_path.is_file():
        for line in open(done_path):
            r = json.loads(line)
            done.add((r["task"], r["seed"], r["head"], r["recipe"]))
    jobs = [j for j in jobs if (j[0], j[1], j[2], "reference" if j[2] == "reference" else j[4]) not in done]
    jobs.sort(key=lambda j: (TASKS[j[0]].default, j[2] != "reference"))  # the slow ones first
    t0 = time.perf_counter()
    results = []
    with mp.get_context("spawn").Pool(args.jobs) as pool, open(args.out / "results.jsonl", "a") as log:
        for r in pool.imap_unordered(run_one, jobs):
            results.append(r)
            log.write(json.dumps(r) + "\n")
            log.flush()
            print(f"{r['task']:<11} seed {r['seed']} {r['head']:<24} AUROC {r['auroc']:.3f} "
                  f"key mass {r['key_mass']:.2f} {r['seconds']:.0f}s", flush=True)
    heads = [h for h in ALL_HEADS if any(r["head"] == h for r in results)]
    print(f"\ncommand: python benchmarks/bench_mil_quality.py {' '.join(sys.argv[1:])}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{time.strftime('%Y-%m-%d')}; {time.perf_counter() - t0:.0f} s; recipe {args.recipe} {overrides}")
    print("cells: pooled out-of-fold AUROC, mean over seeds (± sd) [mean 95 % CI] / attention mass on the keys\n")
    print(table(results, heads))


if __name__ == "__main__":
    main()
