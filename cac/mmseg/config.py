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
from cac.mmseg.heads import WRAPPER_TYPES, check_cac_model, head_type_name
from cac.mmseg.presets import Preset, get_preset
from cac.mmseg.zoo import ModelEntry, dataset_config, load_base_config, mmseg_config_dir, resolve_model

__all__ = ["add_cac", "strip_cac", "existing_cac", "resolve_config", "config_hash", "dump_config",
           "dataset_of_config", "DATASET_TYPES"]


def _is_cac_head(node: Any) -> bool:
    """A classifier wrapper (``CACHead``, or the same class as ``ClassifierHead``), whatever it holds."""
    return isinstance(node, Mapping) and head_type_name(node.get("type")) in WRAPPER_TYPES


def _final_head_path(model: Mapping) -> str:
    """Where CAC goes: ``model.decode_head``, or the last stage of a cascade (``model.decode_head.1``)."""
    heads = model.get("decode_head")
    return f"model.decode_head.{len(heads) - 1}" if isinstance(heads, (list, tuple)) else "model.decode_head"


def _cac_head_paths(node: Any, path: str = "model") -> list[str]:
    """The dotted paths (list items by index, as overrides write them) of every CACHead in ``node``."""
    found = [path] if _is_cac_head(node) else []
    if isinstance(node, Mapping):
        for key, value in node.items():
            found += _cac_head_paths(value, f"{path}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found += _cac_head_paths(value, f"{path}.{i}")
    return found


def _check_cac_placement(model: Mapping) -> None:
    """A CACHead anywhere but the final decode head is refused (one CacError line): CAC is added, replaced
    and removed at the final head only, so one elsewhere would train CAC in a row that says it has none."""
    final = _final_head_path(model)
    for path in _cac_head_paths(model):
        if path == final:
            continue
        if path.startswith(final + "."):
            raise CacError(f"{path}: a CACHead inside the CACHead at {final}; CAC wraps a decode head once")
        heads = model.get("decode_head")
        stage = path[len("model.decode_head."):].split(".")[0] if path.startswith("model.decode_head.") else ""
        if isinstance(heads, (list, tuple)) and stage.isdigit():
            raise CacError(f"{path}: a CACHead at stage {stage} of the {len(heads)}-stage cascade; CAC wraps "
                           f"only its last stage ({final}): give stage {stage} the plain head")
        raise CacError(f"{path}: a CACHead outside the final decode head; CAC wraps only {final}: "
                       f"give {path} the plain head")


# A CACHead's own arguments besides the wrapped head and the CAC options: kept when CAC is re-added.
_WRAPPER_KEYS = ("init_cfg",)


def _split_cac_head(node: Mapping, where: str) -> tuple[dict, dict]:
    """A CACHead config as (the decode head it wraps, the wrapper's own arguments such as ``init_cfg``).
    Both forms: ``head=<head cfg>``, and ``head_type=<name>`` with the head's arguments beside it."""
    rest = copy.deepcopy(dict(node))
    wrapper = {key: rest.pop(key) for key in _WRAPPER_KEYS if key in rest}
    rest.pop("type", None)
    rest.pop("cac", None)
    rest.pop("classifier", None)
    head, head_type = rest.pop("head", None), rest.pop("head_type", None)
    if head is not None:
        if head_type is not None or rest:
            extra = ", ".join(sorted(rest)) or "head_type"
            raise CacError(f"{where}: CACHead takes either `head=` or `head_type=` with the head's arguments, "
                           f"not both (it also sets {extra})")
        if not isinstance(head, Mapping) or "type" not in head:
            raise CacError(f"{where}: CACHead's `head=` is not a decode head config with a `type`")
        return dict(head), wrapper
    if head_type is None:
        raise CacError(f"{where}: CACHead needs `head=<decode head config>` or `head_type=`")
    return {"type": head_type, **rest}, wrapper


def _without_cac(model: Mapping) -> tuple[dict, dict]:
    """(a copy of ``model`` whose final decode head is the head its CACHead wraps, the CACHead's own
    arguments); a model without CAC comes back as a copy and ``{}``."""
    _check_cac_placement(model)
    model = copy.deepcopy(dict(model))
    heads = model.get("decode_head")
    last = heads[-1] if isinstance(heads, (list, tuple)) and heads else heads
    if not _is_cac_head(last):
        return model, {}
    inner, wrapper = _split_cac_head(last, _final_head_path(model))
    model["decode_head"] = [*heads[:-1], inner] if isinstance(heads, (list, tuple)) else inner
    return model, wrapper


def strip_cac(model: Mapping) -> dict:
    """The model with CAC taken out: its final decode head's CACHead (if any) becomes the head it wraps.
    A CACHead anywhere else is refused (:func:`_check_cac_placement`)."""
    return _without_cac(model)[0]


def existing_cac(model_cfg: Mapping | str) -> Optional[dict]:
    """The CAC options a model config already carries: its final decode head's CACHead ``cac=`` (``{}``
    when it sets none), or None when it has no CACHead. ``model_cfg`` is a model dict, a whole config
    (its ``model``), or a model reference as :func:`~cac.mmseg.zoo.resolve_model` takes it.

    :func:`resolve_config` never keeps these options: a plain row trains the wrapped head, a +CAC row
    re-wraps it with the row's options alone. This tells a caller (a plan, a report) what was replaced."""
    if isinstance(model_cfg, str):
        model_cfg = to_plain(load_base_config(resolve_model(model_cfg)).to_dict())
    if "decode_head" not in model_cfg and isinstance(model_cfg.get("model"), Mapping):
        model_cfg = model_cfg["model"]
    _check_cac_placement(model_cfg)
    heads = model_cfg.get("decode_head")
    last = heads[-1] if isinstance(heads, (list, tuple)) and heads else heads
    if not _is_cac_head(last):
        return None
    if last.get("classifier") is not None:  # another classifier: what the wrapper holds, by its type
        return copy.deepcopy(dict(last["classifier"]))
    return copy.deepcopy(dict(last.get("cac") or {}))


def add_cac(model: dict, options: Optional[Mapping] = None, classifier: Optional[Mapping] = None) -> dict:
    """Wrap the segmentor's final decode head in ``CACHead`` (the last stage of a cascade) with CAC's
    ``options``, or in ``ClassifierHead`` (the same wrapper) with ``classifier=dict(type=..., ...)``. A
    final head that already is wrapped is re-wrapped: nothing of its classifier is kept or merged."""
    model, wrapper = _without_cac(model)
    if classifier is not None:
        wrap = lambda head: dict(type="ClassifierHead", head=head,  # noqa: E731
                                 classifier=copy.deepcopy(dict(classifier)), **wrapper)
    else:
        wrap = lambda head: dict(type="CACHead", head=head, cac=copy.deepcopy(dict(options or {})),  # noqa: E731
                                 **wrapper)
    if isinstance(model["decode_head"], (list, tuple)):
        model["decode_head"] = [*model["decode_head"][:-1], wrap(model["decode_head"][-1])]
    else:
        model["decode_head"] = wrap(model["decode_head"])
    return model


def _final_head(model: dict) -> dict:
    heads = model["decode_head"]
    return heads[-1] if isinstance(heads, (list, tuple)) else heads


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
    relative to a checkout of mmseg, is dropped: the data root plays that folder's part). Every
    ``data_root`` of the dataloaders counts, however deep its wrappers (RepeatDataset, ConcatDataset)
    nest it."""
    from cac.data.real import data_dir

    def absolute(root: str) -> str:
        path = Path(root)
        if path.is_absolute():
            return root
        parts = path.parts[1:] if path.parts[:1] == ("data",) else path.parts
        return str(data_dir().joinpath(*parts))

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "data_root" and isinstance(value, str):
                    node[key] = absolute(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    if isinstance(cfg.get("data_root"), str):
        cfg["data_root"] = absolute(cfg["data_root"])
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        walk(cfg.get(key))


def resolve_config(
    model: str,
    preset: str | Preset,
    *,
    cac: Optional[Mapping] | bool = None,
    classifier: Optional[Mapping] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    seed: int = 0,
    dataset: Optional[str] = None,
    work_dir: Optional[str] = None,
) -> dict:
    """The resolved config as a plain dict.

    ``cac``: ``None``/``False`` = the plain model, ``True`` or a dict of ``CACOptions`` = +CAC.
    ``classifier``: another pixel classifier, ``dict(type='gmmseg'|'protoseg', **options)`` (``cac`` false).
    ``overrides``: dotted keys into the config (``model.decode_head.channels: 64``), applied last.
    ``dataset``: for the ``paper`` preset, ``ade20k`` (the shipped configs), ``cocostuff``, ``cityscapes``
    or ``pascal-context`` (see :func:`_on_paper_dataset`).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    entry = resolve_model(model)
    cfg = to_plain(load_base_config(entry).to_dict())

    def in_file(err: CacError) -> CacError:  # a user's config file: say which file names the head
        return CacError(f"model config {entry.config}: {err}") if entry.own_data else err

    if classifier is not None and cac not in (None, False):
        raise CacError("a row takes CAC options or another classifier, not both")
    wants_cac = (cac is not None and cac is not False) or classifier is not None
    # A config that already has CAC (a CACHead config, or `cac-exp config`'s output given back) is
    # reduced to its plain model first: a plain row trains the wrapped head, a +CAC row re-wraps it with
    # the row's options alone (`existing_cac` tells what the config's own were). Never a CAC baseline.
    try:
        cfg["model"], wrapper = _without_cac(cfg["model"])
    except CacError as err:
        raise in_file(err) from None
    dataset = dataset or "ade20k"
    if preset.embedded:
        preset.apply_embedded(cfg)
    elif entry.own_data:  # a user's config trains on its own data, schedule and optimizer
        _resolve_own_data_roots(cfg)
    else:
        cfg = _on_paper_dataset(cfg, entry, dataset)
        _resolve_data_root(cfg, dataset)
    if wants_cac:  # an empty dict is +CAC with the paper's defaults
        cfg["model"] = add_cac(cfg["model"], {} if cac in (True, None) else cac, classifier=classifier)
        _final_head(cfg["model"]).update(copy.deepcopy(wrapper))  # the config's CACHead init_cfg, if any
    for key, value in (overrides or {}).items():
        try:
            set_by_path(cfg, key, copy.deepcopy(value))
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise CacError(f"cannot set override {key!r}: {err}") from None
    try:
        _check_cac_placement(cfg["model"])  # overrides cannot put a CACHead elsewhere either
        if not wants_cac and _cac_head_paths(cfg["model"]):
            raise CacError(f"the row is plain but its overrides make {_final_head_path(cfg['model'])} a "
                           "CACHead; a plain row trains no CAC (give the row CAC options instead)")
        check_cac_model(cfg["model"], cac=wants_cac)
    except CacError as err:
        raise in_file(err) from None
    _resumable_loop(cfg)
    imports = (cfg.get("custom_imports") or {}).get("imports") or []
    imports = ["cac"] + [m for m in ([imports] if isinstance(imports, str) else imports) if m != "cac"]
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


def _data_roots(node: Any) -> list[str]:
    """Every absolute path a ``data_root`` key holds, anywhere in the config (the top level, each
    dataloader's dataset, datasets nested in RepeatDataset / ConcatDataset wrappers)."""
    if isinstance(node, Mapping):
        found = []
        for key, value in node.items():
            if key == "data_root" and isinstance(value, str) and value.startswith("/"):
                found.append(value)
            else:
                found += _data_roots(value)
        return found
    if isinstance(node, (list, tuple)):
        return [root for value in node for root in _data_roots(value)]
    return []


def _machine_prefix(roots: list[str]) -> Optional[str]:
    """The folder that holds every data root: the part of their paths that says where this machine keeps
    data (``$CAC_DATA_ROOT``, or wherever a user config points), not which data. None without roots, or
    when the roots share no folder but ``/`` (then nothing tells the machine's part from the data's)."""
    common: list[str] = []
    for parts in zip(*(root.rstrip("/").split("/") for root in roots)):  # folder by folder, as written
        if any(part != parts[0] for part in parts):
            break
        common.append(parts[0])
    prefix = "/".join(common)
    return prefix if prefix.strip("/") else None


def config_hash(cfg: Mapping) -> str:
    """A stable short hash of what a run trains, the same on every machine: the work dir, launcher and
    resume state are left out, and paths under the data roots are hashed relative to the folder that
    holds them all, so the same unit planned with another ``CAC_DATA_ROOT`` (another node, a teammate's
    checkout) is the same run.

    The data roots are every ``data_root`` in the config (not only the top-level one: a user config's
    dataloaders may each set their own, and may set no top-level one). Their common folder is the
    machine's part and becomes ``<data_root>``; what lies below it stays in the hash, so dataloaders that
    point at other folders relative to one another (another layout) are another run. A config whose data
    roots are all one folder (every preset's) hashes as with the top-level root alone."""
    plain = to_plain(cfg)
    payload = {k: v for k, v in plain.items() if k not in ("work_dir", "launcher", "resume", "load_from")}
    prefix = _machine_prefix(_data_roots(plain))
    payload = _without_machine_paths(payload, (prefix,) if prefix else ())
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def runner_config(cfg: Mapping) -> "Config":  # noqa: F821
    """A deep copy of ``cfg`` as the mmengine Config a Runner is built from. Its text is not run through
    yapf: mmengine prints it into the log, the work dir, the message hub and each checkpoint's meta, and
    yapf takes 60-90 ms a copy for a large config (SegFormer's) on a CPU, against 2 ms unformatted
    (``benchmarks/cpu_overheads.py``). The run's ``config.py`` artifact (:func:`dump_config`) is formatted."""
    from mmengine.config import Config

    return Config(copy.deepcopy(dict(cfg)), format_python_code=False)


def dump_config(cfg: Mapping, path: Optional[Path] = None) -> str:
    """The config as mmengine config file text, formatted (and written to ``path`` if given)."""
    from mmengine.config import Config

    text = Config(dict(cfg)).pretty_text
    if path is not None:
        Path(path).write_text(text)
    return text
