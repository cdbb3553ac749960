"""Random tiles across patch stores, as uint8 batches with their random crops and flips, for
pretraining; the trainer makes them [0, 1] floats and augments them on its device
(:func:`augmented`), so the loader workers only read and decode.

Patch stores keep tiles in chunk files of 64 (64 JPEGs, or 64 tiles compressed together), so
reading tiles one at a time in random order would read (and for lossless stores decompress) a
whole chunk for every tile. Instead each epoch shuffles *blocks* of consecutive tiles (a chunk, or
less when windows are small) across all stores, cuts the resulting stream into windows of whole
batches, shuffles the tiles inside each window, and reads each block once. A batch thus mixes
tiles from many blocks of many slides while every chunk is read once per epoch.

Everything random (block order, tile order, crops, flips) is a pure function of
``(seed, epoch, window)``, so a resumed run sees exactly the batches it would have seen, and
DataLoader workers (each taking every k-th window) need no shared random state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from wsitools.encoders.transforms import apply_crops, draw_crops, to_unit_float
from wsitools.errors import StoreError
from wsitools.store import CHUNK_TILES, PatchStore, find_patch_stores

MIN_BLOCKS_PER_WINDOW = 8
"""A window of batches draws its tiles from at least this many blocks (store chunks or parts)."""


def open_stores(paths: Sequence[str | os.PathLike[str]]) -> list[PatchStore]:
    """Open every patch store among ``paths`` (store directories, or folders holding ``*.zarr``).

    Stores with no tiles are skipped, and a store found twice (a folder given twice, or a store
    and its folder) is taken once; a store without pixels is still readable (from its slide),
    whose slide must be the file it was tiled from (:meth:`PatchStore.check_slide`, here, once:
    a missing slide fails before training, not when an epoch first reads it).
    Raises :class:`StoreError` when nothing usable is found.
    """
    stores = list({s.path: s for s in map(PatchStore.open, find_patch_stores(paths))}.values())
    stores = [s for s in stores if len(s) > 0]
    if not stores:
        raise StoreError(f"no patch store with tiles under {', '.join(map(str, paths))}")
    for s in stores:
        if not s.has_pixels:
            s.check_slide()
    return stores


@dataclass(frozen=True)
class _Window:
    index: int
    tiles: np.ndarray  # [n, 2] (store number, tile index), already in batch order


def augmented(batch: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """A :class:`TileStream` batch on ``device`` as [B, 3, S, S] floats in [0, 1], its crops and
    flips applied there."""
    tiles, crops = batch
    x = tiles.to(device, non_blocking=True).float().div_(255.0).permute(0, 3, 1, 2)
    return x.contiguous() if crops is None else apply_crops(x, crops, size=x.shape[-1])


class TileStream(IterableDataset):
    """Batches of random tiles across patch stores, uint8 [B, size, size, 3] with their crops
    and flips (:meth:`batches`; see the module doc).

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

    def read_window(self, window: _Window) -> np.ndarray:
        """Read a window's tiles (each store once, its tiles in sorted order): [n, size, size, 3]
        uint8. Tiles of another size than the model's input are resized (antialiased) first."""
        size = self.image_size
        out = np.empty((len(window.tiles), size, size, 3), np.uint8)
        for s in np.unique(window.tiles[:, 0]):
            rows = np.nonzero(window.tiles[:, 0] == s)[0]
            idx = window.tiles[rows, 1]
            sort = np.argsort(idx, kind="stable")
            tiles = self.stores[int(s)].read_tiles(idx[sort])
            if tiles.shape[1:3] != (size, size):
                x = to_unit_float(tiles, size=size).permute(0, 2, 3, 1)
                tiles = x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
            out[rows[sort]] = tiles
        return out

    def batches(self, window: _Window) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The window's batches: tiles [B, size, size, 3] uint8 and their augmentation, the
        crop and flip rows of :func:`draw_crops` (None without augmentation), which the trainer
        applies (:func:`augmented`) on its device: the per-image resizing is most of the cost."""
        tiles = torch.from_numpy(self.read_window(window))
        gen = torch.Generator().manual_seed(int(self._rng(7, window.index).integers(2**62)))
        for start in range(0, len(tiles), self.batch_size):
            batch = tiles[start : start + self.batch_size]
            crops = draw_crops(len(batch), self.image_size, self.image_size, generator=gen) if self.augment else None
            yield batch, crops

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for window in self.windows()[worker::workers]:
            yield from self.batches(window)
