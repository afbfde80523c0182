"""ProtoSeg (Zhou et al., CVPR 2022) as a pixel classifier: several non-learnable prototypes per class,
the nearest prototype's cosine as the class score, prototypes moved by a momentum update towards the
well-classified pixels Sinkhorn-Knopp assigns them, and two prototype losses beside the CE.

As the official code (tfzhou/ProtoSeg, ``HRNet_W48_Proto``, ``PixelPrototypeCELoss``) computes it,
from the features ``f`` a decode head feeds its classifier (its ``cls_head`` output, dropout included):

- ``z``: ``f`` through a projection head (1x1 conv, ReLU, 1x1 conv) and an L2 normalisation, then a
  LayerNorm and an L2 normalisation per pixel. The official projection head normalises along the last
  axis of ``[B, D, h, w]``, each channel's row of pixels (``proj_norm: width``); ``channel`` normalises
  each pixel's vector, as the paper describes the embedding;
- the class score is the best of the class's ``M`` prototypes' cosines, normalised over the classes by a
  learnable LayerNorm: the logits;
- in training, each present class's pixels spread over its prototypes by Sinkhorn-Knopp on their
  cosines: the target of the pixel-prototype contrast (PPC, a CE over all prototypes, weight 0.01) and
  distance (PPD, ``(1 - cos)²``, weight 0.001); each prototype moves towards the normalised sum of the
  well-classified pixels assigned to it, ``P ← γ P + (1-γ) f̂``, then all are renormalised, and averaged
  over DDP ranks. The official update draws that assignment by a Gumbel-softmax of the Sinkhorn plan
  (``update_assignment: gumbel``); ``argmax`` takes the plan's best prototype, as the targets do.

The prototypes are a buffer: saved in checkpoints, restored by a resume, never trained by the
optimizer, kept in float32 under AMP.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cac.core.components import ComponentClassifier, ComponentOutputs, component_losses, mean_over_ranks
from cac.core.profiles import check_choices, options_from

__all__ = ["PROTOSEG_PROFILES", "ProtoSegOptions", "ProtoSegClassifier"]

# The official code's choices are the defaults; ``paper``: the embedding normalised per pixel, the
# update's assignment the plan's argmax.
PROTOSEG_PROFILES: dict[str, dict] = {"official": {}, "paper": dict(proj_norm="channel", update_assignment="argmax")}
_CHOICES = {"profile": tuple(PROTOSEG_PROFILES), "proj_norm": ("width", "channel"),
            "update_assignment": ("gumbel", "argmax"), "seg_upsample": ("head", "aligned")}


@dataclass(frozen=True)
class ProtoSegOptions:
    """Every setting of the official network and loss (its Cityscapes config, the only one with a
    ``protoseg`` section)."""

    profile: str = "official"
    num_prototypes: int = 10  # M per class
    proj_dim: int = 0  # the embedding's width; 0: the head's own (the official 720 = HRNet-W48's)
    gamma: float = 0.999  # prototype momentum
    ppc_weight: float = 0.01  # pixel-prototype contrast (0: without it)
    ppd_weight: float = 0.001  # pixel-prototype distance (0: without it)
    proj_norm: str = "width"
    update_assignment: str = "gumbel"
    update_prototypes: bool = True
    sinkhorn_iterations: int = 3
    sinkhorn_epsilon: float = 0.05
    seg_upsample: str = "aligned"  # the official CE upsamples bilinearly with align_corners=True

    def __post_init__(self) -> None:
        check_choices(self, _CHOICES, "protoseg")
        if self.num_prototypes < 1 or self.proj_dim < 0 or self.sinkhorn_iterations < 1:
            raise ValueError("protoseg.num_prototypes and sinkhorn_iterations must be >= 1, proj_dim >= 0")
        if not 0.0 <= self.gamma <= 1.0 or self.ppc_weight < 0 or self.ppd_weight < 0 or self.sinkhorn_epsilon <= 0:
            raise ValueError("protoseg.gamma must be in [0, 1], the weights >= 0, sinkhorn_epsilon > 0")

    @classmethod
    def from_dict(cls, cfg: Optional[Mapping] = None) -> "ProtoSegOptions":
        return options_from(cls, cfg, PROTOSEG_PROFILES, "protoseg", default="official")

    def to_dict(self) -> dict:
        return asdict(self)


class ProtoSegClassifier(ComponentClassifier):
    """The projection head, the two LayerNorms and the prototypes (a buffer)."""

    centres = "prototypes"

    def __init__(self, in_channels: int, num_classes: int, options: ProtoSegOptions | Mapping | None = None,
                 ignore_index: int = 255, norm_layer: Optional[Callable[[int], nn.Module]] = None) -> None:
        super().__init__()
        o = options if isinstance(options, ProtoSegOptions) else ProtoSegOptions.from_dict(options)
        self.options, self.num_classes, self.ignore_index = o, num_classes, ignore_index
        self.gumbel_update = o.update_assignment == "gumbel"
        d = o.proj_dim or in_channels
        self.proj = nn.Sequential(nn.Conv2d(in_channels, in_channels, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(in_channels, d, 1))
        self.feat_norm = nn.LayerNorm(d)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.register_buffer("prototypes", torch.randn(num_classes, o.num_prototypes, d) * 0.02)

    def embed(self, feats: Tensor, dropout: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        """The projection head's output, normalised as ``proj_norm`` says: ``[B, D, h, w]``."""
        x = self.proj(dropout(feats) if dropout is not None else feats)
        return F.normalize(x, dim=-1 if self.options.proj_norm == "width" else 1)

    def component_scores(self, z: Tensor, centres: Tensor) -> Tensor:
        return z @ centres.t()  # cosines

    @torch.no_grad()
    def update_state(self, z: Tensor, gt: Tensor, correct: Tensor, assigned: Tensor) -> None:
        """Each prototype with pixels towards their normalised sum (momentum ``gamma``), all
        renormalised, then the ranks' mean (module doc)."""
        o = self.options
        new = self.prototypes.clone()
        for k in [int(k) for k in torch.unique(gt).tolist() if 0 <= int(k) < self.num_classes]:
            inside = gt == k
            weights = assigned[inside].to(new.dtype)  # one-hot rows, zero where the pixel was misclassified
            pixels = z[inside].to(new.dtype) * correct[inside].unsqueeze(1).to(new.dtype)
            summed = weights.t() @ pixels  # [M, D]
            counts = weights.sum(dim=0)
            if counts.sum() > 0 and o.update_prototypes:
                moved = counts != 0
                new[k, moved] = o.gamma * new[k, moved] + (1 - o.gamma) * F.normalize(summed, dim=-1)[moved]
        # a new tensor, not written in place: this step's cosines keep the old one for their backward
        self.prototypes = mean_over_ranks(F.normalize(new, dim=-1))

    def losses(self, out: ComponentOutputs, labels: Tensor, ce: Callable[[Tensor, bool], Mapping[str, Tensor]],
               ignore_index: int = 255) -> dict[str, Tensor]:
        o = self.options
        return component_losses(out, labels, ce, {"loss_ppc": o.ppc_weight}, ignore_by_label=False,
                                seg_upsample=o.seg_upsample, ignore_index=ignore_index, distance_weight=o.ppd_weight)
