"""PuzzleTuning pretraining benchmark: our training loop against its bound and a naive loader.

All in one run, on the same model, batch size and device:

- bound: the training step alone (puzzle + forward + backward + AdamW step) on one batch already
  on the device, step after step;
- ours: ``train_puzzle`` end to end: block-shuffled windows of tiles read from patch stores by
  DataLoader workers, RandomResizedCrop + flips, puzzle, step (checkpoint writing not timed);
- naive: the same step fed by a per-tile random-access loader (one zarr read per tile, as an
  ImageFolder-style dataset would do), same workers and augmentation;
- loaders only: our tile stream against the naive loader, no model (the data path's own speed);
- puzzle only: ``fix_position_shuffle`` against a per-image, per-patch Python loop.

Prints images/s of each (best of ``--repeats`` rounds, the order rotated each round) and the
ratios. The patch stores are synthetic (224 px crops of the
bundled tissue texture). Weights do not change the speed, so the backbone has random weights.

    python benchmarks/bench_pretrain.py                                   # CPU, tiny ViT
    python benchmarks/bench_pretrain.py --device cuda --model vitb16 --precision bf16 \\
        --batch-size 64 --steps 60 --tiles 8192 --workers 8
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsitools.puzzle import PuzzleTuningModel, fix_position_shuffle
from wsitools.puzzle.backbone import load_puzzle_backbone
from wsitools.encoders.transforms import prepare_input, random_resized_crop_flip, to_unit_float
from wsitools.puzzle.data import TileStream, augmented, open_stores
from wsitools.puzzle.train import PuzzleTrainConfig, train_puzzle
from wsitools.store import write_patch_store
from wsitools.synthetic import texture
from wsitools.training import adamw

CARDS = {
    # The tiny test model at 224 px (196 tokens, width 64, 3 blocks), deep prompts [3, 20, 64].
    "tiny": ("prompted_vit_test_patch16_224", 64, 20),
    # ViT-B/16 as in the paper: deep prompts [12, 20, 768].
    "vitb16": ("prompted_vit_base_patch16_224", 768, 20),
}
DECODERS = {"paper": (512, 8, 16), "small": (128, 2, 4)}


def write_card(path: Path, model: str) -> Path:
    timm_name, dim, tokens = CARDS[model]
    path.write_text(
        f"name: bench-{model}\narchitecture: {{model: {timm_name}, prompts: {{tokens: {tokens}, mode: deep}}, "
        f"init_seed: 0}}\nweights: []\ninput: {{size: 224, normalize: null}}\n"
        f"output: {{kind: cls, dim: {dim}}}\nprecision: {{compute: bf16}}\n"
    )
    return path


def synthetic_stores(folder: Path, n_tiles: int, n_stores: int = 4, size: int = 224) -> Path:
    tex = texture("tissue")
    rng = np.random.default_rng(0)
    for s in range(n_stores):
        n = n_tiles // n_stores
        xy = rng.integers(0, tex.shape[0] - size, size=(n, 2))
        tiles = np.stack([tex[y : y + size, x : x + size] for x, y in xy])
        write_patch_store(folder / f"bench{s}.zarr", coords=xy * 2, tiles=tiles, tissue_fraction=np.ones(n),
                          attrs=dict(slide_id=f"bench{s}", slide_path=f"/synthetic/bench{s}.svs", params_hash="bench",
                                     tile_size=size, tile_size_level0=2.0 * size, mpp_target=0.5))
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NaiveTiles(Dataset):
    """One random-access zarr read per tile (decodes a whole chunk for each tile)."""

    def __init__(self, stores):
        self.stores = stores
        self.index = [(s, i) for s, st in enumerate(stores) for i in range(len(st))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> torch.Tensor:
        s, i = self.index[k]
        x = to_unit_float(self.stores[s].read_tiles(np.array([i])))
        return random_resized_crop_flip(x, size=224, generator=torch.Generator().manual_seed(k))[0]


def build(card: Path, device: str, decoder: tuple[int, int, int]):
    bb = load_puzzle_backbone(str(card), device=device)
    model = PuzzleTuningModel(bb.model, decoder_dim=decoder[0], decoder_depth=decoder[1],
                              decoder_heads=decoder[2]).to(bb.device).train()
    opt = adamw(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95), decay="matrices")
    return bb, model, opt


def step(bb, model, opt, batch, amp, gen) -> None:
    puzzled, mask = fix_position_shuffle(batch, ratio=0.25, patch_size=32, group_size=batch.shape[0], generator=gen)
    ctx = torch.autocast(bb.device.type, dtype=amp) if amp else contextlib.nullcontext()
    with ctx:
        out = model(batch, prepare_input(bb.card, puzzled), mask)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bound(card, device, decoder, batch_size, steps, amp) -> float:
    bb, model, opt = build(card, device, decoder)
    batch = torch.rand(batch_size, 3, 224, 224, device=bb.device)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        step(bb, model, opt, batch, amp, gen)
    sync(bb.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(bb, model, opt, batch, amp, gen)
    sync(bb.device)
    return steps * batch_size / (time.perf_counter() - t0)


def forward_backward(card, device, decoder, batch_size, steps, amp) -> float:
    """The step's forward and backward alone: one puzzled batch prepared once, no optimiser step."""
    bb, model, _ = build(card, device, decoder)
    batch = torch.rand(batch_size, 3, 224, 224, device=bb.device)
    puzzled, mask = fix_position_shuffle(batch, ratio=0.25, patch_size=32, group_size=batch_size,
                                         generator=torch.Generator().manual_seed(0))
    puzzled = prepare_input(bb.card, puzzled)
    ctx = torch.autocast(bb.device.type, dtype=amp) if amp else contextlib.nullcontext()

    def once() -> None:
        with ctx:
            out = model(batch, puzzled, mask)
        out.loss.backward()

    for _ in range(2):
        once()
    sync(bb.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        once()
    sync(bb.device)
    return steps * batch_size / (time.perf_counter() - t0)


def largest_batch(card, device, decoder, amp, start: int, limit: int = 8192) -> list[tuple[int, float | None]]:
    """Peak GPU memory (GiB) of two full steps at ``start``, doubling the batch until one does not
    fit (None) or ``limit`` is passed."""
    rows: list[tuple[int, float | None]] = []
    b = start
    while b <= limit:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            bound(card, str(device), decoder, b, 2, amp)
            rows.append((b, torch.cuda.max_memory_allocated(device) / 2**30))
        except torch.OutOfMemoryError:
            rows.append((b, None))
            break
        finally:
            torch.cuda.empty_cache()
        b *= 2
    return rows


def naive(card, stores, device, decoder, batch_size, steps, amp, workers) -> float:
    bb, model, opt = build(card, device, decoder)
    loader = DataLoader(NaiveTiles(open_stores([stores])), batch_size=batch_size, shuffle=True,
                        num_workers=workers, drop_last=True, pin_memory=bb.device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    done = 0
    t0 = time.perf_counter()
    while done < steps:
        for batch in loader:
            step(bb, model, opt, batch.to(bb.device, non_blocking=True), amp, gen)
            done += 1
            if done == steps:
                break
    sync(bb.device)
    return steps * batch_size / (time.perf_counter() - t0)


def loaders_only(stores, device: torch.device, batch_size: int, batches: int, workers: int) -> tuple[float, float]:
    """Images/s of our tile stream and of the naive loader alone (read, decode, crop, flip: ours
    crops on ``device``, as training does, the naive loader in its workers)."""
    opened = open_stores([stores])
    ours = DataLoader(TileStream(opened, batch_size=batch_size, image_size=224, steps=batches),
                      batch_size=None, num_workers=workers)
    naive_loader = DataLoader(NaiveTiles(opened), batch_size=batch_size, shuffle=True,
                              num_workers=workers, drop_last=True)
    rates = []
    for loader in (ours, naive_loader):
        t0 = time.perf_counter()
        n = 0
        for i, batch in enumerate(loader):
            n += (augmented(batch, device) if isinstance(batch, (tuple, list)) else batch).shape[0]
            if i + 1 == batches:
                break
        sync(device)
        rates.append(n / (time.perf_counter() - t0))
    return rates[0], rates[1]


def puzzle_loop(images: torch.Tensor, ratio: float, p: int, gen: torch.Generator) -> torch.Tensor:
    """Reference puzzle with Python loops over images and patches (the same puzzle semantics)."""
    b, _, h, w = images.shape
    grid = [(y, x) for y in range(0, h, p) for x in range(0, w, p)]
    n_fixed = int(len(grid) * ratio)
    slots, pool = [], []
    for i in range(b):
        order = torch.randperm(len(grid), generator=gen).tolist()
        for k in order[n_fixed:]:
            y, x = grid[k]
            slots.append((i, y, x))
            pool.append(images[i, :, y : y + p, x : x + p].clone())
    out = images.clone()
    for (i, y, x), k in zip(slots, torch.randperm(len(pool), generator=gen).tolist()):
        out[i, :, y : y + p, x : x + p] = pool[k]
    return out


def puzzle_only(device: torch.device, batch_size: int, repeats: int = 5) -> tuple[float, float]:
    x = torch.rand(batch_size, 3, 224, 224, device=device)
    gen = torch.Generator().manual_seed(0)
    timings = []
    for fn in (lambda: fix_position_shuffle(x, ratio=0.25, patch_size=16, group_size=batch_size, generator=gen),
               lambda: puzzle_loop(x, 0.25, 16, gen)):
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
        timings.append(repeats * batch_size / (time.perf_counter() - t0))
    return timings[0], timings[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(CARDS), default="tiny")
    ap.add_argument("--decoder", choices=sorted(DECODERS), default=None,
                    help="decoder size (default: small for tiny, paper for vitb16)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12, help="timed optimiser steps per variant")
    ap.add_argument("--tiles", type=int, default=1024, help="tiles in the synthetic stores")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every variant, order rotated (best kept)")
    ap.add_argument("--largest-batch", action="store_true",
                    help="on a GPU, also double the batch from --batch-size until a step does not fit")
    args = ap.parse_args()

    device = torch.device(args.device)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    decoder = DECODERS[args.decoder or ("small" if args.model == "tiny" else "paper")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        card = write_card(root / "card.yaml", args.model)
        stores = synthetic_stores(root / "tiles", args.tiles)
        config = PuzzleTrainConfig(
            epochs=1, warmup_epochs=0, batch_size=args.batch_size, steps_per_epoch=args.steps,
            decoder_dim=decoder[0], decoder_depth=decoder[1], decoder_heads=decoder[2],
            num_workers=args.workers, precision=args.precision if device.type == "cuda" else "fp32",
            patch_sizes=(32,), warmup_patch_size=32,
        )
        best = {k: 0.0 for k in ("bound", "fwd_bwd", "ours", "naive", "load_ours", "load_naive", "p_ours", "p_loop")}
        mem = None

        def run_bound(r: int) -> None:
            best["bound"] = max(best["bound"], bound(card, args.device, decoder, args.batch_size, args.steps, amp))
            best["fwd_bwd"] = max(best["fwd_bwd"], forward_backward(card, args.device, decoder, args.batch_size,
                                                                    args.steps, amp))

        def run_ours(r: int) -> None:
            nonlocal mem
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            run = train_puzzle([stores], root / f"run{r}", backbone=str(card), config=config,
                               device=args.device, progress=False)
            best["ours"] = max(best["ours"], run.images_per_second)
            if device.type == "cuda":
                mem = torch.cuda.max_memory_allocated(device) / 2**30

        def run_naive(r: int) -> None:
            rate = naive(card, stores, args.device, decoder, args.batch_size, args.steps, amp, args.workers)
            best["naive"] = max(best["naive"], rate)

        def run_small(r: int) -> None:
            lo, ln = loaders_only(stores, device, args.batch_size, args.steps, args.workers)
            best["load_ours"], best["load_naive"] = max(best["load_ours"], lo), max(best["load_naive"], ln)
            po, pl = puzzle_only(device, args.batch_size)
            best["p_ours"], best["p_loop"] = max(best["p_ours"], po), max(best["p_loop"], pl)

        fits = largest_batch(card, device, decoder, amp, args.batch_size) if args.largest_batch and device.type == "cuda" else []
        variants = [run_bound, run_ours, run_naive, run_small]
        for r in range(args.repeats):  # rotate the order each round; keep each variant's best run
            for fn in variants[r % 4:] + variants[: r % 4]:
                fn(r)

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"threads {torch.get_num_threads()}, workers {args.workers}")
    print(f"model {args.model}, decoder {decoder}, batch {args.batch_size}, {args.steps} steps, "
          f"precision {args.precision}, 224 px, puzzle patch 32, ratio 0.25")
    b = best
    print(f"bound (step on a batch on the device): {b['bound']:8.1f} images/s")
    print(f"forward+backward alone (no puzzle, no optimiser step): {b['fwd_bwd']:8.1f} images/s   "
          f"bound/fwd+bwd {b['bound'] / b['fwd_bwd']:.2f}")
    print(f"ours  (train_puzzle from stores):      {b['ours']:8.1f} images/s   ours/bound {b['ours'] / b['bound']:.2f}")
    print(f"naive (per-tile random reads):         {b['naive']:8.1f} images/s   ours/naive {b['ours'] / b['naive']:.2f}")
    print(f"loader only, ours (tile stream):       {b['load_ours']:8.1f} images/s")
    print(f"loader only, naive:                    {b['load_naive']:8.1f} images/s   ratio {b['load_ours'] / b['load_naive']:.2f}")
    print(f"puzzle only, ours vectorised:          {b['p_ours']:8.1f} images/s")
    print(f"puzzle only, per-patch loop:           {b['p_loop']:8.1f} images/s   ratio {b['p_ours'] / b['p_loop']:.1f}")
    if mem is not None:
        print(f"peak GPU memory (train_puzzle): {mem:.2f} GiB")
    for size, gib in fits:
        print(f"batch {size:5d}: " + (f"peak GPU memory {gib:.2f} GiB" if gib is not None else "does not fit"))


if __name__ == "__main__":
    main()
