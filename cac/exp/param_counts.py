"""Parameter counts of a spec's rows (Table 1's #params), from the resolved configs alone."""
from __future__ import annotations

from typing import Optional

from cac.exp.spec import load_spec
from cac.mmseg.config import resolve_config
from cac.mmseg.params import count_params

__all__ = ["count_spec_params"]


def count_spec_params(spec_path: str, preset: str = "paper", rows: Optional[list[str]] = None,
                      model: Optional[str] = None) -> list[dict]:
    """``model`` (``--model``) replaces every row's base model."""
    spec = load_spec(spec_path).with_model(model)
    out = []
    for row in spec.rows_for(preset):
        if rows and row.label not in rows:
            continue
        cfg = resolve_config(spec.model_for(row, preset), preset, cac=row.cac if row.cac is not None else False,
                             classifier=spec.classifier_for(row, preset), overrides=spec.overrides_for(row, preset),
                             dataset=spec.dataset)
        paper = row.paper.get("params") if isinstance(row.paper, dict) else None
        out.append({"row": row.label, "params": count_params(cfg["model"]), "paper": paper})
    return out
