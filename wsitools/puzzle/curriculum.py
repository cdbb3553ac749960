"""The PuzzleTuning curriculum: puzzle size and fix-position ratio per epoch.

A pure function of the epoch, so a resumed run gets exactly the puzzles it would have had without
the interruption, and the whole schedule can be printed before training starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from wsitools.errors import ConfigError
from wsitools.puzzle.shuffle import PuzzleError

Strategy = Literal["loop", "decay", "fixed"]
STRATEGIES: tuple[Strategy, ...] = ("loop", "decay", "fixed")


def default_patch_sizes(image_size: int, token_size: int) -> tuple[int, ...]:
    """Puzzle patch sizes for an image: its divisors that are multiples of the ViT token size,
    without the whole image. For 224 px and 16 px tokens this is (16, 32, 112), the paper's list."""
    sizes = tuple(
        s for s in range(token_size, image_size, token_size) if image_size % s == 0
    )
    if not sizes:
        raise PuzzleError(
            f"no puzzle patch size fits a {image_size} px image with {token_size} px tokens"
        )
    return sizes


@dataclass(frozen=True)
class PuzzleStage:
    """The puzzle of one epoch."""

    epoch: int
    patch_size: int
    ratio: float


@dataclass(frozen=True)
class Curriculum:
    """Puzzle patch size and fix-position ratio as a function of the epoch: the official
    PuzzleTuning schedules, each reproduced exactly.

    - ``"loop"`` (the official public training command): ``warmup_patch_size`` during the
      warm-up, then the patch size cycles through ``patch_sizes``, changing every
      ``epochs_per_size`` epochs; the ratio stays at ``ratio``.
    - ``"decay"`` (the official decay option, the paper's harder-puzzles-later idea): the patch
      size stays at ``fixed_patch_size``; the ratio is ``ratio`` during the warm-up, then
      ``r(e) = clip((T - e) / (T - W) * ratio_max, ratio_min, ratio_max)`` (T total epochs, W
      warm-up epochs). The official values, 0.75 and 0.2, are ``min(3 * 0.25, 0.9)`` and
      ``max(0.25 / 2, 0.2)`` of its base ratio 0.25.
    - ``"fixed"`` (the official code without a strategy, for ablations): ``fixed_patch_size`` and
      ``ratio`` throughout.

    ``fixed_patch_size`` None means the smallest of ``patch_sizes``, as the official code does.
    """

    total_epochs: int
    warmup_epochs: int
    strategy: Strategy = "loop"
    patch_sizes: tuple[int, ...] = (16, 32, 112)
    warmup_patch_size: int = 32
    fixed_patch_size: int | None = None
    epochs_per_size: int = 3
    ratio: float = 0.25
    ratio_max: float = 0.75
    ratio_min: float = 0.2

    def __post_init__(self) -> None:
        if self.total_epochs < 1:
            raise ConfigError(f"the number of epochs must be at least 1, got {self.total_epochs}")
        if not 0 <= self.warmup_epochs < self.total_epochs:
            raise ConfigError(
                f"warm-up epochs ({self.warmup_epochs}) must lie in [0, epochs={self.total_epochs})"
            )
        sizes = (*self.patch_sizes, self.warmup_patch_size, self.fixed_patch_size or 1)
        if not self.patch_sizes or min(sizes) <= 0:
            raise ConfigError(
                f"bad puzzle patch sizes {self.patch_sizes} / {self.warmup_patch_size} / {self.fixed_patch_size}"
            )
        if self.epochs_per_size < 1:
            raise ConfigError(f"epochs per patch size must be at least 1, got {self.epochs_per_size}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"curriculum strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        # At a fix-position ratio of 1 every patch stays in place: nothing to restore, a loss of 0.
        if not 0.0 <= self.ratio_min <= self.ratio_max < 1.0 or not 0.0 <= self.ratio < 1.0:
            raise ConfigError(
                f"fix-position ratios must satisfy 0 <= min ({self.ratio_min}) <= max ({self.ratio_max}) < 1 "
                f"and 0 <= ratio ({self.ratio}) < 1 (at 1 every patch stays in place and nothing is learnt)"
            )

    def patch_size_at(self, epoch: int) -> int:
        if self.strategy != "loop":
            return self.fixed_patch_size or min(self.patch_sizes)
        if epoch < self.warmup_epochs:
            return self.warmup_patch_size
        cycle = (epoch - self.warmup_epochs) % (len(self.patch_sizes) * self.epochs_per_size)
        return self.patch_sizes[cycle // self.epochs_per_size]

    def ratio_at(self, epoch: int) -> float:
        if self.strategy != "decay" or epoch < self.warmup_epochs:
            return self.ratio
        t, w = self.total_epochs, self.warmup_epochs
        raw = ((t - w) - (epoch - w)) / (t - w) * self.ratio_max
        return min(max(raw, self.ratio_min), self.ratio_max)

    def at(self, epoch: int) -> PuzzleStage:
        return PuzzleStage(epoch=epoch, patch_size=self.patch_size_at(epoch), ratio=self.ratio_at(epoch))

    def stages(self) -> list[PuzzleStage]:
        return [self.at(e) for e in range(self.total_epochs)]

    def describe(self) -> str:
        """A compact, human-readable table of the schedule: one line per run of equal epochs."""
        lines = [
            f"puzzle curriculum ({self.total_epochs} epochs, warm-up {self.warmup_epochs}, "
            f"strategy {self.strategy}):"
        ]
        stages = self.stages()
        start = 0
        for i in range(1, len(stages) + 1):
            if i == len(stages) or (stages[i].patch_size, stages[i].ratio) != (
                stages[start].patch_size,
                stages[start].ratio,
            ):
                first, last = stages[start].epoch, stages[i - 1].epoch
                span = f"{first}" if first == last else f"{first}-{last}"
                lines.append(
                    f"  epoch {span:>9}: patch {stages[start].patch_size:>4} px, "
                    f"fix ratio {stages[start].ratio:.3f}"
                )
                start = i
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["patch_sizes"] = list(self.patch_sizes)
        return d
