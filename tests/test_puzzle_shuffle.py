"""Invariants of the fix-position shuffle and the curriculum."""

from __future__ import annotations

import math

import pytest
import torch

from wsitools.errors import ConfigError, WsiToolsError
from wsitools.puzzle import Curriculum, PuzzleError, default_patch_sizes, fix_position_shuffle
from wsitools.training import learning_rate_at
from wsitools.puzzle.shuffle import patchify, unpatchify


def _batch(b: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    # Continuous random values: every patch is distinguishable from every other.
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of a [n, d] tensor in a canonical order (for comparing multisets of patches)."""
    return x[torch.argsort(x[:, 0])]


def test_patchify_roundtrip_and_layout():
    x = _batch(2, 16)
    p = patchify(x, 4)
    assert p.shape == (2, 16, 48)
    # patch 5 = row 1, column 1: pixels [4:8, 4:8]
    assert torch.equal(p[1, 5].reshape(4, 4, 3).permute(2, 0, 1), x[1, :, 4:8, 4:8])
    assert torch.equal(unpatchify(p, 4, height=16, width=16), x)


@pytest.mark.parametrize("ratio,patch,group", [(0.25, 8, 4), (0.5, 4, 8), (0.0, 16, 2), (0.75, 8, 1)])
def test_fixed_patches_unchanged_and_mask_exact(ratio, patch, group):
    x = _batch()
    puzzled, mask = fix_position_shuffle(
        x, ratio=ratio, patch_size=patch, group_size=group, generator=torch.Generator().manual_seed(1)
    )
    assert puzzled.shape == x.shape and mask.shape == x.shape
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # fixed positions keep their own pixels exactly
    assert torch.equal(puzzled * (1 - mask), x * (1 - mask))
    # the mask is constant within each puzzle patch and has exactly N - int(N r) relation patches
    mp = patchify(mask, patch)
    assert torch.equal(mp.amin(-1), mp.amax(-1))
    n = (32 // patch) ** 2
    assert mp[..., 0].sum(1).tolist() == [float(n - int(n * ratio))] * x.shape[0]


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_relation_multiset_preserved_per_group(group):
    x = _batch()
    puzzled, mask = fix_position_shuffle(
        x, ratio=0.25, patch_size=8, group_size=group, generator=torch.Generator().manual_seed(2)
    )
    px, pp, rel = patchify(x, 8), patchify(puzzled, 8), patchify(mask, 8)[..., 0] > 0
    moved_across = 0
    for g in range(x.shape[0] // group):
        sl = slice(g * group, (g + 1) * group)
        before = _sorted_rows(px[sl][rel[sl]])
        after = _sorted_rows(pp[sl][rel[sl]])
        assert torch.equal(before, after)
        # where each relation patch of the puzzle came from (image index within the batch)
        for img in range(sl.start, sl.stop):
            for patch in pp[img][rel[img]]:
                src = (px == patch).all(-1).nonzero()
                assert len(src) == 1 and sl.start <= src[0, 0] < sl.stop  # stays within its group
                moved_across += int(src[0, 0] != img)
    if group > 1:
        assert moved_across > 0  # relation patches really travel between images of a group


def test_ratio_one_returns_input_and_zero_mask():
    x = _batch()
    puzzled, mask = fix_position_shuffle(x, ratio=1.0, patch_size=8, group_size=8)
    assert torch.equal(puzzled, x)
    assert float(mask.abs().sum()) == 0.0


def test_ratio_zero_shuffles_everything_and_generator_repeats():
    x = _batch()
    a, ma = fix_position_shuffle(x, ratio=0.0, patch_size=8, group_size=8, generator=torch.Generator().manual_seed(5))
    b, mb = fix_position_shuffle(x, ratio=0.0, patch_size=8, group_size=8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert bool((ma == 1).all())
    assert not torch.equal(a, x)
    c, _ = fix_position_shuffle(x, ratio=0.0, patch_size=8, group_size=8, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a, c)


def test_clear_errors():
    x = _batch(6)
    with pytest.raises(PuzzleError, match="group size 4 must divide the batch size 6"):
        fix_position_shuffle(x, ratio=0.25, patch_size=8, group_size=4)
    with pytest.raises(PuzzleError, match="patch size 12 must divide the image size 32x32"):
        fix_position_shuffle(x, ratio=0.25, patch_size=12, group_size=3)
    with pytest.raises(PuzzleError, match="ratio"):
        fix_position_shuffle(x, ratio=1.5, patch_size=8, group_size=3)
    assert issubclass(PuzzleError, WsiToolsError)


def test_default_patch_sizes_match_paper():
    assert default_patch_sizes(224, 16) == (16, 32, 112)
    assert default_patch_sizes(32, 4) == (4, 8, 16)


def test_loop_curriculum_is_the_official_commands():
    c = Curriculum(total_epochs=200, warmup_epochs=20)
    assert c.strategy == "loop"
    sizes = [c.patch_size_at(e) for e in range(200)]
    assert sizes[:20] == [32] * 20
    assert sizes[20:29] == [16] * 3 + [32] * 3 + [112] * 3
    assert sizes[29:32] == [16] * 3
    assert {c.ratio_at(e) for e in range(200)} == {0.25}
    # a pure function of the epoch: the same object gives the same answer in any order
    assert [c.at(e) for e in (150, 3, 150)][0] == c.at(150)
    text = c.describe()
    assert "epoch      0-19: patch   32 px, fix ratio 0.250" in text
    assert "strategy loop" in text
    with pytest.raises(ConfigError, match="warm-up"):
        Curriculum(total_epochs=5, warmup_epochs=5)
    with pytest.raises(ConfigError, match="strategy"):
        Curriculum(total_epochs=5, warmup_epochs=1, strategy="linear")


def _official_decay_ratio(epoch: int, total: int, warmup: int, basic: float = 0.25) -> float:
    """The official ratio scheduler's decay branch, written out from its published definition."""
    if epoch < warmup:
        return basic
    hi, lo = min(3 * basic, 0.9), max(basic * 0.5, 0.2)
    return min(max(((total - warmup) - (epoch - warmup)) / (total - warmup) * hi, lo), hi)


def test_decay_and_fixed_curricula_are_the_official_options():
    c = Curriculum(total_epochs=200, warmup_epochs=20, strategy="decay")
    assert [c.ratio_at(e) for e in range(200)] == [_official_decay_ratio(e, 200, 20) for e in range(200)]
    assert c.ratio_at(0) == c.ratio_at(19) == 0.25  # the warm-up keeps the base ratio
    assert c.ratio_at(20) == pytest.approx(0.75) and c.ratio_at(110) == pytest.approx(90 / 180 * 0.75)
    assert c.ratio_at(199) == pytest.approx(0.2)
    after = [c.ratio_at(e) for e in range(20, 200)]
    assert all(a >= b for a, b in zip(after, after[1:]))  # never gets easier after the warm-up
    assert {c.patch_size_at(e) for e in range(200)} == {16}  # the puzzle size stays at the smallest
    assert Curriculum(total_epochs=9, warmup_epochs=2, strategy="decay", fixed_patch_size=32).patch_size_at(5) == 32
    f = Curriculum(total_epochs=10, warmup_epochs=2, strategy="fixed", ratio=0.5)
    assert {(s.patch_size, s.ratio) for s in f.stages()} == {(16, 0.5)}


def test_learning_rate_warmup_then_cosine():
    kw = dict(base_lr=1e-3, total_steps=100, warmup_steps=10)
    assert learning_rate_at(0, **kw) == 0.0
    assert learning_rate_at(5, **kw) == pytest.approx(5e-4)
    assert learning_rate_at(10, **kw) == pytest.approx(1e-3)
    assert learning_rate_at(55, **kw) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate_at(100, **kw) == pytest.approx(0.0, abs=1e-12)
