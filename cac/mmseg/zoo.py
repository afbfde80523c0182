"""Model catalogue: Table 1's eleven models on mmsegmentation's own shipped configs, and the small
models the embedded presets train on 2 CPU cores.

A model is a name (``<head>-<backbone>``) mapped to a config that mmseg ships (under
``mmseg/.mim/configs``) or to a model dict defined here. Adding a model is one ``register_model`` call.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

from cac.errors import CacError

__all__ = ["ModelEntry", "MODELS", "register_model", "get_model", "mmseg_config_dir", "load_base_config"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    head: str  # for reports: the paper's head name
    backbone: str  # for reports: the paper's backbone name
    config: Optional[str] = None  # an mmseg shipped config (ADE20K, 512x512), relative to configs/
    model: Optional[dict] = field(default=None, compare=False)  # or a model dict given here


MODELS: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    if entry.name in MODELS:
        raise KeyError(f"model {entry.name!r} is already registered")
    if (entry.config is None) == (entry.model is None):
        raise ValueError(f"model {entry.name!r} needs exactly one of config= or model=")
    MODELS[entry.name] = entry
    return entry


def get_model(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise CacError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None


@lru_cache(maxsize=1)
def mmseg_config_dir() -> Path:
    import mmseg

    path = Path(mmseg.__file__).parent / ".mim" / "configs"
    if not path.is_dir():
        raise CacError(f"mmsegmentation's shipped configs not found at {path}; reinstall mmsegmentation==1.2.2")
    return path


def load_base_config(entry: ModelEntry):
    """The entry's full mmengine Config: the shipped file, or the model dict with no data/schedule."""
    from mmengine.config import Config

    if entry.config is not None:
        return Config.fromfile(str(mmseg_config_dir() / entry.config))
    return Config(dict(model=copy.deepcopy(entry.model)))


# -- Table 1 (ADE20K, 512x512, 160k) --------------------------------------------------------------
for _name, _head, _bb, _cfg in [
    ("fcn-mv2", "FCN", "MobileNet-V2", "mobilenet_v2/mobilenet-v2-d8_fcn_4xb4-160k_ade20k-512x512.py"),
    ("deeplabv3plus-mv2", "DeepLab-V3+", "MobileNet-V2",
     "mobilenet_v2/mobilenet-v2-d8_deeplabv3plus_4xb4-160k_ade20k-512x512.py"),
    ("ocrnet-hr18", "OCRNet", "HRNet-W18", "ocrnet/ocrnet_hr18_4xb4-160k_ade20k-512x512.py"),
    ("upernet-r50", "UperNet", "ResNet-50", "upernet/upernet_r50_4xb4-160k_ade20k-512x512.py"),
    ("deeplabv3plus-r50", "DeepLab-V3+", "ResNet-50", "deeplabv3plus/deeplabv3plus_r50-d8_4xb4-160k_ade20k-512x512.py"),
    ("ocrnet-hr48", "OCRNet", "HRNet-W48", "ocrnet/ocrnet_hr48_4xb4-160k_ade20k-512x512.py"),
    ("upernet-r101", "UperNet", "ResNet-101", "upernet/upernet_r101_4xb4-160k_ade20k-512x512.py"),
    ("deeplabv3plus-r101", "DeepLab-V3+", "ResNet-101",
     "deeplabv3plus/deeplabv3plus_r101-d8_4xb4-160k_ade20k-512x512.py"),
    ("upernet-swin-t", "UperNet", "Swin-Tiny", "swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py"),
    ("upernet-swin-b", "UperNet", "Swin-Base†",
     "swin/swin-base-patch4-window12-in22k-384x384-pre_upernet_8xb2-160k_ade20k-512x512.py"),
    ("upernet-swin-l", "UperNet", "Swin-Large†",
     "swin/swin-large-patch4-window12-in22k-384x384-pre_upernet_8xb2-160k_ade20k-512x512.py"),
]:
    register_model(ModelEntry(_name, _head, _bb, config=_cfg))


# -- small models for the embedded presets (2 CPU cores, 64x64 crops) ----------------------------
# A slim ResNet-18 (16 base channels, two stages, output stride 4: 16x16 features for 64x64 images)
# with an FCN head, d = 32.
_BN = dict(type="BN", requires_grad=True)
_PREPROC = dict(type="SegDataPreProcessor", mean=[127.5] * 3, std=[63.75] * 3, bgr_to_rgb=True,
                pad_val=0, seg_pad_val=255)

register_model(ModelEntry(
    "fcn-slim-r18", "FCN", "ResNet-18 (slim)",
    model=dict(
        type="EncoderDecoder",
        data_preprocessor=_PREPROC,
        backbone=dict(type="ResNetV1c", depth=18, num_stages=2, out_indices=(1,), strides=(1, 1),
                      dilations=(1, 1), base_channels=16, stem_channels=16, norm_cfg=_BN, contract_dilation=True,
                      style="pytorch"),
        decode_head=dict(type="FCNHead", in_channels=32, in_index=0, channels=32, num_convs=1, concat_input=False,
                         dropout_ratio=0.0, num_classes=19, norm_cfg=_BN, align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        train_cfg=dict(),
        test_cfg=dict(mode="whole"),
    ),
))
