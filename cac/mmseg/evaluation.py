"""Evaluation of the three classifiers of Fig. 5 — original p, context-aware p_p, oracle p_y —
from one forward pass per batch (the data of the paper's Fig. 4), with confusion matrices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["confusion_matrix", "iou_from_confusion", "classifier_logits", "evaluate_classifiers", "unwrap",
           "ClassifierPass", "evaluate_pass", "explain_metrics", "explain_artifacts", "CLASSIFIER_SHORT"]

CLASSIFIER_SHORT = {"p": "p", "p_p": "pp", "p_y": "py"}  # metric-name suffixes: val/mIoU_pp, val/ece_pp


def confusion_matrix(pred: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """``[N, N]`` counts, rows = ground truth, columns = prediction (ignored pixels skipped)."""
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    idx = labels[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(conf: Tensor) -> tuple[Tensor, float]:
    """Per-class IoU (NaN for classes absent from both GT and prediction) and their mean in %."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))
    return iou, float(torch.nanmean(iou) * 100) if torch.isfinite(iou).any() else float("nan")


def unwrap(model):
    """The segmentor inside DDP / TTA wrappers."""
    return getattr(model, "module", model)


def classifier_logits(segmentor, inputs: Tensor, labels: Optional[Tensor]) -> dict[str, Tensor]:
    """Logits of each available classifier at the features' resolution: keys ``p``, ``p_p``, ``p_y``."""
    from cac.mmseg.head import CACHead

    feats = segmentor.extract_feat(inputs)
    heads = segmentor.decode_head
    args: tuple = (feats,)
    if isinstance(heads, torch.nn.ModuleList):  # cascade: run the earlier stages for prev_output
        prev = heads[0].forward(feats)
        for stage in heads[1:-1]:
            prev = stage.forward(feats, prev)
        args, head = (feats, prev), heads[-1]
    else:
        head = heads
    if isinstance(head, CACHead):
        out = head.all_logits(*args, labels=labels)
        return {k: v for k, v in out._asdict().items() if v is not None}
    return {"p": head.forward(*args)}


@dataclass
class ClassifierPass:
    """What one pass over a data set measured: a confusion matrix per classifier and, with
    ``explain``, the calibration sums of p and p_p (:func:`cac.core.explain.calibration_bins`) and the
    counts of pixels p_p decides differently from p (:func:`cac.core.explain.change_counts`)."""

    confusion: dict[str, Tensor]
    calibration: dict[str, Tensor] = field(default_factory=dict)
    changes: Optional[Tensor] = None

    def tensors(self) -> dict[str, Tensor]:
        """Every count by a flat name, in a fixed order (to sum them over processes)."""
        out = {f"conf.{k}": v for k, v in sorted(self.confusion.items())}
        out.update({f"cal.{k}": v for k, v in sorted(self.calibration.items())})
        if self.changes is not None:
            out["changes"] = self.changes
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "ClassifierPass":
        return cls({k[5:]: v for k, v in tensors.items() if k.startswith("conf.")},
                   {k[4:]: v for k, v in tensors.items() if k.startswith("cal.")}, tensors.get("changes"))


def _add(store: dict, key: str, value: Tensor) -> None:
    store[key] = store[key] + value if key in store else value


@torch.no_grad()
def evaluate_pass(model, batches: Iterable[dict], num_classes: int, ignore_index: int = 255,
                  explain: bool = False) -> ClassifierPass:
    """Confusion matrices per classifier over ``batches`` (mmengine data batches, test pipeline) and,
    with ``explain``, calibration and p-vs-p_p change counts from the same logits (one forward pass)."""
    from cac.core.explain import calibration_bins, change_counts

    segmentor = unwrap(model)
    was_training = segmentor.training
    segmentor.eval()
    result = ClassifierPass({})
    try:
        for batch in batches:
            data = segmentor.data_preprocessor(batch, False)
            inputs, samples = data["inputs"], data["data_samples"]
            labels = torch.stack([s.gt_sem_seg.data.squeeze(0) for s in samples]).to(inputs.device)
            preds = {}
            for name, logits in classifier_logits(segmentor, inputs, labels).items():
                logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear",
                                       align_corners=segmentor.align_corners)
                preds[name] = logits.argmax(1)
                _add(result.confusion, name, confusion_matrix(preds[name], labels, num_classes, ignore_index).cpu())
                if explain and name in ("p", "p_p"):
                    _add(result.calibration, name, calibration_bins(logits, labels, ignore_index))
            if explain and "p_p" in preds:
                counts = change_counts(preds["p"], preds["p_p"], labels, num_classes, ignore_index)
                result.changes = counts if result.changes is None else result.changes + counts
    finally:
        segmentor.train(was_training)
    return result


def evaluate_classifiers(model, batches: Iterable[dict], num_classes: int, ignore_index: int = 255,
                         test_output: Optional[str] = None) -> dict[str, Tensor]:
    """Confusion matrices per classifier over ``batches`` (mmengine data batches, test pipeline)."""
    return evaluate_pass(model, batches, num_classes, ignore_index).confusion


def explain_metrics(result: ClassifierPass, prefix: str = "val/") -> dict[str, float]:
    """``val/ece_p``, ``val/ece_pp`` (15-bin ECE, %) and ``val/changed_pixels``, ``val/fixed_by_pp``,
    ``val/broken_by_pp`` (%) of a pass made with ``explain``."""
    from cac.core.explain import change_shares, expected_calibration_error

    out = {f"{prefix}ece_{CLASSIFIER_SHORT[k]}": expected_calibration_error(v) for k, v in result.calibration.items()}
    if result.changes is not None:
        out.update({prefix + k: v for k, v in change_shares(result.changes).items()})
    return out


def explain_artifacts(result: ClassifierPass, classes: Sequence[str], out_dir: Path) -> list[Path]:
    """``per_class_iou_classifiers.csv`` (per-class IoU, %, of every classifier of the pass: the data
    of the p-vs-p_p comparison) and, with calibration sums, ``calibration.json`` (the reliability
    diagram's bins). Returns the written files."""
    import json

    from cac.core.explain import expected_calibration_error, reliability

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [k for k in CLASSIFIER_SHORT if k in result.confusion]
    ious = {k: iou_from_confusion(result.confusion[k])[0].tolist() for k in names}
    lines = ["class," + ",".join(f"iou_{CLASSIFIER_SHORT[k]}" for k in names)]
    lines += [f"{c}," + ",".join("" if ious[k][i] != ious[k][i] else f"{ious[k][i] * 100:.4f}" for k in names)
              for i, c in enumerate(classes)]
    table = out_dir / "per_class_iou_classifiers.csv"
    table.write_text("\n".join(lines) + "\n")
    paths = [table]
    if result.calibration:
        cal = out_dir / "calibration.json"
        cal.write_text(json.dumps({CLASSIFIER_SHORT[k]: {"ece": expected_calibration_error(v), "bins": reliability(v)}
                                   for k, v in result.calibration.items()}, indent=1) + "\n")
        paths.append(cal)
    return paths
