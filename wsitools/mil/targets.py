"""The targets of slide-level tasks in a labels table, checked (no torch: the workflow checks a
samples sheet with these rules before any job runs).

- classification: ``label``, any non-empty text (a class);
- regression: ``label``, a finite number;
- survival: ``time``, a finite number >= 0, and ``event``, 0 (censored) or 1 (event).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from wsitools.errors import DataError
from wsitools.text import TaskType

LABEL_COLUMNS: dict[TaskType, tuple[str, ...]] = {
    "classification": ("slide_id", "label"),
    "regression": ("slide_id", "label"),
    "survival": ("slide_id", "time", "event"),
}
"""The columns a labels table needs for each task type."""

SURVIVAL_STRATA = ("censored", "event")
"""The strata of a survival cohort (folds are stratified on the event indicator)."""


def _finite(text: str, *, where: str, column: str) -> float:
    """``text`` as a finite float; a :class:`DataError` naming ``where`` and the column if not."""
    if not text:
        raise DataError(f"{where}: empty {column}")
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: {column} {text!r} is not a number") from None
    if not np.isfinite(value):
        raise DataError(f"{where}: {column} {text!r} is not a finite number")
    return value


def parse_targets(row: Mapping[str, str], task_type: TaskType, *, where: str) -> dict[str, Any]:
    """The target fields of one labels-table row (``label``; ``value`` for regression; ``time``
    and ``event`` for survival, ``label`` being the stratum) for ``task_type``, checked: a
    :class:`DataError` starting with ``where`` for an empty label, a number that is not finite,
    a negative time or an event other than 0/1."""
    if task_type == "classification":
        if not row["label"]:
            raise DataError(f"{where} has an empty label")
        return {"label": row["label"]}
    if task_type == "regression":
        value = _finite(row["label"], where=where, column="label")
        return {"label": row["label"], "value": value}
    time = _finite(row["time"], where=where, column="time")
    if time < 0:
        raise DataError(f"{where}: time {row['time']!r} is negative")
    event = _finite(row["event"], where=where, column="event")
    if event not in (0.0, 1.0):
        raise DataError(f"{where}: event {row['event']!r} must be 0 (censored) or 1 (event)")
    return {"label": SURVIVAL_STRATA[int(event)], "time": time, "event": int(event)}
