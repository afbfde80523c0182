"""Building a segmentor from a config dict, and counting its parameters (random init, no weights)."""
from __future__ import annotations

import torch

__all__ = ["count_params", "build_model"]


def build_model(model_cfg: dict) -> torch.nn.Module:
    """Build an mmseg segmentor from a config dict (random init; pretrained weights are not loaded)."""
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    import cac.mmseg  # noqa: F401  (registers CACHead; the package root is an upper layer)

    from mmengine.config import ConfigDict

    register_all_modules(init_default_scope=True)
    return MODELS.build(ConfigDict(model_cfg))  # attribute access (test_cfg.mode) needs ConfigDict


def count_params(model_cfg: dict) -> int:
    """All parameters of the segmentor, auxiliary heads included (as mmseg's model cards count them).

    Built on the CPU with random init (Swin's constructor calls ``.item()``, so the meta device
    cannot be used); the model is freed right after counting.
    """
    model = build_model(model_cfg)
    return sum(p.numel() for p in model.parameters())
