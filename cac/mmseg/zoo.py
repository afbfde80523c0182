"""Model catalogue: Table 1's eleven models on mmsegmentation's own shipped configs, and the small
models the embedded presets train on 2 CPU cores.

A model is a name (``<head>-<backbone>``) mapped to a config that mmseg ships (under
``mmseg/.mim/configs``) or to a model dict defined here. Adding a model is one ``register_model`` call.

A user's own model needs no registration: :func:`resolve_model` also takes a path to an mmseg config
file or ``mmseg::<config>`` (one of mmseg's shipped configs, as mmengine writes it), and names it by
its file name and a hash of its loaded content, so the same file under another path is the same model.
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

from cac.errors import CacError

__all__ = ["ModelEntry", "MODELS", "register_model", "get_model", "mmseg_config_dir", "load_base_config",
           "resolve_model", "is_model_file", "MMSEG_PREFIX", "dataset_config", "DATASET_CONFIG_ENDINGS"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    head: str  # for reports: the paper's head name
    backbone: str  # for reports: the paper's backbone name
    config: Optional[str] = None  # an mmseg shipped config (ADE20K, 512x512), relative to configs/
    model: Optional[dict] = field(default=None, compare=False)  # or a model dict given here
    own_data: bool = False  # a config file given by the user: at preset paper it keeps its own data


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
        return _load_config_file(str(mmseg_config_dir() / entry.config))  # an absolute path stays itself
    return Config(dict(model=copy.deepcopy(entry.model)))


MMSEG_PREFIX = "mmseg::"


def is_model_file(ref: str) -> bool:
    """A model reference that names a config file (a path or ``mmseg::...``), not a registered name."""
    return ref.startswith(MMSEG_PREFIX) or ref.endswith(".py") or "/" in ref


_PARSED: dict = {}  # (path, what its folders hold) -> Config, as parsed once by mmengine


def _folders_state(path: Path) -> tuple:
    """Name, size and mtime of every ``.py`` file beside ``path`` and one folder up, where a config's
    relative ``_base_`` files live: an edit to the file or to such a base parses it again."""
    state = []
    for folder in {path.parent, path.parent.parent}:
        try:
            for entry in os.scandir(folder):
                if entry.name.endswith(".py") and entry.is_file():
                    stat = entry.stat()
                    state.append((entry.path, stat.st_size, stat.st_mtime_ns))
        except OSError:
            continue
    return tuple(sorted(state))


def _load_config_file(path: str):
    """``Config.fromfile`` with every failure as one line naming the file and the reason. Each file is
    parsed once per process while it and the files beside it are unchanged (reports plan dozens of
    units from one config, and mmengine takes ~0.3 s a parse); callers get their own copy."""
    from mmengine.config import Config

    if not Path(path).is_file():
        raise CacError(f"model config {path}: file not found")
    key = (str(Path(path).resolve()), _folders_state(Path(path).resolve()))
    if key in _PARSED:
        return copy.deepcopy(_PARSED[key])
    try:
        _PARSED[key] = Config.fromfile(path)
        return copy.deepcopy(_PARSED[key])
    except SyntaxError as err:
        raise CacError(f"model config {path}: syntax error at line {err.lineno}: {err.msg}") from None
    except FileNotFoundError as err:  # a `_base_` that is not there
        missing = err.filename or str(err).split(":")[-1].strip()
        raise CacError(f"model config {path}: a _base_ file was not found ({missing})") from None
    except Exception as err:  # noqa: BLE001 - mmengine raises many kinds; the user needs the file and the reason
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CacError(f"model config {path}: cannot be read ({type(err).__name__}: {reason})") from None


def _content_hash(cfg_dict: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(cfg_dict, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _type_name(node) -> str:
    return str(node.get("type", "?")) if isinstance(node, dict) else "?"


@lru_cache(maxsize=64)
def _file_entry(path: str, mtime_ns: int, label: str) -> ModelEntry:
    """A config file as a model entry, checked to have what CAC wraps: a segmentor with a decode head."""
    from cac.mmseg.cfgtree import to_plain

    cfg = to_plain(_load_config_file(path).to_dict())
    model = cfg.get("model")
    if not isinstance(model, dict):
        raise CacError(f"model config {path}: it defines no `model`")
    heads = model.get("decode_head")
    if not heads:
        raise CacError(f"model config {path}: its model ({_type_name(model)}) has no decode_head for CAC to wrap")
    head = heads[-1] if isinstance(heads, (list, tuple)) else heads
    if not isinstance(head, dict) or "type" not in head:
        raise CacError(f"model config {path}: model.decode_head has no `type`")
    backbone = model.get("backbone")
    return ModelEntry(f"{label}@{_content_hash(cfg)}", _type_name(head), _type_name(backbone), config=path,
                      own_data=True)


def resolve_model(ref: str) -> ModelEntry:
    """A model reference as an entry: a registered name, an mmseg config file path (absolute, or
    relative to the current directory), or ``mmseg::<config>`` (one of mmseg's shipped configs).

    A file's entry is named ``<file name>@<hash of its loaded content>``: the same content under another
    path or checkout is the same model (and the same run identity, which hashes the resolved config)."""
    if not is_model_file(ref):
        return get_model(ref)
    if ref.startswith(MMSEG_PREFIX):
        rel = ref[len(MMSEG_PREFIX):].lstrip("/")
        path, label = (mmseg_config_dir() / rel).resolve(), ref
    else:
        path = Path(ref).expanduser().resolve()
        label = path.name
    if not path.is_file():
        raise CacError(f"model config {ref}: file not found" + (f" (looked at {path})" if str(path) != ref else ""))
    return _file_entry(str(path), path.stat().st_mtime_ns, label)


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


# -- the models of GMMSeg's and ProtoSeg's official configs (ablations/classifiers.yaml, preset paper) --
register_model(ModelEntry("segformer-b5", "SegFormer", "MiT-B5", config="segformer/segformer_mit-b5_8xb2-160k_ade20k-512x512.py"))
register_model(ModelEntry("fcn-hr48", "FCN", "HRNet-W48", config="hrnet/fcn_hr48_4xb4-160k_ade20k-512x512.py"))


# -- the supplementary's datasets: mmseg's own config of a Table 1 model for another dataset -------
# The ending of mmseg's config names for each dataset, with the 80k schedule: the one the official
# CAC code's Cityscapes and Pascal-Context configs use, and one mmseg ships for every such model.
DATASET_CONFIG_ENDINGS = {"cityscapes": "80k_cityscapes-512x1024", "pascal-context": "80k_pascal-context-59-480x480"}
_ADE_ENDING = re.compile(r"_\d+xb\d+-\d+k_ade20k-512x512\.py$")


def dataset_config(entry: ModelEntry, dataset: str) -> Optional[str]:
    """mmseg's shipped config of ``entry``'s model for ``dataset`` (relative to configs/), or None when
    mmseg ships none (then the ADE20K config gets the dataset's data section). The same file name up
    to its GPUs x batch part: ``mobilenet-v2-d8_fcn_4xb4-160k_ade20k-512x512.py`` ->
    ``mobilenet-v2-d8_fcn_4xb2-80k_cityscapes-512x1024.py`` (not ``..._4xb2-amp-80k_...``)."""
    ending = DATASET_CONFIG_ENDINGS.get(dataset)
    if ending is None or entry.config is None or entry.own_data:
        return None
    rel = Path(entry.config)
    match = _ADE_ENDING.search(rel.name)
    if match is None:
        return None
    wanted = re.compile(re.escape(rel.name[:match.start()]) + r"_\d+xb\d+-" + re.escape(ending) + r"\.py")
    found = sorted(p.name for p in (mmseg_config_dir() / rel.parent).glob("*.py") if wanted.fullmatch(p.name))
    if len(found) > 1:
        raise CacError(f"model {entry.name}: mmseg ships several {dataset} configs ({', '.join(found)}); "
                       "give one with --model mmseg::<config>")
    return str(rel.parent / found[0]) if found else None


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
