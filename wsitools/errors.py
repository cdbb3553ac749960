"""User-facing errors.

Every error a user can cause (a bad slide, a bad checkpoint, a bad config) is a
:class:`WsiToolsError`; its message names the file and what is wrong. The CLI prints these
without a traceback; anything else is a bug and keeps its traceback.
"""


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


class DamagedStoreError(StoreError):
    """A store that fails its integrity check (a missing or truncated file, no manifest): it holds
    nothing worth keeping, so ``wsitools tile`` rebuilds it."""
