"""Checkpoints of the official CAC code (tianzhuotao/CAC, mmseg 0.x) as this project's models.

The official code copied CAC into four heads (``FCNHeadCAC``, ``DepthwiseSeparableASPPHeadCAC``,
``OCRHeadCAC`` as OCRNet's second stage, ``UPerHeadCAC``), each holding the head's own modules,
``conv_seg`` (the classifier C) and the two projectors: ``proj`` (theta_p) and ``apd_proj``
(theta_y), whose first Linear has no bias. Here the plain mmseg head sits inside ``CACHead`` as
``.head`` and the projectors in ``.classifier``, so only the CAC head's keys move:

    <cac head>.proj.*      -> <cac head>.classifier.proj_p.*
    <cac head>.apd_proj.*  -> <cac head>.classifier.proj_y.*
    <cac head>.<other>     -> <cac head>.head.<other>

Backbones, auxiliary heads and the first OCR stage keep their names: mmseg 1.x kept the 0.x module
layout of MobileNetV2, ResNetV1c, HRNet and Swin (``BACKBONE_RENAMES`` holds any rename a future
backbone needs). The converted model is the row's ``profile: official`` model, loaded strictly.
"""
from __future__ import annotations

import re
from typing import Mapping

from torch import Tensor

__all__ = ["PROJECTOR_KEYS", "BACKBONE_RENAMES", "cac_head_prefix", "convert_official_state_dict"]

PROJECTOR_KEYS = {"proj.": "classifier.proj_p.", "apd_proj.": "classifier.proj_y."}
BACKBONE_RENAMES: list[tuple[str, str]] = []  # (regex, replacement) on mmseg 0.x keys outside the CAC head


def cac_head_prefix(model_keys: Mapping[str, object] | list[str]) -> str:
    """Where our ``CACHead`` sits in a model's state dict: ``decode_head.`` or ``decode_head.1.``."""
    for key in model_keys:
        match = re.match(r"^(decode_head\.(?:\d+\.)?)classifier\.proj_p\.", key)
        if match:
            return match.group(1)
    raise ValueError("the model has no CACHead with a projector theta_p")


def convert_official_state_dict(state: Mapping[str, Tensor], head_prefix: str) -> dict[str, Tensor]:
    """Official key names to ours; ``head_prefix`` is the CAC head's (same in both layouts)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith(head_prefix):
            rest = key[len(head_prefix):]
            moved = next((new + rest[len(old):] for old, new in PROJECTOR_KEYS.items() if rest.startswith(old)), None)
            key = head_prefix + (moved or "head." + rest)
        else:
            for pattern, replacement in BACKBONE_RENAMES:
                key = re.sub(pattern, replacement, key)
        out[key] = value
    return out
