"""Named units and identifiers shared by every step.

Coordinates are level-0 pixels everywhere; resolutions are microns per pixel. The NewTypes
make the unit of a number part of a signature, as STAMP does.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from typing import Literal, NewType, get_args

from wsitools.errors import DataError, UnsafeNameError

Microns = NewType("Microns", float)
"""A length in micrometres (um)."""

MicronsPerPixel = NewType("MicronsPerPixel", float)
"""A resolution in micrometres per pixel (mpp)."""

Level0Px = NewType("Level0Px", int)
"""A length or coordinate in level-0 (full resolution) pixels."""

TargetPx = NewType("TargetPx", int)
"""A length in pixels at the target resolution of a patch store."""

FeatureDtype = Literal["float32", "float16"]
"""The dtype a feature store holds its features in."""
FEATURE_DTYPES: tuple[str, ...] = get_args(FeatureDtype)
DEFAULT_FEATURE_DTYPE: FeatureDtype = "float32"
"""float32: CLAM's and TRIDENT's heads are float32 and CLAM never casts its input; float16 is the
option that halves the disk (the MIL heads here widen it on reading)."""

MPP_MIN: MicronsPerPixel = MicronsPerPixel(0.05)
MPP_MAX: MicronsPerPixel = MicronsPerPixel(20.0)

def schema_pattern(core: str) -> str:
    """A JSON-schema ``pattern`` that the whole string must match: schema patterns are searched,
    and ``$`` also matches before a trailing newline, which ``(?!\\n)`` excludes."""
    return f"^(?:{core})$(?!\\n)"


_SLIDE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
SLIDE_ID_MAX = 200

# Latin letters that Unicode does not decompose into a base letter and a mark.
_LATIN_LETTERS = str.maketrans(
    {"ß": "ss", "Æ": "AE", "æ": "ae", "Ø": "O", "ø": "o", "Œ": "OE", "œ": "oe", "Ł": "L", "ł": "l",
     "Đ": "D", "đ": "d", "Þ": "Th", "þ": "th", "ı": "i"}
)


def check_slide_id(slide_id: str) -> str:
    """Return ``slide_id`` if it is safe as a single path component, else raise
    :class:`~wsitools.errors.UnsafeNameError` (a ValueError).

    Slide ids become file names (``tiles/{slide_id}.zarr``), so they may hold only letters,
    digits, ``.``, ``_`` and ``-``, must start with a letter or digit (no hidden files, no
    ``..``), and be at most 200 characters. The whole string must match (a trailing newline
    is refused too).
    """
    if not isinstance(slide_id, str) or not _SLIDE_ID.fullmatch(slide_id) or ".." in slide_id:
        raise UnsafeNameError(
            f"unsafe slide id {slide_id!r}: use letters, digits, '.', '_' and '-' only, "
            "starting with a letter or digit, without '..'"
        )
    return slide_id


def safe_id(text: str) -> str:
    """A safe id (see :func:`check_slide_id`) derived from any text, e.g. a file name.

    Accents are folded (Unicode NFKD, combining marks dropped: ``Müller`` -> ``Muller``; ``ß``,
    ``æ``, ``ø``, ``ł`` and the like spelled out), every
    run of other characters (spaces, punctuation, letters without an ASCII form) becomes one
    ``_``, runs of dots become one, and leading and trailing ``_.-`` are stripped. Text with
    nothing left (``切片``) becomes ``slide-`` and a hash of it, and text longer than 200
    characters keeps its first 191 and a hash, so different long names stay different.
    """
    folded = "".join(c for c in unicodedata.normalize("NFKD", text.translate(_LATIN_LETTERS)) if not unicodedata.combining(c))
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", folded)
    cleaned = re.sub(r"\.{2,}", ".", cleaned).strip("_.-")
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    if not cleaned:
        cleaned = f"slide-{digest}"
    elif len(cleaned) > SLIDE_ID_MAX:
        cleaned = f"{cleaned[: SLIDE_ID_MAX - 9].rstrip('_.-')}-{digest}"
    return check_slide_id(cleaned)


SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm", ".qptiff",
)
"""File name endings of the slide formats OpenSlide or tiffslide read (lower case): how a slide
given where a store is expected is recognised, to say so."""


def slide_id_from_path(path: str) -> str:
    """The slide id of a slide file: its file name without the extension(s) of slide formats,
    made safe by :func:`safe_id` (``Biopsie Müller 3.svs`` -> ``Biopsie_Muller_3``)."""
    from pathlib import Path

    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return safe_id(name[: -len(ext)])
    stem = Path(name).stem if Path(name).suffix else name
    return safe_id(stem)


def case_twins(names: Sequence[str]) -> tuple[int, int] | None:
    """The positions of the first two of ``names`` that are one name ignoring case (``S1`` and
    ``s1``, or the same name twice), or None. Names that become file or folder names must
    differ in more than case: where case is ignored (macOS, Windows shares) two such names are
    one file."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        first = seen.setdefault(name.casefold(), i)
        if first != i:
            return first, i
    return None


def check_distinct_ids(ids: Sequence[str], paths: Sequence[object], *, source: str = "") -> None:
    """Raise DataError naming both slide files when two slides get one id, also ignoring case
    (:func:`case_twins`): their outputs would overwrite each other. ``source`` (a samples
    sheet, a slide glob) starts the message."""
    twins = case_twins(ids)
    if twins is None:
        return
    (a, path_a), (b, path_b) = ((ids[i], paths[i]) for i in twins)
    where = f"{source}: " if source else ""
    if a == b:
        raise DataError(f"{where}duplicate slide id {a!r} ({path_a} and {path_b}); rename one of them")
    raise DataError(
        f"{where}slide ids {a!r} ({path_a}) and {b!r} ({path_b}) differ only in case; their outputs "
        "would be one file where case is ignored (macOS, Windows): rename one"
    )
