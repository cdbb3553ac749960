"""Labelled tiles for patch-level prompt tuning, from an image folder or patch stores + a table.

Two sources, one interface (:class:`LabelledTiles`: class names, an integer label per tile, an
optional predefined split, a name per tile, and ``read(i)`` -> uint8 [S, S, 3]):

- an **image folder** with one sub-folder per class (``DIR/CLASS/*.png|jpg|tif``), or with
  ``train/``, ``val/`` and optionally ``test/`` sub-folders each holding class folders (then that
  split is used as given);
- **patch stores + a tile-label table** (CSV or TSV with columns ``slide_id,x,y,label`` and
  optionally ``split``): each row names a tile of ``{slide_id}.zarr`` by its level-0 coordinates.

Without a predefined split, :func:`stratified_split` draws one per class (seeded), and
:class:`TileDataset` serves a split's tiles to a DataLoader at the backbone's input size.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import warnings
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
from wsitools.io import file_fingerprint, read_user_text
from wsitools.labels import classes_from_labels, table_rows
from wsitools.store import PatchStore, find_patch_stores
from wsitools.tables import sniff_dialect
from wsitools.types import check_slide_id

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MAX_IMAGE_PIXELS = 8192 * 8192
"""The largest class-folder image decoded, in pixels (67 Mpx, 200 MB as RGB). Tiles are resized to
the backbone's input (a few hundred px), so a larger image is a slide region to be tiled, not a
tile, or a decompression bomb (a PNG of a few KB that decodes to GB). Below PIL's own limit, so
PIL's warning band between its limit and twice it is refused too."""
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

    @property
    @abstractmethod
    def origin(self) -> Path:
        """The table or folder the labels come from, for messages."""

    @abstractmethod
    def where(self, i: int) -> str:
        """Where tile ``i`` is labelled (its table line, its class folder), for messages."""

    def patch_stores(self) -> list[PatchStore]:
        """The patch stores the pixels are read from (none for image files)."""
        return []

    def image_files(self) -> list[list[str]]:
        """Each image file the pixels are read from as [path, fingerprint] (none for patch
        stores): what a resumed run compares, since another image under the same name is other data."""
        return []

    def relabel(self, classes: Sequence[str], *, task: str = "the task") -> LabelledTiles:
        """The same tiles with class indices in the order of ``classes`` (a task's order). A
        label that is not one of them (named where it first occurs) or one of them without a
        tile is a :class:`DataError`; ``task`` names the task in it (e.g. its file)."""
        extra = [c for c in self.classes if c not in classes]
        if extra:
            first = int(np.flatnonzero(self.labels == self.classes.index(extra[0]))[0])
            raise DataError(
                f"{self.where(first)}: label {extra[0]!r} is not a class of {task} ({', '.join(classes)}); "
                "fix the label or add the class to the task file"
            )
        missing = [c for c in classes if c not in self.classes]
        if missing:
            raise DataError(
                f"class{'es' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} of {task} "
                f"{'have' if len(missing) > 1 else 'has'} no tile in {self.origin}; label tiles of it or remove it "
                "from the task file"
            )
        lookup = np.array([list(classes).index(c) for c in self.classes], dtype=np.int64)
        return dataclasses.replace(self, classes=tuple(classes), labels=lookup[self.labels])


@dataclass
class FolderTiles(LabelledTiles):
    root: Path | None = None
    paths: list[Path] | None = None

    @property
    def origin(self) -> Path:
        assert self.root is not None
        return self.root

    def where(self, i: int) -> str:
        assert self.paths is not None
        return str(self.paths[i].parent)

    def image_files(self) -> list[list[str]]:
        assert self.paths is not None
        return [[str(p), _fingerprint(p)] for p in self.paths]

    def read(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 RGB; a :class:`DataError` naming it when it cannot be decoded or
        has more than :data:`MAX_IMAGE_PIXELS` pixels (judged from its header, before decoding)."""
        assert self.paths is not None
        path = self.paths[i]

        def too_large(size: str) -> DataError:
            return DataError(
                f"{path}: {size}, more than the {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx a class-folder image may have "
                "(tiles are resized to the backbone's input); cut it into tiles or shrink it"
            )

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    if im.width * im.height > MAX_IMAGE_PIXELS:
                        raise too_large(f"{im.width} x {im.height} px")
                    return np.array(im.convert("RGB"))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise too_large(f"refused by PIL as a possible decompression bomb ({exc})") from None
        except OSError as exc:
            raise DataError(f"{path}: not a readable image ({exc})") from None


@dataclass
class StoreTiles(LabelledTiles):
    table: Path | None = None
    lines: np.ndarray | None = None  # [n] the table's line of each tile
    stores: list[PatchStore] | None = None
    index: np.ndarray | None = None  # [n, 2] (store number, tile index)

    @property
    def origin(self) -> Path:
        assert self.table is not None
        return self.table

    def where(self, i: int) -> str:
        assert self.lines is not None
        return f"{self.table}, line {int(self.lines[i])}"

    def patch_stores(self) -> list[PatchStore]:
        assert self.stores is not None
        return list(self.stores)

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


def _fingerprint(path: Path) -> str:
    """The image file's :func:`~wsitools.io.file_fingerprint` (its size and bytes, as a slide's);
    a :class:`DataError` naming it when it cannot be read."""
    try:
        return file_fingerprint(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


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
        root=root,
        paths=paths,
    )


def store_tiles(
    table: str | os.PathLike[str],
    stores: Sequence[str | os.PathLike[str]],
    *,
    task_classes: Sequence[str] | None = None,
) -> StoreTiles:
    """Tiles named by a table (CSV or TSV, ``slide_id,x,y,label[,split]``, read as the MIL
    labels table is: a UTF-8 byte-order mark allowed, cells stripped) in patch stores (``*.zarr``
    paths or folders of them; only the stores of the table's slides, ``{slide_id}.zarr``, are
    opened, and a coordinates-only store's slide is checked here, once). Unknown slides or
    coordinates, an empty label, a tile listed twice and a row of more or fewer fields than the
    header are errors naming the table row. Without ``task_classes`` (a task file's classes) the
    labels are the classes, checked as :func:`wsitools.labels.classes_from_labels` checks them
    (a missing-value marker or one number written two ways is no class)."""
    table = Path(table)
    text = read_user_text(table, what="tile-label table", expected="a CSV or TSV file", encoding="utf-8-sig")
    reader = csv.DictReader(text.splitlines(), dialect=sniff_dialect(table, text[:4096]))
    cols = {c.strip() for c in reader.fieldnames or ()}
    if not {"slide_id", "x", "y", "label"} <= cols:
        raise DataError(f"{table}: needs columns slide_id,x,y,label (has {sorted(cols)})")
    rows = list(table_rows(reader, what=str(table), complete=True))
    if not rows:
        raise DataError(f"{table}: no rows")
    by_id = _named_stores(stores, {r["slide_id"] for _, r in rows})
    store_list = list(by_id.values())
    number = {sid: i for i, sid in enumerate(by_id)}
    lookups: dict[str, dict[tuple[int, int], int]] = {}
    if task_classes is None:
        classes = list(classes_from_labels(((r["slide_id"], r["label"]) for _, r in rows if r["label"]),
                                           where=str(table), unlabelled="leave its row out"))
    else:
        classes = sorted({r["label"] for _, r in rows})
    index, labels, names, split, lines = [], [], [], [], []
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
        split.append(r.get("split", ""))
        lines.append(line)
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
        table=table,
        lines=np.asarray(lines, np.int64),
        stores=store_list,
        index=np.asarray(index, np.int64),
    )


def _named_stores(paths: Sequence[str | os.PathLike[str]], slide_ids: set[str]) -> dict[str, PatchStore]:
    """The patch stores among ``paths`` of the slides ``slide_ids`` (each ``{slide_id}.zarr``), by
    slide id; the others are not opened, so a damaged store the table does not name sinks
    nothing. A coordinates-only store's slide must be the file it was tiled from
    (:meth:`PatchStore.check_slide`), checked before any training."""
    found = find_patch_stores(paths)
    if not found:
        raise StoreError(f"no patch stores under {', '.join(map(str, paths))}")
    by_id: dict[str, PatchStore] = {}
    for q in found:
        if q.stem not in slide_ids:
            continue
        s = PatchStore.open(q)
        if s.slide_id != q.stem:
            raise StoreError(f"{s.path}: holds slide {s.slide_id!r}, not {q.stem!r} as its name says; "
                             "name each store {slide_id}.zarr, as `wsitools tile` does")
        if s.slide_id in by_id:  # the table's slide ids would name either
            raise DataError(f"{by_id[s.slide_id].path} and {s.path} both hold slide {s.slide_id!r}; "
                            "give one of them")
        if not s.has_pixels:
            s.check_slide()
        by_id[s.slide_id] = s
    return by_id


def check_given_split(tiles: LabelledTiles, split: np.ndarray) -> None:
    """Refuse a given split (a table's ``split`` column, ``train/ val/ test/`` folders) that
    leaves a class out of a part holding tiles: as :func:`stratified_split` keeps every class in
    every part it fills, since training without the class never learns it and a validation or
    test part without it scores the class as never seen (an AUROC of NaN). A
    :class:`DataError` naming the class, the part and the data."""
    for part in SPLITS:
        inside = split == part
        if not inside.any():
            continue
        missing = [c for k, c in enumerate(tiles.classes) if not (inside & (tiles.labels == k)).any()]
        if missing:
            effect = ("the model would never learn it" if part == "train"
                      else "it would be scored as never seen (an AUROC of NaN)")
            raise DataError(
                f"{tiles.origin}: class{'es' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                f"{'have' if len(missing) > 1 else 'has'} no {part} tile in the given split, so {effect}; "
                f"give {part} tiles of every class"
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
