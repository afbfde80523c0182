"""Measures that explain what the context-aware classifier changes (not the method itself): calibration
(expected calibration error), which pixels p_p decides differently from p, and the class-specific
part of a set of classifier rows. Pure functions of tensors (and, for :func:`centre_rows`, of numpy
arrays too), shared by the training hook, ``cac-exp eval``, the reports and the t-SNE.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["ECE_BINS", "calibration_bins", "expected_calibration_error", "reliability", "change_counts",
           "change_shares", "centre_rows"]

ECE_BINS = 15


def _valid(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    return (labels != ignore_index) & (labels >= 0) & (labels < num_classes)


def calibration_bins(logits: Tensor, labels: Tensor, ignore_index: int = 255, bins: int = ECE_BINS) -> Tensor:
    """``[bins, 3]`` float64 sums over the labelled pixels of ``logits [B, N, H, W]`` (at the labels'
    resolution): pixel count, summed confidence (the softmax's largest probability) and summed
    correctness (argmax == label), with equal-width bins ``((m-1)/bins, m/bins]`` of the confidence.
    Sums add over batches and processes; :func:`expected_calibration_error` reads them."""
    valid = _valid(labels, logits.shape[1], ignore_index)
    probs = torch.softmax(logits.float(), dim=1)
    conf, pred = probs.max(dim=1)
    conf, correct = conf[valid].double(), (pred[valid] == labels[valid]).double()
    idx = (torch.ceil(conf * bins).long() - 1).clamp_(0, bins - 1)
    out = torch.zeros(bins, 3, dtype=torch.float64, device=logits.device)
    out[:, 0].index_add_(0, idx, torch.ones_like(conf))
    out[:, 1].index_add_(0, idx, conf)
    out[:, 2].index_add_(0, idx, correct)
    return out.cpu()


def expected_calibration_error(table: Tensor) -> float:
    """ECE = sum over bins of (n_b / N) |accuracy_b - confidence_b|, in % (NaN without pixels)."""
    table = table.double()
    total = float(table[:, 0].sum())
    if total <= 0:
        return float("nan")
    return float((table[:, 2] - table[:, 1]).abs().sum() / total * 100.0)


def reliability(table: Tensor) -> list[dict]:
    """Per bin: its edges, pixel count, mean confidence and accuracy (None for an empty bin): the
    points of a reliability diagram."""
    bins = table.shape[0]
    out = []
    for m, (n, conf, correct) in enumerate(table.double().tolist()):
        out.append({"low": m / bins, "high": (m + 1) / bins, "pixels": int(n),
                    "confidence": conf / n if n else None, "accuracy": correct / n if n else None})
    return out


def change_counts(pred_p: Tensor, pred_pp: Tensor, labels: Tensor, num_classes: int,
                  ignore_index: int = 255) -> Tensor:
    """``[4]`` int64 counts over the labelled pixels: all of them, those whose class p_p decides
    differently from p (changed), changed ones p_p gets right (fixed: p was wrong) and changed ones
    p got right (broken: p_p is wrong)."""
    valid = _valid(labels, num_classes, ignore_index)
    changed = valid & (pred_p != pred_pp)
    fixed = changed & (pred_pp == labels)
    broken = changed & (pred_p == labels)
    return torch.stack([valid.sum(), changed.sum(), fixed.sum(), broken.sum()]).long().cpu()


def change_shares(counts: Tensor | Sequence[int]) -> dict[str, float]:
    """``changed_pixels`` (% of labelled pixels), ``fixed_by_pp`` and ``broken_by_pp`` (% of the
    changed ones); NaN where the denominator is zero."""
    valid, changed, fixed, broken = (float(v) for v in (counts.tolist() if isinstance(counts, Tensor) else counts))

    def share(a: float, b: float) -> float:
        return a / b * 100.0 if b > 0 else math.nan

    return {"changed_pixels": share(changed, valid), "fixed_by_pp": share(fixed, changed),
            "broken_by_pp": share(broken, changed)}


def centre_rows(rows, present: Sequence[int]):
    """``rows [N, D]`` minus the mean of the rows of the classes in ``present`` (torch or numpy).

    For a classifier whose logits are ``tau * <f_hat, row_k>`` (the cosine classifiers of Eqs. 3/6
    on L2-normalised rows), the removed mean adds the same ``tau * <f_hat, mean>`` to the logit of
    every present class at a pixel: their argmax and every margin between them are unchanged."""
    present = list(present)
    if not present:
        raise ValueError("centre_rows needs at least one present class")
    return rows - rows[present].mean(0)[None]
