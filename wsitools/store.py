"""The patch store: one zarr v3 group per slide holding its tiles, coordinates and provenance.

Layout (docs/formats.md): ``coords`` [N, 2] int64 level-0 (x, y) top-left corners, ``tiles``
in chunks of many tiles (absent when pixels are switched off), ``tissue_fraction`` [N] float32,
and the provenance under the group attribute ``wsitools``. ``tiles`` holds either one JPEG per
tile ([N] variable-length bytes, codec ``jpeg``, the default: a quarter to a third of the
lossless size, docs/benchmarks.md) or the pixels themselves ([N, S, S, 3] uint8 under Blosc, codec
``lossless``). Readers never see the difference: :meth:`PatchStore.read_tiles` gives uint8
pixels for both, and for format 2 stores (lossless, written before the codec was recorded).

A store exists under its final name only once complete (written under a temporary name and
renamed), and its last file, ``manifest.json``, lists every other file with its size (and the
sha256 of the metadata documents). Opening a store checks the manifest (a stat per file, no
pixel read), so a store with a missing or truncated chunk, edited metadata or a file that is not
and does not link to a regular file (a FIFO, a device: never read) is an error naming it, never a
silent read of fill values or a read that never ends. The store is also the one record of how its slide was
read (backend, mpp and its override, pyramid level, geometry, the slide's identity): later steps
open the slide through :meth:`PatchStore.open_slide`, never on their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import threading
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsitools.errors import ConfigError, DamagedStoreError, StoreError, one_line
from wsitools.io import TEMP_PREFIX, NotRegularFile, file_fingerprint, file_kind, open_regular, sha256_file
from wsitools.types import SLIDE_SUFFIXES, check_slide_id, slide_id_from_path

FORMAT_VERSION = 3
"""3: the tile codec (``jpeg`` or ``lossless``) recorded in the attributes. 2: with
``manifest.json`` and the slide's fingerprint, always lossless; still read. Format 1 stores (no
manifest) cannot be told from damaged ones and are refused; ``wsitools tile`` rebuilds them."""
READABLE_VERSIONS = (2, 3)
ATTRS_KEY = "wsitools"
MANIFEST = "manifest.json"
CHUNK_TILES = 64
"""Tiles per zarr chunk: large enough to compress well and keep file counts low, small enough
for a DataLoader worker to read one chunk per batch."""


BLOSC = {"cname": "lz4", "clevel": 5}
"""Lossless tiles are compressed with Blosc-lz4 (no shuffle): fast enough that compression never
limits tiling, but only 1.1-2x on tissue tiles (docs/benchmarks.md)."""

Codec = Literal["jpeg", "lossless"]
CODECS: tuple[Codec, ...] = ("jpeg", "lossless")
DEFAULT_CODEC: Codec = "jpeg"
DEFAULT_JPEG_QUALITY = 97
"""Quality of the tile JPEGs. Measured on 224 px tiles of four kinds of tissue (a JPEG-textured
synthetic slide, an IHC image, an H&E image at 40x and at 20x; docs/benchmarks.md): 97 keeps
efficientnet-lite0 features within a mean cosine of 0.9976-0.9986 of the lossless tiles' on all
four at 38-52 KB a tile (0.25-0.35 of lossless); 96 clears 0.995 by as little as 0.001 and 95
by 0.0003. ImageNet CNN features are more sensitive to JPEG artefacts than PSNR suggests."""
JPEG_SUBSAMPLING = "444"
"""Chroma subsampling of the tile JPEGs: none (4:4:4). Stain colour carries much of what encoders
see: at equal size, 4:2:0 or 4:2:2 at a higher quality moves features further (docs/benchmarks.md)."""


@dataclass(frozen=True)
class TileCodec:
    """How a store codes its tile pixels: one JPEG of ``quality`` per tile, or lossless."""

    name: Codec = DEFAULT_CODEC
    quality: int = DEFAULT_JPEG_QUALITY
    """JPEG quality, 1-100 (ignored by ``lossless``)."""

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ConfigError(f"tile codec must be one of {', '.join(CODECS)}, got {self.name!r}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"JPEG quality must be from 1 to 100, got {self.quality}")

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> TileCodec:
        """The codec of a store with these attributes (format 2 stores are lossless)."""
        if attrs.get("codec", "lossless") == "lossless":
            return cls("lossless")
        return cls(attrs["codec"], int(attrs["jpeg_quality"]))

    def chunk_key(self, chunk: int) -> str:
        """Where chunk ``chunk`` of ``tiles`` lies inside the array's folder (zarr v3 keys)."""
        return f"c/{chunk}" if self.name == "jpeg" else f"c/{chunk}/0/0/0"

    def encode_chunk(self, tiles: Sequence[np.ndarray]) -> bytes:
        """The bytes of one chunk file holding ``tiles`` (n <= CHUNK_TILES arrays [S, S, 3] uint8,
        or one array [n, S, S, 3]; views into larger images are coded as they are, uncopied).

        The bytes zarr's own write produces for the arrays of :func:`create_patch_store`: for
        ``jpeg`` the vlen-bytes codec's format (a little-endian uint32 count, then each item's
        uint32 length and bytes) over the tiles' JPEGs, the last chunk padded with empty items;
        for ``lossless`` the bytes codec then Blosc, padded with zero tiles.
        """
        if len(tiles) > CHUNK_TILES:
            raise ValueError(f"a chunk holds at most {CHUNK_TILES} tiles, got {len(tiles)}")
        if self.name == "jpeg":
            from numcodecs import VLenBytes

            items = np.full(CHUNK_TILES, b"", dtype=object)
            for k, tile in enumerate(tiles):
                items[k] = encode_jpeg(tile, self.quality)
            return bytes(VLenBytes().encode(items))
        from numcodecs import Blosc

        full = np.empty((CHUNK_TILES, *np.shape(tiles[0])), np.uint8)
        for k, tile in enumerate(tiles):
            full[k] = tile
        full[len(tiles) :] = 0  # the last chunk: padded with zero tiles
        return bytes(Blosc(**BLOSC, shuffle=Blosc.NOSHUFFLE).encode(full))

    def decode_chunk(self, data: bytes, tile_size: int) -> np.ndarray:
        """The tiles [CHUNK_TILES, S, S, 3] uint8 of a ``lossless`` chunk file's bytes (the last
        chunk's padding included); ValueError or RuntimeError for bytes that are not one."""
        from numcodecs import Blosc

        if self.name != "lossless":
            raise ValueError(f"decode_chunk reads lossless chunks; {self.name} tiles are decoded one by one")
        return np.frombuffer(Blosc().decode(data), np.uint8).reshape(CHUNK_TILES, tile_size, tile_size, 3)


def encode_jpeg(tile: np.ndarray, quality: int, subsampling: str = JPEG_SUBSAMPLING) -> bytes:
    """One RGB tile ([S, S, 3] uint8, a view is coded as it is) as a baseline JPEG with libjpeg's
    accurate integer DCT at every quality. TurboJPEG's API (simplejpeg's encoder) switches to the
    fast DCT below quality 96, which moves encoder features further at the same size; from 96 up
    the bytes are the same (docs/benchmarks.md)."""
    import imagecodecs

    return imagecodecs.jpeg8_encode(np.asarray(tile, np.uint8), level=quality, subsampling=subsampling)


def codec_attrs(codec: TileCodec | None) -> dict[str, Any]:
    """The store attributes that record the tile codec (all None for a coordinates-only store)."""
    jpeg = codec is not None and codec.name == "jpeg"
    return {
        "codec": codec.name if codec is not None else None,
        "jpeg_quality": codec.quality if jpeg else None,
        "jpeg_subsampling": JPEG_SUBSAMPLING if jpeg else None,
    }


def write_tile_chunk(
    tiles_dir: str | os.PathLike[str], chunk: int, tiles: Sequence[np.ndarray], *, codec: TileCodec
) -> None:
    """Encode one chunk of tiles and write it where zarr v3 keeps chunk ``chunk`` of ``tiles``.

    Without zarr's per-chunk async machinery, which costs about 5x the encoding itself; tests
    read every chunk back through zarr. Only for arrays made by :func:`create_patch_store`
    with the same codec.
    """
    path = Path(tiles_dir) / codec.chunk_key(chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(codec.encode_chunk(tiles))


_WARNING_FILTERS = threading.Lock()
"""Held while a store is created with a warning filter in place: the filters are one list for the
whole process, so two threads each saving and restoring it would let the warning through."""


def create_patch_store(
    path: str | os.PathLike[str],
    *,
    n_tiles: int,
    tile_size: int,
    codec: TileCodec | None,
    attrs: dict[str, Any],
) -> Any:
    """Create the arrays of a store at ``path`` (a temporary directory) and return the group.

    ``codec`` None makes a coordinates-only store. The caller fills ``coords``,
    ``tissue_fraction`` and (chunk by chunk, :func:`write_tile_chunk`) ``tiles``, then renames
    the directory into place.
    """
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs[ATTRS_KEY] = {
        **attrs,
        "format_version": FORMAT_VERSION,
        "kind": "patch_store",
        "n_tiles": int(n_tiles),
        "has_pixels": codec is not None,
        **codec_attrs(codec),
    }
    rows = max(1, min(n_tiles, 1 << 16))
    group.create_array("coords", shape=(n_tiles, 2), dtype="int64", chunks=(rows, 2))
    group.create_array("tissue_fraction", shape=(n_tiles,), dtype="float32", chunks=(rows,))
    if codec is not None and codec.name == "jpeg":
        from zarr.core.dtype import VariableLengthBytes
        from zarr.errors import UnstableSpecificationWarning

        with _WARNING_FILTERS, warnings.catch_warnings():
            # zarr marks its variable-length bytes type unstable; wsitools reads and writes the
            # chunks itself (numcodecs' vlen-bytes format), so its own reads do not depend on it.
            warnings.simplefilter("ignore", UnstableSpecificationWarning)
            group.create_array(
                "tiles", shape=(n_tiles,), dtype=VariableLengthBytes(), chunks=(CHUNK_TILES,),
                compressors=None, fill_value=b"",
            )
    elif codec is not None:
        from zarr.codecs import BloscCodec

        group.create_array(
            "tiles",
            shape=(n_tiles, tile_size, tile_size, 3),
            dtype="uint8",
            chunks=(CHUNK_TILES, tile_size, tile_size, 3),
            compressors=BloscCodec(**BLOSC, shuffle="noshuffle"),
            fill_value=0,
        )
    return group


def write_tile_table(group: Any, coords: np.ndarray, tissue_fraction: np.ndarray) -> None:
    """Write a new store's ``coords`` and ``tissue_fraction``, every chunk of them: zarr leaves
    out a chunk of fill values (a lone tile at (0, 0), fractions of 0) unless told, and the
    manifest must list every chunk a reader will look for."""
    import zarr

    with zarr.config.set({"array.write_empty_chunks": True}):
        group["coords"][:] = np.asarray(coords, np.int64).reshape(-1, 2)
        group["tissue_fraction"][:] = np.asarray(tissue_fraction, np.float32)


def write_patch_store(
    path: str | os.PathLike[str],
    *,
    coords: np.ndarray,
    tiles: np.ndarray | None,
    tissue_fraction: np.ndarray,
    attrs: dict[str, Any],
    codec: TileCodec = TileCodec(),
    overwrite: bool = False,
) -> Path:
    """Write a complete store in one go (atomically): for tests and small stores."""
    from wsitools.io import atomic_path

    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    if tiles is not None and (tiles.ndim != 4 or tiles.shape[0] != len(coords) or tiles.shape[-1] != 3):
        raise ValueError(f"tiles must be [N, S, S, 3] with N = {len(coords)}, got {tiles.shape}")
    tile_size = int(tiles.shape[1]) if tiles is not None else int(attrs["tile_size"])
    with atomic_path(path, overwrite=overwrite) as tmp:
        group = create_patch_store(
            tmp, n_tiles=len(coords), tile_size=tile_size, codec=codec if tiles is not None else None, attrs=attrs
        )
        write_tile_table(group, coords, tissue_fraction)
        if tiles is not None:
            for c, start in enumerate(range(0, len(coords), CHUNK_TILES)):
                write_tile_chunk(tmp / "tiles", c, tiles[start : start + CHUNK_TILES], codec=codec)
        seal_patch_store(tmp)
    return Path(path)


def seal_patch_store(root: str | os.PathLike[str]) -> None:
    """Write ``manifest.json``, the last file of a complete store: every other file and its size,
    the sha256 of the metadata documents (``zarr.json``, which hold the attributes) and the CRC-32
    of every chunk file, which readers check as they read a chunk: other bytes of the same size
    would otherwise decode as wrong coordinates or pixels."""
    root = Path(root)
    files = {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    metadata = {rel: sha256_file(root / rel) for rel in files if _is_metadata(rel)}
    crc32 = {rel: zlib.crc32((root / rel).read_bytes()) for rel in files if not _is_metadata(rel)}
    manifest = {
        "kind": "patch_store_manifest", "format_version": FORMAT_VERSION, "files": files, "sha256": metadata,
        "crc32": crc32,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _raw_attrs(p: Path) -> dict[str, Any] | None:
    """The ``wsitools`` attributes read straight from the group's zarr.json, or None."""
    try:
        with open_regular(p / "zarr.json") as f:
            return dict(json.loads(f.read())["attributes"][ATTRS_KEY])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recorded_slide_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """The slide fingerprint (:func:`~wsitools.io.file_fingerprint`) the patch store at ``path``
    records, read from its ``zarr.json`` alone (one small file, no verification of the store, so
    a cohort's stores are compared quickly); None where there is no such record."""
    attrs = _raw_attrs(Path(path))
    value = attrs.get("slide_fingerprint") if attrs is not None else None
    return value if isinstance(value, str) else None


def _is_metadata(rel: str) -> bool:
    return rel.rsplit("/", 1)[-1] == "zarr.json"


_MANIFEST_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
"""A path the manifest may list: relative, inside the store, made of plain names."""


def _not_regular(p: Path, rel: str, kind: str) -> DamagedStoreError:
    """The error for the entry ``rel`` of the store ``p``, which is ``kind`` (:func:`~wsitools.io.file_kind`)."""
    return DamagedStoreError(
        f"{p}: damaged patch store: {rel} is {kind}, not a regular file (never read); re-tile the slide"
    )


def _entry_bytes(p: Path, rel: str, size: int) -> bytes:
    """The bytes of the store entry ``rel``, ``size`` of them as the manifest lists it: read only
    from a regular file or a link to one (:func:`~wsitools.io.open_regular`), and no further
    than one byte past ``size``; else a :class:`DamagedStoreError` naming the store and the entry."""
    try:
        with open_regular(p / rel) as f:
            data = f.read(size + 1)
    except FileNotFoundError:
        raise DamagedStoreError(f"{p}: damaged patch store: {rel} is missing; re-tile the slide") from None
    except NotRegularFile as exc:
        raise _not_regular(p, rel, exc.kind) from None
    if len(data) != size:
        held = f"more than {size}" if len(data) > size else str(len(data))
        raise DamagedStoreError(
            f"{p}: damaged patch store: {rel} holds {held} bytes, {size} when written; re-tile the slide"
        )
    return data


def _verify_manifest(p: Path) -> tuple[dict[str, int], dict[str, str], dict[str, int]]:
    """The manifest's files (relative path: bytes), digests (relative path: sha256) and chunk
    checksums (relative path: CRC-32; none in stores sealed before they were recorded);
    :class:`DamagedStoreError` unless every file it lists is there, a regular file (a link to
    /dev/zero or a FIFO would be read forever) and whole, and it records the digest of the
    group's ``zarr.json``."""
    try:
        with open_regular(p / MANIFEST) as f:
            manifest = json.loads(f.read())
        files, metadata = dict(manifest["files"]), dict(manifest["sha256"])
        crc32 = dict(manifest.get("crc32", {}))
    except FileNotFoundError:
        attrs = _raw_attrs(p)
        if attrs is None or attrs.get("kind") != "patch_store":
            raise StoreError(f"{p}: not a wsitools patch store (no {MANIFEST}, no patch store attributes)") from None
        if attrs.get("format_version") == 1:
            raise DamagedStoreError(
                f"{p}: patch store format 1 has no integrity manifest and cannot be verified; "
                "re-tile the slide (wsitools tile rebuilds it)"
            ) from None
        raise DamagedStoreError(f"{p}: damaged patch store: {MANIFEST} is missing; re-tile the slide") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedStoreError(f"{p}: damaged patch store: unreadable {MANIFEST} ({exc}); re-tile the slide") from None
    for rel in [*files, *metadata]:
        # Only files inside the store, and digests only of its zarr.json documents: an edited
        # manifest must not make a reader stat or hash anything else (/dev/zero never ends).
        if not isinstance(rel, str) or not _MANIFEST_PATH.fullmatch(rel) or ".." in rel.split("/") or (
            rel in metadata and (not _is_metadata(rel) or rel not in files)
        ):
            raise DamagedStoreError(
                f"{p}: damaged patch store: {MANIFEST} lists {rel!r}, which is no file of a patch store; "
                "re-tile the slide"
            )
    for rel, value in crc32.items():
        if rel not in files or _is_metadata(rel) or type(value) is not int or not 0 <= value < 1 << 32:
            raise DamagedStoreError(
                f"{p}: damaged patch store: {MANIFEST} records a checksum {rel!r}: {value!r}, "
                "not the CRC-32 of a chunk it lists; re-tile the slide"
            )
    for rel, size in files.items():
        try:
            st = os.stat(p / rel)
        except FileNotFoundError:
            raise DamagedStoreError(f"{p}: damaged patch store: {rel} is missing; re-tile the slide") from None
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(p, rel, file_kind(st.st_mode))
        actual = st.st_size
        if actual != size:
            raise DamagedStoreError(
                f"{p}: damaged patch store: {rel} holds {actual} bytes, {size} when written; re-tile the slide"
            )
    for rel, digest in metadata.items():
        if hashlib.sha256(_entry_bytes(p, rel, files[rel])).hexdigest() != digest:
            raise DamagedStoreError(f"{p}: damaged patch store: {rel} was changed after writing; re-tile the slide")
    if "zarr.json" not in metadata:
        raise DamagedStoreError(f"{p}: damaged patch store: {MANIFEST} does not record zarr.json; re-tile the slide")
    return files, metadata, crc32


def not_a_store(path: Path) -> str:
    """Why ``path``, which is no folder, is not a patch store: missing, a slide (then what to run
    first), or another file."""
    if not path.exists():
        return f"{path}: no such patch store"
    if path.name.lower().endswith(SLIDE_SUFFIXES):
        return (
            f"{path}: is a slide, not a patch store; tile it first (wsitools tile {path} --out tiles) "
            f"and give its store, tiles/{slide_id_from_path(str(path))}.zarr"
        )
    return f"{path}: not a patch store (a file; patch stores are the {{slide_id}}.zarr folders of wsitools tile)"


def read_store_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The provenance attributes of a finished, verified store.

    :class:`DamagedStoreError` for a store that fails its manifest (or has none: unfinished, or
    format 1), :class:`StoreError` for anything else that is not a finished patch store.
    """
    return _open_verified(Path(path))[0]


def _open_verified(p: Path) -> tuple[dict[str, Any], dict[str, int], dict[str, int]]:
    """:func:`read_store_attrs`, and the files (with their sizes) and chunk checksums of the manifest."""
    import zarr

    if p.name.startswith(TEMP_PREFIX):
        raise StoreError(f"{p}: is an unfinished (temporary) patch store")
    if not p.is_dir():
        raise StoreError(not_a_store(p))
    files, digests, crc32 = _verify_manifest(p)
    try:
        group = zarr.open_group(str(p), mode="r")
        attrs = dict(group.attrs[ATTRS_KEY])
    except Exception as exc:
        raise DamagedStoreError(f"{p}: damaged patch store: unreadable attributes ({exc}); re-tile the slide") from None
    if attrs.get("kind") != "patch_store":
        raise StoreError(f"{p}: not a wsitools patch store (kind {attrs.get('kind')!r})")
    version = attrs.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise StoreError(
            f"{p}: patch store format {version!r} is not supported (this wsitools "
            f"writes format {FORMAT_VERSION} and reads formats {', '.join(map(str, READABLE_VERSIONS))}); "
            "re-tile the slide"
        )
    problem = _attrs_problem(attrs)
    if problem is None:
        problem = _arrays_problem(p, attrs, files, digests)
    if problem is not None:
        raise DamagedStoreError(f"{p}: damaged patch store: {problem}; re-tile the slide")
    return attrs, files, crc32


_COUNTS = {"n_tiles": 0, "tile_size": 1, "stride": 1, "level": 0}
"""Integer attributes and their least values."""
_SIZES = ("mpp_level0", "mpp_target", "tile_size_level0", "level_downsample")
"""Positive numeric attributes."""
_TEXTS = ("slide_path", "params_hash")
"""String attributes."""
_REQUIRED = ("n_tiles", "tile_size", "mpp_target", "tile_size_level0")
"""The attributes every reader of a store needs (with ``has_pixels`` and ``slide_id``); the
others are checked where present (stores written by :func:`write_patch_store` for tests and
benchmarks carry only these)."""


def _attrs_problem(attrs: dict[str, Any]) -> str | None:
    """What is wrong with a readable store's attributes (a value a reader would choke on or
    misread: a missing key, a wrong type, an unknown codec, a JPEG quality out of range, a slide
    id unsafe as a file name), or None. The manifest's digest only says the attributes are the
    ones written at sealing; this says they are ones a reader can use."""
    for key in _REQUIRED:
        if key not in attrs:
            return f"attribute {key} is missing"
    for key, least in _COUNTS.items():
        value = attrs.get(key, least)
        if type(value) is not int or value < least:
            return f"attribute {key} = {value!r}, not an integer >= {least}"
    for key in _SIZES:
        value = attrs.get(key, 1.0)
        if type(value) not in (int, float) or not 0 < value < float("inf"):
            return f"attribute {key} = {value!r}, not a positive number"
    for key in _TEXTS:
        if not isinstance(attrs.get(key, ""), str):
            return f"attribute {key} = {attrs[key]!r}, not a string"
    if type(attrs.get("has_pixels")) is not bool:
        return f"attribute has_pixels = {attrs.get('has_pixels')!r}, not true or false"
    try:
        check_slide_id(attrs.get("slide_id"))  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        return f"attribute slide_id: {exc}"
    codec = attrs.get("codec")
    if attrs["format_version"] == 2:
        return "attribute codec in a format 2 store (always lossless)" if "codec" in attrs else None
    if not attrs["has_pixels"]:
        return None if codec is None else f"attribute codec = {codec!r} in a store without pixels"
    if codec not in CODECS:
        return f"attribute codec = {codec!r}, not one of {', '.join(CODECS)}"
    quality = attrs.get("jpeg_quality")
    if codec == "jpeg" and (type(quality) is not int or not 1 <= quality <= 100):
        return f"attribute jpeg_quality = {quality!r}, not an integer from 1 to 100"
    return None


def _arrays_problem(p: Path, attrs: dict[str, Any], files: dict[str, int], digests: dict[str, str]) -> str | None:
    """What is wrong with a store's arrays, judged from their metadata and the manifest alone
    (no chunk is read), or None.

    Each array the attributes call for must be there with its dtype and shape (``coords`` int64
    [N, 2], ``tissue_fraction`` float32 [N], ``tiles`` [N] JPEGs or uint8 [N, S, S, 3]), its
    ``zarr.json`` recorded with a digest in the manifest, and every chunk its shape implies listed
    in the manifest: a manifest that leaves a file out cannot vouch for it, and zarr would read a
    missing chunk as fill values (black tiles, coords (0, 0)). :func:`write_tile_table` writes
    every chunk; stores written before it may lack the coords chunk of a lone tile at (0, 0).
    """
    n, size = attrs["n_tiles"], attrs["tile_size"]
    arrays = {"coords": ("int64", [n, 2]), "tissue_fraction": ("float32", [n])}
    if attrs["has_pixels"]:
        jpeg = attrs.get("codec") == "jpeg"
        arrays["tiles"] = ("variable_length_bytes", [n]) if jpeg else ("uint8", [n, size, size, 3])
    for name, (dtype, shape) in arrays.items():
        doc = f"{name}/zarr.json"
        if doc not in digests:
            return f"{doc} is missing" if not (p / doc).is_file() else f"{MANIFEST} does not record {doc}"
        try:
            meta = json.loads(_entry_bytes(p, doc, files[doc]))
            found = (meta["data_type"], list(meta["shape"]))
            chunk_shape = [int(c) for c in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{doc} is unreadable ({exc})"
        if found != (dtype, shape):
            return f"{name} is {found[0]} {found[1]}, not {dtype} {shape}"
        if name == "coords" and n == 1:
            continue
        chunks = [-(-extent // max(1, chunk)) for extent, chunk in zip(shape, chunk_shape)]
        for index in np.ndindex(*chunks):
            key = f"{name}/c/" + "/".join(map(str, index))
            if key not in files:
                return f"{MANIFEST} does not record {key}"
    return None


def find_patch_stores(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The patch stores among ``paths``: a ``*.zarr`` path as given, a folder's ``*.zarr`` in name
    order (hidden ones, such as a running tiler's temporaries, left out). Anything else is a
    :class:`StoreError` naming it."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.suffix == ".zarr":
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(q for q in p.glob("*.zarr") if not q.name.startswith(".")))
        else:
            raise StoreError(f"{p}: not a patch store (*.zarr) nor a folder of patch stores")
    return found


def slide_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a store records to know its slide again: path, size, mtime and a partial hash."""
    p = Path(path)
    st = p.stat()
    return {
        "slide_path": str(p),
        "slide_size": st.st_size,
        "slide_mtime": st.st_mtime,
        "slide_fingerprint": file_fingerprint(p),
    }


class PatchStore:
    """Read access to a finished patch store; picklable (workers re-open it by path)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).resolve()
        self.attrs, self._files, self._crc32 = _open_verified(self.path)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> PatchStore:
        return cls(path)

    @cached_property
    def _group(self) -> Any:
        import zarr

        return zarr.open_group(str(self.path), mode="r")

    def _chunk_bytes(self, key: str) -> bytes:
        """The bytes of the chunk file ``key``, checked against the manifest's CRC-32: other bytes
        of the same size are a :class:`DamagedStoreError` naming the store and the file."""
        data = _entry_bytes(self.path, key, self._files[key])
        expected = self._crc32.get(key)
        if expected is not None and zlib.crc32(data) != expected:
            raise DamagedStoreError(
                f"{self.path}: damaged patch store: {key} was changed after writing (its checksum differs); "
                "re-tile the slide"
            )
        return data

    def check_chunks(self, arrays: Sequence[str] | None = None) -> None:
        """Read the chunk files of ``arrays`` (default: every chunk the manifest has a checksum
        of) whole and check them against the manifest's checksums (:class:`DamagedStoreError`
        naming the first that differs)."""
        for key in self._crc32:
            if arrays is None or key.split("/", 1)[0] in arrays:
                self._chunk_bytes(key)

    def _read(self, name: str, selection: Any) -> np.ndarray:
        """``selection`` of the small array ``name`` (a slice, or an index array along the first
        axis), after checking its chunk files; a chunk that does not decode is a
        :class:`DamagedStoreError` naming the store and the array."""
        self.check_chunks((name,))
        array = self._group[name]
        try:
            if isinstance(selection, slice):
                return np.asarray(array[selection])
            return np.asarray(array.get_orthogonal_selection((np.asarray(selection),)))
        except (RuntimeError, ValueError) as exc:
            raise DamagedStoreError(
                f"{self.path}: damaged patch store: a chunk of {name} cannot be decoded ({one_line(exc)}); "
                "re-tile the slide"
            ) from None

    @cached_property
    def coords(self) -> np.ndarray:
        return self._read("coords", slice(None)).reshape(-1, 2)

    @cached_property
    def tissue_fraction(self) -> np.ndarray:
        return self._read("tissue_fraction", slice(None))

    @property
    def slide_id(self) -> str:
        return str(self.attrs["slide_id"])

    @property
    def slide_path(self) -> Path:
        return Path(self.attrs["slide_path"])

    @property
    def params_hash(self) -> str:
        return str(self.attrs["params_hash"])

    @property
    def has_pixels(self) -> bool:
        return bool(self.attrs["has_pixels"])

    @property
    def tile_size(self) -> int:
        return int(self.attrs["tile_size"])

    @property
    def tile_size_level0(self) -> float:
        return float(self.attrs["tile_size_level0"])

    @property
    def mpp_target(self) -> float:
        return float(self.attrs["mpp_target"])

    @property
    def identity(self) -> dict[str, str]:
        """What a feature store records to know which patch store it came from."""
        return {"store_path": str(self.path), "store_hash": self.params_hash}

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def codec(self) -> TileCodec | None:
        """How the tile pixels are coded (None for a coordinates-only store)."""
        return TileCodec.from_attrs(self.attrs) if self.has_pixels else None

    def read_tiles(self, index: slice | np.ndarray) -> np.ndarray:
        """Tiles [n, S, S, 3] uint8 in the order of ``index``, whatever the store's codec; for a
        coordinates-only store they are read from the slide."""
        codec = self.codec
        rows = np.arange(len(self))[index].reshape(-1)
        out = np.empty((len(rows), self.tile_size, self.tile_size, 3), np.uint8)
        if codec is not None and codec.name == "lossless":
            for chunk in np.unique(rows // CHUNK_TILES):
                key = f"tiles/{codec.chunk_key(int(chunk))}"
                try:
                    pixels = codec.decode_chunk(self._chunk_bytes(key), self.tile_size)
                except (RuntimeError, ValueError, MemoryError) as exc:
                    raise DamagedStoreError(
                        f"{self.path}: damaged patch store: a chunk of tiles cannot be decoded ({one_line(exc)}); "
                        "re-tile the slide"
                    ) from None
                at = rows // CHUNK_TILES == chunk
                out[at] = pixels[rows[at] % CHUNK_TILES]
            return out
        if codec is None:
            for k, c in enumerate(self.coords[rows]):
                out[k] = self._read_from_slide(c)
            return out
        for chunk in np.unique(rows // CHUNK_TILES):
            key = f"tiles/{codec.chunk_key(int(chunk))}"
            items = self._jpeg_chunk(key)
            for k in np.flatnonzero(rows // CHUNK_TILES == chunk):
                self._decode_jpeg(items[rows[k] % CHUNK_TILES], key, int(rows[k]), out[k])
        return out

    def _jpeg_chunk(self, key: str) -> np.ndarray:
        """The JPEGs of the chunk file ``key`` of a ``jpeg`` store (CHUNK_TILES bytes objects)."""
        from numcodecs import VLenBytes

        data = self._chunk_bytes(key)
        try:
            items = VLenBytes().decode(data)
        except (ValueError, RuntimeError, MemoryError, OverflowError) as exc:
            raise DamagedStoreError(
                f"{self.path}: damaged patch store: {key} is not a chunk of JPEGs ({exc}); re-tile the slide"
            ) from None
        if len(items) != CHUNK_TILES:
            raise DamagedStoreError(
                f"{self.path}: damaged patch store: {key} holds {len(items)} items, not {CHUNK_TILES}; re-tile the slide"
            )
        return items

    def _decode_jpeg(self, data: bytes, key: str, row: int, out: np.ndarray) -> None:
        """Decode tile ``row`` (``data``, from chunk file ``key``) into ``out`` [S, S, 3]."""
        import simplejpeg

        try:
            shape = simplejpeg.decode_jpeg_header(data)[:2]
            if shape != out.shape[:2]:
                raise ValueError(f"{shape[0]} x {shape[1]} px, not {out.shape[0]} x {out.shape[1]}")
            simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
        except (ValueError, TypeError) as exc:
            raise DamagedStoreError(
                f"{self.path}: damaged patch store: tile {row} in {key} is not a readable JPEG "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); re-tile the slide"
            ) from None

    def check_slide(self, path: str | os.PathLike[str] | None = None) -> Path:
        """The slide file (``path``, default the recorded one) if it is the one this store was made
        from: same size and fingerprint as recorded (size and mtime in stores without a
        fingerprint). Else :class:`StoreError` naming both."""
        slide = Path(path) if path is not None else self.slide_path
        if not slide.is_file():
            raise StoreError(f"{self.path}: its slide {slide} is gone; restore it or re-tile")
        now = slide_identity(slide)
        # Its bytes decide, where a fingerprint was recorded: a copied or touched slide is the same.
        keys = ("slide_size", "slide_fingerprint") if "slide_fingerprint" in self.attrs else ("slide_size", "slide_mtime")
        changed = [key.removeprefix("slide_") for key in keys if key in self.attrs and self.attrs[key] != now[key]]
        if changed:
            raise StoreError(
                f"{self.path}: its slide {slide} is not the file it was tiled from "
                f"({', '.join(changed)} differ); re-tile the slide"
            )
        return slide

    def open_slide(self, path: str | os.PathLike[str] | None = None) -> Any:
        """The store's slide opened as the tiler read it (recorded backend and mpp override),
        after :meth:`check_slide`; ``path`` replaces the recorded location (a moved slide)."""
        from wsitools.slide import open_slide

        slide = self.check_slide(path)
        return open_slide(slide, backend=self.attrs.get("backend", "auto"), mpp_override=self.attrs.get("mpp_override"))

    @cached_property
    def _slide(self) -> Any:
        return self.open_slide()

    def _read_from_slide(self, coord: np.ndarray) -> np.ndarray:
        a = self.attrs
        # The exact (unrounded) grid position the tiler sampled: coords are rounded to whole px.
        step = a["stride"] * a["mpp_target"] / a["mpp_level0"]
        x, y = (np.rint(coord / step) * step).tolist()
        level = int(a["level"])
        dx, dy = self._slide.level_downsamples_xy[level]  # as the tiler reads: each axis its own ratio
        size = (self.tile_size_level0 / dx, self.tile_size_level0 / dy)
        return self._slide.read_region_resized((x, y), level, size, (self.tile_size,) * 2)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"<PatchStore {self.path.name}: {len(self)} tiles of {self.tile_size}px @ {self.mpp_target} mpp>"
