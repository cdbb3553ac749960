"""Feature-extraction benchmark: the whole path against the model alone, in one run.

- model alone: the encoder's forward pass on random tensors already on the device (batch after
  batch, same batch size, autocast and channels-last as extraction uses): the bound;
- loader alone: the data path without the model (read, decode, copy to the device);
- whole path: ``extract_features`` on a patch store of N tiles (zarr read and decode in DataLoader
  workers, pinned host->device copies, preprocessing, forward pass, h5 write).

Prints patches/s of each and the ratio (target >= 0.85 on a GPU). The patch store is synthetic
(224 px crops of the bundled tissue texture) unless ``--store`` names one. Weights do not change
the speed, so ``--random-weights`` (automatic when a card's files are absent) builds the card's
architecture with random weights; ``--precision`` overrides the card's autocast dtype.

    python benchmarks/bench_features.py                       # CPU, efficientnet-lite0, 256 tiles
    python benchmarks/bench_features.py --device cuda --encoder puzzletuning-vitb16 \\
        --precision bf16 --tiles 16384 --batch-size 512 --workers 8 [--compile]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsitools.encoders import build_encoder, find_card
from wsitools.features import extract_features, tile_loader
from wsitools.io import loader_workers
from wsitools.store import PatchStore, write_patch_store
from wsitools.synthetic import texture


def synthetic_store(path: Path, n: int, size: int = 224) -> Path:
    """A patch store of ``n`` random crops of the tissue texture (pixels stored, zarr chunks of 64)."""
    tex = texture("tissue")
    rng = np.random.default_rng(0)
    xy = rng.integers(0, tex.shape[0] - size, size=(n, 2))
    tiles = np.stack([tex[y : y + size, x : x + size] for x, y in xy])
    attrs = dict(slide_id="bench", slide_path="/synthetic/bench.svs", params_hash="bench",
                 tile_size=size, tile_size_level0=2.0 * size, mpp_target=0.5)
    return write_patch_store(path, coords=xy * 2, tiles=tiles, tissue_fraction=np.ones(n), attrs=attrs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_alone(encoder, *, batch_size: int, batches: int, compile: bool) -> float:
    """Patches/s of the forward pass on random inputs already on the device."""
    size = encoder.input_size
    x = torch.rand(batch_size, 3, size, size, device=encoder.device).contiguous(memory_format=torch.channels_last)
    forward = torch.compile(encoder.forward_batch, dynamic=False) if compile else encoder.forward_batch
    with torch.inference_mode(), encoder.autocast():
        for _ in range(3):  # warm-up (cudnn autotune, compilation)
            forward(x)
        sync(encoder.device)
        start = time.perf_counter()
        for _ in range(batches):
            forward(x)
        sync(encoder.device)
    return batches * batch_size / (time.perf_counter() - start)


def loader_alone(store: PatchStore, device: torch.device, *, batch_size: int, workers: int) -> float:
    """Patches/s of the data path without the model: read and decode in the loader workers,
    pinned hand-over and the copy to the device (its capacity: the whole path cannot beat it)."""
    start = time.perf_counter()
    for tiles in tile_loader(store, batch_size=batch_size, workers=workers, pin_memory=device.type == "cuda"):
        tiles.to(device, non_blocking=True)
    sync(device)
    return len(store) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="efficientnet-lite0-imagenet", help="card name or card file")
    ap.add_argument("--models-dir", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None, help="override the card's autocast dtype")
    ap.add_argument("--random-weights", action="store_true", help="random weights (speed is the same)")
    ap.add_argument("--tiles", type=int, default=256, help="tiles in the synthetic store")
    ap.add_argument("--store", type=Path, default=None, help="use this patch store instead")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="whole-path runs (the best is reported)")
    args = ap.parse_args()

    card = find_card(args.encoder, models_dir=args.models_dir)
    if args.random_weights or not all(w.path.is_file() for w in card.weights):
        print(f"{card.name}: random weights (files absent or --random-weights)")
        card = dataclasses.replace(card, weights=(), init_seed=0)
    if args.precision:
        card = dataclasses.replace(card, compute_precision=args.precision)
    encoder = build_encoder(card, device=args.device)
    workers = loader_workers() if args.workers is None else args.workers
    gpu = torch.cuda.get_device_name(encoder.device) if encoder.device.type == "cuda" else "no GPU"
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {gpu}")
    print(f"encoder {card.name} ({card.model}), device {encoder.device}, autocast {encoder.amp_dtype}, "
          f"batch {args.batch_size}, workers {workers}, compile {args.compile}")

    with tempfile.TemporaryDirectory() as tmp:
        store_path = args.store or synthetic_store(Path(tmp) / "tiles" / "bench.zarr", args.tiles)
        store = PatchStore.open(store_path)
        n = len(store)
        batches = max(3, min(50, n // args.batch_size))
        alone = model_alone(encoder, batch_size=args.batch_size, batches=batches, compile=args.compile)
        print(f"model alone : {alone:10.1f} patches/s ({batches} batches of {args.batch_size} random tensors on {encoder.device})")
        feed = loader_alone(store, encoder.device, batch_size=args.batch_size, workers=workers)
        print(f"loader alone: {feed:10.1f} patches/s (read + decode in {workers} workers, on {encoder.device})")
        best = 0.0
        for i in range(args.repeats):
            start = time.perf_counter()
            extract_features(store, encoder, Path(tmp) / "features", batch_size=args.batch_size,
                             workers=workers, compile=args.compile, overwrite=True)
            rate = n / (time.perf_counter() - start)
            best = max(best, rate)
            print(f"whole path  : {rate:10.1f} patches/s (run {i + 1}: {n} tiles, store -> model -> h5)")
    print(f"ratio whole path / model alone: {best / alone:.2f} (target >= 0.85 on a GPU)")


if __name__ == "__main__":
    main()
