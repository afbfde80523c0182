"""What the command line may change about a planned run, applied to its resolved config.

``--cfg-options`` (mmengine's ``DictAction`` syntax), ``--amp``, ``--no-pretrained``, a dataset subset
(``--expected-train/--expected-val``), the world size and ``--batch-per-gpu`` (gradient accumulation up
to the total batch). Each one that changes what is trained
changes the config, so it is part of the run's identity (its config hash); the subset is part of
the data version.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Mapping, Optional

from cac.errors import CacError
from cac.mmseg.cfgtree import strip_pretrained, to_plain

__all__ = ["RunOptions", "apply_run_options", "shipped_total_batch", "per_process_batch", 
           "run_options", "model_option", "accumulation_steps"]


@dataclass(frozen=True)
class RunOptions:
    """Command-line changes to every unit of a plan. The defaults change nothing."""

    cfg_options: Mapping[str, Any] = field(default_factory=dict)
    amp: bool = False
    no_pretrained: bool = False
    expected: Mapping[str, int] = field(default_factory=dict)  # {"train": n, "val": m}: a subset
    world_size: int = 1
    model: Optional[str] = None  # --model: every row's base model (a registered name, or a config file)
    batch_per_gpu: Optional[int] = None  # --batch-per-gpu: the total batch kept by gradient accumulation
    smoke: bool = False  # --smoke: the config shrunk for a CPU check (cac.mmseg.smoke)

    def params(self) -> dict:
        """What MLflow records about them (the config itself is logged too)."""
        out: dict = {"amp": self.amp, "pretrained": "none" if self.no_pretrained else "config"}
        if self.smoke:
            out["smoke"] = True
        out.update({f"cfg_options.{k}": v for k, v in self.cfg_options.items()})
        out.update({f"expected_{k}": v for k, v in self.expected.items()})
        return out


_SHIPPED_BATCH = re.compile(r"_(\d+)xb(\d+)-")


def shipped_total_batch(config_name: Optional[str]) -> Optional[int]:
    """The total batch an mmseg config's file name declares (``..._8xb2-160k...`` is 8 GPUs x 2 = 16);
    the folders above it say nothing (a user's ``runs_2xb8-old/`` is not a batch)."""
    match = _SHIPPED_BATCH.search(PurePosixPath(str(config_name or "").replace("\\", "/")).name)
    return int(match.group(1)) * int(match.group(2)) if match else None


def per_process_batch(total: int, world_size: int, where: str) -> int:
    """The per-GPU batch that keeps the paper's total batch on ``world_size`` processes."""
    if world_size < 1 or total % world_size:
        raise CacError(f"{where}: the total batch {total} does not divide over {world_size} processes; "
                       f"use a GPU count that divides {total}, or set train_dataloader.batch_size with --cfg-options")
    return total // world_size


def accumulation_steps(total: int, batch_per_gpu: int, world_size: int, where: str) -> int:
    """Gradient-accumulation steps that keep ``total`` = ``batch_per_gpu`` x ``world_size`` x steps."""
    if batch_per_gpu >= 1 and world_size >= 1 and total % (batch_per_gpu * world_size) == 0:
        return total // (batch_per_gpu * world_size)
    fits = [n for n in range(1, total + 1) if total % (n * max(1, world_size)) == 0]
    hint = f"use one of {', '.join(map(str, fits))}" if fits else f"use a GPU count that divides {total}"
    raise CacError(f"{where}: --batch-per-gpu {batch_per_gpu} x {world_size} process(es) does not divide the "
                   f"total batch {total}; {hint}")


def _accumulate(cfg: dict, batch_per_gpu: int, steps: int, where: str) -> None:
    """Per-GPU batch ``batch_per_gpu`` and ``steps`` micro-batches per optimizer step: mmengine's
    ``accumulative_counts`` and cac's loop's ``micro_batches`` (one loop iteration is one optimizer
    step, so the schedule, intervals and hooks keep counting optimizer steps, unscaled)."""
    from cac.mmseg.loops import LOOP_TYPE

    cfg["train_dataloader"]["batch_size"] = batch_per_gpu
    if steps == 1:
        return
    train = cfg.get("train_cfg") or {}
    if train.get("type") != LOOP_TYPE:
        raise CacError(f"{where}: --batch-per-gpu accumulates within cac's {LOOP_TYPE}; this config's train loop "
                       f"is {train.get('type')!r}")
    train["micro_batches"] = steps
    cfg["optim_wrapper"] = {**(cfg.get("optim_wrapper") or {}), "accumulative_counts": steps}


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
    if options.batch_per_gpu is not None:
        for key in ("train_dataloader.batch_size", "optim_wrapper.accumulative_counts", "train_cfg.micro_batches"):
            if key in options.cfg_options:
                raise CacError(f"--batch-per-gpu and --cfg-options {key} both set how a step is batched; use one of them")
        # the total kept: the paper's (the shipped config's name), or an embedded preset's batch
        kept = cfg["train_dataloader"]["batch_size"] if embedded else total
        if kept is None:
            raise CacError(f"{where}: --batch-per-gpu needs the config's total batch, which its name does not "
                           "declare (no _NxbM-); set train_dataloader.batch_size and "
                           "optim_wrapper.accumulative_counts with --cfg-options")
        _accumulate(cfg, options.batch_per_gpu, accumulation_steps(kept, options.batch_per_gpu,
                                                                   1 if embedded else options.world_size, where),
                    where)
    if options.smoke:
        from cac.mmseg.smoke import smoke_config

        smoke_config(cfg, batch_size=None if options.batch_per_gpu is not None else 2)
    if options.cfg_options:
        cfg = _merge_cfg_options(cfg, options.cfg_options)
    return cfg


def model_option(args) -> Optional[str]:
    """``--model`` as a reference that means the same from any directory (a file path made absolute),
    checked now: a missing or unreadable config is one line before anything is planned."""
    from cac.mmseg.zoo import MMSEG_PREFIX, is_model_file, resolve_model

    ref = getattr(args, "model", None)
    if not ref:
        return None
    if is_model_file(ref) and not ref.startswith(MMSEG_PREFIX):
        from pathlib import Path

        ref = str(Path(ref).expanduser().resolve())
    resolve_model(ref)
    return ref


def run_options(args) -> RunOptions:
    """The :class:`RunOptions` of parsed arguments (flags a command lacks stay at their defaults)."""
    expected = {split: n for split, n in (("train", getattr(args, "expected_train", None)),
                                          ("val", getattr(args, "expected_val", None))) if n is not None}
    for split, n in expected.items():
        if n < 1:
            raise CacError(f"--expected-{split} must be >= 1, got {n}")
    batch_per_gpu = getattr(args, "batch_per_gpu", None)
    if batch_per_gpu is not None and batch_per_gpu < 1:
        raise CacError(f"--batch-per-gpu must be >= 1, got {batch_per_gpu}")
    return RunOptions(cfg_options=dict(getattr(args, "cfg_options", None) or {}), amp=bool(getattr(args, "amp", False)),
                      no_pretrained=bool(getattr(args, "no_pretrained", False)), expected=expected,
                      model=model_option(args), batch_per_gpu=batch_per_gpu, smoke=bool(getattr(args, "smoke", False)))
