"""From (model, preset, CAC options, overrides, seed) to one resolved mmengine Config.

The config is plain data: ``cac-exp config`` prints it as a file that mmseg's stock
``tools/train.py`` trains unchanged (``custom_imports`` brings in the plug-in and the dataset).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional

from cac.errors import CacError
from cac.mmseg.cfgtree import set_by_path, set_num_classes, to_plain
from cac.mmseg.heads import check_cac_model
from cac.mmseg.presets import Preset, get_preset
from cac.mmseg.zoo import ModelEntry, dataset_config, load_base_config, mmseg_config_dir, resolve_model

__all__ = ["add_cac", "resolve_config", "config_hash", "dump_config", "dataset_of_config", "DATASET_TYPES"]


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


# The paper preset's datasets: mmseg's dataset base for a model's ADE20K config, and the class count.
PAPER_DATASETS = {"ade20k": (None, 150), "cocostuff": ("coco-stuff164k.py", 171),
                  "cityscapes": ("cityscapes.py", 19), "pascal-context": ("pascal_context_59.py", 59)}


def _on_paper_dataset(cfg: dict, entry: ModelEntry, dataset: str) -> dict:
    """A Table 1 model's config at preset paper on ``dataset``: mmseg's own config of the model for it
    where mmseg ships one (Cityscapes, Pascal-Context: :func:`~cac.mmseg.zoo.dataset_config`), else the
    ADE20K config with the dataset's data section, class count and crop size (the preprocessor pads to it)."""
    if dataset not in PAPER_DATASETS:
        raise CacError(f"unknown dataset {dataset!r} for the paper preset; use {', '.join(PAPER_DATASETS)}")
    shipped = dataset_config(entry, dataset)
    if shipped is not None:
        return to_plain(load_base_config(dataclasses.replace(entry, config=shipped)).to_dict())
    base, classes = PAPER_DATASETS[dataset]
    if base is not None:
        _dataset_swap(cfg, base)
        set_num_classes(cfg["model"], classes)
        for preproc in (cfg["model"].get("data_preprocessor"), cfg.get("data_preprocessor")):
            if isinstance(preproc, dict) and "size" in preproc:
                preproc["size"] = copy.deepcopy(cfg["crop_size"])
    return cfg


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


# mmseg dataset classes -> this project's dataset names (the official layouts `cac-exp data` prepares).
DATASET_TYPES = {"ADE20KDataset": "ade20k", "COCOStuffDataset": "cocostuff", "CityscapesDataset": "cityscapes",
                 "PascalContextDataset59": "pascal-context"}


def dataset_of_config(cfg: Mapping) -> str:
    """The dataset a config trains on: a known name, else its dataset class's name in lower case."""
    ds = (cfg.get("train_dataloader") or {}).get("dataset") or {}
    while isinstance(ds, dict) and "type" in ds and isinstance(ds.get("dataset"), dict):  # RepeatDataset etc.
        ds = ds["dataset"]
    kind = str(ds.get("type") if isinstance(ds, dict) and ds.get("type") else cfg.get("dataset_type", "unknown"))
    return DATASET_TYPES.get(kind, kind.lower())


def _resolve_own_data_roots(cfg: dict) -> None:
    """A user config's relative data roots are relative to ``$CAC_DATA_ROOT`` (mmseg's ``data/`` prefix,
    relative to a checkout of mmseg, is dropped: the data root plays that folder's part)."""
    from cac.data.real import data_dir

    def absolute(root: str) -> str:
        path = Path(root)
        if path.is_absolute():
            return root
        parts = path.parts[1:] if path.parts[:1] == ("data",) else path.parts
        return str(data_dir().joinpath(*parts))

    if isinstance(cfg.get("data_root"), str):
        cfg["data_root"] = absolute(cfg["data_root"])
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        ds = (cfg.get(key) or {}).get("dataset")
        while isinstance(ds, dict):
            if isinstance(ds.get("data_root"), str):
                ds["data_root"] = absolute(ds["data_root"])
            for inner in ds.get("datasets") or []:  # ConcatDataset
                if isinstance(inner, dict) and isinstance(inner.get("data_root"), str):
                    inner["data_root"] = absolute(inner["data_root"])
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
    ``dataset``: for the ``paper`` preset, ``ade20k`` (the shipped configs), ``cocostuff``, ``cityscapes``
    or ``pascal-context`` (see :func:`_on_paper_dataset`).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    entry = resolve_model(model)
    cfg = to_plain(load_base_config(entry).to_dict())
    dataset = dataset or "ade20k"
    if preset.embedded:
        preset.apply_embedded(cfg)
    elif entry.own_data:  # a user's config trains on its own data, schedule and optimizer
        _resolve_own_data_roots(cfg)
    else:
        cfg = _on_paper_dataset(cfg, entry, dataset)
        _resolve_data_root(cfg, dataset)
    if cac is not None and cac is not False:  # an empty dict is +CAC with the paper's defaults
        cfg["model"] = add_cac(cfg["model"], {} if cac is True else cac)
    for key, value in (overrides or {}).items():
        try:
            set_by_path(cfg, key, copy.deepcopy(value))
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise CacError(f"cannot set override {key!r}: {err}") from None
    try:
        check_cac_model(cfg["model"], cac=cac is not None and cac is not False)
    except CacError as err:
        if entry.own_data:  # a user's config file: say which file names the head
            raise CacError(f"model config {entry.config}: {err}") from None
        raise
    _resumable_loop(cfg)
    imports = ["cac"] + [m for m in cfg.get("custom_imports", {}).get("imports", []) if m != "cac"]
    cfg["custom_imports"] = dict(imports=imports, allow_failed_imports=False)
    cfg["randomness"] = dict(seed=seed, deterministic=False)
    cfg["default_scope"] = "mmseg"
    if work_dir:
        cfg["work_dir"] = work_dir
    return cfg


def _resumable_loop(cfg: dict) -> None:
    """mmengine's iteration loop becomes cac's, which resumes without replaying the data and seeds each
    sample's augmentation from its stream position (``cac.mmseg.loops``); another loop type is kept."""
    from cac.mmseg.loops import LOOP_TYPE

    train = cfg.get("train_cfg")
    if isinstance(train, dict) and train.get("type") in ("IterBasedTrainLoop", "mmengine.IterBasedTrainLoop"):
        train["type"] = LOOP_TYPE


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
