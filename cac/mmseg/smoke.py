"""``--smoke``: any paper-scale config shrunk, consistently, to a run a CPU finishes in a minute.

For a user who wants to know that a full config (their own, or a Table 1 row on ADE20K, COCO-Stuff,
Cityscapes or Pascal-Context) trains, evaluates and checkpoints before sending it to a cluster: every
size in its pipelines is divided by :data:`FACTOR` (resize scales, crops, the data preprocessor's pad
size, sliding-window inference), the schedule is two iterations with a validation and a checkpoint at
the second, and the loaders are single-process. The model, its heads, losses, optimizer and the
data's label conventions are untouched (but GMMSeg's memory, 1/64 of its slots: 9.8 GB at ADE20K's
150 classes): what would break at full scale breaks here.
"""
from __future__ import annotations

from typing import Any

__all__ = ["FACTOR", "SMOKE_ITERS", "smoke_config"]

FACTOR = 8  # a 512 crop becomes 64 (Swin's 7x7 windows still fit its 1/4-scale features)
SMOKE_ITERS = 2
_MIN_SIDE = 16
_SIZE_KEYS = ("scale", "scales", "crop_size", "img_scale", "size")  # pipeline transforms' sizes, in pixels
SMOKE_MEMORY = 64  # GMMSeg's memory (a state buffer of the model) divided by this


def _shrink(value: Any) -> Any:
    """A size (int, or a tuple/list of ints or of such sizes) divided by FACTOR, at least 16 pixels."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return max(_MIN_SIDE, round(value / FACTOR))
    if isinstance(value, (list, tuple)):
        return type(value)(_shrink(v) for v in value)
    return value  # a float scale factor or anything else is not a pixel size


def _pipeline(steps: Any) -> Any:
    """Every transform's pixel sizes shrunk, nested transforms (TestTimeAug, RandomChoice) included."""
    if isinstance(steps, dict):
        return {k: _shrink(v) if k in _SIZE_KEYS else _pipeline(v) for k, v in steps.items()}
    if isinstance(steps, (list, tuple)):
        return type(steps)(_pipeline(s) for s in steps)
    return steps


def _dataset(ds: Any) -> None:
    """A dataset config's pipeline (and those of wrapped or concatenated datasets)."""
    if not isinstance(ds, dict):
        return
    if "pipeline" in ds:
        ds["pipeline"] = _pipeline(ds["pipeline"])
    _dataset(ds.get("dataset"))
    for inner in ds.get("datasets") or []:
        _dataset(inner)


def _loader(loader: Any, batch_size: int | None) -> None:
    if not isinstance(loader, dict):
        return
    if batch_size is not None:
        loader["batch_size"] = batch_size
    loader["num_workers"] = 0
    loader["persistent_workers"] = False
    _dataset(loader.get("dataset"))


def _model(model: Any) -> None:
    """The preprocessor's pad size and sliding-window inference, in the model and its wrappers."""
    if not isinstance(model, dict):
        return
    pre = model.get("data_preprocessor")
    if isinstance(pre, dict) and pre.get("size") is not None:
        pre["size"] = _shrink(pre["size"])
    test_cfg = model.get("test_cfg")
    if isinstance(test_cfg, dict):
        for key in ("crop_size", "stride"):
            if test_cfg.get(key) is not None:
                test_cfg[key] = _shrink(test_cfg[key])
    heads = model.get("decode_head")
    for head in heads if isinstance(heads, list) else [heads]:
        classifier = head.get("classifier") if isinstance(head, dict) else None
        if isinstance(classifier, dict) and str(classifier.get("type", "")).lower() == "gmmseg":
            # GMMSeg's memory is part of the model: its official 32000 slots a component are 9.8 GB at
            # ADE20K's 150 classes x 8; a CPU check keeps 1/64 of them (at least a step's intake)
            classifier["mem_size"] = max(classifier.get("max_sample_size", 20),
                                         classifier.get("mem_size", 32000) // SMOKE_MEMORY)
    _model(model.get("module"))  # SegTTAModel and the like


def smoke_config(cfg: dict, *, batch_size: int | None = 2) -> dict:
    """``cfg`` (a resolved config, plain data) shrunk for a CPU smoke run, in place and returned.
    ``batch_size``: the training batch (None keeps the config's, e.g. when ``--batch-per-gpu`` set it)."""
    _loader(cfg.get("train_dataloader"), batch_size)
    for key in ("val_dataloader", "test_dataloader"):
        _loader(cfg.get(key), None)
    for key in ("train_pipeline", "test_pipeline", "tta_pipeline"):
        if key in cfg:
            cfg[key] = _pipeline(cfg[key])
    for key in ("crop_size", "img_scale"):
        if cfg.get(key) is not None:
            cfg[key] = _shrink(cfg[key])
    _model(cfg.get("model"))
    _model(cfg.get("tta_model"))
    pre = cfg.get("data_preprocessor")
    if isinstance(pre, dict) and pre.get("size") is not None:
        pre["size"] = _shrink(pre["size"])
    train = cfg.get("train_cfg")
    if isinstance(train, dict) and "max_iters" in train:
        train["max_iters"] = SMOKE_ITERS
        train["val_interval"] = SMOKE_ITERS
        train.pop("val_begin", None)
    hooks = cfg.get("default_hooks") or {}
    if isinstance(hooks.get("checkpoint"), dict):
        hooks["checkpoint"]["interval"] = SMOKE_ITERS
    if isinstance(hooks.get("logger"), dict):
        hooks["logger"]["interval"] = 1
    return cfg
