"""The fix-position shuffle: the puzzle PuzzleTuning learns to restore (docs/puzzletuning.md).

Each image is cut into non-overlapping square puzzle patches. Per image a random ``int(N * r)``
of the N positions are *fixed* (their patch stays where it was, a position hint for the model);
the patches at the other, *relation*, positions of a group of G consecutive images are pooled
and shuffled across the whole group, then put back into the relation slots, so a patch may land
in another image of its group or back in its own. Everything is done with tensor indexing
(gather and scatter over patch indices): no Python loop over patches or images, on any device.
"""

from __future__ import annotations

import torch

from wsitools.errors import WsiToolsError


class PuzzleError(WsiToolsError, ValueError):
    """A puzzle or PuzzleTuning setting that cannot work (sizes that do not divide, bad ratio)."""


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order, pixels as (y, x, c)."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, patch_size: int, *, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, N, p*p*C] -> [B, C, H, W]."""
    b, n, d = patches.shape
    c = d // (patch_size * patch_size)
    gh, gw = height // patch_size, width // patch_size
    if gh * gw != n or c * patch_size * patch_size != d:
        raise PuzzleError(
            f"cannot assemble {n} patches of {d} values into a {height}x{width} image with "
            f"patch size {patch_size}"
        )
    x = patches.reshape(b, gh, gw, patch_size, patch_size, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


def check_puzzle_setting(
    *, batch_size: int, height: int, width: int, ratio: float, patch_size: int, group_size: int
) -> None:
    """Raise :class:`PuzzleError` with a clear message if the puzzle cannot be built."""
    if patch_size <= 0 or height % patch_size or width % patch_size:
        raise PuzzleError(
            f"puzzle patch size {patch_size} must divide the image size {height}x{width}"
        )
    if group_size <= 0 or batch_size % group_size:
        raise PuzzleError(
            f"puzzle group size {group_size} must divide the batch size {batch_size} "
            "(relation patches are shuffled within groups of consecutive images)"
        )
    if not 0.0 <= ratio <= 1.0:
        raise PuzzleError(f"fix-position ratio {ratio} must lie in [0, 1]")


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform noise drawn on the generator's own device, then moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def fix_position_shuffle(
    images: torch.Tensor,
    *,
    ratio: float,
    patch_size: int,
    group_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build the puzzle of a batch: fixed patches stay, relation patches are shuffled per group.

    Args:
        images: [B, C, H, W] float tensor (PuzzleTuning uses [0, 1] values, no normalisation).
        ratio: fix-position ratio r; ``int(N * r)`` of the N patches of each image stay in place.
        patch_size: side of a square puzzle patch in pixels; must divide H and W.
        group_size: G, the number of consecutive images whose relation patches are pooled and
            shuffled together; must divide B (G = B shuffles across the whole batch).
        generator: optional random generator (CPU or on the images' device) for repeatable puzzles.

    Returns:
        ``(puzzled, mask)``, both [B, C, H, W] like ``images``; ``mask`` is 0 at fixed patches and
        1 at relation patches (in ``images``' dtype).
    """
    if images.ndim != 4:
        raise PuzzleError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    check_puzzle_setting(
        batch_size=b, height=h, width=w, ratio=ratio, patch_size=patch_size, group_size=group_size
    )
    device = images.device
    patches = patchify(images, patch_size)  # [B, N, D]
    n, d = patches.shape[1], patches.shape[2]
    n_fixed = int(n * ratio)
    n_rel = n - n_fixed

    # Per image, a random order of the positions; the first n_fixed are fixed, the rest relation.
    order = torch.argsort(_uniform((b, n), generator, device), dim=1)
    rel_pos = order[:, n_fixed:]  # [B, n_rel]

    mask_tokens = torch.zeros(b, n, dtype=images.dtype, device=device)
    mask_tokens.scatter_(1, rel_pos, 1.0)
    if n_rel == 0:
        return images.clone(), unpatchify(
            mask_tokens[:, :, None].expand(b, n, d), patch_size, height=h, width=w
        )

    # Pool the relation patches of each group of G images and permute them within the group.
    rel = torch.gather(patches, 1, rel_pos[:, :, None].expand(b, n_rel, d))  # [B, n_rel, D]
    groups = b // group_size
    pooled = rel.reshape(groups, group_size * n_rel, d)
    perm = torch.argsort(_uniform((groups, group_size * n_rel), generator, device), dim=1)
    shuffled = torch.gather(pooled, 1, perm[:, :, None].expand_as(pooled)).reshape(b, n_rel, d)

    puzzled = patches.scatter(1, rel_pos[:, :, None].expand(b, n_rel, d), shuffled)
    mask = mask_tokens[:, :, None].expand(b, n, d)
    return (
        unpatchify(puzzled, patch_size, height=h, width=w),
        unpatchify(mask, patch_size, height=h, width=w),
    )
