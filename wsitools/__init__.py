"""wsitools: a whole-slide-image pipeline for computational pathology.

Slides -> tissue -> zarr patch stores -> h5 feature stores -> attention-MIL heads, plus
PuzzleTuning prompt pretraining and PathoTune prompt tuning. Every step is a module usable on
its own from Python and from the ``wsitools`` command.
"""

__version__ = "0.1.0"
