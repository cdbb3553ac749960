"""Feature extraction: patch store -> encoder -> h5 feature store ``{out_root}/{encoder}/{slide_id}.h5``.

Tiles are read by DataLoader workers in contiguous batches (whole zarr chunks, decoded to pixels
by :meth:`PatchStore.read_tiles` whatever the store's codec; a coords-only store reads its slide),
handed over in pinned memory and copied to the device without blocking, so the
next batch is decoded while the current one runs. On the device the encoder's card recipe applies
(scale to [0, 1], resize, normalise), the network runs under ``torch.inference_mode`` with the
card's autocast dtype on a GPU, channels-last, optionally ``torch.compile``-d, and the features
accumulate on the device (no per-batch synchronisation) until one copy back at the end.

Features are stored float32 by default, the dtype CLAM's and TRIDENT's heads take as they are;
float16 (``dtype="float16"``) halves the disk. The ``coords`` dataset carries the attributes
CLAM and TRIDENT read there (:func:`interop_attrs`), so their readers take a feature store as it is.

The h5 file is written through :mod:`wsitools.feature_store` (which owns the format: under a
temporary name, renamed when complete). An existing file is reused when its ``encoder_hash``,
``store_hash`` and dtype match and its coordinates equal the store's; otherwise it is recomputed.
Layout and attributes: docs/formats.md.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsitools.encoders.loading import Encoder
from wsitools.errors import ModelError, StoreError
from wsitools.feature_store import check_target, feature_attrs, feature_store_path, reusable, write_feature_store
from wsitools.io import loader_workers
from wsitools.store import PatchStore
from wsitools.types import DEFAULT_FEATURE_DTYPE, FEATURE_DTYPES, FeatureDtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractResult:
    """Outcome of one store: where the features are and whether they were computed or reused."""

    path: Path
    slide_id: str
    n_tiles: int
    status: Literal["computed", "reused"]
    seconds: float

    @property
    def patches_per_s(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else float("nan")


class TileBatches(Dataset):
    """Contiguous batches ``[b, S, S, 3]`` uint8 of a patch store (one item per batch)."""

    def __init__(self, store: PatchStore, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.store = store
        self.batch_size = batch_size
        self.n = len(store)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.batch_size
        return torch.from_numpy(self.store.read_tiles(slice(start, min(self.n, start + self.batch_size))))


def tile_loader(store: PatchStore, *, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """The DataLoader that feeds extraction (exposed for the benchmark)."""
    return DataLoader(
        TileBatches(store, batch_size),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )


def compute_features(
    store: PatchStore,
    encoder: Encoder,
    *,
    batch_size: int = 128,
    workers: int | None = None,
    compile: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """Features ``[N, D]`` float32 of every tile of ``store``, in store order."""
    from tqdm import tqdm

    device = encoder.device
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # the fastest convolution algorithms; TF32 matmuls stay off
    forward = torch.compile(encoder.forward_batch, dynamic=False) if compile else encoder.forward_batch
    n = len(store)
    loader = tile_loader(
        store,
        batch_size=batch_size,
        workers=loader_workers() if workers is None else workers,
        pin_memory=cuda,
    )
    out = torch.empty((n, encoder.dim), dtype=torch.float32, device=device)
    pos = 0
    with torch.inference_mode(), tqdm(
        total=n, unit="patch", unit_scale=True, desc=store.slide_id, disable=not progress, leave=False
    ) as bar:
        for tiles in loader:
            n_tiles = len(tiles)
            if compile and n_tiles < batch_size:  # one shape for the compiled graph: no recompiling per slide
                tiles = torch.cat([tiles, tiles.new_zeros((batch_size - n_tiles, *tiles.shape[1:]))])
            with encoder.autocast():
                feats = forward(encoder.preprocess(tiles))
            out[pos : pos + n_tiles] = feats[:n_tiles]
            pos += n_tiles
            bar.update(n_tiles)
    if pos != n:
        raise StoreError(f"{store.path}: read {pos} tiles but the store holds {n}")
    return out.cpu().numpy()


def as_stored(features: np.ndarray, dtype: FeatureDtype, *, source: Path, encoder: str) -> np.ndarray:
    """``features`` in the stored dtype; :class:`ModelError` naming ``source`` when a value is not
    finite (an encoder that diverged, or a value beyond float16's range of 65504)."""
    with np.errstate(over="ignore"):  # an overflow is reported below, naming the store
        stored = features.astype(dtype, copy=False)
    finite = np.isfinite(stored).all(axis=1)
    if not finite.all():
        bad = int((~finite).sum())
        hint = " (beyond float16's range: store float32)" if np.isfinite(features[~finite]).all() else ""
        raise ModelError(f"{source}: encoder {encoder!r} produced non-finite {dtype} features for {bad} tiles{hint}")
    return stored


def extract_features(
    store: str | os.PathLike[str] | PatchStore,
    encoder: Encoder,
    out_root: str | os.PathLike[str],
    *,
    batch_size: int = 128,
    workers: int | None = None,
    compile: bool = False,
    dtype: FeatureDtype = DEFAULT_FEATURE_DTYPE,
    overwrite: bool = False,
    progress: bool = False,
) -> ExtractResult:
    """Write (or reuse) ``{out_root}/{encoder.name}/{slide_id}.h5`` for one patch store.

    Args:
        store: a patch store path or an open :class:`PatchStore` (unfinished stores raise
            :class:`StoreError`, and so does a feature store path that is a directory or whose
            folder cannot be made, before any work: :func:`check_target`).
        encoder: from :func:`wsitools.encoders.load_encoder`.
        out_root: the features root.
        batch_size: tiles per forward pass (and per DataLoader item).
        workers: DataLoader workers (default :func:`wsitools.io.loader_workers`; 0 reads in this process).
        compile: ``torch.compile`` the forward pass (worth it on a GPU for large cohorts; the
            last batch is padded to ``batch_size`` so that one compiled graph serves every slide).
        dtype: the stored dtype of ``features``: float32, or float16 for half the disk.
        overwrite: recompute even if a matching feature store exists.
        progress: show a tqdm bar with patches/s.
    """
    start = time.perf_counter()
    store = store if isinstance(store, PatchStore) else PatchStore.open(store)
    path = check_target(feature_store_path(out_root, encoder.name, store.slide_id))
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(FEATURE_DTYPES)}, not {dtype!r}")
    if not overwrite and path.exists() and reusable(path, store, encoder, dtype):
        return ExtractResult(path, store.slide_id, len(store), "reused", time.perf_counter() - start)
    if len(store) == 0:
        log.warning("%s: patch store has no tiles; writing an empty feature store", store.path)
    elif not store.has_pixels:
        store.check_slide()  # here, once, rather than in every DataLoader worker
    features = compute_features(store, encoder, batch_size=batch_size, workers=workers, compile=compile, progress=progress)
    stored = as_stored(features, dtype, source=store.path, encoder=encoder.name)
    write_feature_store(path, stored, store.coords, feature_attrs(store, encoder))
    seconds = time.perf_counter() - start
    log.debug("%s: %d tiles in %.1f s (%.0f patches/s)", path, len(store), seconds, len(store) / max(seconds, 1e-9))
    return ExtractResult(path, store.slide_id, len(store), "computed", seconds)
