"""SSA-Seg's additions to CAC (Ma et al., "Semantic and Spatial Adaptive Pixel-level Classifier for
Semantic Segmentation", NeurIPS 2024), as switches of :class:`cac.core.classifier.CACOptions`.

SSA-Seg keeps CAC's soft-pooled class centres and cosine classifier and adds:

1. spatial positions: a depthwise 3x3 convolution of f gives every pixel a position ``P``, added to f
   before the context classifiers (``ssa_pixel_pos``); every class gets a learned embedding ``E_k``,
   refined with the positions its pixels occupy (a softmax over the image of p's class-k map weighs
   ``P``), added to the centre before a last linear map (``ssa_center_pos``);
2. the same for the ground-truth (oracle) branch with its own projections: the positions pooled over
   each class's labelled pixels, per image (``ssa_gt_pos``);
3. two distillations from the oracle branch: the centres' inter-class relations (``ssa_relation``) and
   the centres' positions (``ssa_pos_distill``);
4. dice losses on the context and oracle maps (``ssa_dice``);

and, in its distillation of p_y into p_p, averages each class's boundary and interior pixels
separately (``ssa_kl_edges``). Every piece here is a small function or module; the classifier composes
them. With every switch off, nothing here is built or called.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor, nn

from cac.core.designs import Projector
from cac.core.functional import mask_pool

__all__ = ["SSAModules", "SSAExtras", "centre_positions", "oracle_positions", "relation_distill_loss",
           "position_distill_loss", "dice_loss", "boundary_mask"]

# The official code's constants: the relation softmax's scale (the cosine classifier's 15) and the
# floor it adds to the centres' norms.
RELATION_SCALE = 15.0
SSA_EPS = 1e-12


class SSAExtras(NamedTuple):
    """What SSA-Seg's losses need besides the logits (``None`` where the switch is off)."""

    centres: Tensor  # A_p before positions, [B, N, D] (SSA's pred_proto)
    oracle_centres: Optional[Tensor]  # A_y before positions, [B, N, D] (SSA's gt_proto)
    positions: Optional[Tensor]  # the centres' positions, [B, N, D]
    oracle_positions: Optional[Tensor]  # the oracle centres' positions, [B, N, D]


def centre_positions(logits: Tensor, pixel_pos: Tensor, embedding: Tensor, proj: nn.Module) -> Tensor:
    """A class's position: ``proj(E_k ⊕ sum_i softmax_i(p_k) P_i)`` — p's class-k map, normalised over
    the image's pixels (not over classes), weighs the pixels' positions. ``[B, N, D]``."""
    b, n = logits.shape[:2]
    attn = logits.flatten(2).softmax(dim=-1)  # [B, N, HW]
    pooled = attn @ pixel_pos.flatten(2).transpose(1, 2)  # [B, N, D]
    return proj(torch.cat([embedding.unsqueeze(0).expand(b, -1, -1), pooled], dim=-1))


def oracle_positions(pixel_pos: Tensor, labels: Tensor, embedding: Tensor, proj: nn.Module,
                     ignore_index: int = 255) -> Tensor:
    """The oracle centres' positions: ``proj(G_k ⊕ E_k)``, ``G_k`` the mean position of the image's
    pixels labelled k (the detached ``E_k`` where k is absent). ``labels`` at the positions' size."""
    b = pixel_pos.shape[0]
    pooled, present = mask_pool(pixel_pos, labels, embedding.shape[0], ignore_index)  # Eq. (1), per image
    pooled = torch.where(present.unsqueeze(-1), pooled, embedding.detach().to(pooled.dtype).unsqueeze(0))
    return proj(torch.cat([pooled, embedding.unsqueeze(0).expand(b, -1, -1)], dim=-1))


def _relations(centres: Tensor) -> Tensor:
    """Row-softmax of the centres' scaled cosine similarities, ``[B, N, N]``; the right-hand factor is
    detached (SSA-Seg: a centre's relations move the centre, not the others)."""
    unit = centres / (centres.norm(dim=-1, keepdim=True) + SSA_EPS)
    return (unit @ unit.transpose(1, 2).detach() * RELATION_SCALE).softmax(dim=-1)


def relation_distill_loss(centres: Tensor, oracle_centres: Tensor) -> Tensor:
    """Inter-centre relation distillation: where the estimated centres' relation to another class
    exceeds the oracle's, the excess is penalised, ``mean_{b,k} sum_{j != k} relu(R_kj - R^y_kj)``."""
    n = centres.shape[1]
    off = 1.0 - torch.eye(n, dtype=centres.dtype, device=centres.device)
    excess = (_relations(centres) - _relations(oracle_centres.detach())) * off
    return excess.clamp_min(0).sum(dim=-1).mean()


def position_distill_loss(positions: Tensor, oracle_positions: Tensor) -> Tensor:
    """Position distillation: soft cross-entropy over the channels, ``mean_{b,k} -sum_c
    softmax(G^y_k)_c log softmax(G_k)_c``."""
    target = oracle_positions.detach().softmax(dim=-1)
    return -(target * positions.log_softmax(dim=-1)).sum(dim=-1).mean()


def dice_loss(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """SSA-Seg's dice on class maps: for each class present in an image, ``1 - (2 sum s t + 1) / (sum s
    + sum t + 1)`` with ``s = sigmoid(logit)`` over all the image's pixels (ignored ones add to
    ``sum s``) and ``t`` the class's mask; summed, divided by the number of (image, class) pairs
    (at least 1). ``logits [B, N, H, W]`` at the labels' size.

    No one-hot map: ``sum s t`` is the sigmoid at each pixel's own label, summed per label, so the only
    full-size tensor is the sigmoid itself (at 150 classes a one-hot would be another)."""
    b, n = logits.shape[:2]
    lab = labels.flatten(1).long()
    valid = (lab != ignore_index) & (lab >= 0) & (lab < n)
    bins = torch.where(valid, lab, n)  # [B, HW]; ignored pixels go to a bin of their own
    s = logits.flatten(2).sigmoid()  # [B, N, HW]
    at_label = s.gather(1, torch.where(valid, lab, 0).unsqueeze(1)).squeeze(1) * valid  # s_{i, y_i}
    inter = s.new_zeros(b, n + 1).scatter_add_(1, bins, at_label)[:, :n]
    mass = s.new_zeros(b, n + 1).scatter_add_(1, bins, valid.to(s.dtype))[:, :n]  # sum t
    present = mass > 0
    per_class = 1 - (2 * inter + 1) / (s.sum(dim=-1) + mass + 1)
    return (per_class * present).sum() / present.sum().clamp_min(1)


def boundary_mask(labels: Tensor, margin: int = 6, width: int = 3) -> Tensor:
    """Bool ``[B, h, w]``: pixels near a label boundary, as SSA-Seg finds them: OpenCV's Canny on the
    label map (ignored pixels are a label like any other), edges within ``margin`` pixels of the border
    dropped, then dilated by a ``width`` square. On the host: a label map is small."""
    import cv2

    out = []
    kernel = np.ones((width, width), np.uint8)
    for lab in labels.detach().cpu().numpy():
        edge = cv2.Canny(lab.astype(np.uint8), 0.1, 0.2)
        inner = np.zeros_like(edge)
        if edge.shape[0] > 2 * margin and edge.shape[1] > 2 * margin:
            inner[margin:-margin, margin:-margin] = edge[margin:-margin, margin:-margin]
        out.append(cv2.dilate(inner, kernel, iterations=1) > 50)
    return torch.from_numpy(np.stack(out)).to(labels.device)


class SSAModules(nn.Module):
    """SSA-Seg's parameters for ``dim``-wide features and ``num_classes`` classes, only those its
    switches need: the pixels' position convolution, the class embeddings and position projector, the
    centre projection, and the oracle branch's own position projector and centre projection."""

    def __init__(self, dim: int, num_classes: int, centre: bool, oracle: bool, hidden_ratio: float = 0.5) -> None:
        super().__init__()
        self.pixel_pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=True)
        # the class embeddings E serve both branches' positions
        self.centre_pos = nn.Embedding(num_classes, dim) if centre or oracle else None
        self.centre_pos_proj, self.centre_proj = (
            (Projector(2 * dim, dim, hidden_ratio, first_bias=False), nn.Linear(dim, dim, bias=False))
            if centre else (None, None))
        self.oracle_pos_proj, self.oracle_proj = (
            (Projector(2 * dim, dim, hidden_ratio, first_bias=False), nn.Linear(dim, dim, bias=False))
            if oracle else (None, None))

    def positions(self, feats: Tensor) -> Tensor:
        """P: a depthwise 3x3 convolution of f, ``[B, D, h, w]``."""
        return self.pixel_pos(feats)

    def centre(self, centres: Tensor, logits: Tensor, pixel_pos: Tensor) -> tuple[Tensor, Tensor]:
        """``(W (A_p + G), G)``: the estimated classifier with positions, and the positions."""
        pos = centre_positions(logits, pixel_pos, self.centre_pos.weight, self.centre_pos_proj)
        return self.centre_proj(centres + pos), pos

    def oracle(self, centres: Tensor, labels: Tensor, pixel_pos: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
        """``(W_y (A_y + G^y), G^y)`` for the oracle branch."""
        pos = oracle_positions(pixel_pos, labels, self.centre_pos.weight, self.oracle_pos_proj, ignore_index)
        return self.oracle_proj(centres + pos), pos
