"""cac — the Context-Aware Classifier (Tian et al., AAAI 2023) for MMSegmentation.

``cac.functional`` and ``cac.classifier`` are pure PyTorch. Importing ``cac`` also registers the
mmseg plug-in (``CACHead``) and the embedded dataset when mmsegmentation is installed, which is what
``custom_imports = dict(imports=['cac'])`` in an mmseg config relies on.
"""
from . import functional
from .classifier import CACOptions, CACOutputs, ContextAwareClassifier, cac_losses
from .designs import DESIGNS, register_design

__version__ = "0.1.0"

try:  # the plug-in needs mmseg (and mmcv with ops); the core does not
    import mmseg  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without mmseg
    pass
else:
    from . import registry as _registry  # noqa: F401  (registers CACHead and datasets)

__all__ = ["functional", "CACOptions", "CACOutputs", "ContextAwareClassifier", "cac_losses", "DESIGNS",
           "register_design"]
