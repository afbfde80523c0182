"""What the multi-component pixel classifiers (GMMSeg, ProtoSeg) share: several components per class
(Gaussians, prototypes), a class score that is the best component's, normalised over the classes,
and an online equipartition of each class's pixels over its components (Sinkhorn-Knopp, as in SwAV)
that gives each pixel the component it trains towards.

Pixels are flattened as ``n = (b * h + y) * w + x`` and components class-major (``j = k * M + m``),
as both official codes lay them out.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["sinkhorn", "flat_pixels", "class_logits", "ComponentAssignment", "assign_components",
           "gather_over_ranks", "mean_over_ranks", "component_cross_entropy"]


@torch.no_grad()
def sinkhorn(scores: Tensor, iterations: int = 3, epsilon: float = 0.05) -> Tensor:
    """The soft transport plan that spreads ``n`` pixels evenly over ``M`` components given their
    ``scores [n, M]``: ``exp(scores / epsilon)``, normalised to a total of 1, then ``iterations``
    rounds of (each component's row to 1/M, each pixel's column to 1/n), finally scaled so that each
    pixel's assignments sum to 1. Returns ``[n, M]``. No log-space: the official codes exponentiate
    scores in [-1, 1] (or cosines), which epsilon = 0.05 keeps within exp(±20)."""
    plan = torch.exp(scores / epsilon).t()  # [M, n]
    count, comps = plan.shape[1], plan.shape[0]
    plan = plan / plan.sum()
    for _ in range(iterations):
        plan = plan / plan.sum(dim=1, keepdim=True)
        plan = plan / comps
        plan = plan / plan.sum(dim=0, keepdim=True)
        plan = plan / count
    return (plan * count).t()


def flat_pixels(x: Tensor) -> Tensor:
    """``[B, D, h, w]`` -> ``[B*h*w, D]``, pixels in ``(b, y, x)`` order."""
    b, d, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b * h * w, d)


def class_logits(scores: Tensor, norm: nn.LayerNorm, shape: tuple[int, int, int]) -> Tensor:
    """Class scores ``[N, C]`` (each class's best component's, or its mixture's) normalised over the
    classes of each pixel by ``norm``, a learnable LayerNorm (both official codes' only temperature),
    as logits ``[B, C, h, w]`` for ``shape = (B, h, w)``."""
    b, h, w = shape
    return norm(scores).view(b, h, w, scores.shape[-1]).permute(0, 3, 1, 2)


class ComponentAssignment(NamedTuple):
    """Each labelled pixel's component index ``k * M + m`` (the component cross-entropy's target;
    unlabelled pixels keep the ignore value), and the assignment the state update uses (one-hot rows,
    zero for pixels the classifier got wrong)."""

    targets: Tensor  # [N] long
    update: Tensor  # [N, M]


@torch.no_grad()
def assign_components(components: Tensor, labels: Tensor, correct: Tensor, num_classes: int, ignore_index: int,
                      *, scale_by_max: bool, gumbel_update: bool, iterations: int = 3,
                      epsilon: float = 0.05, classes: Optional[list[int]] = None) -> ComponentAssignment:
    """Each present class's pixels spread over its components by :func:`sinkhorn` on their scores
    (``components [N, C*M]``, flattened ``labels [N]``): the target of a pixel is its best component
    under the plan. ``scale_by_max``: the scores are first divided by their largest magnitude (GMMSeg's
    log-likelihoods; ProtoSeg's cosines are used as they are). ``gumbel_update``: the update's one-hot
    is a Gumbel-softmax sample of the plan (``tau=0.5``, the plan's probabilities taken as logits: the
    official ProtoSeg code; one draw of ``[n_k, M]`` per class in class order), else the target's
    one-hot. ``classes``: the classes to visit, in order (default: every class present, ascending)."""
    n = components.shape[0]
    comps = components.shape[1] // num_classes
    grouped = components.view(n, num_classes, comps)
    targets = labels.clone().long()
    update = components.new_zeros(n, comps)
    if classes is None:
        classes = [int(k) for k in torch.unique(labels).tolist() if int(k) != ignore_index]
    for k in classes:
        where = labels == k
        scores = grouped[where, k, :]
        if scores.shape[0] == 0:
            continue
        if scale_by_max:
            scores = scores / scores.abs().max()
        plan = sinkhorn(scores, iterations, epsilon)
        best = plan.argmax(dim=1)
        pick = F.gumbel_softmax(plan, tau=0.5, hard=True) if gumbel_update else F.one_hot(best, comps).to(plan.dtype)
        targets[where] = best + k * comps
        update[where] = pick * correct[where].unsqueeze(1).to(pick.dtype)
    return ComponentAssignment(targets, update)


def component_cross_entropy(components: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """Softmax cross-entropy over all ``C*M`` components, mean over the pixels whose target is not the
    ignore value (both official codes' component/prototype contrast term, no temperature)."""
    return F.cross_entropy(components, targets, ignore_index=ignore_index)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def gather_over_ranks(t: Tensor) -> Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order (one process: ``t``). Ranks must hold
    the same shape (the same per-rank batch and crop, as DDP trains)."""
    if _world() == 1:
        return t
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(_world())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def mean_over_ranks(t: Tensor) -> Tensor:
    """The ranks' mean of ``t`` (each rank's copy divided by the world size, then summed)."""
    if _world() == 1:
        return t
    import torch.distributed as dist

    out = t / _world()
    dist.all_reduce(out)
    return out
