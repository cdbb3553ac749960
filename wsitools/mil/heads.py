"""Slide-level MIL heads: one interface, three heads (saved and loaded by :mod:`wsitools.mil.head_folder`).

Every head maps one bag of patch features ``x`` [N, D] (and, for PathoTune's IVP from a second
encoder, that encoder's bag [M, E]) to :class:`HeadOutput`: class logits [C] and attention [N]
(non-negative, summing to one; the map drawn by ``wsitools heatmap``).

Every head first standardises its features with its training bags' statistics (each dimension
centred, all divided by one overall scale where it exceeds 1; :class:`FeatureScaling`, set by
training and saved with the weights), so that the head sees numbers of at most unit scale around
zero whatever unit and origin the encoder gives its features: features centred at 50 or 100 times
larger start with most of abmil's attention gates saturated and logits in the tens, and the head
does not learn.

- ``meanpool``: linear probe on the mean feature (attention is uniform).
- ``abmil``: Ilse et al.'s gated attention MIL: Linear(D, d) + ReLU + dropout, gated attention
  ``a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))``, ``z = sum_i a_i h_i``, Linear(d, C).
- ``pathotune``: abmil plus PathoTune prompts at slide level, starting as abmil (every prompted
  path enters through a gate or weights that are zero at initialisation, and abmil's own modules
  are built first, so one seed gives both heads the same starting weights). Prompt tokens (all of width d):

  - TVP: ``n_tvp`` learnable task tokens;
  - TTP: the frozen text embeddings of the task and of each class description (1 + C tokens),
    stored in the head as a buffer and projected by Linear(E, d) + LayerNorm; with ``text_prior``
    (features in the text encoder's own space), also a prior on each patch's attention score from
    its similarity to the texts, starting from the zero-shot prior;
  - IVP: ``n_ivp`` instance tokens from the refine module: ``n_ivp`` learned queries attend over
    the slide's own projected bag (or a second encoder's bag, projected by its own Linear + ReLU),
    and each pooled summary is refined by a residual MLP (d -> 2d -> d, GELU).

  Each patch embedding attends to the task tokens (TVP, TTP; multi-head cross-attention with a
  residual, cost O(N K d), never O(N^2)). Gated attention over these prompted embeddings gives
  the attention map, which pools the patch embeddings themselves into the slide embedding: the
  prompts steer *where* the head looks, while the evidence pooled stays local to each patch. The
  slide-specific IVP tokens add their own term to the logits and do not reach the attention (as
  keys of the cross-attention they let it tell training slides apart, and the head learned small
  cohorts by heart). That term is linear in the mean IVP token when the tokens come from a second
  encoder (new evidence, to be learned at its own pace) and a cosine, bounded by its gate, when
  they come from the slide's own bag (no new evidence, only a whole-bag summary that a free
  readout learns the training slides from; :meth:`PathoTuneHead.ivp_readout`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from wsitools.errors import ConfigError, ModelError

HeadName = Literal["abmil", "pathotune", "meanpool"]
Pooling = Literal["attention", "mean"]
POOLINGS: tuple[Pooling, ...] = ("attention", "mean")
PromptKind = Literal["tvp", "ttp", "ivp"]
PROMPT_KINDS: tuple[PromptKind, ...] = ("tvp", "ttp", "ivp")


class HeadOutput(NamedTuple):
    """What every head returns for one bag."""

    logits: Tensor  # [C]
    attention: Tensor  # [N], sums to 1


@dataclass(frozen=True)
class HeadConfig:
    """Everything needed to rebuild a head; saved as ``config.json`` beside its weights."""

    head: HeadName
    in_dim: int
    n_classes: int
    dim: int = 128
    attn_dim: int = 128
    dropout: float = 0.25
    prompts: tuple[PromptKind, ...] = ()
    n_tvp: int = 8
    n_ivp: int = 4
    n_heads: int = 4
    text_dim: int | None = None
    ivp_in_dim: int | None = None
    # TTP's text prior on the attention (PathoTuneHead.forward), for features in the text
    # encoder's own space (a vision-language encoder whose text tower embedded the task); its
    # weights are ``ttp_prior_scale * ttp_prior``, so that Adam, which moves ``ttp_prior`` by
    # about the learning rate per step, moves these 1 + C numbers by units within a few epochs.
    text_prior: bool = False
    ttp_prior_scale: float = 10.0
    # TTP texts when they are not the task and one per class (survival and regression tasks:
    # the task and its optional high/low descriptions, with one output).
    n_texts: int | None = None
    # Standardise the features (and a second IVP encoder's) with the training bags' statistics
    # (FeatureScaling). Heads saved before this existed have none (from_dict).
    standardize: bool = True

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ConfigError(f"unknown head {self.head!r}; choose one of {sorted(HEADS)}")
        bad = [p for p in self.prompts if p not in PROMPT_KINDS]
        if bad:
            raise ConfigError(f"unknown prompt kinds {bad}; choose from {', '.join(PROMPT_KINDS)}")
        object.__setattr__(self, "prompts", tuple(p for p in PROMPT_KINDS if p in self.prompts))
        if self.head == "pathotune" and not self.prompts:
            raise ConfigError("the pathotune head needs at least one prompt kind (tvp, ttp, ivp); without prompts use abmil")
        if self.head != "pathotune" and self.prompts:
            raise ConfigError(f"prompts are a pathotune option; the {self.head} head takes none")
        if "ttp" in self.prompts and not self.text_dim:
            raise ConfigError("TTP prompts need text_dim (the text encoder's embedding width)")
        if self.text_prior and "ttp" not in self.prompts:
            raise ConfigError("the text prior is part of the ttp prompt: add ttp to the prompts")
        if self.text_prior and self.text_dim != self.in_dim:
            raise ConfigError(
                f"the text prior needs features in the text encoder's space, but the features are "
                f"{self.in_dim}-d and the text embeddings {self.text_dim}-d"
            )
        if self.ivp_in_dim is not None and "ivp" not in self.prompts:
            raise ConfigError("a second IVP encoder is only used with the 'ivp' prompt")
        if self.dim % self.n_heads:
            raise ConfigError(f"head width dim (--dim) {self.dim} must be divisible by its {self.n_heads} attention heads (n_heads)")

    @property
    def n_ttp(self) -> int:
        """Text tokens: ``n_texts``, else the task description and one per class."""
        return self.n_texts if self.n_texts is not None else 1 + self.n_classes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompts"] = list(self.prompts)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ModelError(f"head config has unknown keys {sorted(unknown)}")
        for key, value in data.items():
            problem = _config_value_problem(key, value)
            if problem is not None:
                raise ModelError(f"head config: {key} = {value!r}, not {problem}")
        prompts = tuple(data.get("prompts", ()))
        # Heads saved before these were settings had the prior whenever the widths matched, unscaled.
        implied = "ttp" in prompts and data.get("text_dim") == data.get("in_dim")
        # Heads saved before feature standardisation saw the raw features.
        return cls(**{"text_prior": implied, "ttp_prior_scale": 1.0, "standardize": False, **data, "prompts": prompts})


_COUNTS = {"in_dim": 1, "n_classes": 1, "dim": 1, "attn_dim": 1, "n_heads": 1, "n_tvp": 0, "n_ivp": 0,
           "text_dim": 1, "ivp_in_dim": 1, "n_texts": 1}
"""The integer settings of a head config and their least values (the last three may be null)."""


def _config_value_problem(key: str, value: Any) -> str | None:
    """What a saved head config's ``value`` for ``key`` should have been, or None if it is usable."""
    if key in _COUNTS:
        if value is None and key in ("text_dim", "ivp_in_dim", "n_texts"):
            return None
        return None if type(value) is int and value >= _COUNTS[key] else f"an integer >= {_COUNTS[key]}"
    if key in ("dropout", "ttp_prior_scale"):
        ok = type(value) in (int, float) and math.isfinite(value) and (key != "dropout" or 0 <= value < 1)
        return None if ok else ("a number in [0, 1)" if key == "dropout" else "a finite number")
    if key in ("text_prior", "standardize"):
        return None if type(value) is bool else "true or false"
    if key == "head":
        return None if isinstance(value, str) else "a head name"
    if key == "prompts":
        return None if isinstance(value, list | tuple) and all(isinstance(p, str) for p in value) else "a list of prompt kinds"
    return None


HEADS: dict[str, Callable[[HeadConfig], nn.Module]] = {}


def register_head(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a head available under ``name``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        HEADS[name] = cls
        return cls

    return deco


class GatedAttentionPool(nn.Module):
    """Gated attention pooling (Ilse et al. 2018), V and U fused into one matmul.

    ``tanh(v)`` is computed as ``2 sigmoid(2v) - 1`` (the same function): on CPUs torch's tanh
    kernel is about five times slower than its sigmoid (0.37 vs 0.08 ms in a 512-patch step).

    ``pooling`` (:func:`set_pooling`) is ``attention``, or ``mean``: every instance weighs the
    same, the head a mean-pooling one that pooling selection trains beside the attention one
    (docs/mil.md, "Pooling selection").
    """

    def __init__(self, dim: int, attn_dim: int):
        super().__init__()
        self.attn_dim = attn_dim
        self.vu = nn.Linear(dim, 2 * attn_dim)
        self.w = nn.Linear(attn_dim, 1)
        self.pooling: Pooling = "attention"

    def weights(self, h: Tensor, bias: Tensor | None = None) -> Tensor:
        """Attention over the N instances of ``h`` [N, d] (softmax, sums to one); ``bias`` [N]
        is added to the scores before the softmax. Uniform where the pool pools by the mean."""
        if self.pooling == "mean":
            return torch.full(h.shape[:-1], 1.0 / h.shape[-2], dtype=h.dtype, device=h.device)
        v, u = self.vu(h).split(self.attn_dim, dim=-1)
        gate = (2.0 * torch.sigmoid(2.0 * v) - 1.0) * torch.sigmoid(u)
        scores = self.w(gate).squeeze(-1)
        return torch.softmax(scores if bias is None else scores + bias, dim=-1)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        attention = self.weights(h)
        return attention @ h, attention


class Dropout(nn.Module):
    """Element dropout exactly as ``nn.Dropout`` (each element zeroed with probability ``p``, the
    rest scaled by ``1 / (1 - p)``, identity in eval mode), with the mask drawn by ``torch.rand``:
    torch's CPU Bernoulli kernel took 0.66 ms of a 5 ms abmil training step, this mask 0.25 ms,
    drawn from the same seeded generator."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ModelError(f"dropout (--dropout) must lie in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        scale = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # 0 or 1/(1-p), one buffer
        return x * scale

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FeatureScaling(nn.Module):
    """``(x - mean) / scale`` per feature dimension, with ``mean`` and ``scale`` [D] buffers
    (saved with the head) that training sets from its training bags (:meth:`set`; the scale is
    one number for all dimensions, at least 1, :func:`wsitools.mil.train.feature_statistics`);
    the identity until then.

    Why: encoders' feature scales differ by orders of magnitude and features may sit far from
    zero, while the heads' initialisation and learning rate assume values of at most order one.
    Centring and scaling down with the training part's statistics (as the regression target is
    standardised) gives the head that start and those steps on every encoder.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def set(self, mean: Tensor, scale: Tensor) -> None:
        """Install the training bags' per-dimension ``mean`` and ``scale`` (> 0) [D]."""
        if mean.shape != self.mean.shape or scale.shape != self.scale.shape:
            raise ModelError(
                f"feature statistics have shapes {tuple(mean.shape)}, {tuple(scale.shape)}; "
                f"the head expects {tuple(self.mean.shape)}"
            )
        if not bool(torch.all(scale > 0)) or not bool(torch.all(torch.isfinite(mean))):
            raise ModelError("feature scales must be positive and means finite")
        self.mean.copy_(mean)
        self.scale.copy_(scale)

    def forward(self, x: Tensor) -> Tensor:
        # One bag-sized temporary, not two: the difference is divided in place (the same bits).
        return (x - self.mean).div_(self.scale)


def _scaling(config: HeadConfig, dim: int) -> nn.Module:
    return FeatureScaling(dim) if config.standardize else nn.Identity()


def feature_scalings(model: nn.Module) -> dict[str, FeatureScaling]:
    """The head's :class:`FeatureScaling` modules by input: ``features`` and, for PathoTune's IVP
    from a second encoder, ``ivp``; empty for a head saved without standardisation."""
    found = {"features": getattr(model, "scaling", None), "ivp": getattr(model, "ivp_scaling", None)}
    return {name: m for name, m in found.items() if isinstance(m, FeatureScaling)}


def _projection(in_dim: int, dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), Dropout(dropout))


@register_head("meanpool")
class MeanPoolHead(nn.Module):
    """Linear probe on the bag's mean feature, the simplest baseline."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.scaling = _scaling(config, config.in_dim)
        self.classifier = nn.Linear(config.in_dim, config.n_classes)

    def forward(self, x: Tensor, ivp: Tensor | None = None) -> HeadOutput:
        attention = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=x.dtype, device=x.device)
        return HeadOutput(self.classifier(self.scaling(x).mean(dim=0)), attention)


@register_head("abmil")
class ABMILHead(nn.Module):
    """Gated attention MIL with a projection layer and dropout: the baseline."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.scaling = _scaling(config, config.in_dim)
        self.project = _projection(config.in_dim, config.dim, config.dropout)
        self.pool = GatedAttentionPool(config.dim, config.attn_dim)
        self.classifier = nn.Linear(config.dim, config.n_classes)

    def forward(self, x: Tensor, ivp: Tensor | None = None) -> HeadOutput:
        z, attention = self.pool(self.project(self.scaling(x)))
        return HeadOutput(self.classifier(z), attention)


class InstanceRefine(nn.Module):
    """IVP's visual refine module: learned queries pool a bag into tokens, a residual MLP refines them."""

    def __init__(self, dim: int, n_tokens: int, dropout: float):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        self.norm_in = nn.LayerNorm(dim)
        self.norm_mid = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, bag: Tensor) -> Tensor:
        keys = self.norm_in(bag)
        weights = torch.softmax(self.queries @ keys.T / math.sqrt(bag.shape[-1]), dim=-1)  # [K, N]
        summary = weights @ bag
        return summary + self.mlp(self.norm_mid(summary))


class PromptCrossAttention(nn.Module):
    """Each patch (query) attends to the K prompt tokens (keys/values), added back through a gate.

    The gate is one number starting at zero (the zero-init gating of LLaMA-Adapter and
    Flamingo), so at initialisation the block is the identity and the PathoTune head computes
    exactly what ``abmil`` computes with the same weights. A single gate is also what keeps
    prompts that cannot help from hurting: Adam moves every parameter by about the learning rate
    per step whatever the size of its gradient, so a zero-initialised output matrix drifts away
    from zero on gradient noise alone, while one gate whose gradient keeps changing sign only
    random-walks, and grows steadily only where the loss keeps asking for the prompts.
    """

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm_patch = nn.LayerNorm(dim)
        self.norm_prompt = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, h: Tensor, prompts: Tensor) -> Tensor:
        n, d = h.shape
        k_tokens, heads, hd = prompts.shape[0], self.n_heads, d // self.n_heads
        q = self.q(self.norm_patch(h)).view(n, heads, hd).transpose(0, 1)  # [H, N, hd]
        k, v = self.kv(self.norm_prompt(prompts)).view(k_tokens, 2, heads, hd).permute(1, 2, 0, 3)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # [H, N, K]
        mixed = (weights @ v).transpose(0, 1).reshape(n, d)
        return h + self.gate * self.out(mixed)


@register_head("pathotune")
class PathoTuneHead(nn.Module):
    """Gated attention MIL whose attention is computed from patch embeddings that first attend to
    TVP/TTP/IVP prompt tokens."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        # abmil's modules first, in abmil's order: with the same seed both heads start from the
        # same weights, and the prompted paths (all gated by zeros) leave abmil's computation.
        self.scaling = _scaling(config, config.in_dim)
        self.project = _projection(config.in_dim, dim, config.dropout)
        self.pool = GatedAttentionPool(dim, config.attn_dim)
        self.classifier = nn.Linear(dim, config.n_classes)
        if "tvp" in config.prompts:
            self.tvp = nn.Parameter(torch.randn(config.n_tvp, dim) * 0.02)
        if "ttp" in config.prompts:
            assert config.text_dim is not None
            self.register_buffer("ttp_text", torch.zeros(config.n_ttp, config.text_dim))
            self.ttp_project = nn.Sequential(nn.Linear(config.text_dim, dim), nn.LayerNorm(dim))
        if "tvp" in config.prompts or "ttp" in config.prompts:
            self.cross = PromptCrossAttention(dim, config.n_heads)
        if config.text_prior:
            # Start from the zero-shot prior: every class text weighs 1 (a patch one standard
            # deviation of its bag closer to a class description gets e times the attention),
            # the task text 0. The user asserted that features and texts share one space.
            start = torch.full((config.n_ttp,), 1.0 / config.ttp_prior_scale)
            start[0] = 0.0
            self.ttp_prior = nn.Parameter(start)
        if "ivp" in config.prompts:
            if config.ivp_in_dim is not None:
                self.ivp_scaling = _scaling(config, config.ivp_in_dim)
                self.ivp_project = _projection(config.ivp_in_dim, dim, config.dropout)
            self.ivp_refine = InstanceRefine(dim, config.n_ivp, config.dropout)
            # The own bag's readout is a cosine (no bias): see ivp_readout.
            self.ivp_classifier = nn.Linear(dim, config.n_classes, bias=config.ivp_in_dim is not None)
            self.ivp_gate = nn.Parameter(torch.zeros(()))

    def set_text_embeddings(self, embeddings: Tensor) -> None:
        """Install the frozen TTP embeddings [1 + C, E] (task first, then classes in order)."""
        if tuple(embeddings.shape) != tuple(self.ttp_text.shape):
            raise ModelError(f"TTP embeddings have shape {tuple(embeddings.shape)}, the head expects {tuple(self.ttp_text.shape)}")
        self.ttp_text.copy_(embeddings)

    def instance_tokens(self, h: Tensor, ivp: Tensor | None) -> Tensor:
        """IVP's [n_ivp, d] tokens: the refine module over the slide's own projected bag ``h`` or
        over the second encoder's bag ``ivp``. They are slide-specific, so they feed the logits
        (through :meth:`ivp_readout`, behind a gate that starts at zero) and not the patches' attention: as
        keys of the cross-attention they let the attention tell the training slides apart, and the
        head learned them by heart (training loss to zero, validation AUROC 0.5, where abmil
        separated the same folds)."""
        if self.config.ivp_in_dim is None:
            return self.ivp_refine(h)
        if ivp is None:
            raise ModelError("this head was trained with IVP features from a second encoder; pass them")
        return self.ivp_refine(self.ivp_project(self.ivp_scaling(ivp)))

    def ivp_readout(self, token: Tensor) -> Tensor:
        """IVP's [C] term of the logits (before the gate) from the mean instance token [d].

        From a second encoder: ``ivp_classifier(token)``, a linear readout free to grow as fast as
        the evidence that encoder adds is learned. From the slide's own bag: the cosine of the
        token with each class's weight vector, in [-1, 1], so no class's term can exceed the
        gate in size, and Adam moves the gate by about the learning rate per step. The own bag's tokens add no
        evidence the attention cannot already pool, and a free linear readout of a whole-bag
        summary learns the training slides by heart from their per-slide shifts and composition
        before the attention has found the few key patches: on a cohort with 1-3 key patches per
        positive bag its training loss reached 0 by epoch 6, the gate stayed below 0.08 while the
        readout's weights grew until the term swung the validation logits by +-8 (so the
        attention never got a gradient, key mass 0.04, and the fold's validation AUROC stayed
        0.5). Bounded, the gate settles near 0.13 there, and the attention finds the keys as
        abmil's does (key mass 0.9 by epoch 3).
        """
        if self.config.ivp_in_dim is not None:
            return self.ivp_classifier(token)
        weight = nn.functional.normalize(self.ivp_classifier.weight, dim=-1)
        return weight @ nn.functional.normalize(token, dim=-1)

    def task_tokens(self) -> Tensor | None:
        """The [K, d] task prompt tokens the patches attend to (TVP, then TTP); None without either."""
        tokens = []
        if "tvp" in self.config.prompts:
            tokens.append(self.tvp)
        if "ttp" in self.config.prompts:
            tokens.append(self.ttp_project(self.ttp_text))
        return torch.cat(tokens, dim=0) if tokens else None

    def forward(self, x: Tensor, ivp: Tensor | None = None) -> HeadOutput:
        h = self.project(self.scaling(x))
        tokens = self.task_tokens()
        prompted = self.cross(h, tokens) if tokens is not None else h
        bias = None
        if self.config.text_prior:
            # The raw features: the prior compares them with the texts in the text encoder's space.
            similarity = nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(self.ttp_text, dim=-1).T
            # Standardised within the bag, so that gamma ~ 1 already separates a patch a few
            # standard deviations closer to a text than the rest of its bag.
            similarity = (similarity - similarity.mean(0)) / (similarity.std(0, correction=0) + 1e-6)
            bias = similarity @ (self.config.ttp_prior_scale * self.ttp_prior)  # [N]: zero at initialisation
        attention = self.pool.weights(prompted, bias)
        logits = self.classifier(attention @ h)
        if "ivp" in self.config.prompts:
            logits = logits + self.ivp_gate * self.ivp_readout(self.instance_tokens(h, ivp).mean(dim=0))
        return HeadOutput(logits, attention)


def attention_pools(model: nn.Module) -> list[GatedAttentionPool]:
    """The head's attention pools (none in ``meanpool``)."""
    return [m for m in model.modules() if isinstance(m, GatedAttentionPool)]


def set_pooling(model: nn.Module, pooling: Pooling) -> None:
    """Make every attention pool of ``model`` pool by ``pooling`` (:class:`GatedAttentionPool`)."""
    if pooling not in POOLINGS:
        raise ModelError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    for pool in attention_pools(model):
        pool.pooling = pooling


def create_head(config: HeadConfig, *, text_embeddings: Tensor | None = None) -> nn.Module:
    """Build the head ``config.head``; TTP heads need ``text_embeddings`` [1 + C, E] here or
    from a loaded state dict."""
    model = HEADS[config.head](config)
    if text_embeddings is not None:
        if "ttp" not in config.prompts:
            raise ModelError("text embeddings given to a head without TTP prompts")
        with torch.no_grad():
            model.set_text_embeddings(text_embeddings.to(torch.float32))
    return model
