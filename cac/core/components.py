"""What the multi-component pixel classifiers (GMMSeg, ProtoSeg) share: several components per class
(Gaussians, prototypes), a class score that is the best component's, normalised over the classes,
and an online equipartition of each class's pixels over its components (Sinkhorn-Knopp, as in SwAV)
that gives each pixel the component it trains towards.

Pixels are flattened as ``n = (b * h + y) * w + x`` and components class-major (``j = k * M + m``),
as both official codes lay them out.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cac.core.classifier import resize_labels
from cac.core.functional import autocast_off, resize_bilinear

__all__ = ["sinkhorn", "flat_pixels", "class_logits", "ComponentAssignment", "assign_components",
           "gather_over_ranks", "mean_over_ranks", "component_cross_entropy", "ComponentOutputs",
           "component_losses", "ComponentClassifier"]


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


class ComponentOutputs(NamedTuple):
    """What a multi-component classifier computed: ``p`` its class logits ``[B, C, h, w]`` (the test
    output), ``components`` every component's score ``[N, C*M]``, and in training each pixel's
    component ``targets [N]`` and whether it is labelled, ``valid [N]``."""

    p: Tensor
    components: Tensor
    targets: Optional[Tensor] = None
    valid: Optional[Tensor] = None


def component_losses(out: ComponentOutputs, labels: Tensor, ce: Callable[[Tensor, bool], Mapping[str, Tensor]],
                     terms: Mapping[str, float], *, ignore_by_label: bool, seg_upsample: str,
                     ignore_index: int, distance_weight: float = 0.0) -> dict[str, Tensor]:
    """The terms of a multi-component classifier, each weighted: the head's own loss on the class
    logits (``ce(logits, accuracy)``, with its accuracy), the component cross-entropy under each name
    of ``terms`` (``{"loss_contrast": 0.01}``) and, with ``distance_weight``, the squared distance of
    each labelled pixel's score to 1 at its component (ProtoSeg's PPD, ``loss_ppd``)."""
    logits = out.p
    if seg_upsample == "aligned":
        logits = resize_bilinear(logits, labels.shape[-2:], align_corners=True)
    losses = dict(ce(logits, True))
    if out.targets is None:
        return losses
    labelled = torch.where(out.valid, out.targets, torch.zeros_like(out.targets))  # any index where unlabelled
    for name, weight in terms.items():
        if weight > 0:
            if ignore_by_label:
                value = component_cross_entropy(out.components, out.targets, ignore_index)
            else:
                value = _masked_mean(F.cross_entropy(out.components, labelled, reduction="none"), out.valid)
            losses[name] = value * weight
    if distance_weight > 0:
        picked = out.components.gather(1, labelled.unsqueeze(1)).squeeze(1)
        losses["loss_ppd"] = _masked_mean((1 - picked).pow(2), out.valid) * distance_weight
    return losses


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """The mean over ``mask``; 0 (with a gradient) when nothing is labelled, where the official codes'
    0/0 would end the run with a NaN."""
    count = mask.sum()
    return (values * mask).sum() / count.clamp_min(1)

class ComponentClassifier(nn.Module):
    """The forward GMMSeg and ProtoSeg share. Per pixel: the method's embedding, a LayerNorm and an L2
    normalisation; every component's score against the normalised centres (stored back normalised, in
    training only: an evaluation would change the state by a rounding, and a resume's with it); the
    class logits (:func:`class_logits`). In training: the component assignment
    (:func:`assign_components`) and the method's state update. A method sets ``centres`` (the name of its
    ``[C, M, D]`` buffer) and ``scale_by_max``, and gives ``embed``, ``component_scores`` and
    ``update_state``; ``options`` carries ``sinkhorn_iterations`` and ``sinkhorn_epsilon``."""

    uses_head_classifier = False  # the head's conv_seg is not used
    test_logits = "p"  # what the head predicts with (of evaluation_logits)
    centres = ""
    scale_by_max = False  # Sinkhorn on the scores divided by their largest magnitude
    gumbel_update = False  # the update's one-hot drawn from the plan (ProtoSeg's official update)
    feat_norm: nn.LayerNorm
    mask_norm: nn.LayerNorm

    def embed(self, feats: Tensor, dropout: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        raise NotImplementedError

    def component_scores(self, z: Tensor, centres: Tensor) -> Tensor:
        """``[N, C*M]`` for pixels ``z [N, D]`` and normalised ``centres [C*M, D]``."""
        raise NotImplementedError

    def class_scores(self, comps: Tensor) -> Tensor:
        """``[N, C]``: each class's best component."""
        return comps.view(comps.shape[0], self.num_classes, -1).amax(dim=-1)

    def update_state(self, z: Tensor, gt: Tensor, correct: Tensor, assigned: Tensor) -> None:
        raise NotImplementedError

    def forward(self, feats: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, dropout: Optional[Callable[[Tensor], Tensor]] = None) -> ComponentOutputs:
        """``weight``/``bias`` (the head's classifier) are not used; ``labels [B, H, W]`` in training
        give the targets and update the state."""
        x = self.embed(feats, dropout)
        b, _, h, w = x.shape
        with autocast_off(x.device.type):
            dtype = torch.promote_types(x.dtype, torch.float32)
            z = F.normalize(self.feat_norm(flat_pixels(x).to(dtype)), dim=-1)
            stored = getattr(self, self.centres)
            centres = F.normalize(stored, dim=-1)
            if self.training:
                with torch.no_grad():
                    stored.copy_(centres)
            comps = self.component_scores(z, centres.view(-1, z.shape[-1]).to(z.dtype))
            p = class_logits(self.class_scores(comps), self.mask_norm, (b, h, w))
        if labels is None or not self.training:
            return ComponentOutputs(p, comps)
        gt = resize_labels(labels, (h, w)).reshape(-1)
        correct = p.argmax(1).reshape(-1) == gt
        o = self.options
        assignment = assign_components(comps.detach(), gt, correct, self.num_classes, self.ignore_index,
                                       scale_by_max=self.scale_by_max, gumbel_update=self.gumbel_update,
                                       iterations=o.sinkhorn_iterations, epsilon=o.sinkhorn_epsilon)
        self.update_state(z.detach(), gt, correct, assignment.update)
        return ComponentOutputs(p, comps, assignment.targets, gt != self.ignore_index)

    def predict(self, feats: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
        return self.forward(feats).p

    @staticmethod
    def evaluation_logits(out: ComponentOutputs) -> dict[str, Tensor]:
        return {"p": out.p}
