"""Evaluation of the three classifiers of Fig. 5 — original p, context-aware p_p, oracle p_y —
from one forward pass per batch (the data of the paper's Fig. 4), with confusion matrices.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["confusion_matrix", "iou_from_confusion", "classifier_logits", "evaluate_classifiers", "unwrap"]


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


@torch.no_grad()
def evaluate_classifiers(model, batches: Iterable[dict], num_classes: int, ignore_index: int = 255,
                         test_output: Optional[str] = None) -> dict[str, Tensor]:
    """Confusion matrices per classifier over ``batches`` (mmengine data batches, test pipeline)."""
    segmentor = unwrap(model)
    was_training = segmentor.training
    segmentor.eval()
    confs: dict[str, Tensor] = {}
    try:
        for batch in batches:
            data = segmentor.data_preprocessor(batch, False)
            inputs, samples = data["inputs"], data["data_samples"]
            labels = torch.stack([s.gt_sem_seg.data.squeeze(0) for s in samples]).to(inputs.device)
            for name, logits in classifier_logits(segmentor, inputs, labels).items():
                logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear",
                                       align_corners=segmentor.align_corners)
                conf = confusion_matrix(logits.argmax(1), labels, num_classes, ignore_index).cpu()
                confs[name] = confs[name] + conf if name in confs else conf
    finally:
        segmentor.train(was_training)
    return confs
