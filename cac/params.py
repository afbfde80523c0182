"""Parameter counts of a spec's rows, from the resolved configs alone (no data, no weights)."""
from __future__ import annotations

from typing import Optional

import torch

from .spec import load_spec

__all__ = ["count_params", "count_spec_params", "build_model"]


def build_model(model_cfg: dict) -> torch.nn.Module:
    """Build an mmseg segmentor from a config dict (random init; pretrained weights are not loaded)."""
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    import cac  # noqa: F401  (registers CACHead)

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


def count_spec_params(spec_path: str, preset: str = "paper", rows: Optional[list[str]] = None) -> list[dict]:
    from .config import resolve_config

    spec = load_spec(spec_path)
    out = []
    for row in spec.rows:
        if rows and row.label not in rows:
            continue
        cfg = resolve_config(spec.model_for(row, preset), preset, cac=row.cac if row.cac is not None else False,
                             overrides=spec.overrides_for(row, preset), dataset=spec.dataset)
        paper = row.paper.get("params") if isinstance(row.paper, dict) else None
        out.append({"row": row.label, "params": count_params(cfg["model"]), "paper": paper})
    return out
