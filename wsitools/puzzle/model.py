"""The PuzzleTuning model: a frozen prompted ViT reads the puzzled image, a
position hint marks the fixed patches, and an MAE-style decoder restores the relation patches.

Only the backbone's prompt tokens and the decoder are trained; every other backbone weight is
frozen (``requires_grad = False``) and the backbone stays in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn

from wsitools.puzzle.shuffle import PuzzleError, patchify, unpatchify


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, *, prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2-D sine-cosine positional embedding, [prefix_tokens + grid_h * grid_w, dim].

    MAE's layout, which the official PuzzleTuning decoder uses: the first half of the channels
    encodes the column (x), the second half the row (y); each half is the sines, then the cosines,
    of the position at ``dim / 4`` geometric frequencies (1 down to 1/10000). Tokens run row by
    row; prefix slots (CLS) are 0. Computed in float32 in the reference's order of operations, so
    the table is bit-identical to the official one and the puzzle loss on the same weights is equal.
    """
    if dim % 4:
        raise PuzzleError(f"a 2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    quarter = dim // 4
    omega = np.arange(quarter, dtype=np.float32)
    omega /= float(quarter)
    omega = 1.0 / 10000**omega
    xs, ys = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    emb = np.concatenate([encode(xs), encode(ys)], axis=1)
    prefix = np.zeros((prefix_tokens, dim), dtype=np.float32)
    return torch.from_numpy(np.concatenate([prefix, emb], axis=0))


class PuzzleDecoder(nn.Module):
    """MAE-style decoder: Linear(D -> d), fixed 2-D sin-cos position embedding, ``depth``
    transformer blocks, LayerNorm, and Linear(d -> t*t*3) per token (t = the ViT token size).

    Input: the encoder tokens [B, P + N, D] (P prefix tokens such as CLS, N patch tokens);
    output: pixels per patch token [B, N, t*t*3] (prefix tokens are dropped).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        grid_size: tuple[int, int],
        token_size: int,
        prefix_tokens: int = 1,
        decoder_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if decoder_dim % num_heads:
            raise PuzzleError(f"decoder width {decoder_dim} is not divisible by {num_heads} heads")
        self.prefix_tokens = prefix_tokens
        self.token_size = token_size
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.register_buffer(
            "pos_embed",
            sincos_pos_embed_2d(decoder_dim, *grid_size, prefix_tokens=prefix_tokens)[None],
            persistent=False,
        )
        self.blocks = nn.Sequential(
            *[
                Block(decoder_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                      norm_layer=partial(nn.LayerNorm, eps=1e-6))
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.pred = nn.Linear(decoder_dim, token_size * token_size * in_chans)
        self.apply(_init_linear_and_norm)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != self.pos_embed.shape[1]:
            raise PuzzleError(
                f"the decoder was built for {self.pos_embed.shape[1]} tokens, got {tokens.shape[1]}"
            )
        x = self.embed(tokens) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x)[:, self.prefix_tokens :]


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@dataclass
class PuzzleOutput:
    loss: torch.Tensor  # scalar, MSE over relation patches
    pred: torch.Tensor  # [B, N, t*t*3] restored pixels per ViT token
    relation: torch.Tensor  # [B, N] 1 at relation tokens, 0 at fixed tokens


class PuzzleTuningModel(nn.Module):
    """Frozen prompted ViT + position hint + MAE-style decoder; MSE on relation patches only.

    ``backbone`` is a timm ``VisionTransformer`` whose ``forward_features`` applies its own
    ``prompt_tokens`` (deep: [L, T, D], appended after the patch tokens before each block and
    dropped after it; shallow: [1, T, D]), as the prompted ViT of ``wsitools.encoders`` does.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
    ) -> None:
        super().__init__()
        prompts = getattr(backbone, "prompt_tokens", None)
        if not isinstance(prompts, nn.Parameter):
            raise PuzzleError(
                f"PuzzleTuning needs a prompted ViT backbone (a 'prompt_tokens' parameter); "
                f"{type(backbone).__name__} has none"
            )
        self.backbone = backbone
        for name, p in backbone.named_parameters():
            p.requires_grad_(name == "prompt_tokens")
        patch_size = backbone.patch_embed.patch_size
        grid = backbone.patch_embed.grid_size
        if patch_size[0] != patch_size[1]:
            raise PuzzleError(f"PuzzleTuning needs square ViT tokens, got {tuple(patch_size)}")
        self.token_size = int(patch_size[0])
        self.image_size = (grid[0] * self.token_size, grid[1] * self.token_size)
        self.prefix_tokens = int(backbone.num_prefix_tokens)
        self.decoder = PuzzleDecoder(
            embed_dim=int(backbone.embed_dim),
            grid_size=(int(grid[0]), int(grid[1])),
            token_size=self.token_size,
            prefix_tokens=self.prefix_tokens,
            decoder_dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_heads,
        )

    def train(self, mode: bool = True) -> PuzzleTuningModel:
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout / drop-path noise in the backbone
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors (prompt tokens and decoder), by their names in this module."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def check_patch_size(self, patch_size: int) -> None:
        if patch_size % self.token_size:
            raise PuzzleError(
                f"puzzle patch size {patch_size} must be a multiple of the ViT token size "
                f"{self.token_size}, so every token is either fixed or relation"
            )

    def forward(self, images: torch.Tensor, puzzled: torch.Tensor, mask: torch.Tensor) -> PuzzleOutput:
        """Restore ``puzzled`` (from :func:`fix_position_shuffle` of ``images`` with ``mask``)."""
        if tuple(images.shape[-2:]) != self.image_size:
            raise PuzzleError(
                f"the backbone takes {self.image_size[0]}x{self.image_size[1]} images, "
                f"got {tuple(images.shape[-2:])}"
            )
        t, p = self.token_size, self.prefix_tokens
        tokens = self.backbone.forward_features(puzzled)  # [B, P + N, D], after the final norm
        with torch.no_grad():  # position hint: the (detached) embedding of the fixed patch
            hint = self.backbone._pos_embed(self.backbone.patch_embed(puzzled))[:, p:]
        relation = mask[:, 0, ::t, ::t].flatten(1)  # [B, N]; exact when t divides the patch size
        patch_tokens = torch.where(relation[..., None] > 0, tokens[:, p:], hint.to(tokens.dtype))
        pred = self.decoder(torch.cat([tokens[:, :p], patch_tokens], dim=1)).float()
        target = patchify(images.float(), t)
        per_token = (pred - target).pow(2).mean(dim=-1)
        loss = (per_token * relation).sum() / relation.sum().clamp_min(1.0)
        return PuzzleOutput(loss=loss, pred=pred, relation=relation)

    def restoration(self, puzzled: torch.Tensor, out: PuzzleOutput) -> torch.Tensor:
        """The restored image: decoder pixels at relation tokens, the puzzle's own at fixed ones."""
        t = self.token_size
        h, w = puzzled.shape[-2:]
        pred_img = unpatchify(out.pred.to(puzzled.dtype), t, height=h, width=w)
        rel_img = unpatchify(
            out.relation[:, :, None].expand(-1, -1, t * t * 3).to(puzzled.dtype), t, height=h, width=w
        )
        return (rel_img * pred_img + (1 - rel_img) * puzzled).clamp(0, 1)
