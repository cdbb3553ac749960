"""PathoTune at patch level: a frozen ViT with task-specific visual (TVP), task-specific textual
(TTP) and instance-specific visual (IVP) prompts, and a linear classifier on its feature (CLS).

How the prompts enter the ViT (our choices; the paper's code is not public; docs/pathotune.md):

- TVP, deep: ``n_tvp`` learnable tokens per block ([depth, n_tvp, D], normal std 0.02). Before
  block *i* its tokens are appended after the sequence and their outputs dropped after the block
  (VPT-deep), as the prompted ViT does with PuzzleTuning prompts.
- TTP, shallow: the frozen text embeddings of the task and of each class description
  ([1 + C, E], from :func:`wsitools.text.embed_texts`) go through Linear(E, D) + LayerNorm into
  1 + C tokens that are appended once before the first block and travel through all blocks.
- IVP, shallow: the tile's feature from a second frozen encoder (or the frozen backbone itself)
  goes through the *visual refine module* (LayerNorm, Linear(F, D), GELU, Linear(D, n_ivp * D),
  plus a learned offset per token) into ``n_ivp`` tokens, appended once like TTP.
- A backbone that already has prompts (a PuzzleTuning card) keeps them, frozen, in their place.

All prompt outputs are dropped before the final norm. The feature is the backbone card's own
(the CLS token after the final norm for our ViT cards), now prompted; the classifier on it is
BatchNorm without affine parameters (as in MAE's linear probing) + Linear(D, C). The TTP
LayerNorm gain and the last refine layer start small (0.02) so the tuned model starts close to
the frozen one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from wsitools.encoders import Encoder
from wsitools.encoders.loading import token_feature
from wsitools.errors import ConfigError, ModelError
from wsitools.encoders.transforms import prepare_input, unnormalize
from wsitools.encoders.vit import embed_tokens, run_blocks

PromptKind = Literal["tvp", "ttp", "ivp"]
PROMPT_KINDS: tuple[PromptKind, ...] = ("tvp", "ttp", "ivp")


def parse_prompts(text: str | tuple[str, ...] | list[str]) -> tuple[PromptKind, ...]:
    """``"tvp,ttp"`` -> ``("tvp", "ttp")`` in canonical order; unknown or empty -> ModelError."""
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in items if t not in PROMPT_KINDS]
    if bad or not items:
        raise ModelError(f"prompts must be a non-empty subset of tvp,ttp,ivp; got {text!r}")
    return tuple(k for k in PROMPT_KINDS if k in items)


@dataclass(frozen=True)
class PathoTuneConfig:
    """Everything that shapes the trainable part (saved as JSON beside its weights)."""

    prompts: tuple[PromptKind, ...]
    classes: tuple[str, ...]
    embed_dim: int
    depth: int
    n_tvp: int = 8
    n_ivp: int = 4
    text_dim: int | None = None
    ivp_dim: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", parse_prompts(tuple(self.prompts)))
        object.__setattr__(self, "classes", tuple(self.classes))
        if len(self.classes) < 2:
            raise ConfigError(f"PathoTune needs at least two classes, got {list(self.classes)}")
        if "ttp" in self.prompts and not self.text_dim:
            raise ConfigError("TTP prompts need text_dim (the text encoder's width)")
        if "ivp" in self.prompts and not self.ivp_dim:
            raise ConfigError("IVP prompts need ivp_dim (the IVP encoder's feature width)")
        if self.n_tvp < 1 or self.n_ivp < 1:
            raise ConfigError(f"token counts must be positive (n_tvp={self.n_tvp}, n_ivp={self.n_ivp})")

    @property
    def n_ttp(self) -> int:
        return 1 + len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompts"] = list(self.prompts)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PathoTuneConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ModelError(f"PathoTune config has unknown keys {sorted(unknown)}")
        return cls(**{**data, "prompts": tuple(data["prompts"]), "classes": tuple(data["classes"])})


class VisualRefine(nn.Module):
    """IVP's refine module: an instance feature [B, F] -> ``n_tokens`` prompt tokens [B, K, D]."""

    def __init__(self, in_dim: int, dim: int, n_tokens: int):
        super().__init__()
        self.n_tokens = n_tokens
        self.norm = nn.LayerNorm(in_dim)
        self.hidden = nn.Linear(in_dim, dim)
        self.out = nn.Linear(dim, n_tokens * dim)
        self.offsets = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        nn.init.normal_(self.out.weight, std=0.02 / dim**0.5)
        nn.init.zeros_(self.out.bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        h = self.out(F.gelu(self.hidden(self.norm(feature))))
        return h.view(feature.shape[0], self.n_tokens, -1) + self.offsets


class PathoTunePrompts(nn.Module):
    """The trainable part: TVP tokens, the TTP projection (+ frozen text buffer), the IVP refine
    module and the classifier. Its ``state_dict`` is what a tuned model saves."""

    def __init__(self, config: PathoTuneConfig):
        super().__init__()
        self.config = config
        d = config.embed_dim
        if "tvp" in config.prompts:
            self.tvp = nn.Parameter(torch.randn(config.depth, config.n_tvp, d) * 0.02)
        if "ttp" in config.prompts:
            assert config.text_dim is not None
            self.register_buffer("ttp_text", torch.zeros(config.n_ttp, config.text_dim))
            self.ttp_project = nn.Linear(config.text_dim, d)
            self.ttp_norm = nn.LayerNorm(d)
            nn.init.constant_(self.ttp_norm.weight, 0.02)
        if "ivp" in config.prompts:
            assert config.ivp_dim is not None
            self.ivp_refine = VisualRefine(config.ivp_dim, d, config.n_ivp)
        # As in MAE's linear probing: standardise the frozen-scale CLS feature (BatchNorm without
        # affine parameters), then a linear layer, so the classifier learns at a sane rate.
        self.head_norm = nn.BatchNorm1d(d, affine=False, eps=1e-6)
        self.classifier = nn.Linear(d, len(config.classes))
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def classify(self, cls_feature: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] from the CLS feature [B, D]."""
        return self.classifier(self.head_norm(cls_feature))

    def set_text_embeddings(self, embeddings: torch.Tensor) -> None:
        """Install the frozen TTP embeddings [1 + C, E]: the task first, then each class."""
        if tuple(embeddings.shape) != tuple(self.ttp_text.shape):
            raise ModelError(
                f"TTP embeddings have shape {list(embeddings.shape)}, expected {list(self.ttp_text.shape)}"
            )
        with torch.no_grad():
            self.ttp_text.copy_(embeddings)

    def shallow(self, batch: int, ivp_feature: torch.Tensor | None) -> list[torch.Tensor]:
        """TTP and IVP tokens, [B, K, D] each, appended once before the first block."""
        out = []
        if "ttp" in self.config.prompts:
            out.append(self.ttp_norm(self.ttp_project(self.ttp_text)).expand(batch, -1, -1))
        if "ivp" in self.config.prompts:
            if ivp_feature is None:
                raise ModelError("IVP prompts need the instance features of the IVP encoder")
            out.append(self.ivp_refine(ivp_feature))
        return out


class PathoTuneViT(nn.Module):
    """A frozen ViT encoder (from a card) with PathoTune prompts; timm-like interface.

    ``forward_features(x)`` takes the backbone card's preprocessed input and returns normed
    tokens [B, 1 + N, D] (prompts removed), so an :class:`~wsitools.encoders.Encoder` built
    around this module extracts the card's feature (the CLS token for our ViT cards) of the
    prompted model; ``forward(x)`` returns class logits from the classifier on that feature.
    """

    def __init__(self, backbone: Encoder, prompts: PathoTunePrompts, *, ivp: Encoder | None = None):
        super().__init__()
        vit = backbone.model
        needed = ("blocks", "patch_embed", "_pos_embed", "norm", "num_prefix_tokens")
        if not all(hasattr(vit, a) for a in needed) or not getattr(vit, "has_class_token", False):
            raise ModelError(
                f"{backbone.card.source or backbone.name}: PathoTune needs a ViT with a class token "
                f"(timm VisionTransformer); {type(vit).__name__} is not one"
            )
        if backbone.card.output == "cls_mean_patch":
            raise ModelError(
                f"{backbone.card.source or backbone.name}: PathoTune's classifier reads one "
                f"{vit.embed_dim}-d token feature; this card's feature (class token and patch mean, "
                f"{backbone.dim}-d) is not one: use a card whose output is cls, pooled or mean_patch"
            )
        cfg = prompts.config
        if cfg.embed_dim != vit.embed_dim or cfg.depth != len(vit.blocks):
            raise ModelError(
                f"the PathoTune prompts were made for a {cfg.depth}-block, {cfg.embed_dim}-d ViT; "
                f"{backbone.name} has {len(vit.blocks)} blocks of width {vit.embed_dim}"
            )
        if ("ivp" in cfg.prompts) != (ivp is not None):
            raise ModelError("an IVP encoder is needed exactly when the 'ivp' prompt is used")
        self.backbone = vit
        self.backbone_card = backbone.card
        self.prompts = prompts
        self.ivp_card = ivp.card if ivp is not None else None
        self._ivp_encoder = ivp  # not a submodule: its weights belong to its own card
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.has_class_token = True
        self.num_features = vit.num_features
        self.embed_dim = vit.embed_dim

    def train(self, mode: bool = True) -> PathoTuneViT:
        super().train(mode)
        self.backbone.eval()  # frozen backbone: no dropout noise
        return self

    def ivp_features(self, x: torch.Tensor) -> torch.Tensor:
        """The IVP encoder's features [B, F] of the tiles behind ``x`` (no gradient)."""
        assert self._ivp_encoder is not None and self.ivp_card is not None
        with torch.no_grad():
            x01 = unnormalize(self.backbone_card, x.float()).clamp(0, 1)
            return self._ivp_encoder.forward_batch(prepare_input(self.ivp_card, x01)).float()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images -> normed tokens [B, 1 + N, D]: the backbone's own prompts (if any)
        first, then TTP/IVP once before the first block and TVP before every block."""
        vit, cfg = self.backbone, self.prompts.config
        b = x.shape[0]
        ivp_feature = self.ivp_features(x) if "ivp" in cfg.prompts else None
        own = getattr(vit, "prompt_tokens", None)
        own_deep = own is not None and getattr(vit, "prompt_mode", "deep") == "deep"
        shallow = self.prompts.shallow(b, ivp_feature)
        if own is not None and not own_deep:
            shallow.insert(0, own[0].expand(b, -1, -1))

        def deep(i: int) -> torch.Tensor | None:
            tokens = ([own[i]] if own_deep else []) + ([self.prompts.tvp[i]] if "tvp" in cfg.prompts else [])
            return torch.cat(tokens, dim=0).expand(b, -1, -1) if tokens else None

        return run_blocks(vit, embed_tokens(vit, x), shallow=shallow, deep=deep)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The backbone's own pooling of the prompted tokens (timm interface; no logits here)."""
        return self.backbone.forward_head(tokens, pre_logits=True)

    def feature(self, tokens: torch.Tensor) -> torch.Tensor:
        """The backbone card's feature of the prompted tokens (its output kind, as an encoder's)."""
        kind = self.backbone_card.output
        if kind == "pooled":
            return self.forward_head(tokens)
        return token_feature(tokens, kind=kind, num_prefix_tokens=self.num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] from the classifier on the prompted feature."""
        return self.prompts.classify(self.feature(self.forward_features(x)).float())
