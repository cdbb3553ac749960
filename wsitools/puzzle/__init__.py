"""PuzzleTuning: prompt pretraining by multiple-puzzle restoration (docs/puzzletuning.md).

The puzzle (:func:`fix_position_shuffle`), the curriculum (:class:`Curriculum`), the model
(:class:`PuzzleTuningModel`), training (:func:`train_puzzle`) and the export of the learned
prompts as an official promptstate file plus an encoder card (:func:`export_promptstate`).
"""

from wsitools.puzzle.backbone import PuzzleBackbone, export_promptstate, load_puzzle_backbone
from wsitools.puzzle.curriculum import Curriculum, PuzzleStage, default_patch_sizes
from wsitools.puzzle.model import PuzzleDecoder, PuzzleOutput, PuzzleTuningModel, sincos_pos_embed_2d
from wsitools.puzzle.shuffle import PuzzleError, fix_position_shuffle
from wsitools.puzzle.train import PuzzleRunResult, PuzzleTrainConfig, train_puzzle

__all__ = [
    "Curriculum",
    "PuzzleBackbone",
    "PuzzleDecoder",
    "PuzzleError",
    "PuzzleOutput",
    "PuzzleRunResult",
    "PuzzleStage",
    "PuzzleTrainConfig",
    "PuzzleTuningModel",
    "default_patch_sizes",
    "export_promptstate",
    "fix_position_shuffle",
    "load_puzzle_backbone",
    "sincos_pos_embed_2d",
    "train_puzzle",
]
