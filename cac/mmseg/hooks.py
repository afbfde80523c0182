"""mmengine hooks the runner adds to every run: MLflow logging, the three-classifier evaluation
(Fig. 4 data), a progress bar, and a guard that stops a run on a non-finite loss.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from cac.errors import CacError
from cac.mmseg.evaluation import (ClassifierPass, evaluate_classifiers, evaluate_pass, explain_artifacts,
                                    explain_metrics, iou_from_confusion, rank_share)

__all__ = ["TrackingHook", "EvaluationHook", "NonFiniteLossError", "metric_name", "EVALUATION_PRIORITY"]

# The three-classifier evaluation runs after mmengine's CheckpointHook (VERY_LOW = 90): an evaluation
# that fails (a bad image, out of memory) then never costs the checkpoint that was due at that step.
EVALUATION_PRIORITY = 95

_SHORT = {"p": "p", "p_p": "pp", "p_y": "py"}


class NonFiniteLossError(CacError):
    """Training produced a NaN/inf loss."""


def _scalar(value: Any) -> Optional[float]:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().mean().item()
    return float(value) if isinstance(value, (int, float)) else None


def _final_stage_prefix(model) -> str:
    """The loss-key prefix of the segmentor's final decode head: ``decode.``, or ``decode_N.`` for the
    last stage of a cascade (OCRNet), where ``add_cac`` puts CAC. Its terms are logged unprefixed
    (``train/loss_kl``) for every model; other stages keep theirs (``train/decode_0.loss_ce``)."""
    from cac.mmseg.evaluation import unwrap

    heads = getattr(unwrap(model), "decode_head", None)
    return f"decode_{len(heads) - 1}." if isinstance(heads, torch.nn.ModuleList) else "decode."


def metric_name(loss_key: str, final_prefix: str = "decode.") -> str:
    """``decode_1.loss_kl`` -> ``loss_kl`` when ``decode_1.`` is the final stage; others unchanged."""
    return loss_key[len(final_prefix):] if loss_key.startswith(final_prefix) else loss_key


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
                 label: str = "", progress: bool = True, on_eval=None, curve_interval: int = 0,
                 val_subset: int = 96) -> None:
        self.tracker, self.interval, self.log_interval = tracker, interval, log_interval
        # Fig. 4's curves: every ``curve_interval`` iterations the three classifiers on fixed, small
        # subsets of val and train (``curve/{val,train}_mIoU_*``), a few times cheaper than the full val
        # pass of ``interval`` (``{val,train}/mIoU_*``), so a run gets a curve at a small cost.
        self.curve_interval, self.val_subset = curve_interval, val_subset
        self.on_eval = on_eval  # called as on_eval(step, metrics), e.g. to report to an Optuna trial
        self.train_subset, self.label, self.progress = train_subset, label, progress
        self._t0 = 0.0
        self._last: dict[str, float] = {}
        self._prefix = "decode."
        self._logged: dict[str, int] = {}
        self.final_confusion: Optional[torch.Tensor] = None
        self.eval_seconds = 0.0  # spent on the three-classifier evaluations (the curves' cost)

    # -- training ---------------------------------------------------------------------------------
    def before_train(self, runner) -> None:
        self._t0 = time.time()
        self._start_iter = runner.iter
        self._prefix = _final_stage_prefix(runner.model)
        # A resumed run repeats the iterations between its checkpoint and the kill (all of them when it
        # was killed before its first checkpoint), whose metrics the killed process may have logged
        # already: those steps are not logged a second time.
        self._logged = self.tracker.logged_steps() if self.tracker is not None else {}
        if self.tracker is not None and runner.iter > 0:  # where each resume started: the run's history
            self.tracker.log_metrics({"resume/start_iter": float(runner.iter)}, runner.iter)

    def _due(self, step: int, max_iters: int) -> tuple[bool, bool]:
        """Whether the full and the curve evaluations are due after ``step``."""
        last = step == max_iters
        return ((self.interval and step % self.interval == 0) or last,
                (self.curve_interval and step % self.curve_interval == 0) or last)

    def resume_evaluations(self, runner) -> None:
        """A run resumed at a step whose evaluation did not get logged (the process died in it, after
        its checkpoint was written) evaluates that step first, so the curves keep their point."""
        step = runner.iter
        if self.tracker is None or step == 0 or step >= runner.max_iters:
            return
        full, curve = self._due(step, runner.max_iters)
        if full and self._logged.get("val/mIoU_p", -1) < step:
            self._evaluate(runner, step, final=False)
        if curve and self._logged.get("curve/val_mIoU_p", -1) < step:
            self._timed(self._evaluate_curve, runner, step)

    def _log(self, metrics: dict, step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self._logged.get(k, -1)}
        if self.tracker is not None and fresh:
            self.tracker.log_metrics(fresh, step)

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
            metrics = {f"train/{metric_name(k, self._prefix)}": v for k, v in values.items()}
            lr = runner.optim_wrapper.get_lr()
            if lr:
                metrics["train/lr"] = float(next(iter(lr.values()))[0])
            self._log(metrics, step)
        if self.progress:
            self._print_progress(runner, step)

    def evaluate_after_iter(self, runner) -> None:
        """The evaluations due after this iteration (called by :class:`EvaluationHook`, which runs
        after the checkpoint hook)."""
        step = runner.iter + 1
        full, curve = self._due(step, runner.max_iters)
        if full:
            self._evaluate(runner, step, final=step == runner.max_iters)
        if curve:
            self._timed(self._evaluate_curve, runner, step)

    def after_train(self, runner) -> None:
        """A run resumed from its final checkpoint trained nothing here: evaluate it as the end of an
        uninterrupted run does (mmseg's val loop for val/mIoU, then the three classifiers), so the
        rerun logs the same final metrics."""
        if runner.iter >= runner.max_iters and self.final_confusion is None:
            if runner.iter == self._start_iter and runner.val_loop is not None:
                runner.val_loop.run()
            self._evaluate(runner, runner.max_iters, final=True)
            self._timed(self._evaluate_curve, runner, runner.max_iters)
        self._log({"time/eval_seconds": self.eval_seconds}, runner.max_iters)

    def _print_progress(self, runner, step: int) -> None:
        done, total = step - self._start_iter, runner.max_iters - self._start_iter
        elapsed = time.time() - self._t0
        eta = elapsed / max(done, 1) * (total - done)
        width = 24
        fill = int(width * step / runner.max_iters)
        loss = self._last.get("loss", float("nan"))
        terms = " ".join(f"{metric_name(k, self._prefix)}={v:.3f}" for k, v in self._last.items()
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

    def _timed(self, fn, *args) -> None:
        t0 = time.perf_counter()
        try:
            fn(*args)
        finally:
            self.eval_seconds += time.perf_counter() - t0

    def _evaluate(self, runner, step: int, final: bool) -> None:
        self._timed(self._evaluate_classifiers, runner, step, final)

    def _val_subset_batches(self, runner):
        """``val_subset`` evenly spaced val images (the same every time), batched as the val loader."""
        from mmengine.dataset import pseudo_collate

        if not hasattr(self, "_val_batches"):
            ds = runner.val_dataloader.dataset
            n = len(ds)
            picks = sorted({round(i * (n - 1) / max(1, self.val_subset - 1)) for i in range(min(n, self.val_subset))})
            items = [ds[i] for i in picks]
            self._val_batches = [pseudo_collate(items[i:i + 16]) for i in range(0, len(items), 16)]
        return self._val_batches

    def _evaluate_curve(self, runner, step: int) -> None:
        """``curve/{val,train}_mIoU_{p,pp,py}`` on the fixed subsets (every rank evaluates the same
        images, so no reduction is needed)."""
        num_classes = len(runner.val_dataloader.dataset.metainfo["classes"])
        metrics: dict[str, float] = {}
        for split, batches in (("val", self._val_subset_batches(runner)), ("train", self._train_subset_batches(runner))):
            for name, conf in evaluate_classifiers(runner.model, batches, num_classes).items():
                metrics[f"curve/{split}_mIoU_{_SHORT[name]}"] = iou_from_confusion(conf)[1]
        self._log(metrics, step)
        if self.on_eval is not None:
            self.on_eval(step, metrics)

    def _evaluate_classifiers(self, runner, step: int, final: bool) -> None:
        num_classes = len(runner.val_dataloader.dataset.metainfo["classes"])
        metrics: dict[str, float] = {}
        for split, batches in (("val", runner.val_dataloader), ("train", self._train_subset_batches(runner))):
            result = evaluate_pass(runner.model, batches, num_classes, explain=split == "val",
                                   max_images=self._val_share(runner) if split == "val" else None)
            if split == "val":  # under DDP each rank saw its shard of val: sum every count
                result = ClassifierPass.from_tensors({k: _all_reduce(v) for k, v in result.tensors().items()})
                metrics.update(explain_metrics(result))  # val/ece_*, val/changed_pixels, ...
            confs = result.confusion
            for name, conf in confs.items():
                metrics[f"{split}/mIoU_{_SHORT[name]}"] = iou_from_confusion(conf)[1]
            if split == "val" and final:
                self.final_confusion = self._test_time_confusion(runner, confs)
                if self.tracker is not None:  # per-class IoU of every classifier, reliability bins
                    classes = runner.val_dataloader.dataset.metainfo["classes"]
                    for path in explain_artifacts(result, classes, Path(runner.work_dir) / "artifacts"):
                        self.tracker.log_artifact(path)
        self._log(metrics, step)
        if self.on_eval is not None:
            self.on_eval(step, metrics)

    @staticmethod
    def _val_share(runner) -> Optional[int]:
        """This rank's real val images (None on one process): the sampler's padding is not counted."""
        from mmengine.dist import get_dist_info

        rank, world = get_dist_info()
        return None if world == 1 else rank_share(len(runner.val_dataloader.dataset), rank, world)

    @staticmethod
    def _test_time_confusion(runner, confs: dict) -> torch.Tensor:
        from cac.mmseg.evaluation import unwrap
        from cac.mmseg.head import CACHead

        head = unwrap(runner.model).decode_head
        head = head[-1] if isinstance(head, torch.nn.ModuleList) else head
        if isinstance(head, CACHead) and head.test_logits in confs:
            return confs[head.test_logits]
        return confs["p"]


@HOOKS.register_module()
class EvaluationHook(Hook):
    """Runs a :class:`TrackingHook`'s evaluations after each training iteration; registered at
    :data:`EVALUATION_PRIORITY`, after the checkpoint hook, and before the first training step of a
    resumed run (for an evaluation the interrupted process did not finish)."""

    def __init__(self, tracking: TrackingHook) -> None:
        self.tracking = tracking

    def before_train(self, runner) -> None:
        self.tracking.resume_evaluations(runner)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self.tracking.evaluate_after_iter(runner)
