"""MIL training speed (bags/s) on 10k-patch x 768-d bags read from h5, and peak memory of a
100k-patch bag.

Ours: the training loop of ``wsitools train`` (``wsitools.mil.train.train_epoch``: one bag per
step, ``bag_size`` patches sampled per bag and read straight from the h5 file, AdamW) for the
abmil and pathotune heads. Baseline, in the same run: the common recipe of reading the whole
bag every step and training on all its patches (same head, same optimiser). The ratio is printed.
Bound, in the same run: the same step (forward, loss, backward, AdamW) on one resident
``bag_size`` x dim tensor, with no reading and no sampling: what the CPU allows for this head,
so "ours / bound" says how much the loop around the model costs, whatever the machine's speed.

Peak memory is measured in a fresh process per case (``ru_maxrss`` above the resident size after
imports and model creation): one training step and one prediction on a 100k x 768 bag.

    python benchmarks/bench_mil.py [--device cpu|cuda] [--bags 24] [--patches 10000] [--dim 768] [--threads 1 2]
        [--bag-sizes 512 256] [--workers 0 1] [--big 100000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsitools.mil.config import TrainConfig
from wsitools.feature_store import read_features
from wsitools.mil.heads import HeadConfig, create_head
from wsitools.mil.synthetic import write_synthetic_store
from wsitools.mil.train import BagDataset, BagLoader, classification_loss, epoch_keys, make_stepper, train_epoch
from wsitools.device import resolve_device
from wsitools.training import Stepper

TEXT_DIM = 384  # MiniLM's width; the TTP embeddings are random here (their values do not change the cost)


def make_bags(folder: Path, n_bags: int, n_patches: int, dim: int, dtype: str) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n_bags):
        feats = rng.standard_normal((n_patches, dim), dtype=np.float32).astype(dtype)
        paths.append(write_synthetic_store(folder / f"bag_{i:03d}.h5", feats))
    return paths


def head_config(head: str, dim: int) -> HeadConfig:
    if head == "pathotune":
        return HeadConfig(head="pathotune", in_dim=dim, n_classes=2, prompts=("tvp", "ttp", "ivp"), text_dim=TEXT_DIM)
    return HeadConfig(head=head, in_dim=dim, n_classes=2)


DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def build(head: str, dim: int) -> tuple[torch.nn.Module, Stepper]:
    """The head and its optimiser steps exactly as ``wsitools train`` makes them (default
    settings), on ``DEVICE``."""
    torch.manual_seed(0)
    cfg = head_config(head, dim)
    model = create_head(cfg, text_embeddings=torch.randn(cfg.n_ttp, TEXT_DIM) if "ttp" in cfg.prompts else None)
    return model.to(DEVICE), make_stepper(model, TrainConfig(), device=DEVICE)


def ours_bags_per_s(
    paths: list[Path], head: str, dim: int, n_patches: int, epochs: int, workers: int, bag_size: int, repeats: int
) -> tuple[float, float, float, float]:
    """Bags per second through ``train_epoch`` with the default training settings: per second of
    wall time, and per second of this process's CPU time (the rate without other processes
    competing for the cores; meaningful for one thread and no workers), of the median of
    ``repeats`` timed runs of ``epochs`` epochs; then the slowest and fastest run's wall rate."""
    cfg = TrainConfig(workers=workers, bag_size=bag_size)
    labels = np.arange(len(paths)) % 2
    dataset = BagDataset(paths, labels, [n_patches] * len(paths), bag_size=cfg.bag_size,
                         instance_dropout=cfg.instance_dropout)
    bags = BagLoader(dataset, workers=workers, device=DEVICE)
    model, stepper = build(head, dim)
    rng = np.random.default_rng(0)
    step_loss = classification_loss(torch.from_numpy(labels).to(DEVICE), torch.ones(2, device=DEVICE))
    index = np.arange(len(paths))
    train_epoch(model, stepper, bags, epoch_keys(index, labels, balance="weights", rng=rng)[:4],
                step_loss=step_loss)  # warm-up
    rates = []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(epochs):
            keys = epoch_keys(index, labels, balance="weights", rng=rng)
            train_epoch(model, stepper, bags, keys, step_loss=step_loss)
        n = epochs * len(paths)
        rates.append((n / (time.perf_counter() - start), n / (time.process_time() - cpu)))
    rates.sort()
    return (*rates[len(rates) // 2], rates[0][0], rates[-1][0])  # the median repeat by wall-clock rate


def bound_bags_per_s(head: str, dim: int, bag_size: int, steps: int) -> tuple[float, float]:
    """Steps per second of the model alone, per second of wall time and of this process's CPU
    time: forward, loss, backward and the AdamW step on one resident ``bag_size`` x ``dim`` tensor (the
    median of five timed blocks of ``steps`` steps, by wall-clock rate)."""
    model, stepper = build(head, dim)
    model.train()
    x = torch.randn(bag_size, dim, device=DEVICE)
    target = torch.tensor([1], device=DEVICE)
    rates = []
    for block in range(6):
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            stepper.backward(torch.nn.functional.cross_entropy(model(x).logits[None], target))
        sync()
        if block:  # the first block warms up
            rates.append((steps / (time.perf_counter() - start), steps / (time.process_time() - cpu)))
    return sorted(rates)[len(rates) // 2]


def baseline_bags_per_s(paths: list[Path], head: str, dim: int, epochs: int) -> tuple[float, float]:
    """Whole bag read and trained on every step (the usual CLAM-style loop)."""
    model, stepper = build(head, dim)
    model.train()
    labels = np.arange(len(paths)) % 2
    steps = 0
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        for i in np.random.default_rng(steps).permutation(len(paths)):
            x = read_features(paths[i]).to(DEVICE)
            loss = torch.nn.functional.cross_entropy(model(x).logits[None], torch.tensor([int(labels[i])], device=DEVICE))
            stepper.backward(loss)
            steps += 1
    sync()
    return steps / (time.perf_counter() - start), steps / (time.process_time() - cpu)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _memory_case(args: tuple[str, str, str, int]) -> dict[str, float]:
    """In a fresh process: peak RSS of one full-bag training step or prediction on ``path``."""
    path, head, mode, dim = args
    model, stepper = build(head, dim)
    with open("/proc/self/status") as f:
        current = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024.0
    start = time.perf_counter()
    x = read_features(path)
    if mode == "train":
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x).logits[None], torch.tensor([1]))
        stepper.backward(loss)
    else:
        model.eval()
        with torch.no_grad():
            model(x)
    return {"peak_mib": _rss_mib(), "above_start_mib": _rss_mib() - current, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=24)
    parser.add_argument("--patches", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per timed run of ours")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of ours; the median is reported")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--big", type=int, default=100_000, help="patches of the memory-test bag")
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="bag-reading worker processes")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU the memory cases are skipped)")
    parser.add_argument("--bag-sizes", type=int, nargs="+", default=[TrainConfig().bag_size],
                        help="patches sampled per bag per step (the default is TrainConfig's)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = resolve_device(args.device)

    gpu = f", {torch.cuda.get_device_name(DEVICE)}" if DEVICE.type == "cuda" else ""
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"python {sys.version.split()[0]}{gpu}")
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = make_bags(Path(tmp), args.bags, args.patches, args.dim, args.dtype)
        mib = sum(p.stat().st_size for p in paths) / 2**20
        print(f"wrote {args.bags} bags of {args.patches} x {args.dim} {args.dtype} ({mib:.0f} MiB) "
              f"in {time.perf_counter() - t0:.1f}s")
        subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        for threads in args.threads:
            torch.set_num_threads(threads)
            for head in ("abmil", "pathotune"):
                load = os.getloadavg()[0]
                base = baseline_bags_per_s(paths, head, args.dim, 1)
                row: dict[str, object] = {"load_avg_1min": load, "baseline_full_bag": base}
                print(f"{head:10s} threads={threads} load={load:.1f} | baseline (whole bag every step): "
                      f"{base[0]:6.1f} bags/s ({base[1]:6.1f}/cpu-s)", flush=True)
                for bag_size in args.bag_sizes:
                    for w in args.workers:
                        rate = ours_bags_per_s(paths, head, args.dim, args.patches, args.epochs, w, bag_size, args.repeats)
                        bound = bound_bags_per_s(head, args.dim, bag_size, len(paths))
                        row[f"ours_bag{bag_size}_workers{w}"] = rate
                        row[f"bound_bag{bag_size}"] = bound
                        print(f"{'':10s} ours bag_size={bag_size} workers={w}: {rate[0]:6.1f} bags/s "
                              f"(runs {rate[2]:.0f}-{rate[3]:.0f}; {rate[1]:6.1f}/cpu-s), "
                              f"{rate[0] / base[0]:5.1f}x the baseline; model alone {bound[0]:6.1f} steps/s "
                              f"({bound[1]:6.1f}/cpu-s), ours / bound {rate[0] / bound[0]:4.2f} "
                              f"(per cpu-s {rate[1] / bound[1]:4.2f})", flush=True)
                results[f"{head}_threads{threads}"] = row

        if DEVICE.type == "cuda":
            print(json.dumps(results, indent=1, default=lambda v: round(v, 2)))
            return
        big = write_synthetic_store(Path(tmp) / "big.h5",
                                  np.random.default_rng(1).standard_normal((args.big, args.dim), dtype=np.float32)
                                  .astype(args.dtype))
        ctx = mp.get_context("spawn")
        for head in ("abmil", "pathotune"):
            for mode in ("train", "predict"):
                with ctx.Pool(1) as pool:
                    mem = pool.map(_memory_case, [(str(big), head, mode, args.dim)])[0]
                print(f"{head:10s} {mode:7s} one {args.big}-patch bag: peak RSS {mem['peak_mib']:.0f} MiB "
                      f"({mem['above_start_mib']:.0f} MiB above start), {mem['seconds']:.2f}s")
                results[f"{head}_{mode}_{args.big}"] = mem
    print(json.dumps(results, indent=1, default=lambda v: round(v, 2)))


if __name__ == "__main__":
    main()
