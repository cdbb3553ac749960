"""The frozen prompted ViT that PuzzleTuning trains prompts for, and the export of those prompts.

A backbone comes from an encoder card (``wsitools.encoders``). A card of a plain timm ViT
(``vit_base_patch16_224``) is trained as its prompted twin (``prompted_vit_base_patch16_224``,
the same network plus prompt tokens). Prompts start at zero (the paper) unless the card
brings a prompts file, in which case training continues from those prompts.

The export is the official promptstate file (``{'Prompt_Tokens': [L, T, D], 'head': {}}``, read
by the PuzzleTuning code and by ours alike) plus an encoder card that names the same backbone
weights and the new prompts, so ``wsitools extract --encoder CARD.yaml`` uses them at once.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import timm
import torch
import yaml
from torch import nn

from wsitools.encoders import EncoderCard, PromptedVisionTransformer, build_encoder, find_card, read_card
from wsitools.encoders.cards import card_to_dict
from wsitools.errors import ModelError
from wsitools.io import atomic_path, sha256_file, write_torch
from wsitools.puzzle.shuffle import PuzzleError

PromptMode = Literal["deep", "shallow"]
DEFAULT_PROMPT_TOKENS = 20


@dataclass
class PuzzleBackbone:
    """A prompted ViT ready for PuzzleTuning, with the card that describes it (prompts included)."""

    model: PromptedVisionTransformer
    card: EncoderCard  # the card of this network: model name and prompt settings as trained
    weight_sha256: dict[str, str]  # sha256 of the card's weight files, by role
    device: torch.device


def _attach_zero_prompts(model: PromptedVisionTransformer, tokens: int, mode: PromptMode) -> None:
    """Give a prompted ViT built without prompts a zero prompt parameter of ``tokens`` per layer."""
    layers = len(model.blocks) if mode == "deep" else 1
    ref = next(model.parameters())
    model.prompt_tokens = nn.Parameter(torch.zeros(layers, tokens, model.embed_dim, device=ref.device))
    model.num_prompt_tokens = tokens
    model.prompt_mode = mode


def prompted_card(card: EncoderCard) -> EncoderCard:
    """``card`` with its model replaced by the prompted twin when it names a plain timm ViT."""
    if card.model.startswith("prompted_"):
        return card
    twin = f"prompted_{card.model}"
    if not timm.is_model(twin):
        raise ModelError(
            f"{card.source or card.name}: PuzzleTuning needs a prompted ViT; {card.model!r} has no "
            f"prompted twin ({twin!r} is not a registered model)"
        )
    return dataclasses.replace(card, model=twin)


def load_puzzle_backbone(
    name_or_card: str | os.PathLike[str] | EncoderCard,
    *,
    prompt_tokens: int | None = None,
    prompt_mode: PromptMode | None = None,
    device: str | torch.device = "auto",
    models_dir: str | os.PathLike[str] | None = None,
) -> PuzzleBackbone:
    """Build the frozen backbone with trainable prompt tokens (``requires_grad`` on them only).

    ``prompt_tokens``/``prompt_mode`` default to the card's prompt settings, else 20 deep tokens.
    A card with a prompts file fixes them: asking for others is an error.
    """
    card = name_or_card if isinstance(name_or_card, EncoderCard) else find_card(str(name_or_card), models_dir=models_dir)
    if card.kind is not None:  # its own weights (a PathoTune model's) would not carry over to the export
        raise PuzzleError(
            f"{card.source or card.name}: PuzzleTuning starts from a backbone card (a prompted ViT and its "
            f"weights), not a {card.kind} card"
        )
    card = prompted_card(card)
    if card.weight("prompts") is not None:
        if (prompt_tokens not in (None, card.prompt_tokens)) or (prompt_mode not in (None, card.prompt_mode)):
            asked = " ".join(str(v) for v in (prompt_tokens or card.prompt_tokens, prompt_mode or card.prompt_mode))
            raise PuzzleError(
                f"{card.source or card.name}: its prompts file holds {card.prompt_tokens} "
                f"{card.prompt_mode} tokens; cannot train {asked} tokens from it"
            )
        encoder = build_encoder(card, device=device)
    else:
        tokens = prompt_tokens or card.prompt_tokens or DEFAULT_PROMPT_TOKENS
        mode: PromptMode = prompt_mode or (card.prompt_mode if card.prompt_tokens else "deep")
        encoder = build_encoder(dataclasses.replace(card, prompt_tokens=0), device=device)
        _attach_zero_prompts(encoder.model, tokens, mode)
        card = dataclasses.replace(card, prompt_tokens=tokens, prompt_mode=mode)
    model = encoder.model
    if not isinstance(model, PromptedVisionTransformer) or model.prompt_tokens is None:
        raise ModelError(f"{card.source or card.name}: {card.model} is not a prompted ViT")
    model.freeze_backbone()
    return PuzzleBackbone(model=model, card=card, weight_sha256=dict(encoder.weight_sha256), device=encoder.device)


def export_promptstate(
    prompts: torch.Tensor,
    out_dir: str | os.PathLike[str],
    *,
    card: EncoderCard,
    weight_sha256: dict[str, str],
    name: str,
    description: str,
    overwrite: bool = True,
) -> tuple[Path, Path]:
    """Write ``{name}_promptstate.pth`` (official format) and the card ``{name}.yaml`` into ``out_dir``.

    ``card`` is the backbone's card as trained (its prompt settings must match ``prompts``);
    the new card keeps its architecture, input recipe and backbone weights (checksums pinned to
    the files trained on) and adds the promptstate as its ``prompts`` weight file, named
    relative to the card so the folder can be moved as a whole. Returns (promptstate, card).
    """
    if prompts.ndim != 3 or prompts.shape[1] != card.prompt_tokens:
        raise ModelError(
            f"prompt tensor {list(prompts.shape)} does not match the card's {card.prompt_tokens} tokens"
        )
    out = Path(out_dir)
    state_path = out / f"{name}_promptstate.pth"
    card_path = out / f"{name}.yaml"
    with atomic_path(state_path, overwrite=overwrite) as tmp:
        write_torch(tmp, {"Prompt_Tokens": prompts.detach().float().cpu().contiguous(), "head": {}})
    data = card_to_dict(card)
    data["name"] = name
    data["description"] = description
    weights = []
    for entry in data["weights"]:
        if entry["role"] == "prompts":
            continue
        digest = weight_sha256.get(entry["role"])
        if digest:
            entry["sha256"] = digest
        weights.append(entry)
    weights.append({"role": "prompts", "file": state_path.name, "sha256": sha256_file(state_path)})
    data["weights"] = weights
    with atomic_path(card_path, overwrite=overwrite) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    read_card(card_path)  # the card we wrote must be one the encoder loader accepts
    return state_path, card_path
