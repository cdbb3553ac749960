"""Input transforms shared by every step that feeds tiles to an encoder: uint8 tiles to [0, 1]
floats, the PuzzleTuning augmentation, and a card's input recipe (resize, mean/std) and its inverse."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from wsitools.encoders.cards import EncoderCard


def draw_crops(
    n: int, height: int, width: int, *, generator: torch.Generator, scale: tuple[float, float] = (0.8, 1.0)
) -> torch.Tensor:
    """The random part of :func:`random_resized_crop_flip` for ``n`` tiles of ``height`` x
    ``width``: [n, 5] int64 rows (x0, y0, side, flip left-right, flip top-bottom). Drawn apart
    from the pixels, so that loader workers draw them and the device applies them."""
    area = torch.empty(n).uniform_(*scale, generator=generator) * height * width
    side = torch.sqrt(area).round().clamp(1, min(height, width)).long()
    u = torch.rand(n, 2, generator=generator)
    x0 = (u[:, 0] * (width - side + 1)).floor().long()
    y0 = (u[:, 1] * (height - side + 1)).floor().long()
    flips = (torch.rand(n, 2, generator=generator) < 0.5).long()
    return torch.stack([x0, y0, side, flips[:, 0], flips[:, 1]], dim=1)


def apply_crops(tiles: torch.Tensor, crops: torch.Tensor, *, size: int) -> torch.Tensor:
    """Crop each tile of ``tiles`` [B, 3, S, S] (float in [0, 1], on any device) to its row of
    ``crops`` (:func:`draw_crops`), resize it to ``size`` x ``size`` (antialiased bicubic,
    clamped to [0, 1]) and flip it as drawn. Returns [B, 3, size, size] on the tiles' device."""
    out = torch.empty(len(tiles), 3, size, size, dtype=tiles.dtype, device=tiles.device)
    for i, (x0, y0, side, flip_lr, flip_tb) in enumerate(crops.tolist()):  # one box per image
        crop = tiles[i : i + 1, :, y0 : y0 + side, x0 : x0 + side]
        img = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
        if flip_lr:
            img = img.flip(-1)
        if flip_tb:
            img = img.flip(-2)
        out[i] = img
    return out.clamp_(0.0, 1.0)


def random_resized_crop_flip(
    tiles: torch.Tensor,
    *,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.8, 1.0),
) -> torch.Tensor:
    """RandomResizedCrop (square crops, area fraction in ``scale``) + left-right and top-bottom flips.

    ``tiles``: [B, 3, S, S] float in [0, 1], on any device (the draws come from ``generator``,
    on the CPU). Each tile gets its own square crop covering a uniform fraction ``scale`` of its
    area at a uniform position, resized to ``size`` x ``size`` (antialiased bicubic, clamped to
    [0, 1]), then flipped left-right and top-bottom each with probability 0.5 (the PuzzleTuning
    recipe: square crops, both flips, no normalisation). Returns [B, 3, size, size].
    """
    b, _, h, w = tiles.shape
    return apply_crops(tiles, draw_crops(b, h, w, generator=generator, scale=scale), size=size)


def to_unit_float(tiles: np.ndarray, *, size: int | None = None) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> float32 [B, 3, S, S] in [0, 1], resized to ``size`` if given."""
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float().div_(255.0)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def _mean_std(card: EncoderCard, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    if card.mean is None or card.std is None:
        return None
    mean = torch.tensor(card.mean, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)
    std = torch.tensor(card.std, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)
    return mean, std


def fit_to_input(card: EncoderCard, x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images [B, 3, H, W] -> [B, 3, S, S] at a card's input size S: resized (antialiased,
    the card's interpolation, clamped to [0, 1]) to ``card.resize`` and centre-cropped to S when the
    card has a ``resize``, else resized straight to S; an image already at that size is kept as is."""
    size = card.input_size
    side = card.resize or size
    if tuple(x01.shape[-2:]) != (side, side):
        x01 = F.interpolate(
            x01, size=(side, side), mode=card.interpolation, antialias=True, align_corners=False
        ).clamp(0, 1)
    if side != size:
        top = int(round((side - size) / 2.0))  # torchvision's CenterCrop offset
        x01 = x01[..., top : top + size, top : top + size]
    return x01


def prepare_input(card: EncoderCard, x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images [B, 3, H, W] -> an encoder card's model input: :func:`fit_to_input`, then
    its mean/std (none for PuzzleTuning)."""
    x01 = fit_to_input(card, x01)
    ms = _mean_std(card, x01)
    return x01 if ms is None else (x01 - ms[0]) / ms[1]


def unnormalize(card: EncoderCard, x: torch.Tensor) -> torch.Tensor:
    """Undo a card's mean/std: model input -> [0, 1] pixels (at the card's input size)."""
    ms = _mean_std(card, x)
    return x if ms is None else x * ms[1] + ms[0]
