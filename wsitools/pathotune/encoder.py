"""Saving a tuned PathoTune model and loading it back, as a classifier or as an encoder card.

A tuning run writes into its folder:

- ``pathotune.safetensors``: the trainable part (TVP tokens, TTP projection and the frozen text
  embeddings it projects, the IVP refine module, the classifier);
- ``pathotune.json``: its :class:`PathoTuneConfig`, the IVP encoder it reads, the task and
  text model, and the backbone's ``encoder_hash`` (checked at load time);
- ``{name}.yaml``: an encoder card. It is the backbone's card (architecture, weight files with
  pinned checksums, input recipe, output) under a new name, plus two PathoTune entries::

      architecture:
        ...                               # the backbone's
        pathotune: {config: pathotune.json}
      weights:
        ...                               # the backbone's
        - {role: pathotune, file: pathotune.safetensors, sha256: ...}

  :func:`load_pathotune_encoder` reads such a card and returns an
  :class:`~wsitools.encoders.Encoder` whose feature is the prompted CLS token, for
  ``wsitools extract``; :func:`load_pathotune` returns the classifier.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from wsitools.device import resolve_device
from wsitools.encoders import Encoder, EncoderCard, load_encoder
from wsitools.encoders.cards import card_from_dict, card_to_dict
from wsitools.encoders.checkpoint import read_state_dict
from wsitools.encoders.loading import build_encoder
from wsitools.errors import ModelError
from wsitools.io import atomic_path, sha256_file, stable_hash, write_json_atomic, write_safetensors, yaml_loader
from wsitools.pathotune.model import PathoTuneConfig, PathoTunePrompts, PathoTuneViT

FORMAT_VERSION = 1
KIND = "pathotune_patch"
WEIGHTS_FILE = "pathotune.safetensors"
CONFIG_FILE = "pathotune.json"


def ivp_reference(backbone: Encoder, ivp: Encoder | None) -> dict[str, Any] | None:
    """How ``pathotune.json`` names the IVP encoder: the backbone itself, or a card."""
    if ivp is None:
        return None
    if ivp is backbone:
        return {"source": "backbone"}
    return {
        "source": "card",
        "card": str(ivp.card.source) if ivp.card.source else ivp.name,
        "name": ivp.name,
        "encoder_hash": ivp.encoder_hash,
    }


def save_pathotune(
    folder: str | os.PathLike[str],
    model: PathoTuneViT,
    *,
    backbone: Encoder,
    ivp: Encoder | None,
    name: str,
    meta: dict[str, Any],
    trained_on: str | None = None,
) -> tuple[Path, Path]:
    """Write the weights, ``pathotune.json`` and the encoder card ``{name}.yaml``; return
    (weights, card). ``trained_on`` (e.g. the tile sizes and resolutions of the patch stores)
    ends the card's description."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    state = model.prompts.state_dict()
    with atomic_path(weights, overwrite=True) as tmp:
        # One metadata key, so that the same prompts give the same bytes (the library writes
        # several in a random order); the kind is in the card and the config.
        write_safetensors(tmp, state, metadata={"format": "pt"})
    write_json_atomic(
        folder / CONFIG_FILE,
        {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "config": model.prompts.config.to_dict(),
            "backbone": {"name": backbone.name, "encoder_hash": backbone.encoder_hash},
            "ivp": ivp_reference(backbone, ivp),
            **meta,
        },
    )
    card = card_to_dict(backbone.card)
    card["name"] = name
    card["description"] = (
        f"{backbone.name} with PathoTune prompts ({', '.join(model.prompts.config.prompts)}) tuned for "
        f"{', '.join(model.prompts.config.classes)}; the feature is the prompted CLS token."
        + (f" Tuned on {trained_on}." if trained_on else "")
    )
    for entry in card["weights"]:
        digest = backbone.weight_sha256.get(entry["role"])
        if digest:
            entry["sha256"] = digest
    card["architecture"]["pathotune"] = {"config": CONFIG_FILE}
    card["weights"].append({"role": "pathotune", "file": WEIGHTS_FILE, "sha256": sha256_file(weights)})
    card_path = folder / f"{name}.yaml"
    with atomic_path(card_path, overwrite=True) as tmp:
        tmp.write_text(yaml.safe_dump(card, sort_keys=False))
    return weights, card_path


def _split_card(path: Path) -> tuple[EncoderCard, Path, Path, str | None]:
    """A PathoTune card -> (the backbone's card under the tuned name, weights, config, pinned sha)."""
    try:
        data = yaml.load(path.read_text(), Loader=yaml_loader())  # safe; a repeated key is an error
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"{path}: not a readable card ({exc})") from None
    data = copy.deepcopy(data)
    pt = (data.get("architecture") or {}).pop("pathotune", None)
    if not isinstance(pt, dict) or "config" not in pt:
        raise ModelError(f"{path}: not a PathoTune card (no architecture.pathotune.config)")
    entries = [w for w in data.get("weights", []) if w.get("role") == "pathotune"]
    if len(entries) != 1:
        raise ModelError(f"{path}: a PathoTune card needs exactly one weight file with role 'pathotune'")
    data["weights"] = [w for w in data["weights"] if w.get("role") != "pathotune"]
    card = card_from_dict(data, source=path)
    return card, path.parent / entries[0]["file"], path.parent / pt["config"], entries[0].get("sha256")


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable PathoTune config ({exc})") from None
    if meta.get("kind") != KIND or meta.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}: not a version-{FORMAT_VERSION} {KIND} config")
    return meta


@dataclass
class TunedModel:
    """A tuned PathoTune model rebuilt from its card."""

    model: PathoTuneViT  # eval mode, on the backbone's device
    backbone: Encoder
    card: EncoderCard  # the backbone's card under the tuned name (the encoder's input recipe)
    meta: dict[str, Any]  # pathotune.json
    weights_sha256: str  # of pathotune.safetensors


def load_pathotune(
    card: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    models_dir: str | os.PathLike[str] | None = None,
) -> TunedModel:
    """Rebuild a tuned model from its card (``{name}.yaml`` in the tuning folder).

    The backbone is rebuilt from the card and must have the ``encoder_hash`` recorded at
    training time; the trainable weights must match their pinned sha256 and the config exactly.
    """
    path = Path(card).expanduser().resolve()
    base, weights, config_path, pinned = _split_card(path)
    meta = _read_meta(config_path)
    dev = resolve_device(device)
    backbone = build_encoder(base, device=dev)
    if backbone.encoder_hash != meta["backbone"]["encoder_hash"]:
        raise ModelError(
            f"{path}: its backbone ({meta['backbone']['name']}) is not the one the prompts were "
            "tuned on (different weights or card settings)"
        )
    if not weights.is_file():
        raise ModelError(f"{weights}: PathoTune weight file not found")
    digest = sha256_file(weights)
    if pinned and digest != pinned:
        raise ModelError(f"{weights}: wrong checksum (the card {path} pins {pinned})")
    ref = meta.get("ivp")
    if ref is None:
        ivp = None
    elif ref["source"] == "backbone":
        ivp = backbone
    else:
        ivp = load_encoder(ref["card"], device=dev, models_dir=models_dir)
        if ivp.encoder_hash != ref["encoder_hash"]:
            raise ModelError(f"{path}: its IVP encoder {ref['card']} changed since tuning (encoder hash differs)")
    config = PathoTuneConfig.from_dict(meta["config"])
    prompts = PathoTunePrompts(config)
    prompts.load_state_dict(read_state_dict(weights, prompts.state_dict()), strict=True)
    model = PathoTuneViT(backbone, prompts.to(dev), ivp=ivp).eval()
    return TunedModel(model=model, backbone=backbone, card=base, meta=meta, weights_sha256=digest)


def load_pathotune_encoder(
    card: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    models_dir: str | os.PathLike[str] | None = None,
) -> Encoder:
    """An :class:`~wsitools.encoders.Encoder` for a PathoTune card: the card's input recipe, the
    prompted CLS feature, and an ``encoder_hash`` over the backbone, the tuned weights and the
    IVP encoder. This is the function the encoder loader calls for cards with
    ``architecture.pathotune``."""
    tuned = load_pathotune(card, device=device, models_dir=models_dir)
    digests = {**tuned.backbone.weight_sha256, "pathotune": tuned.weights_sha256}
    ivp = tuned.meta.get("ivp")
    encoder_hash = stable_hash(
        {
            "backbone": tuned.backbone.encoder_hash,
            "pathotune": [tuned.weights_sha256, tuned.meta["config"]],
            "ivp": None if ivp is None else ivp.get("encoder_hash", "backbone"),
        }
    )
    return Encoder(
        name=tuned.card.name, card=tuned.card, model=tuned.model, device=tuned.backbone.device,
        encoder_hash=encoder_hash, weight_sha256=digests,
    )
