"""Devices and mixed precision for every torch step (extraction, MIL, pretraining, tuning).

Kept apart from the encoders so that a step needing only a device pays for importing torch,
not timm.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch

from wsitools.errors import ModelError


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; CUDA without an index is the current GPU,
    named by its index (``cuda:0``). Asking for CUDA without one, or for a GPU index the machine
    does not have, is an error, and so is a string torch does not read as a device (one line,
    not torch's list of every device type)."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelError(f"--device {device}: not a device (auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no CUDA GPU is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
            f"numbered from 0"
        )
    if dev.type == "cuda" and dev.index is None:  # the GPU it runs on, as run records name it
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


TrainPrecision = Literal["auto", "fp32", "bf16", "fp16"]


def training_amp_dtype(precision: TrainPrecision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training on ``device`` (None: full fp32).

    ``auto`` is bf16 on a GPU that has it, else fp16 (with a grad scaler), and fp32 on a CPU;
    asking for bf16 or fp16 on a CPU is an error rather than a silent fp32 run.
    """
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ModelError(f"mixed precision {precision} needs a CUDA device (running on {device})")
        return None
    if precision == "fp32":
        return None
    if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``dtype``, or a no-op context for full precision."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
