"""Labelled tiles for patch-level prompt tuning, from an image folder or patch stores + a table.

Two sources, one interface (:class:`LabelledTiles`: class names, an integer label per tile, an
optional predefined split, a name per tile, and ``read(i)`` -> uint8 [S, S, 3]):

- an **image folder** with one sub-folder per class (``DIR/CLASS/*.png|jpg|tif``), or with
  ``train/``, ``val/`` and optionally ``test/`` sub-folders each holding class folders (then that
  split is used as given);
- **patch stores + a tile-label table** (CSV with columns ``slide_id,x,y,label`` and optionally
  ``split``): each row names a tile of ``{slide_id}.zarr`` by its level-0 coordinates.

Without a predefined split, :func:`stratified_split` draws one per class (seeded), and
:class:`TileDataset` serves a split's tiles to a DataLoader at the backbone's input size.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from wsitools.encoders.transforms import to_unit_float
from wsitools.errors import DataError, StoreError
from wsitools.labels import classes_from_labels
from wsitools.store import PatchStore, find_patch_stores
from wsitools.types import check_slide_id

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLITS = ("train", "val", "test")


@dataclass
class LabelledTiles(ABC):
    """Tiles with class labels; subclasses say where the pixels come from."""

    classes: tuple[str, ...]
    labels: np.ndarray  # int64 [n], index into classes
    names: list[str]  # one identifier per tile (file path, or slide_id:x:y)
    split: np.ndarray | None  # "train" / "val" / "test" per tile, or None

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def read(self, i: int) -> np.ndarray:
        """Tile ``i`` as uint8 [H, W, 3] RGB."""

    def relabel(self, classes: Sequence[str]) -> LabelledTiles:
        """The same tiles with class indices in the order of ``classes`` (e.g. a task's order)."""
        if set(classes) != set(self.classes):
            raise DataError(
                f"the task's classes {sorted(classes)} differ from the data's {sorted(self.classes)}"
            )
        lookup = np.array([list(classes).index(c) for c in self.classes], dtype=np.int64)
        return dataclasses.replace(self, classes=tuple(classes), labels=lookup[self.labels])


@dataclass
class FolderTiles(LabelledTiles):
    paths: list[Path] | None = None

    def read(self, i: int) -> np.ndarray:
        assert self.paths is not None
        try:
            with Image.open(self.paths[i]) as im:
                return np.array(im.convert("RGB"))
        except OSError as exc:
            raise DataError(f"{self.paths[i]}: not a readable image ({exc})") from None


@dataclass
class StoreTiles(LabelledTiles):
    stores: list[PatchStore] | None = None
    index: np.ndarray | None = None  # [n, 2] (store number, tile index)

    def read(self, i: int) -> np.ndarray:
        assert self.stores is not None and self.index is not None
        s, t = self.index[i]
        return self.stores[int(s)].read_tiles(np.array([t]))[0]


class TileDataset(Dataset):
    """The tiles ``indices`` of ``tiles`` as (float [3, size, size] in [0, 1], label): what a
    DataLoader of one split reads (pixels resized to the backbone's input ``size``)."""

    def __init__(self, tiles: LabelledTiles, indices: np.ndarray, size: int):
        self.tiles, self.indices, self.size = tiles, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        i = int(self.indices[k])
        return to_unit_float(self.tiles.read(i)[None], size=self.size)[0], int(self.tiles.labels[i])


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_tiles(root: str | os.PathLike[str]) -> FolderTiles:
    """Read an image folder (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder of class folders")
    subdirs = {p.name for p in _class_dirs(root)}
    split_layout = {"train", "val"} <= subdirs and subdirs <= set(SPLITS)
    parts = [(root / s, s) for s in SPLITS if (root / s).is_dir()] if split_layout else [(root, None)]
    classes = sorted({d.name for folder, _ in parts for d in _class_dirs(folder)})
    if len(classes) < 2:
        raise DataError(f"{root}: needs at least two class folders, found {classes}")
    paths, labels, split = [], [], []
    for folder, name in parts:
        for d in _class_dirs(folder):
            files = _images(d)
            if not files and not split_layout:  # a class the model would learn to predict without one example
                raise DataError(f"{d}: class folder without images ({', '.join(IMAGE_SUFFIXES)})")
            paths += files
            labels += [classes.index(d.name)] * len(files)
            split += [name] * len(files)
    if not paths:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return FolderTiles(
        classes=tuple(classes),
        labels=np.asarray(labels, np.int64),
        names=[str(p) for p in paths],
        split=np.asarray(split, object) if split_layout else None,
        paths=paths,
    )


def store_tiles(
    table: str | os.PathLike[str],
    stores: Sequence[str | os.PathLike[str]],
    *,
    task_classes: Sequence[str] | None = None,
) -> StoreTiles:
    """Tiles named by a CSV table (``slide_id,x,y,label[,split]``) in patch stores (``*.zarr``
    paths or folders of them). Unknown slides or coordinates, an empty label and a tile listed
    twice are errors naming the table row. Without ``task_classes`` (a task file's classes) the
    labels are the classes, checked as :func:`wsitools.labels.classes_from_labels` checks them
    (a missing-value marker or one number written two ways is no class)."""
    table = Path(table)
    if not table.is_file():
        raise DataError(f"{table}: tile-label table not found")
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        if not {"slide_id", "x", "y", "label"} <= cols:
            raise DataError(f"{table}: needs columns slide_id,x,y,label (has {sorted(cols)})")
        header = len(reader.fieldnames or ())
        rows = [(reader.line_num, r) for r in reader]  # the file's line, whatever blank lines it has
    if not rows:
        raise DataError(f"{table}: no rows")
    by_id: dict[str, PatchStore] = {}
    for q in find_patch_stores(stores):
        s = PatchStore.open(q)
        if s.slide_id in by_id:  # the table's slide ids would name either
            raise DataError(f"{by_id[s.slide_id].path} and {s.path} both hold slide {s.slide_id!r}; "
                            "give one of them")
        by_id[s.slide_id] = s
    if not by_id:
        raise StoreError(f"no patch stores under {', '.join(map(str, stores))}")
    store_list = list(by_id.values())
    number = {sid: i for i, sid in enumerate(by_id)}
    lookups: dict[str, dict[tuple[int, int], int]] = {}
    for line, r in rows:
        if None in r or None in r.values():  # a separator inside a value, or a cut-off row
            fields = sum(v is not None for k, v in r.items() if k is not None) + len(r.get(None) or ())
            raise DataError(f"{table}, line {line}: {fields} fields, but the header has {header}")
    if task_classes is None:
        classes = list(classes_from_labels(((r["slide_id"], r["label"]) for _, r in rows if r["label"]),
                                           where=str(table), unlabelled="leave its row out"))
    else:
        classes = sorted({r["label"] for _, r in rows})
    index, labels, names, split = [], [], [], []
    first_line: dict[tuple[str, int], int] = {}
    for line, r in rows:
        sid = r["slide_id"]
        try:
            check_slide_id(sid)
            x, y = int(r["x"]), int(r["y"])
        except ValueError as exc:
            raise DataError(f"{table}, line {line}: {exc}") from None
        if sid not in by_id:
            raise DataError(f"{table}, line {line}: slide {sid!r} has no patch store")
        if sid not in lookups:
            coords = by_id[sid].coords
            lookups[sid] = {(int(a), int(b)): i for i, (a, b) in enumerate(coords)}
        tile = lookups[sid].get((x, y))
        if tile is None:
            raise DataError(f"{table}, line {line}: no tile at ({x}, {y}) in {by_id[sid].path}")
        if not r["label"]:
            raise DataError(f"{table}, line {line}: tile ({x}, {y}) of slide {sid} has an empty label")
        seen = first_line.setdefault((sid, tile), line)
        if seen != line:  # twice in training, or in training and test at once
            raise DataError(f"{table}, line {line}: tile ({x}, {y}) of slide {sid} is listed again (first on line "
                            f"{seen}); list each tile once")
        index.append((number[sid], tile))
        labels.append(classes.index(r["label"]))
        names.append(f"{sid}:{x}:{y}")
        split.append((r.get("split") or "").strip())
    if len(classes) < 2:
        raise DataError(f"{table}: needs at least two labels, found {classes}")
    has_split = "split" in cols
    if has_split:
        bad = sorted({s for s in split if s not in SPLITS})
        if bad:
            raise DataError(f"{table}: split values must be train, val or test, found {bad}")
    return StoreTiles(
        classes=tuple(classes),
        labels=np.asarray(labels, np.int64),
        names=names,
        split=np.asarray(split, object) if has_split else None,
        stores=store_list,
        index=np.asarray(index, np.int64),
    )


def stratified_split(
    labels: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int, classes: Sequence[str] | None = None
) -> np.ndarray:
    """"train"/"val"/"test" per tile, the same fractions within every class (seeded).

    Each class keeps at least one training tile; val and test get ``round(fraction * n)`` of a
    class's tiles, at least one each when the fraction is positive: a class too small for that
    is a :class:`DataError` naming it (``classes``: the names of the label indices), since a
    part without it would score the class as never seen (an AUROC of NaN).
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"--val-fraction {val_fraction:g} and --test-fraction {test_fraction:g} leave no tiles to train on: "
            "each must be >= 0 and their sum below 1"
        )
    rng = np.random.default_rng(seed)
    out = np.full(len(labels), "train", dtype=object)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        n_val = max(int(val_fraction > 0), round(val_fraction * n))
        n_test = max(int(test_fraction > 0), round(test_fraction * n))
        if n - n_val - n_test < 1:
            name = repr(classes[int(c)]) if classes is not None else str(int(c))
            raise DataError(
                f"class {name} has only {n} tile{'s' if n != 1 else ''}: too few to split into train/val/test "
                f"({1 + (n_val > 0) + (n_test > 0)} at least, one for each part; or give the split yourself)"
            )
        out[idx[:n_val]] = "val"
        out[idx[n_val : n_val + n_test]] = "test"
    return out
