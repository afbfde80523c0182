"""The MMSegmentation side of cac: the ``CACHead`` plug-in, the Table 1 model zoo, presets and
resolved configs, the embedded dataset, the three-classifier evaluation and the training hooks.

Importing this package registers everything mmseg/mmengine look up by name (``CACHead``,
``TrackingHook``, ``ContextScenesDataset``, the local checkpoint loader, the train loop that resumes
without replaying data); ``import cac`` does it.
"""
from cac.mmseg import checkpoint  # noqa: F401  (local checkpoint loading under torch >= 2.6)
from cac.mmseg import datasets  # noqa: F401  (ContextScenesDataset)
from cac.mmseg import loops  # noqa: F401  (ResumableIterBasedTrainLoop: resume without replaying data)
from cac.mmseg.head import CACHead
from cac.mmseg.hooks import TrackingHook

__all__ = ["CACHead", "TrackingHook"]
