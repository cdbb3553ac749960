"""Slide-level attention MIL with PathoTune prompts: heads, cohorts, training, prediction.

- :mod:`wsitools.mil.heads`: the ``abmil``, ``pathotune`` and ``meanpool`` heads and their config.
- :mod:`wsitools.mil.head_folder`: a trained head on disk (safetensors + JSON): path, write, read, verify.
- :mod:`wsitools.mil.run_folder`: a training run on disk (its record, results, fold heads and
  attention files), written whole or not at all; path, write, read, verify.
- :mod:`wsitools.mil.data`: cohorts (labelled slides matched to their checked feature bags) and
  the sampling of bag rows for training steps (labels tables and their targets: :mod:`wsitools.labels`; feature
  bags: :mod:`wsitools.feature_store`).
- :mod:`wsitools.mil.folds`: patient-level stratified k-fold, or the labels table's own splits.
- :mod:`wsitools.mil.config`: :class:`TrainConfig` (no torch import).
- :mod:`wsitools.mil.patients`: patient-level bags (``--bag patient``): a patient's slides
  pooled into one bag, label agreement, the slide -> patient table, attention split per slide.
- :mod:`wsitools.mil.train`: cross-validated training (``wsitools train``).
- :mod:`wsitools.mil.predict`: ensembles of trained heads on new slides (``wsitools predict``).
- :mod:`wsitools.mil.synthetic`: feature-bag cohorts with planted key instances, and outcome
  cohorts whose survival or regression target follows their share of key instances (tests, benchmarks).
"""

