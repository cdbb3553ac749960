"""What every trainer shares: the learning-rate schedule.

A pure function of the optimiser step, so a resumed run gets exactly the learning rate it would
have had without the interruption.
"""

from __future__ import annotations

import math


def learning_rate_at(
    step: int, *, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0
) -> float:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then a half-cycle cosine down
    to ``min_lr`` at ``total_steps`` (the MAE/PuzzleTuning schedule, stepped per iteration)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
