"""User-facing errors.

Every error a user can cause (a bad slide, a bad checkpoint, a bad config) is a
:class:`WsiToolsError`; its message names the file and what is wrong. The CLI prints these
without a traceback; anything else is a bug and keeps its traceback.
"""

import os
import re
import signal
import textwrap
from collections.abc import Mapping
from typing import Any


class WsiToolsError(Exception):
    """An error caused by the input, with a message meant for the user."""


class SlideError(WsiToolsError):
    """A slide cannot be opened, read, or lacks a trustworthy resolution."""


class StoreError(WsiToolsError):
    """A patch store or feature store is missing, unfinished, or does not match."""


class ModelError(WsiToolsError):
    """A model card, checkpoint or weight file is missing or does not match."""


class DataError(WsiToolsError):
    """A labels table, task description or cohort is inconsistent."""


class ConfigError(WsiToolsError, ValueError):
    """A setting (a command option, a workflow config key, a field of a settings dataclass such
    as ``TilingParams`` or ``TrainConfig``) is out of its range or contradicts another one.

    Also a ValueError, so code validating its own input can catch it as one."""


class DamagedStoreError(StoreError):
    """A store that fails its integrity check (a missing or truncated file, no manifest): it holds
    nothing worth keeping, so ``wsitools tile`` rebuilds it."""


class UnsafeNameError(DataError, ValueError):
    """A name that would become a path (a slide id, an encoder name) is not safe as one.

    Also a ValueError, so code validating its own input can catch it as one.
    """


STOPPED_LINE = re.compile(r"wsitools [\w-]+: stopped by (SIG[A-Z]+)\b")
"""How a ``wsitools`` command that a signal stopped says so as its last line
(:func:`stopped_line`); the workflow tells such a job from a failed one by it."""


def stopped_line(command: str, signum: int, detail: str = "") -> str:
    """The last line of a ``wsitools`` command stopped by signal ``signum`` (a cancelled job):
    not a fault of its input, and nothing it had not finished is kept."""
    name = signal.Signals(signum).name
    return f"wsitools {command}: stopped by {name} before it finished{detail}; run it again to finish"


_TRACEBACK_MARKS = ("Traceback (most recent call last)", "Original Traceback (most recent call last)")


def schema_problem(error: Any) -> tuple[list[str], str]:
    """Where and what of a failed JSON-schema validation (a ``jsonschema.ValidationError``), in
    words for the user: the path of keys, and what is wrong there on one line, never the schema
    itself. An unknown key (a typo) is added to the path and named with the nearest known key."""
    import difflib

    path = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        known = sorted((error.schema or {}).get("properties", {}))
        unknown = sorted(str(k) for k in error.instance if k not in known)
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            return [*path, unknown[0]], f"unknown key ({hint})"
    return path, textwrap.shorten(" ".join(str(error.message).split()), width=300, placeholder=" ...")


def one_line(error: BaseException | str) -> str:
    """An error message as one line, for the CLI and for QC records.

    An error raised in a worker process (a DataLoader worker, a process pool) comes back with
    the worker's whole traceback in its message; its last line is the error itself, which is
    what is kept (without the exception's module path, and without the class name for our own
    errors, whose messages already name the file). Other multi-line messages are joined.
    """
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    if not any(line.startswith(_TRACEBACK_MARKS) for line in lines):
        return " ".join(lines)
    last = lines[-1]
    name, sep, message = last.partition(": ")
    if sep and name.replace(".", "").replace("_", "").isalnum():
        short = name.rsplit(".", 1)[-1]
        own = short in {c.__name__ for c in (WsiToolsError, *_subclasses(WsiToolsError))}
        return message if own else f"{short}: {message}"
    return last


def error_line(exc: BaseException) -> str | None:
    """The one line a user is told for ``exc``: a :class:`WsiToolsError`'s message, or
    ``FILE: reason`` for an ``OSError`` about a named file; None for anything else (a bug,
    whose traceback is wanted). The ``wsitools`` command and the workflow's scripts both say it."""
    if isinstance(exc, WsiToolsError):
        return one_line(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        reason = exc.strerror or one_line(exc)
        if isinstance(exc, FileExistsError) and not os.path.isdir(exc.filename):
            reason = "is a file, where a folder is needed"  # mkdir over a file says only "File exists"
        return f"{exc.filename}: {reason}"
    return None


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out
