"""The official CAC heads' training computation, as a peer for the benchmarks (not used by `cac`).

A re-derivation, written from reading the official heads (tianzhuotao/CAC, mmseg 0.x:
``FCNHeadCAC`` / ``UPerHeadCAC`` ``forward_train`` with ``post_refine_proto_v2``,
``get_adaptive_perspective`` and ``get_distill_loss``), of what one training step of theirs computes,
op for op where the cost lives, so that ``benchmarks/train_step.py`` can time it beside ours on the
same model, the same weights and the same batch:

- p = C(dropout(f)) through ``conv_seg``; each branch below works on its own clone of f;
- p_p (Eqs. 4-6): softmax of p, soft prototypes ``softmax(p) @ f^T / (sum + 1e-12)``, concatenated with
  the repeated C, θ_p, and a cosine classifier that divides a copy of f by its norm;
- p_y (Eqs. 1-3): the labels resized to f (nearest), then a Python loop over ``unique()`` classes (a
  host sync), each pooling its prototype from a full-size ``f * mask`` product over the batch and
  writing it into C's detached rows with a one-hot blend; θ_y; ``F.normalize`` of a copy of f and a
  1x1 convolution;
- the distillation loss: a ``[B·H·W, N]`` one-hot built by scatter, softmax of the teacher, the
  half-and-half target, ``-log_softmax(p_p) * target``, the teacher's softmax computed a second time
  for its entropy, and a Python loop over ``unique()`` classes;
- two full-size CE terms (p and p_y): ``F.interpolate(align_corners=True)`` to the label size and
  ``nn.CrossEntropyLoss(ignore_index=255)``;
- the head's own loss on p_p (mmseg's ``loss_by_feat``: resize, ``loss_decode``, accuracy), to which
  the three other terms are added, as the official head adds them to ``loss_ce``.

It is registered as ``OfficialCACHead``, a ``CACHead`` whose training loss is the above: the wrapped
head, ``conv_seg`` and the projectors (``classifier.proj_p`` = their ``proj``, ``classifier.proj_y``
= their ``apd_proj``, first Linear without bias under ``profile: official``) are the very modules our
head trains, so the two rows differ only in how the step is computed. Device-agnostic (the official
code's ``.cuda()`` calls are the tensors' own device here). Prediction is ``CACHead``'s.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cac.mmseg.head import CACHead
from mmseg.registry import MODELS

IGNORE = 255
TAU = 15.0


def _cosine(x: Tensor, classifiers: Tensor) -> Tensor:
    """Their ``get_pred``: ``15 * (x / (|x| + 1e-12)) @ (A / (|A| + 1e-12))^T``, per image ``[B, N, D]``."""
    b, c, h, w = x.shape
    x = x / (torch.norm(x, 2, 1, True) + 1e-12)  # a normalised copy of f
    a = classifiers / (torch.norm(classifiers, 2, -1, True) + 1e-12)
    return (a @ x.contiguous().view(b, c, h * w)).contiguous().view(b, -1, h, w) * TAU


def context_logits(feat: Tensor, p: Tensor, weight: Tensor, proj: nn.Module) -> Tensor:
    """p_p as their ``post_refine_proto_v2``: soft prototypes, ``[C_p, C]``, θ_p, cosine."""
    x = feat.clone()
    b, c, h, w = x.shape
    soft = F.softmax(p.view(b, weight.shape[0], h * w), 1)
    protos = (soft @ x.view(b, c, h * w).permute(0, 2, 1)) / (soft.sum(-1).unsqueeze(-1) + 1e-12)
    protos = torch.cat([protos, weight.unsqueeze(0).repeat(b, 1, 1)], -1)
    return _cosine(x, proj(protos))


def oracle_logits(feat: Tensor, y: Tensor, fill: Tensor, weight: Tensor, proj: nn.Module) -> Tensor:
    """p_y as their ``get_adaptive_perspective``: per present class (a Python loop over ``unique()``),
    the batch-pooled prototype replaces that row of the detached C; θ_y; cosine by 1x1 convolution."""
    x = feat.clone()
    h, w = x.shape[-2:]
    y = F.interpolate(y.float(), size=(h, w), mode="nearest")  # [B, 1, h, w]
    classes = [k for k in y.unique() if int(k) != IGNORE]
    table = fill
    for k in classes:
        mask = (y == k).float()
        proto = (x * mask).sum(0).sum(-1).sum(-1) / (mask.sum(0).sum(-1).sum(-1) + 1e-12)
        pick = torch.zeros(table.shape[0], 1, device=x.device, dtype=x.dtype)
        pick[k.long()] = 1
        table = table * (1 - pick) + proto.unsqueeze(0) * pick
    a = proj(torch.cat([table, weight], -1)).unsqueeze(-1).unsqueeze(-1)  # [N, D, 1, 1]
    return F.conv2d(F.normalize(x, 2, 1), F.normalize(a, 2, 1)) * TAU


def distill_loss(student: Tensor, teacher: Tensor, target: Tensor, smoothness: float = 0.5) -> Tensor:
    """Their ``get_distill_loss``: half softmax(teacher), half one-hot target; entropy weights from a
    second softmax of the teacher; class-wise mean over a Python loop of the ``unique()`` classes."""
    b, n, h, w = teacher.shape
    target = F.interpolate(target.unsqueeze(1).float(), size=student.shape[-2:], mode="nearest").squeeze(1).long()
    flat = target.view(-1, 1)
    ignored = (flat == IGNORE).float()
    flat = flat * (1 - ignored)
    onehot = torch.zeros(b * h * w, n, device=student.device).scatter_(1, flat.long(), 1)  # [B·H·W, N]
    onehot = onehot.contiguous().view(b, h, w, n).permute(0, 3, 1, 2)
    soft = F.softmax(teacher, 1)
    mixed = smoothness * soft + (1 - smoothness) * onehot
    per_pixel = torch.mul(-1 * F.log_softmax(student, dim=1), mixed).sum(1)
    soft = F.softmax(teacher, 1)
    entropy = -1 * (soft * torch.log(soft + 1e-12)).sum(1) * (target != IGNORE).float()
    terms = []
    for k in [k for k in target.unique() if int(k) != IGNORE]:
        weight_k = entropy * (target == k).float()
        terms.append((per_pixel * weight_k).sum() / (weight_k.sum() + 1e-12))
    return sum(terms) / (len(terms) + 1e-12) if terms else student.sum() * 0


@MODELS.register_module()
class OfficialCACHead(CACHead):
    """``CACHead`` whose training loss is the official heads' computation (see the module's text)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.criterion = nn.CrossEntropyLoss(ignore_index=IGNORE)

    def loss(self, *args: Any) -> dict:
        *inputs, batch_data_samples, _train_cfg = args
        y = self.head._stack_batch_gt(batch_data_samples)  # [B, 1, H, W]
        feat = self.features(*inputs)
        conv = self.head.conv_seg
        dropout = self.head.dropout if self.head.dropout is not None else nn.Identity()
        p = conv(dropout(feat))
        weight = conv.weight.squeeze()
        p_p = context_logits(feat, p, weight, self.classifier.proj_p)
        p_y = oracle_logits(feat, y, conv.weight.detach().data.squeeze(), weight, self.classifier.proj_y)
        kl = distill_loss(p_p, p_y.detach(), y.squeeze(1))
        label = y.squeeze(1).long()
        up = dict(size=y.shape[-2:], mode="bilinear", align_corners=True)
        ce_p = self.criterion(F.interpolate(p, **up), label)
        ce_y = self.criterion(F.interpolate(p_y, **up), label)
        losses = self.head.loss_by_feat(p_p, batch_data_samples)
        losses["loss_ce"] = losses["loss_ce"] + ce_p + ce_y + kl
        return losses


def official_model_cfg(cac_model: dict) -> dict:
    """A +CAC model config (``profile: official``) whose CAC head computes the official step instead."""
    model = copy.deepcopy(cac_model)
    heads = model["decode_head"] if isinstance(model["decode_head"], list) else [model["decode_head"]]
    if heads[-1].get("type") != "CACHead":
        raise ValueError("official_model_cfg needs a model whose final decode head is CACHead")
    heads[-1]["type"] = "OfficialCACHead"
    return model
