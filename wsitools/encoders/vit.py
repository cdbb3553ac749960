"""The prompted Vision Transformer of PuzzleTuning (VPT-style visual prompts on a timm ViT).

:class:`PromptedVisionTransformer` is timm's ``VisionTransformer`` with one extra parameter,
``prompt_tokens``:

- ``deep`` mode, shape ``[depth, T, D]``: before block ``i`` the ``T`` prompts of layer ``i`` are
  appended *after* the patch tokens (no positional embedding); after the block those ``T`` outputs
  are dropped, so every block sees fresh prompts and nothing downstream ever sees a prompt output.
- ``shallow`` mode, shape ``[1, T, D]``: the prompts are appended once before the first block,
  travel through all blocks, and are dropped after the last one (before the final norm).

Prompts are zero-initialised. With ``prompt_tokens=0`` the model is exactly timm's ViT (same keys,
same outputs). The timm interface is kept: ``forward_features`` returns the normed tokens
``[B, prefix + N, D]`` with the prompts already removed, ``forward_head(x, pre_logits=True)`` the
pooled (CLS) feature, ``num_features`` the width. Two extra entry points serve prompt pretraining:
:meth:`embed` (patch embedding + position embedding, the tokens fed to the blocks) and
:meth:`forward_blocks` (blocks with prompts + final norm).

The models are registered with timm (``timm.create_model("prompted_vit_base_patch16_224",
prompt_tokens=20, prompt_mode="deep")``) once this module is imported. They carry no pretrained
weights of their own: weights come from model cards (see :mod:`wsitools.encoders.cards`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from wsitools.errors import ModelError

PromptMode = Literal["deep", "shallow"]


def embed_tokens(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Images ``[B, C, H, W]`` -> the tokens ``[B, prefix + N, D]`` entering a timm ViT's first
    block: patch embedding, class token, position embedding (as timm applies them), patch dropout
    and the optional pre-norm; no prompts."""
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))


def run_blocks(
    vit: VisionTransformer,
    x: torch.Tensor,
    *,
    shallow: Sequence[torch.Tensor] = (),
    deep: Callable[[int], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The prompted forward of a timm ViT's blocks, shared by every prompt method.

    ``x``: tokens ``[B, L, D]`` from :func:`embed_tokens`. ``shallow``: prompt tokens ``[B, K, D]``
    appended once after the tokens; they travel through every block. ``deep(i)``: prompt tokens
    ``[B, K, D]`` appended before block ``i`` and dropped after it (None: none at that block).
    Returns the final-normed ``[B, L, D]`` with every prompt removed. Blocks are
    gradient-checkpointed when the ViT's ``grad_checkpointing`` is set and gradients are on.
    """
    n = x.shape[1]
    if shallow:
        x = torch.cat([x, *(p.to(dtype=x.dtype) for p in shallow)], dim=1)
    keep = x.shape[1]
    ckpt = getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled() and not torch.jit.is_scripting()
    for i, block in enumerate(vit.blocks):
        extra = deep(i) if deep is not None else None
        inp = x if extra is None else torch.cat([x, extra.to(dtype=x.dtype)], dim=1)
        out = checkpoint(block, inp, use_reentrant=False) if ckpt else block(inp)
        x = out if extra is None else out[:, :keep]
    return vit.norm(x[:, :n])


class PromptedVisionTransformer(VisionTransformer):
    """timm's ViT with deep or shallow visual prompt tokens (see the module docstring).

    Args:
        prompt_tokens: prompt tokens per layer (``T``); 0 gives a plain ViT without the parameter.
        prompt_mode: ``"deep"`` (fresh prompts before every block) or ``"shallow"`` (once).
        **kwargs: passed to :class:`timm.models.vision_transformer.VisionTransformer`.
    """

    def __init__(self, *, prompt_tokens: int = 0, prompt_mode: PromptMode = "deep", **kwargs: Any):
        super().__init__(**kwargs)
        if prompt_mode not in ("deep", "shallow"):
            raise ValueError(f"prompt_mode must be 'deep' or 'shallow', not {prompt_mode!r}")
        if prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be >= 0, not {prompt_tokens}")
        self.prompt_mode: PromptMode = prompt_mode
        self.num_prompt_tokens = int(prompt_tokens)
        if prompt_tokens:
            layers = len(self.blocks) if prompt_mode == "deep" else 1
            self.prompt_tokens: nn.Parameter | None = nn.Parameter(
                torch.zeros(layers, prompt_tokens, self.embed_dim)
            )
        else:
            self.register_parameter("prompt_tokens", None)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"prompt_tokens"}

    def freeze_backbone(self) -> None:
        """Freeze every parameter except ``prompt_tokens`` (the PuzzleTuning / VPT setting)."""
        for name, param in self.named_parameters():
            param.requires_grad_(name == "prompt_tokens")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> tokens ``[B, prefix + N, D]`` entering the first block
        (:func:`embed_tokens`; no prompts yet)."""
        return embed_tokens(self, x)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, L, D]`` (from :meth:`embed`) -> normed outputs ``[B, L, D]``, prompts dropped."""
        prompts = self.prompt_tokens
        if prompts is None:
            return run_blocks(self, x)
        if self.prompt_mode == "shallow":
            return run_blocks(self, x, shallow=[prompts[0].expand(x.shape[0], -1, -1)])
        return run_blocks(self, x, deep=lambda i: prompts[i].expand(x.shape[0], -1, -1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Images -> normed tokens ``[B, prefix + N, D]`` (class token first, prompts removed)."""
        return self.forward_blocks(self.embed(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Not provided: timm's version would silently skip the prompts."""
        raise NotImplementedError(
            "PromptedVisionTransformer does not support forward_intermediates; "
            "use embed() and forward_blocks()"
        )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # No pretrained source: weights come from model cards. PuzzleTuning feeds [0, 1] pixels
    # without normalisation, hence mean 0 / std 1.
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "prompted_vit_test_patch16_224": _cfg(),
        "prompted_vit_small_patch16_224": _cfg(),
        "prompted_vit_base_patch16_224": _cfg(),
        "prompted_vit_large_patch16_224": _cfg(),
    }
)


def _create(variant: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any) -> PromptedVisionTransformer:
    if pretrained:
        raise ModelError(
            f"{variant} has no built-in pretrained weights; load weights through a model card "
            "(wsitools.encoders.load_encoder)"
        )
    kwargs.setdefault("num_classes", 0)
    return build_model_with_cfg(
        PromptedVisionTransformer, variant, pretrained=False, **dict(model_args, **kwargs)
    )


@register_model
def prompted_vit_test_patch16_224(pretrained: bool = False, **kwargs: Any) -> PromptedVisionTransformer:
    """A tiny prompted ViT for tests: 16 px patches at 224 px, width 64, 3 blocks, 4 heads."""
    args = dict(patch_size=16, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0)
    return _create("prompted_vit_test_patch16_224", pretrained, args, **kwargs)


@register_model
def prompted_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> PromptedVisionTransformer:
    """Prompted ViT-S/16 (384-d, 12 blocks, 6 heads)."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create("prompted_vit_small_patch16_224", pretrained, args, **kwargs)


@register_model
def prompted_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> PromptedVisionTransformer:
    """Prompted ViT-B/16 (768-d, 12 blocks, 12 heads): the PuzzleTuning backbone."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create("prompted_vit_base_patch16_224", pretrained, args, **kwargs)


@register_model
def prompted_vit_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> PromptedVisionTransformer:
    """Prompted ViT-L/16 (1024-d, 24 blocks, 16 heads)."""
    args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create("prompted_vit_large_patch16_224", pretrained, args, **kwargs)
