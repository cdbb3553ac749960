"""Slide-level attention MIL with PathoTune prompts: heads, cohorts, training, prediction.

- :mod:`wsitools.mil.heads`: the ``abmil``, ``pathotune`` and ``meanpool`` heads, their config,
  and safetensors + JSON saving/loading.
- :mod:`wsitools.mil.data`: labels tables, feature bags, cohort checks, patient-level folds.
- :mod:`wsitools.mil.targets`: the targets of classification, survival and regression tasks in a
  labels table, checked (no torch import; the workflow checks samples sheets with it).
- :mod:`wsitools.mil.config`: :class:`TrainConfig` (no torch import).
- :mod:`wsitools.mil.patients`: patient-level bags (``--bag patient``): a patient's slides
  pooled into one bag, label agreement, the slide -> patient table, attention split per slide.
- :mod:`wsitools.mil.train`: cross-validated training (``wsitools train``).
- :mod:`wsitools.mil.predict`: ensembles of trained heads on new slides (``wsitools predict``).
- :mod:`wsitools.mil.synthetic`: feature-bag cohorts with planted key instances, and outcome
  cohorts whose survival or regression target follows their share of key instances (tests, benchmarks).
"""

