"""cac — the Context-Aware Classifier (Tian et al., AAAI 2023) for MMSegmentation.

The method is pure PyTorch (:mod:`cac.core`; :mod:`cac.functional` holds the equations). Importing
``cac`` also registers the mmseg plug-in (``CACHead``), the hooks and the embedded dataset when
mmsegmentation is installed, which is what ``custom_imports = dict(imports=['cac'])`` relies on.
"""
from cac import functional
from cac.core.classifier import CACOptions, CACOutputs, ContextAwareClassifier, cac_losses
from cac.core.designs import DESIGNS, register_design

__version__ = "0.1.0"

try:  # the plug-in needs mmseg (and mmcv with ops); the core does not
    import mmseg as _mmseg_library  # noqa: F401  (bound under another name: `cac.mmseg` is ours)
except ImportError:  # pragma: no cover - exercised only without mmseg
    pass
else:
    import importlib

    importlib.import_module("cac.mmseg")  # registers CACHead, the hooks and the datasets

__all__ = ["functional", "CACOptions", "CACOutputs", "ContextAwareClassifier", "cac_losses", "DESIGNS",
           "register_design"]
