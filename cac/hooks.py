"""mmengine hooks the runner adds to every run: MLflow logging, the three-classifier evaluation
(Fig. 4 data), a progress bar, and a guard that stops a run on a non-finite loss.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Optional

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from .errors import CacError
from .evaluation import evaluate_classifiers, iou_from_confusion

__all__ = ["TrackingHook", "NonFiniteLossError"]

_SHORT = {"p": "p", "p_p": "pp", "p_y": "py"}


class NonFiniteLossError(CacError):
    """Training produced a NaN/inf loss."""


def _scalar(value: Any) -> Optional[float]:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().mean().item()
    return float(value) if isinstance(value, (int, float)) else None


def _all_reduce(conf: torch.Tensor) -> torch.Tensor:
    from mmengine.dist import all_reduce, get_world_size

    if get_world_size() > 1:
        conf = conf.clone()
        all_reduce(conf, op="sum")
    return conf


@HOOKS.register_module()
class TrackingHook(Hook):
    """Logs each loss term and lr, the three classifiers' mIoU on val and a fixed train subset every
    ``interval`` iterations, and the final per-class IoU; stops on non-finite losses.

    ``tracker`` is a ``cac.tracking.RunTracker`` (None on non-zero ranks: nothing is logged there).
    """

    priority = "LOW"

    def __init__(self, tracker=None, interval: int = 0, log_interval: int = 10, train_subset: int = 32,
                 label: str = "", progress: bool = True, on_eval=None) -> None:
        self.tracker, self.interval, self.log_interval = tracker, interval, log_interval
        self.on_eval = on_eval  # called as on_eval(step, metrics), e.g. to report to an Optuna trial
        self.train_subset, self.label, self.progress = train_subset, label, progress
        self._t0 = 0.0
        self._last: dict[str, float] = {}
        self.final_confusion: Optional[torch.Tensor] = None

    # -- training ---------------------------------------------------------------------------------
    def before_train(self, runner) -> None:
        self._t0 = time.time()
        self._start_iter = runner.iter

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        step = runner.iter + 1
        values = {k: _scalar(v) for k, v in (outputs or {}).items()}
        values = {k: v for k, v in values.items() if v is not None}
        bad = [k for k, v in values.items() if "loss" in k and not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss {bad[0]}={values[bad[0]]} at iteration {step}"
                + (f" of {self.label}" if self.label else "") + "; the run is marked FAILED")
        self._last = values
        if self.tracker is not None and (step % self.log_interval == 0 or step == runner.max_iters):
            metrics = {f"train/{k.replace('decode.', '')}": v for k, v in values.items()}
            lr = runner.optim_wrapper.get_lr()
            if lr:
                metrics["train/lr"] = float(next(iter(lr.values()))[0])
            self.tracker.log_metrics(metrics, step)
        if self.interval and step % self.interval == 0:
            self._evaluate(runner, step, final=step == runner.max_iters)
        if self.progress:
            self._print_progress(runner, step)

    def _print_progress(self, runner, step: int) -> None:
        done, total = step - self._start_iter, runner.max_iters - self._start_iter
        elapsed = time.time() - self._t0
        eta = elapsed / max(done, 1) * (total - done)
        width = 24
        fill = int(width * step / runner.max_iters)
        loss = self._last.get("loss", float("nan"))
        terms = " ".join(f"{k.replace('decode.', '')}={v:.3f}" for k, v in self._last.items()
                         if "loss_" in k)
        line = (f"\r  {self.label} [{'#' * fill}{'.' * (width - fill)}] {step}/{runner.max_iters} "
                f"eta {eta:4.0f}s loss={loss:.3f} {terms}")
        if sys.stderr.isatty():
            sys.stderr.write(line[:200].ljust(80) + ("\n" if step == runner.max_iters else ""))
        elif step % self.log_interval == 0 or step == runner.max_iters:
            sys.stderr.write(line[1:200] + "\n")  # logs and pipes get one line per log interval
        sys.stderr.flush()

    # -- the three classifiers on val and a fixed train subset ------------------------------------
    def _train_subset_batches(self, runner):
        """The first ``train_subset`` training images through the test pipeline (fixed, no flip)."""
        from mmengine.dataset import pseudo_collate

        if not hasattr(self, "_train_batches"):
            ds = runner.train_dataloader.dataset
            from mmengine.dataset import Compose

            test_pipe = Compose(runner.cfg.get("test_pipeline") or runner.cfg.val_dataloader.dataset.pipeline)
            items = [test_pipe(dict(ds.get_data_info(i))) for i in range(min(self.train_subset, len(ds)))]
            self._train_batches = [pseudo_collate(items[i:i + 16]) for i in range(0, len(items), 16)]
        return self._train_batches

    def _evaluate(self, runner, step: int, final: bool) -> None:
        num_classes = len(runner.val_dataloader.dataset.metainfo["classes"])
        metrics: dict[str, float] = {}
        for split, batches in (("val", runner.val_dataloader), ("train", self._train_subset_batches(runner))):
            confs = evaluate_classifiers(runner.model, batches, num_classes)
            if split == "val":  # under DDP each rank saw its shard of val: sum the confusion matrices
                confs = {k: _all_reduce(v) for k, v in sorted(confs.items())}
            for name, conf in confs.items():
                metrics[f"{split}/mIoU_{_SHORT[name]}"] = iou_from_confusion(conf)[1]
            if split == "val" and final:
                self.final_confusion = self._test_time_confusion(runner, confs)
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)
        if self.on_eval is not None:
            self.on_eval(step, metrics)

    @staticmethod
    def _test_time_confusion(runner, confs: dict) -> torch.Tensor:
        from .evaluation import unwrap
        from .head import CACHead

        head = unwrap(runner.model).decode_head
        head = head[-1] if isinstance(head, torch.nn.ModuleList) else head
        if isinstance(head, CACHead) and "p_p" in confs and head.options.test_output == "context":
            return confs["p_p"]
        return confs["p"]
