"""GMMSeg (Liang et al., NeurIPS 2022) as a pixel classifier: a Gaussian mixture per class over the
head's features, fitted online by a momentum EM on a memory of well-classified pixels, and trained
discriminatively on the mixtures' likelihoods.

As the official code (leonnnop/GMMSeg, ``GMMSegHead``) computes it, from the features ``f`` a decode
head feeds its classifier:

- ``z``: ``f`` (after the head's dropout) through a 1x1 projection to ``embed_dim`` (conv, norm, ReLU;
  only when the widths differ), a LayerNorm and an L2 normalisation, per pixel;
- each component's diagonal Gaussian log-density of ``z`` (its constant included, Eq. of a diagonal
  Gaussian: ``-D/2 log 2π - Σ log σ - ½ Σ ((z - μ) / σ)²``); a class scores its best component
  (``class_score: max``; the paper's mixture with uniform weights is ``mixture``), the class scores are
  normalised over the classes by a learnable LayerNorm: the logits;
- in training, each present class's pixels spread over its components by Sinkhorn-Knopp on their
  log-densities (divided by the largest magnitude): the target of the component cross-entropy
  (weight ``contrast_weight``); the pixels the classifier got right join their component's FIFO memory
  (at most ``max_sample_size`` a step, evenly spaced; gathered over DDP ranks, so every rank holds the
  same memory), and every ``update_interval`` steps the present classes' components are re-estimated
  from their whole memory: ``μ ← γ μ + (1-γ) normalise(Σ memory)``, ``σ ← sqrt(var about that
  direction + variance_floor)`` (``gamma_cov = 0``: replaced, not averaged).

The state (means, σ, memory, pointers, step counter) is buffers: saved in checkpoints, restored by a
resume, never trained by the optimizer, kept in float32 under AMP.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cac.core.components import ComponentClassifier, ComponentOutputs, component_losses, gather_over_ranks
from cac.core.profiles import check_choices, options_from

__all__ = ["GMMSEG_PROFILES", "GMMSegOptions", "GMMSegClassifier", "diagonal_gaussian_log_density"]

# The official code's choices are the defaults; ``paper`` scores a class by its mixture's likelihood
# (uniform component weights) instead of its best component.
GMMSEG_PROFILES: dict[str, dict] = {"official": {}, "paper": dict(class_score="mixture")}
_CHOICES = {"profile": tuple(GMMSEG_PROFILES), "class_score": ("max", "mixture"), "contrast_ignore": ("label", "pixel"),
            "seg_upsample": ("head", "aligned")}


@dataclass(frozen=True)
class GMMSegOptions:
    """Every setting of the official head (its ADE20K config's values where they differ by dataset:
    8 components there, 5 on COCO-Stuff-10k and Cityscapes, which is the default here)."""

    profile: str = "official"
    embed_dim: int = 64  # the mixtures' space (a 1x1 projection reaches it when the head's width differs)
    num_components: int = 5  # Gaussians per class
    mem_size: int = 32000  # memory slots per component (the official configs'; the embedded presets use fewer)
    max_sample_size: int = 20  # vectors a component's memory takes per step, at most
    update_interval: int = 5  # steps between EM updates (the first is at step 0)
    gamma_mean: float = 0.999  # momentum of the means
    gamma_cov: float = 0.0  # momentum of σ: 0 replaces it at each update
    contrast_weight: float = 0.01  # the component cross-entropy's weight (0: without it)
    variance_floor: float = 0.01  # added to each variance before its square root (σ >= 0.1)
    sinkhorn_iterations: int = 3
    sinkhorn_epsilon: float = 0.05
    class_score: str = "max"  # "mixture": logsumexp over the components minus log M
    # A component target equal to the ignore label is ignored ("label": the official code, so class
    # 255 // M's component 255 % M never gets the term) or only unlabelled pixels are ("pixel").
    contrast_ignore: str = "label"
    seg_upsample: str = "head"  # the logits reach the label size by the head's own resize, or "aligned"

    def __post_init__(self) -> None:
        check_choices(self, _CHOICES, "gmmseg")
        for key in ("embed_dim", "num_components", "mem_size", "update_interval", "sinkhorn_iterations"):
            if getattr(self, key) < 1:
                raise ValueError(f"gmmseg.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_sample_size != -1 and not 1 <= self.max_sample_size <= self.mem_size:
            raise ValueError(f"gmmseg.max_sample_size must be -1 or in [1, mem_size], got {self.max_sample_size}")
        for key in ("gamma_mean", "gamma_cov"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"gmmseg.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.contrast_weight < 0 or self.variance_floor <= 0 or self.sinkhorn_epsilon <= 0:
            raise ValueError("gmmseg.contrast_weight must be >= 0, variance_floor and sinkhorn_epsilon > 0")

    @classmethod
    def from_dict(cls, cfg: Optional[Mapping] = None) -> "GMMSegOptions":
        return options_from(cls, cfg, GMMSEG_PROFILES, "gmmseg", default="official")

    def to_dict(self) -> dict:
        return asdict(self)


def diagonal_gaussian_log_density(z: Tensor, means: Tensor, sigma: Tensor) -> Tensor:
    """``log N(z; μ_j, diag(σ_j²))`` for every pixel ``z [N, D]`` and component ``means, sigma [J, D]``:
    ``-D/2 log 2π - Σ_d log σ_jd - ½ Σ_d ((z_d - μ_jd) / σ_jd)²``, as ``[N, J]``. The square is expanded
    into products (``z²·σ⁻² - 2 z·μσ⁻² + μ²·σ⁻²``): memory of ``N x J``, not ``N x J x D``."""
    inv_var = sigma.pow(-2)
    quad = (z * z) @ inv_var.t() - 2.0 * (z @ (means * inv_var).t()) + (means * means * inv_var).sum(-1)
    return (-0.5 * z.shape[-1] * math.log(2 * math.pi) - sigma.log().sum(-1)) - 0.5 * quad


class GMMSegClassifier(ComponentClassifier):
    """The mixtures and their state; ``forward(f, labels=..., dropout=...)`` updates the state in training."""

    centres = "means"  # directions: normalised each forward
    scale_by_max = True  # log-densities, unbounded

    def __init__(self, in_channels: int, num_classes: int, options: GMMSegOptions | Mapping | None = None,
                 ignore_index: int = 255, norm_layer: Optional[Callable[[int], nn.Module]] = None) -> None:
        super().__init__()
        o = options if isinstance(options, GMMSegOptions) else GMMSegOptions.from_dict(options)
        self.options, self.num_classes, self.ignore_index = o, num_classes, ignore_index
        d, m = o.embed_dim, o.num_components
        self.projection = None
        if in_channels != d:  # the official head's ConvModule: conv (no bias), norm, ReLU; mmcv's init
            conv = nn.Conv2d(in_channels, d, 1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            self.projection = nn.Sequential(conv, (norm_layer or nn.BatchNorm2d)(d), nn.ReLU(inplace=True))
        self.feat_norm = nn.LayerNorm(d)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.register_buffer("means", torch.randn(num_classes, m, d) * 0.02)  # directions: normalised each forward
        self.register_buffer("sigma", torch.ones(num_classes, m, d))
        self.register_buffer("queue", F.normalize(torch.randn(num_classes * m, d, o.mem_size), dim=-2))
        self.register_buffer("queue_ptr", torch.zeros(num_classes * m, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def embed(self, feats: Tensor, dropout: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        """The features the mixtures see, before the LayerNorm: ``[B, D, h, w]``."""
        x = dropout(feats) if dropout is not None else feats
        return self.projection(x) if self.projection is not None else x

    def component_scores(self, z: Tensor, centres: Tensor) -> Tensor:
        return diagonal_gaussian_log_density(z, centres, self.sigma.view(-1, z.shape[-1]).to(z.dtype))

    def class_scores(self, comps: Tensor) -> Tensor:
        """``[N, C]``: each class's best component, or its mixture (``logsumexp - log M``)."""
        if self.options.class_score == "mixture":
            grouped = comps.view(comps.shape[0], self.num_classes, -1)
            return torch.logsumexp(grouped, dim=-1) - math.log(grouped.shape[-1])
        return super().class_scores(comps)

    @torch.no_grad()
    def update_state(self, z: Tensor, gt: Tensor, correct: Tensor, assigned: Tensor) -> None:
        """One step's memory update and, every ``update_interval`` steps, the EM update (module doc).
        ``assigned`` is already zero where the pixel was misclassified."""
        o = self.options
        z, gt, assigned = gather_over_ranks(z), gather_over_ranks(gt), gather_over_ranks(assigned)
        classes = [int(k) for k in torch.unique(gt).tolist() if int(k) != self.ignore_index]
        m = o.num_components
        for k in classes:
            inside = gt == k
            emb, pick = z[inside].to(self.queue.dtype), assigned[inside] > 0
            for c in range(m):
                chosen = emb[pick[:, c]]
                n = chosen.shape[0]
                if n == 0:
                    continue
                if o.max_sample_size != -1 and n > o.max_sample_size:  # evenly spaced, no randomness
                    chosen = chosen[torch.linspace(0, n - 1, o.max_sample_size, dtype=torch.int64, device=chosen.device)]
                self._enqueue(k * m + c, chosen)
        if int(self.step) % o.update_interval == 0:
            self._em(classes)
        self.step += 1

    def _enqueue(self, row: int, x: Tensor) -> None:
        """``x [n, D]`` into component ``row``'s ring buffer at its pointer (wrapping at the end)."""
        size, ptr, n = self.queue.shape[-1], int(self.queue_ptr[row]), x.shape[0]
        if ptr + n >= size:
            first = size - ptr
            self.queue[row, :, ptr:size] = x[:first].t()
            self.queue[row, :, :n - first] = x[first:].t()
        else:
            self.queue[row, :, ptr:ptr + n] = x.t()
        self.queue_ptr[row] = (ptr + n) % size

    def _em(self, classes: list[int]) -> None:
        """Every component of ``classes`` re-estimated from its whole memory (a class at a time)."""
        o = self.options
        m, d = o.num_components, self.means.shape[-1]
        means, sigma = self.means.view(-1, d), self.sigma.view(-1, d)
        for k in classes:
            rows = slice(k * m, (k + 1) * m)
            memory = self.queue[rows]  # [M, D, K]
            direction = F.normalize(memory.sum(dim=-1), dim=-1)  # the normalised sum, not the mean
            var = (1 / memory.shape[-1]) * (memory - direction.unsqueeze(-1)).pow(2).sum(dim=-1)
            spread = (var + o.variance_floor * torch.ones_like(var)).sqrt()
            means[rows] = o.gamma_mean * means[rows] + (1 - o.gamma_mean) * direction
            sigma[rows] = o.gamma_cov * sigma[rows] + (1 - o.gamma_cov) * spread

    def losses(self, out: ComponentOutputs, labels: Tensor, ce: Callable[[Tensor, bool], Mapping[str, Tensor]],
               ignore_index: int = 255) -> dict[str, Tensor]:
        o = self.options
        return component_losses(out, labels, ce, {"loss_contrast": o.contrast_weight},
                                ignore_by_label=o.contrast_ignore == "label", seg_upsample=o.seg_upsample,
                                ignore_index=ignore_index)
