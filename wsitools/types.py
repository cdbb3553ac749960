"""Named units and identifiers shared by every step.

Coordinates are level-0 pixels everywhere; resolutions are microns per pixel. The NewTypes
make the unit of a number part of a signature, as STAMP does.
"""

from __future__ import annotations

import re
from typing import NewType

Microns = NewType("Microns", float)
"""A length in micrometres (um)."""

MicronsPerPixel = NewType("MicronsPerPixel", float)
"""A resolution in micrometres per pixel (mpp)."""

Level0Px = NewType("Level0Px", int)
"""A length or coordinate in level-0 (full resolution) pixels."""

TargetPx = NewType("TargetPx", int)
"""A length in pixels at the target resolution of a patch store."""

MPP_MIN: MicronsPerPixel = MicronsPerPixel(0.05)
MPP_MAX: MicronsPerPixel = MicronsPerPixel(20.0)

_SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_slide_id(slide_id: str) -> str:
    """Return ``slide_id`` if it is safe as a single path component, else raise ValueError.

    Slide ids become file names (``tiles/{slide_id}.zarr``), so they may hold only letters,
    digits, ``.``, ``_`` and ``-``, must start with a letter or digit (no hidden files, no
    ``..``), and be at most 200 characters.
    """
    if not isinstance(slide_id, str) or not _SLIDE_ID.match(slide_id) or ".." in slide_id:
        raise ValueError(
            f"unsafe slide id {slide_id!r}: use letters, digits, '.', '_' and '-' only, "
            "starting with a letter or digit, without '..'"
        )
    return slide_id


def slide_id_from_path(path: str) -> str:
    """The slide id of a slide file: its file name without the extension(s) of slide formats."""
    from pathlib import Path

    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return check_slide_id(name[: -len(ext)])
    stem = Path(name).stem if Path(name).suffix else name
    return check_slide_id(stem)
