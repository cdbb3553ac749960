"""Random tiles across patch stores, augmented, as [0, 1] float batches for pretraining.

Patch stores keep tiles in compressed chunks of 64, so reading tiles one at a time in random
order would decompress a whole chunk for every tile. Instead each epoch shuffles *blocks* of
consecutive tiles (a chunk, or less when windows are small) across all stores, cuts the resulting
stream into windows of whole batches, shuffles the tiles inside each window, and reads each block
once. A batch thus
mixes tiles from many blocks of many slides while every chunk is decoded once per epoch.

Everything random (block order, tile order, crops, flips) is a pure function of
``(seed, epoch, window)``, so a resumed run sees exactly the batches it would have seen, and
DataLoader workers (each taking every k-th window) need no shared random state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from wsitools.encoders import EncoderCard
from wsitools.errors import StoreError
from wsitools.store import CHUNK_TILES, PatchStore

MIN_BLOCKS_PER_WINDOW = 8
"""A window of batches draws its tiles from at least this many blocks (store chunks or parts)."""


def random_resized_crop_flip(
    tiles: torch.Tensor,
    *,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.8, 1.0),
) -> torch.Tensor:
    """RandomResizedCrop (square crops, area fraction in ``scale``) + left-right and top-bottom flips.

    ``tiles``: [B, 3, S, S] float in [0, 1]. Each tile gets its own square crop covering a
    uniform fraction ``scale`` of its area at a uniform position, resized to ``size`` x ``size``
    (antialiased bicubic, clamped to [0, 1]), then flipped left-right and top-bottom each with
    probability 0.5 (the PuzzleTuning recipe: square crops, both flips, no normalisation).
    Returns [B, 3, size, size].
    """
    b, _, h, w = tiles.shape
    area = torch.empty(b).uniform_(*scale, generator=generator) * h * w
    side = torch.sqrt(area).round().clamp(1, min(h, w)).long()
    u = torch.rand(b, 2, generator=generator)
    x0 = (u[:, 0] * (w - side + 1)).floor().long()
    y0 = (u[:, 1] * (h - side + 1)).floor().long()
    flips = torch.rand(b, 2, generator=generator) < 0.5
    out = torch.empty(b, 3, size, size, dtype=tiles.dtype)
    for i in range(b):  # one crop box per image: a loop over images, not pixels
        crop = tiles[i : i + 1, :, y0[i] : y0[i] + side[i], x0[i] : x0[i] + side[i]]
        img = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
        if flips[i, 0]:
            img = img.flip(-1)
        if flips[i, 1]:
            img = img.flip(-2)
        out[i] = img
    return out.clamp_(0.0, 1.0)


def to_unit_float(tiles: np.ndarray, *, size: int | None = None) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> float32 [B, 3, S, S] in [0, 1], resized to ``size`` if given."""
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float().div_(255.0)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def _mean_std(card: EncoderCard, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    if card.mean is None or card.std is None:
        return None
    mean = torch.tensor(card.mean, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)
    std = torch.tensor(card.std, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)
    return mean, std


def prepare_input(card: EncoderCard, x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images [B, 3, H, W] -> an encoder card's model input: resized to its input size
    (antialiased, its interpolation) when needed, then its mean/std (none for PuzzleTuning)."""
    size = card.input_size
    if tuple(x01.shape[-2:]) != (size, size):
        x01 = F.interpolate(
            x01, size=(size, size), mode=card.interpolation, antialias=True, align_corners=False
        ).clamp(0, 1)
    ms = _mean_std(card, x01)
    return x01 if ms is None else (x01 - ms[0]) / ms[1]


def unnormalize(card: EncoderCard, x: torch.Tensor) -> torch.Tensor:
    """Undo a card's mean/std: model input -> [0, 1] pixels (at the card's input size)."""
    ms = _mean_std(card, x)
    return x if ms is None else x * ms[1] + ms[0]


def open_stores(paths: Sequence[str | os.PathLike[str]]) -> list[PatchStore]:
    """Open every patch store among ``paths`` (store directories, or folders holding ``*.zarr``).

    Stores with no tiles are skipped; a store without pixels is still readable (from its slide).
    Raises :class:`StoreError` when nothing usable is found.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.suffix == ".zarr":
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(q for q in p.glob("*.zarr") if not q.name.startswith(".")))
        else:
            raise StoreError(f"{p}: not a patch store (*.zarr) nor a folder of patch stores")
    stores = [PatchStore.open(p) for p in found]
    stores = [s for s in stores if len(s) > 0]
    if not stores:
        raise StoreError(f"no patch store with tiles under {', '.join(map(str, paths))}")
    return stores


@dataclass(frozen=True)
class _Window:
    index: int
    tiles: np.ndarray  # [n, 2] (store number, tile index), already in batch order


class TileStream(IterableDataset):
    """Augmented batches [B, 3, size, size] of random tiles across patch stores (see module doc).

    Use with ``DataLoader(stream, batch_size=None, num_workers=k)``; call :meth:`set_epoch`
    before iterating. An epoch is ``steps`` batches (default: every tile once, remainder dropped).
    """

    def __init__(
        self,
        stores: Sequence[PatchStore],
        *,
        batch_size: int,
        image_size: int,
        seed: int = 0,
        steps: int | None = None,
        batches_per_window: int = 16,
        augment: bool = True,
    ) -> None:
        self.stores = list(stores)
        self.lengths = np.array([len(s) for s in self.stores], dtype=np.int64)
        self.batch_size = batch_size
        self.image_size = image_size
        self.seed = seed
        self.batches_per_window = batches_per_window
        self.augment = augment
        full = int(self.lengths.sum()) // batch_size
        if full < 1:
            raise StoreError(
                f"the patch stores hold {int(self.lengths.sum())} tiles, fewer than one batch of {batch_size}"
            )
        self.steps = full if steps is None else steps
        if self.steps < 1:
            raise StoreError(f"steps per epoch must be at least 1, got {self.steps}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *keys])

    def windows(self) -> list[_Window]:
        """This epoch's plan: windows of whole batches of (store, tile) pairs, a pure function of
        (seed, epoch). Blocks of consecutive tiles (one chunk, or less so that a window holds at
        least 8 blocks) are shuffled across stores; when an epoch needs more tiles than the
        stores hold, the block order is drawn again."""
        need = self.steps * self.batch_size
        per_window = self.batches_per_window * self.batch_size
        # A window mixes at least MIN_BLOCKS_PER_WINDOW blocks; a block is at most one chunk.
        block = max(1, min(CHUNK_TILES, per_window // MIN_BLOCKS_PER_WINDOW))
        blocks = [
            (s, start, min(start + block, n))
            for s, n in enumerate(self.lengths.tolist())
            for start in range(0, n, block)
        ]
        parts: list[np.ndarray] = []
        have, draw = 0, 0
        while have < need:
            order = self._rng(1_000_003, draw).permutation(len(blocks))
            for b in order:
                s, start, stop = blocks[b]
                idx = np.arange(start, stop, dtype=np.int64)
                parts.append(np.stack([np.full_like(idx, s), idx], axis=1))
                have += stop - start
                if have >= need:
                    break
            draw += 1
        stream = np.concatenate(parts)[:need]
        out = []
        for w, start in enumerate(range(0, need, per_window)):
            tiles = stream[start : start + per_window]
            out.append(_Window(w, tiles[self._rng(w).permutation(len(tiles))]))
        return out

    def read_window(self, window: _Window) -> torch.Tensor:
        """Read a window's tiles (each store once, its tiles in sorted order): [n, 3, size, size]."""
        out = torch.empty(len(window.tiles), 3, self.image_size, self.image_size)
        for s in np.unique(window.tiles[:, 0]):
            rows = np.nonzero(window.tiles[:, 0] == s)[0]
            idx = window.tiles[rows, 1]
            sort = np.argsort(idx, kind="stable")
            # Tiles of another size than the model's input are resized first (then cropped).
            x = to_unit_float(self.stores[int(s)].read_tiles(idx[sort]), size=self.image_size)
            out[torch.from_numpy(rows[sort])] = x
        return out

    def batches(self, window: _Window) -> Iterator[torch.Tensor]:
        tiles = self.read_window(window)
        gen = torch.Generator().manual_seed(int(self._rng(7, window.index).integers(2**62)))
        for start in range(0, len(tiles), self.batch_size):
            batch = tiles[start : start + self.batch_size]
            if self.augment:
                batch = random_resized_crop_flip(batch, size=self.image_size, generator=gen)
            yield batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for window in self.windows()[worker::workers]:
            yield from self.batches(window)
