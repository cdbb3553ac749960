"""The head folder: one trained MIL head on disk (path, write, read, verify).

A head folder holds ``model.safetensors`` (the state dict, CPU tensors) and ``config.json``
(``format_version``, ``kind: mil_head``, the :class:`~wsitools.mil.heads.HeadConfig` under
``config``, the weights file's sha256 under ``weights_sha256``, and the training metadata:
``classes`` in logit order, task, encoder record, text model, fold, settings, the pooling
training kept, and a survival or regression head's scale).
A ``wsitools train`` run holds one per fold, ``fold_{k}/``; ``wsitools predict`` takes a run
(its fold heads, an ensemble) or one head folder, both read through :mod:`wsitools.mil.run_folder`. Layout:
docs/formats.md, "MIL heads".

A head folder is written whole under a temporary name and renamed when complete
(:func:`save_head`), so a folder with weights but no config (or the reverse) is never left to
look like a head. Loading checks the kind, the format version, the config, the weights
file's sha256 (a flipped bit in a weight changes every prediction, silently; heads saved before
it was recorded are loaded unchecked) and every tensor's name and shape against the head it
describes, naming the file on any mismatch (:class:`~wsitools.errors.ModelError`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsitools.errors import ModelError
from wsitools.io import atomic_path, sha256_file, write_json_atomic, write_safetensors
from wsitools.mil.heads import HeadConfig, Pooling, attention_pools, create_head, set_pooling

HEAD_FORMAT_VERSION = 1
HEAD_KIND = "mil_head"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
WEIGHTS_SHA256 = "weights_sha256"
"""The key of ``config.json`` recording the sha256 of ``model.safetensors``."""


@dataclass
class SavedHead:
    """A head read from disk: the module (eval mode), its config, and the metadata saved with it."""

    model: nn.Module
    config: HeadConfig
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def task_type(self) -> str:
        """The task type the head was trained for (heads saved before task types: classification)."""
        return str(self.meta.get("task_type") or "classification")

    @property
    def pooling(self) -> Pooling:
        """How the head pools: ``attention``, or ``mean`` where training kept mean pooling or the
        head has no attention pools (``meanpool``); heads saved before pooling selection pool by
        attention."""
        return "mean" if self.meta.get("pooling") == "mean" or not attention_pools(self.model) else "attention"

    @property
    def bag(self) -> str:
        """How the head's bags were made: ``slide`` (heads saved before patient bags) or ``patient``."""
        return str(self.meta.get("bag") or "slide")


def save_head(model: nn.Module, folder: str | os.PathLike[str], *, meta: dict[str, Any]) -> Path:
    """Write the head folder ``folder`` (``model.safetensors`` and ``config.json``: head config,
    the weights' sha256 and ``meta``) atomically, replacing any folder there; returns ``folder``.

    ``meta`` must hold ``classes`` (the class names in logit order); anything else JSON-able
    (task, encoder, text model, fold, training settings) is kept for provenance.
    """
    if "classes" not in meta:
        raise ValueError("save_head needs meta['classes']")
    config: HeadConfig = model.config
    folder = Path(folder)
    state = model.state_dict()
    with atomic_path(folder, overwrite=True) as tmp:
        tmp.mkdir()
        # One metadata key: the library writes several in a random order, and the same head
        # should give the same bytes (the head's name is in config.json).
        write_safetensors(tmp / WEIGHTS_FILE, state, metadata={"format": "pt"})
        write_json_atomic(
            tmp / CONFIG_FILE,
            {"format_version": HEAD_FORMAT_VERSION, "kind": HEAD_KIND, "config": config.to_dict(), **meta,
             WEIGHTS_SHA256: sha256_file(tmp / WEIGHTS_FILE)},
        )
    return folder


def load_head(folder: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> SavedHead:
    """Read a head folder written by :func:`save_head`; raises :class:`ModelError` naming the file
    on a mismatch (a weights file whose sha256 is not the one ``config.json`` records: damaged
    since it was written)."""
    from wsitools.encoders.checkpoint import read_state_dict

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelError(f"{folder}: not a saved head (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_path}: not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("kind") != HEAD_KIND or meta.get("format_version") != HEAD_FORMAT_VERSION:
        raise ModelError(f"{config_path}: not a version-{HEAD_FORMAT_VERSION} {HEAD_KIND} config")
    try:
        config = HeadConfig.from_dict(meta.pop("config"))
        model = create_head(config)
        meta["classes"] = [str(c) for c in meta["classes"]]
        if meta.get("pooling", "attention") not in ("attention", "mean"):
            raise ModelError(f"pooling is {meta['pooling']!r}, not 'attention' or 'mean'")
    except ModelError as exc:
        raise ModelError(f"{config_path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{config_path}: not a usable head config ({type(exc).__name__}: {exc})") from None
    # Read before the checksum is compared: a file that is no weight file, or another head's, is named as such.
    state = read_state_dict(weights_path, model.state_dict())
    recorded = meta.pop(WEIGHTS_SHA256, None)
    if recorded is not None and (digest := sha256_file(weights_path)) != recorded:
        raise ModelError(
            f"{weights_path}: checksum mismatch: its sha256 is {digest}, {config_path} records {recorded}: "
            "damaged since it was written; train the head again"
        )
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    saved = SavedHead(model=model, config=config, meta=meta)
    set_pooling(model, saved.pooling)
    return saved
