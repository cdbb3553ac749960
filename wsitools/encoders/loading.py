"""``load_encoder``: one uniform, frozen encoder object from a card name, a card file or ``timm:NAME``.

The :class:`Encoder` it returns bundles the network (eval mode, frozen, on its device,
channels-last), the card's input recipe (:meth:`Encoder.preprocess`: uint8 tiles -> resized,
normalised float batch), its feature (:meth:`Encoder.forward_batch`: CLS token, pooled or mean of
patch tokens), the autocast precision to use on a GPU, and ``encoder_hash``: a hash over the weight
files' sha256 and every card setting that changes the features, which feature stores record so a
changed encoder is never mistaken for the old one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import nn

from wsitools.encoders.cards import (
    EncoderCard, OutputKind, WeightFile, card_encoder_hash, check_weight_file, find_card, precision_hash, weight_sha256,
)
from wsitools.encoders.checkpoint import load_weights
from wsitools.encoders.transforms import fit_to_input
from wsitools.encoders.vit import PromptedVisionTransformer  # noqa: F401 - registers the prompted ViTs with timm
from wsitools.device import resolve_device
from wsitools.errors import ModelError, one_line

log = logging.getLogger(__name__)

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}

def verify_weight(card: EncoderCard, weight: WeightFile) -> str:
    """Check that a card's weight file exists and matches its pinned sha256; return the sha256."""
    check_weight_file(card, weight)
    digest = weight_sha256(weight.path)
    if weight.sha256 and digest != weight.sha256:
        raise ModelError(
            f"{weight.path}: wrong checksum for encoder {card.name!r} (sha256 {digest}, the card "
            f"{card.source} expects {weight.sha256}); the file is corrupt or not the one the card names"
        )
    return digest


def token_feature(
    tokens: torch.Tensor, *, kind: Literal["cls", "mean_patch", "cls_mean_patch"], num_prefix_tokens: int
) -> torch.Tensor:
    """A ViT's final tokens ``[B, P + N, D]`` (P prefix tokens: class, then registers) -> the
    feature of a card's output kind: the class token ``[B, D]``, the mean of the N patch tokens
    ``[B, D]``, or both side by side ``[B, 2D]`` (class token first). Register tokens never enter
    the mean."""
    if kind == "cls":
        return tokens[:, 0]
    patch_mean = tokens[:, num_prefix_tokens:].mean(dim=1)
    if kind == "cls_mean_patch":
        return torch.cat([tokens[:, 0], patch_mean], dim=-1)
    return patch_mean


def model_feature(model: nn.Module, output: OutputKind, x: torch.Tensor) -> torch.Tensor:
    """Preprocessed images ``[B, 3, S, S]`` -> ``model``'s feature of an output kind ``[B, D]``
    (see :data:`wsitools.encoders.cards.OUTPUT_KINDS`)."""
    if output == "pooled":
        return model.forward_head(model.forward_features(x), pre_logits=True)
    return token_feature(model.forward_features(x), kind=output, num_prefix_tokens=model.num_prefix_tokens)


@dataclass(eq=False)
class Encoder:
    """A frozen encoder ready for inference; see the module docstring.

    Attributes:
        name: the card name (the feature store folder ``features/{name}/``).
        card: the card it was built from.
        model: the network (timm interface), eval mode, ``requires_grad`` off.
        device: where ``model`` lives.
        encoder_hash: hash of weight checksums and card settings.
        weight_sha256: sha256 of each weight file, by role.
    """

    name: str
    card: EncoderCard
    model: nn.Module
    device: torch.device
    encoder_hash: str
    weight_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def input_size(self) -> int:
        return self.card.input_size

    @property
    def dim(self) -> int:
        return self.card.dim

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype used on a GPU (None: full fp32). CPUs always run fp32."""
        if self.device.type != "cuda":
            return None
        dtype = _AMP_DTYPES[self.card.compute_precision]
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return torch.float16
        return dtype

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast per the card on a GPU; a no-op on CPU."""
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def preprocess(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles ``[B, H, W, 3]`` -> float ``[B, 3, S, S]`` on the device, channels-last.

        Scales to [0, 1], resizes to the card's input size (antialiased) when the tiles differ, or
        to the card's ``resize`` and centre-crops the input size (:func:`fit_to_input`), and
        normalises with the card's mean/std (or not at all, as PuzzleTuning wants).
        """
        if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError(f"expected uint8 tiles [B, H, W, 3], got {tiles.dtype} {list(tiles.shape)}")
        x = tiles.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        x = fit_to_input(self.card, x)
        if self._normalisation is not None:
            mean, std = self._normalisation
            x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last)

    @cached_property
    def _normalisation(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        # Made once on the device: a per-batch torch.tensor(..., device=cuda) would synchronise.
        if self.card.mean is None or self.card.std is None:
            return None
        mean = torch.tensor(self.card.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.card.std, device=self.device).view(1, 3, 1, 1)
        return mean, std

    def forward_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images ``[B, 3, S, S]`` -> features ``[B, D]`` (the card's output kind:
        see :data:`wsitools.encoders.cards.OUTPUT_KINDS`)."""
        return model_feature(self.model, self.card.output, x)

    @torch.inference_mode()
    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles ``[B, H, W, 3]`` -> features ``[B, D]`` float32."""
        with self.autocast():
            return self.forward_batch(self.preprocess(tiles)).float()


def _model_kwargs(card: EncoderCard) -> dict[str, Any]:
    """The card's timm arguments with ``mlp_layer`` turned from its name (one of
    :data:`~wsitools.encoders.cards.MLP_LAYERS`, checked when the card is read) into timm's class."""
    kwargs = dict(card.model_kwargs)
    if "mlp_layer" in kwargs:
        kwargs["mlp_layer"] = getattr(timm.layers, kwargs["mlp_layer"])
    return kwargs


def _create(card: EncoderCard, *, with_classifier: bool) -> nn.Module:
    kwargs = _model_kwargs(card)
    if card.prompt_tokens:
        kwargs.update(prompt_tokens=card.prompt_tokens, prompt_mode=card.prompt_mode)
    if not with_classifier:
        kwargs.setdefault("num_classes", 0)
    where = f"{card.source or card.name} (model {card.model})"
    try:
        if card.init_seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(card.init_seed)
                model = create_timm_model(card.model, where=where, **kwargs)
                prompts = getattr(model, "prompt_tokens", None)
                if prompts is not None:
                    # Random-weight test models get random prompts too, so prompts matter in tests.
                    nn.init.normal_(prompts, std=0.02)
        else:
            model = create_timm_model(card.model, where=where, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ModelError(f"{card.source or card.name}: unknown timm model {card.model!r}") from None
        raise
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise ModelError(
            f"{card.source or card.name}: timm model {card.model!r} does not accept the card's "
            f"settings ({type(exc).__name__}: {one_line(exc)}); prompts need a prompted_vit_* model"
        ) from None
    return model


def _check_input(card: EncoderCard, model: nn.Module) -> None:
    """The network must take RGB tiles of the card's input size: 3 input channels; a timm ViT
    built for one image side (a strict patch embedding) that side; one with ``dynamic_img_size``
    a multiple of its patch size, unless it pads (``dynamic_img_pad``). Say so when the card is
    loaded, not on every batch of every store."""
    where = card.source or card.name
    channels = card.model_kwargs.get("in_chans", 3)
    if channels != 3:
        raise ModelError(
            f"{where}: architecture.kwargs.in_chans is {channels}, but tiles are RGB: an encoder takes "
            "3 input channels; delete in_chans"
        )
    embed = getattr(model, "patch_embed", None)
    if getattr(model, "dynamic_img_size", False):
        patch = getattr(embed, "patch_size", None)
        if patch is None or getattr(embed, "dynamic_img_pad", False):
            return
        step = math.lcm(*(int(v) for v in patch))
        if card.input_size % step:
            below = card.input_size // step * step
            raise ModelError(
                f"{where}: input.size {card.input_size} is not a multiple of {card.model}'s patch size {step} "
                f"(dynamic_img_size takes only multiples); set input.size to {below} or {below + step}, or "
                "architecture.kwargs.dynamic_img_pad: true to pad"
            )
        return
    size = getattr(embed, "img_size", None)
    if size is None or not getattr(embed, "strict_img_size", False):
        return
    if tuple(size) != (card.input_size, card.input_size):
        side = " x ".join(str(int(v)) for v in size)
        raise ModelError(
            f"{where}: input.size is {card.input_size} but {card.model} takes {side} px "
            f"images; set input.size to {int(size[0])} or architecture.kwargs.img_size to {card.input_size}"
        )


def _check_runs(card: EncoderCard, model: nn.Module) -> None:
    """One RGB image of the card's input size through the network to the card's feature, so that a
    network that cannot take it fails here, once, not on every store. It runs on a copy built on
    the meta device (shapes only, no arithmetic: cheap even for a ViT-g, whose real forward on a
    CPU would be a large part of the start-up); a failure there is confirmed by a real forward of
    ``model`` (an operation without a meta implementation is no fault of the card)."""
    side = card.input_size
    try:
        with torch.device("meta"), torch.no_grad():
            model_feature(_create(card, with_classifier=False).eval(), card.output, torch.zeros(1, 3, side, side))
        return
    except Exception:  # noqa: BLE001 - confirmed or cleared by the real forward below
        log.debug("meta-device probe of %s failed; trying a real forward", card.name, exc_info=True)
    try:
        with torch.no_grad():
            model_feature(model.eval(), card.output, torch.zeros(1, 3, side, side))
    except Exception as exc:  # noqa: BLE001 - whatever the network trips on, the card cannot run
        raise ModelError(
            f"{card.source or card.name}: {card.model} cannot run on RGB tiles of {side} x {side} px, the "
            f"card's input.size ({type(exc).__name__}: {one_line(exc)})"
        ) from None


def _check_output(card: EncoderCard, model: nn.Module) -> None:
    """The card's output kind must be one the network gives, at the card's width. A token kind
    reads ``forward_features``' tokens, which are final only when the network normalises them
    there: one whose final norm is ``fc_norm``, applied after pooling (timm's global-average-pool
    ViTs, BEiT, EVA-02), is refused in favour of ``pooled``, timm's own pooled feature, since
    which norm a class token or a mean would want is the training recipe's to say."""
    where = card.source or card.name
    if card.output != "pooled" and not hasattr(model, "num_prefix_tokens"):
        raise ModelError(f"{where}: output {card.output!r} needs a ViT-style model; use 'pooled'")
    fc_norm = getattr(model, "fc_norm", None)
    if card.output != "pooled" and isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity):
        pool = getattr(model, "global_pool", None)
        raise ModelError(
            f"{where}: output {card.output!r} would take {card.model}'s tokens before their final norm "
            f"(its fc_norm follows the pooling); use output kind 'pooled', timm's own feature "
            f"({f'global_pool {pool!r}, then ' if isinstance(pool, str) and pool else ''}fc_norm)"
        )
    if card.output in ("cls", "cls_mean_patch") and not isinstance(getattr(model, "cls_token", None), torch.Tensor):
        raise ModelError(f"{where}: output {card.output!r} but {card.model} has no class token")
    if card.output == "pooled" and getattr(model, "global_pool", None) == "":
        raise ModelError(
            f"{where}: architecture.kwargs.global_pool '' leaves every token unpooled, but output is "
            "'pooled'; use output kind cls or mean_patch"
        )
    width = getattr(model, "head_hidden_size", None) if card.output == "pooled" else None
    width = width or model.num_features
    if card.output == "cls_mean_patch":
        width = 2 * model.num_features
    if width != card.dim:
        raise ModelError(f"{where}: output.dim is {card.dim} but {card.model} gives {width}-d features")


def build_encoder(card: EncoderCard, *, device: str | torch.device = "auto") -> Encoder:
    """Build the network of ``card``, load and verify its weights, freeze it, move it to ``device``."""
    dev = resolve_device(device)
    digests = {w.role: verify_weight(card, w) for w in card.weights}
    backbone = card.weight("backbone")
    prompts = card.weight("prompts")
    ordered = backbone is not None and backbone.layout == "ordered"
    model = _create(card, with_classifier=ordered)
    _check_input(card, model)
    _check_output(card, model)
    _check_runs(card, model)
    if backbone is not None or prompts is not None:
        load_weights(
            model,
            backbone=backbone.path if backbone else None,
            prompts=prompts.path if prompts else None,
            layout=backbone.layout if backbone else "timm",
        )
    if ordered:
        model.reset_classifier(0)
    model.eval().requires_grad_(False)
    model.to(device=dev, memory_format=torch.channels_last)
    encoder_hash = card_encoder_hash(card, digests)
    return Encoder(
        name=card.name,
        card=card,
        model=model,
        device=dev,
        encoder_hash=encoder_hash,
        weight_sha256=digests,
    )


CARD_KINDS_GROUP = "wsitools.card_kinds"
"""Entry-point group of the loaders of card kinds (``name = "module:function"``); the function
takes ``(card_path, *, device, models_dir)`` and returns an :class:`Encoder`. wsitools registers
``pathotune`` there; another package can add its own kinds the same way."""


def card_kind_loader(card: EncoderCard) -> Callable[..., Encoder]:
    """The loader registered for ``card.kind`` (the encoders know no kind by name)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=CARD_KINDS_GROUP):
        if entry.name == card.kind:
            return entry.load()
    raise ModelError(
        f"{card.source or card.name}: no loader for cards of kind {card.kind!r} is installed "
        f"(entry points {CARD_KINDS_GROUP}; reinstall wsitools with pip install -e .)"
    )


Precision = Literal["card", "fp32"]


def with_precision(encoder: Encoder, precision: Precision) -> Encoder:
    """The encoder at the requested precision: ``"card"`` as its card says; ``"fp32"`` float32
    compute on every device, the exact-parity setting (the features then equal a float32 reference
    forward, e.g. the official PuzzleTuning code, when stored float32). It changes ``encoder_hash``
    of a card that computes in half precision on GPUs, so stores of one never pass for the other.
    """
    card = encoder.card
    if precision == "card" or card.compute_precision == "fp32":
        return encoder
    exact = dataclasses.replace(card, compute_precision="fp32")
    return dataclasses.replace(encoder, card=exact, encoder_hash=precision_hash(encoder.encoder_hash, card, precision))


HUB_PREFIX, LOCAL_DIR_PREFIX = "hf-hub:", "local-dir:"
"""timm model names whose network is described by a ``config.json`` (on the hub, or in a folder)."""


@contextlib.contextmanager
def hub_cache_only() -> Iterator[None]:
    """Hugging Face hub lookups answered from the local cache only (timm builds ``hf-hub:``
    models from their ``config.json``): extraction never reaches the network."""
    from huggingface_hub import constants

    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _hub_repo(model_name: str) -> tuple[str, str]:
    """(repo id, revision or "") of a timm ``hf-hub:OWNER/REPO[@REVISION]`` name."""
    repo, _, revision = model_name.removeprefix(HUB_PREFIX).partition("@")
    return repo, revision


def create_timm_model(model_name: str, *, where: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, pretrained=False, **kwargs)``, an ``hf-hub:`` model from
    the local cache only; a model whose config cannot be read is a one-line :class:`ModelError`
    naming ``where``."""
    try:
        with hub_cache_only():
            return timm.create_model(model_name, pretrained=False, **kwargs)
    except OSError as exc:
        if not model_name.startswith(HUB_PREFIX):
            raise ModelError(f"{where}: {one_line(exc)}") from None
        repo, revision = _hub_repo(model_name)
        fetch = f"huggingface-cli download {repo} config.json" + (f" --revision {revision}" if revision else "")
        raise ModelError(
            f"{where}: not in the local Hugging Face cache ({type(exc).__name__}), and wsitools never "
            f"downloads; fetch it first ({fetch})"
        ) from None


def config_preprocessing(model_name: str) -> dict[str, Any] | None:
    """The ``pretrained_cfg`` of an ``hf-hub:`` or ``local-dir:`` model's own ``config.json``
    (None for other names). timm fills what it lacks with ImageNet's values at 224 px, which
    are no model's stated preprocessing."""
    if model_name.startswith(LOCAL_DIR_PREFIX):
        path = Path(model_name.removeprefix(LOCAL_DIR_PREFIX)) / "config.json"
    elif model_name.startswith(HUB_PREFIX):
        from huggingface_hub import hf_hub_download

        repo, revision = _hub_repo(model_name)
        with hub_cache_only():
            path = Path(hf_hub_download(repo, "config.json", revision=revision or None))
    else:
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable model config ({one_line(exc)})") from None
    return dict(raw.get("pretrained_cfg") or {}) if isinstance(raw, dict) else {}


def timm_card(model_name: str, weights: str | os.PathLike[str]) -> EncoderCard:
    """A card for ``timm:NAME`` plus a local timm-layout checkpoint (no YAML needed).

    Input size, mean/std and interpolation come from timm's pretrained config for the model
    (for ``hf-hub:`` and ``local-dir:`` names, the ``pretrained_cfg`` of the model's own
    ``config.json``, which must state them: a model without them is refused, never given
    ImageNet's). The feature is timm's pooled pre-logits output.
    """
    path = Path(weights).expanduser().resolve()
    try:
        probe = create_timm_model(model_name, where=f"timm:{model_name}", num_classes=0)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"timm:{model_name}: not a timm model ({one_line(exc)})") from None
    own = config_preprocessing(model_name)
    if own is not None:
        missing = [k for k in ("input_size", "mean", "std") if not own.get(k)]
        if missing:
            raise ModelError(
                f"timm:{model_name}: its config.json's pretrained_cfg gives no {', '.join(missing)}; "
                "write an encoder card that states its preprocessing (docs/encoders.md)"
            )
    cfg_dict = {**dict(getattr(probe, "pretrained_cfg", None) or {}), **(own or {})}
    size = int(cfg_dict["input_size"][-1])
    name = "timm-" + re.sub(r"[^A-Za-z0-9._-]", "-", model_name)
    return EncoderCard(
        name=name,
        description=f"timm model {model_name} with weights {path}",
        model=model_name,
        model_kwargs={},
        prompt_tokens=0,
        prompt_mode="deep",
        init_seed=None,
        weights=(WeightFile(role="backbone", file=path.name, path=path),),
        input_size=size,
        interpolation="bilinear" if cfg_dict.get("interpolation") == "bilinear" else "bicubic",
        mean=tuple(cfg_dict["mean"]),  # type: ignore[arg-type]
        std=tuple(cfg_dict["std"]),  # type: ignore[arg-type]
        output="pooled",
        dim=getattr(probe, "head_hidden_size", None) or probe.num_features,
        compute_precision="bf16",
        source=path,
    )


def load_encoder(
    name_or_card: str | os.PathLike[str] | EncoderCard,
    *,
    device: str | torch.device = "auto",
    models_dir: str | os.PathLike[str] | None = None,
    weights: str | os.PathLike[str] | None = None,
    precision: Precision = "card",
) -> Encoder:
    """Load an encoder: a card name (looked up in the models directory), a card file, or ``timm:NAME``.

    Args:
        name_or_card: ``"puzzletuning-vitb16"``, ``"path/to/card.yaml"``, ``"timm:resnet50"`` or an
            :class:`EncoderCard`.
        device: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        models_dir: where named cards are looked up (default: ``$WSITOOLS_MODELS`` or the repo's
            ``models/``).
        weights: the local checkpoint for ``timm:NAME`` (required there, refused elsewhere).
        precision: ``"card"`` or ``"fp32"`` (exact parity; see :func:`with_precision`).
    """
    if isinstance(name_or_card, EncoderCard):
        card = name_or_card
    else:
        text = str(name_or_card)
        if text.startswith("timm:"):
            if weights is None:
                raise ModelError(f"{text}: a timm model needs a local checkpoint (--weights PATH)")
            card = timm_card(text[len("timm:"):], weights)
        else:
            card = find_card(text, models_dir=models_dir)
    if weights is not None and not str(name_or_card).startswith("timm:"):
        raise ModelError(f"--weights is only for timm:NAME encoders; the card {card.name!r} names its own")
    log.debug("loading encoder %s from %s", card.name, card.source)
    if card.kind is not None:
        encoder = card_kind_loader(card)(card.source, device=device, models_dir=models_dir)
    else:
        encoder = build_encoder(card, device=device)
    return with_precision(encoder, precision)
