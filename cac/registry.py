"""Everything cac registers into mmseg/mmengine, imported once by ``import cac``."""
from . import checkpoint  # noqa: F401  (local checkpoint loading under torch >= 2.6)
from .head import CACHead  # noqa: F401
from .hooks import TrackingHook  # noqa: F401
from .data import datasets as _datasets  # noqa: F401  (ContextScenesDataset)

__all__ = ["CACHead", "TrackingHook"]
