"""What the command line may change about a planned run, applied to its resolved config.

``--cfg-options`` (mmengine's ``DictAction`` syntax), ``--amp``, ``--no-pretrained``, a dataset subset
(``--expected-train/--expected-val``) and the world size. Each one that changes what is trained
changes the config, so it is part of the run's identity (its config hash); the subset is part of
the data version.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from cac.errors import CacError
from cac.mmseg.cfgtree import strip_pretrained, to_plain

__all__ = ["RunOptions", "apply_run_options", "shipped_total_batch", "per_process_batch", "add_run_options",
           "run_options"]


@dataclass(frozen=True)
class RunOptions:
    """Command-line changes to every unit of a plan. The defaults change nothing."""

    cfg_options: Mapping[str, Any] = field(default_factory=dict)
    amp: bool = False
    no_pretrained: bool = False
    expected: Mapping[str, int] = field(default_factory=dict)  # {"train": n, "val": m}: a subset
    world_size: int = 1

    def params(self) -> dict:
        """What MLflow records about them (the config itself is logged too)."""
        out: dict = {"amp": self.amp, "pretrained": "none" if self.no_pretrained else "config"}
        out.update({f"cfg_options.{k}": v for k, v in self.cfg_options.items()})
        out.update({f"expected_{k}": v for k, v in self.expected.items()})
        return out


_SHIPPED_BATCH = re.compile(r"_(\d+)xb(\d+)-")


def shipped_total_batch(config_name: Optional[str]) -> Optional[int]:
    """The total batch an mmseg config's name declares (``..._8xb2-160k...`` is 8 GPUs x 2 = 16)."""
    match = _SHIPPED_BATCH.search(config_name or "")
    return int(match.group(1)) * int(match.group(2)) if match else None


def per_process_batch(total: int, world_size: int, where: str) -> int:
    """The per-GPU batch that keeps the paper's total batch on ``world_size`` processes."""
    if world_size < 1 or total % world_size:
        raise CacError(f"{where}: the total batch {total} does not divide over {world_size} processes; "
                       f"use a GPU count that divides {total}, or set train_dataloader.batch_size with --cfg-options")
    return total // world_size


def _merge_cfg_options(cfg: dict, options: Mapping[str, Any]) -> dict:
    """mmengine's own merge (``a.b=1``, list indices ``a.0.b=1``), as ``tools/train.py`` does it."""
    from mmengine.config import Config

    merged = Config(cfg)
    try:
        merged.merge_from_dict(dict(options))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise CacError(f"--cfg-options {', '.join(options)}: cannot apply ({err})") from None
    return to_plain(merged.to_dict())


def _amp(cfg: dict) -> None:
    """mmengine's AmpOptimWrapper (dynamic loss scale) around the config's optimizer."""
    wrapper = dict(cfg.get("optim_wrapper") or {})
    if wrapper.get("type", "OptimWrapper") == "OptimWrapper":
        wrapper["type"] = "AmpOptimWrapper"
        wrapper.setdefault("loss_scale", "dynamic")
    cfg["optim_wrapper"] = wrapper


def apply_run_options(cfg: dict, options: RunOptions, *, embedded: bool, config_name: Optional[str],
                      where: str) -> dict:
    """``cfg`` with the run options applied; ``--cfg-options`` last, so an explicit value wins."""
    if options.no_pretrained:
        cfg["model"] = strip_pretrained(cfg["model"])
    if options.amp:
        _amp(cfg)
    total = shipped_total_batch(config_name)
    if not embedded and total is not None and "train_dataloader" in cfg:
        # mmseg's configs hold a per-GPU batch for the GPU count in their name; the paper's total
        # batch (16) is kept on any count.
        cfg["train_dataloader"]["batch_size"] = per_process_batch(total, options.world_size, where)
    if options.cfg_options:
        cfg = _merge_cfg_options(cfg, options.cfg_options)
    return cfg


def add_run_options(parser, *, training: bool = True) -> None:
    """The flags users know from mmseg's ``tools/train.py`` (and a dataset subset)."""
    from mmengine.config import DictAction

    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={}, metavar="KEY=VALUE",
                        help="override the resolved config, as mmseg's tools do (part of the run's identity)")
    parser.add_argument("--expected-train", type=int, help="train on a dataset subset of this many images")
    parser.add_argument("--expected-val", type=int, help="validate on a dataset subset of this many images")
    if training:
        parser.add_argument("--amp", action="store_true", help="mixed precision (mmengine's AmpOptimWrapper)")
        parser.add_argument("--no-pretrained", action="store_true",
                            help="random init instead of the config's pretrained backbone (recorded)")


def run_options(args) -> RunOptions:
    """The :class:`RunOptions` of parsed arguments (flags a command lacks stay at their defaults)."""
    expected = {split: n for split, n in (("train", getattr(args, "expected_train", None)),
                                          ("val", getattr(args, "expected_val", None))) if n is not None}
    for split, n in expected.items():
        if n < 1:
            raise CacError(f"--expected-{split} must be >= 1, got {n}")
    return RunOptions(cfg_options=dict(getattr(args, "cfg_options", None) or {}), amp=bool(getattr(args, "amp", False)),
                      no_pretrained=bool(getattr(args, "no_pretrained", False)), expected=expected)
