"""From (model, preset, CAC options, overrides, seed) to one resolved mmengine Config.

The config is plain data: ``cac-exp config`` prints it as a file that mmseg's stock
``tools/train.py`` trains unchanged (``custom_imports`` brings in the plug-in and the dataset).
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional

from cac.errors import CacError
from cac.mmseg.cfgtree import set_by_path, set_num_classes, to_plain
from cac.mmseg.presets import Preset, get_preset
from cac.mmseg.zoo import get_model, load_base_config, mmseg_config_dir

__all__ = ["add_cac", "resolve_config", "config_hash", "dump_config"]


def add_cac(model: dict, options: Optional[Mapping] = None) -> dict:
    """Wrap the segmentor's final decode head in ``CACHead`` (the last stage of a cascade)."""
    model = copy.deepcopy(model)
    wrap = lambda head: dict(type="CACHead", head=head, cac=dict(options or {}))  # noqa: E731
    if isinstance(model["decode_head"], (list, tuple)):
        model["decode_head"] = [*model["decode_head"][:-1], wrap(model["decode_head"][-1])]
    else:
        model["decode_head"] = wrap(model["decode_head"])
    return model


def _dataset_swap(cfg: dict, base_dataset_file: str) -> None:
    """Replace the data part of a shipped config with another of mmseg's dataset bases."""
    from mmengine.config import Config

    data = Config.fromfile(str(mmseg_config_dir() / "_base_" / "datasets" / base_dataset_file)).to_dict()
    for key in ("dataset_type", "data_root", "crop_size", "train_pipeline", "test_pipeline", "img_ratios",
                "tta_pipeline", "train_dataloader", "val_dataloader", "test_dataloader", "val_evaluator",
                "test_evaluator"):
        if key in data:
            cfg[key] = data[key]


def _resolve_data_root(cfg: dict, dataset: str) -> None:
    """mmseg's relative ``data/...`` roots become absolute, under ``$CAC_DATA_ROOT`` or the repo's data/."""
    from cac.data.real import default_real_root

    root = str(default_real_root(dataset))
    cfg["data_root"] = root
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        ds = (cfg.get(key) or {}).get("dataset")
        while isinstance(ds, dict):  # wrappers (RepeatDataset, ConcatDataset) nest the real one
            if "data_root" in ds:
                ds["data_root"] = root
            ds = ds.get("dataset")


def resolve_config(
    model: str,
    preset: str | Preset,
    *,
    cac: Optional[Mapping] | bool = None,
    overrides: Optional[Mapping[str, Any]] = None,
    seed: int = 0,
    dataset: Optional[str] = None,
    work_dir: Optional[str] = None,
) -> dict:
    """The resolved config as a plain dict.

    ``cac``: ``None``/``False`` = the plain model, ``True`` or a dict of ``CACOptions`` = +CAC.
    ``overrides``: dotted keys into the config (``model.decode_head.channels: 64``), applied last.
    ``dataset``: for the ``paper`` preset, ``ade20k`` (the shipped configs) or ``cocostuff``.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    entry = get_model(model)
    cfg = to_plain(load_base_config(entry).to_dict())
    dataset = dataset or "ade20k"
    if preset.embedded:
        preset.apply_embedded(cfg)
    else:
        if dataset == "cocostuff":
            _dataset_swap(cfg, "coco-stuff164k.py")
            set_num_classes(cfg["model"], 171)
        elif dataset != "ade20k":
            raise CacError(f"unknown dataset {dataset!r} for the paper preset; use ade20k or cocostuff")
        _resolve_data_root(cfg, dataset)
    if cac is not None and cac is not False:  # an empty dict is +CAC with the paper's defaults
        cfg["model"] = add_cac(cfg["model"], {} if cac is True else cac)
    for key, value in (overrides or {}).items():
        try:
            set_by_path(cfg, key, copy.deepcopy(value))
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise CacError(f"cannot set override {key!r}: {err}") from None
    imports = ["cac"] + [m for m in cfg.get("custom_imports", {}).get("imports", []) if m != "cac"]
    cfg["custom_imports"] = dict(imports=imports, allow_failed_imports=False)
    cfg["randomness"] = dict(seed=seed, deterministic=False)
    cfg["default_scope"] = "mmseg"
    if work_dir:
        cfg["work_dir"] = work_dir
    return cfg


def _without_machine_paths(node: Any, roots: tuple[str, ...]) -> Any:
    """Strings under a machine-specific root (the data root) rewritten relative to it."""
    if isinstance(node, Mapping):
        return {k: _without_machine_paths(v, roots) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_without_machine_paths(v, roots) for v in node]
    if isinstance(node, str):
        for root in roots:
            if node == root or node.startswith(root.rstrip("/") + "/"):
                return "<data_root>" + node[len(root.rstrip("/")):]
    return node


def config_hash(cfg: Mapping) -> str:
    """A stable short hash of what a run trains, the same on every machine: the work dir, launcher and
    resume state are left out, and paths under the data root are hashed relative to it, so the same
    unit planned with another ``CAC_DATA_ROOT`` (another node, a teammate's checkout) is the same run."""
    plain = to_plain(cfg)
    payload = {k: v for k, v in plain.items() if k not in ("work_dir", "launcher", "resume", "load_from")}
    roots = tuple(r for r in [plain.get("data_root")] if isinstance(r, str) and r.startswith("/") and len(r) > 1)
    payload = _without_machine_paths(payload, roots)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dump_config(cfg: Mapping, path: Optional[Path] = None) -> str:
    """The config as mmengine config file text (and written to ``path`` if given)."""
    from mmengine.config import Config

    text = Config(dict(cfg)).pretty_text
    if path is not None:
        Path(path).write_text(text)
    return text
