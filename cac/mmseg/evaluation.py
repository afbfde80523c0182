"""Evaluation of the three classifiers of Fig. 5 — original p, context-aware p_p, oracle p_y —
from one forward pass per batch (the data of the paper's Fig. 4), with confusion matrices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["confusion_matrix", "iou_from_confusion", "classifier_logits", "evaluate_classifiers", "unwrap",
           "ClassifierPass", "evaluate_pass", "explain_metrics", "explain_artifacts", "CLASSIFIER_SHORT",
           "size_groups", "rank_share"]

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


def _sizes(batch: Mapping, i: int) -> tuple:
    """What must agree for two test images to share a forward pass: the input's shape and the label's."""
    samples = batch.get("data_samples") or []
    gt = getattr(samples[i], "gt_sem_seg", None) if i < len(samples) else None
    return tuple(batch["inputs"][i].shape), tuple(gt.shape) if gt is not None else ()


def size_groups(batch: Mapping) -> list[tuple[list[int], dict]]:
    """A collated test batch as ``(indices, sub-batch)`` pairs of images of one size (and labels of one
    size), in order of first appearance. mmseg's ``SegDataPreProcessor`` stacks a test batch only when
    every image has the same size, and real test pipelines keep each image's aspect (ADE20K,
    COCO-Stuff, Pascal-Context), so a batch of val images is in general several forward passes."""
    inputs = batch.get("inputs")
    if not isinstance(inputs, (list, tuple)):  # already a stacked tensor: one size
        return [(list(range(len(inputs))), dict(batch))]
    groups: dict[tuple, list[int]] = {}
    for i in range(len(inputs)):
        groups.setdefault(_sizes(batch, i), []).append(i)
    if len(groups) == 1:
        return [(list(range(len(inputs))), dict(batch))]
    return [(idx, {k: [v[i] for i in idx] if isinstance(v, (list, tuple)) and len(v) == len(inputs) else v
                   for k, v in batch.items()}) for idx in groups.values()]


def rank_share(dataset_size: int, rank: int, world_size: int) -> int:
    """How many of a rank's val samples are real under mmengine's ``DefaultSampler``: it pads the
    dataset to a multiple of the world size with repeats at the end of the index list and deals it
    out round-robin, so rank ``r`` holds positions ``r, r + world, ...`` and those at or past
    ``dataset_size`` are the padding (mmengine's evaluator drops them; so must every count here)."""
    return len(range(rank, dataset_size, world_size))


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
        return head.named_logits(*args, labels=labels)
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
                  explain: bool = False, max_images: Optional[int] = None) -> ClassifierPass:
    """Confusion matrices per classifier over ``batches`` (mmengine data batches, test pipeline) and,
    with ``explain``, calibration and p-vs-p_p change counts from the same logits (one forward pass).

    Images of any sizes: a batch is run as :func:`size_groups`, so every count equals the sum of each
    image's own. ``max_images``: count only the first that many images (the rest are a DDP sampler's
    padding, see :func:`rank_share`)."""
    segmentor = unwrap(model)
    was_training = segmentor.training
    segmentor.eval()
    result = ClassifierPass({})
    try:
        seen = 0
        for batch in batches:
            if max_images is not None:
                if seen >= max_images:
                    continue  # the rest is padding; the loader is still drained to its end
                batch = _first(batch, max_images - seen)
            seen += len(batch["inputs"])
            for _, group in size_groups(batch):
                _count_group(segmentor, group, result, num_classes, ignore_index, explain)
    finally:
        segmentor.train(was_training)
    return result


def predicted_classes(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(1)``: the first maximum over the classes, NaN counting as the maximum. Written
    as ``max(1).indices``, which gives the same indices and is 2-20x faster on the CPU over the channel
    dimension of an (N, C, H, W) tensor (argmax reduces over a strided dimension slowly;
    ``benchmarks/cpu_overheads.py``)."""
    return logits.max(1).indices


def _count_group(segmentor, group: dict, result: ClassifierPass, num_classes: int, ignore_index: int,
                 explain: bool) -> None:
    """One forward pass over images of one size, added to ``result``."""
    from cac.core.explain import calibration_bins, change_counts

    data = segmentor.data_preprocessor(group, False)
    inputs, samples = data["inputs"], data["data_samples"]
    labels = torch.stack([s.gt_sem_seg.data.squeeze(0) for s in samples]).to(inputs.device)
    preds = {}
    for name, logits in classifier_logits(segmentor, inputs, labels).items():
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear",
                               align_corners=segmentor.align_corners)
        preds[name] = predicted_classes(logits)
        _add(result.confusion, name, confusion_matrix(preds[name], labels, num_classes, ignore_index).cpu())
        if explain and name in ("p", "p_p"):
            _add(result.calibration, name, calibration_bins(logits, labels, ignore_index))
    if explain and "p_p" in preds:
        counts = change_counts(preds["p"], preds["p_p"], labels, num_classes, ignore_index)
        result.changes = counts if result.changes is None else result.changes + counts


def _first(batch: dict, n: int) -> dict:
    """The first ``n`` images of a collated batch."""
    size = len(batch["inputs"])
    if n >= size:
        return batch
    return {k: v[:n] if isinstance(v, (list, tuple, Tensor)) and len(v) == size else v for k, v in batch.items()}


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
