"""The context-aware classifier (paper §3.2–3.3) as a pure PyTorch module, and the loss of Eq. (8).

``ContextAwareClassifier`` takes the features ``f`` a decode head feeds its classifier and the
original classifier ``C`` (weight and bias), and yields ``p`` (original), ``p_p`` (context-aware,
Eqs. 4–6) and, when labels are given, ``p_y`` (oracle, Eqs. 1–3). Every variant the paper ablates is
a field of ``CACOptions``; the defaults are the paper's text.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cac.core.designs import DESIGNS, Projector
from cac.core.functional import (cosine_logits, dot_logits, entropy_kl_loss, mask_pool, soft_pool,
                                 upsampled_cross_entropy)

__all__ = ["PROFILES", "CACOptions", "CACOutputs", "ContextAwareClassifier", "cac_losses", "plain_cross_entropy",
           "resize_labels"]

_CHOICES = {
    "profile": ("paper", "official"),
    "original": ("dot", "cos"),
    "context": ("cos", "dot", "none"),
    "kl_entropy_source": ("oracle", "estimated", "original"),
    "oracle_pool": ("image", "batch"),
    "oracle_absent": ("zero", "classifier"),
    "test_output": ("context", "original"),
    "kl_normaliser": ("batch", "literal"),
    "extra_ce": ("head", "fixed"),
    "numerics": ("exact", "official"),
}

# What ``numerics="official"`` adds where the equations divide or take a log: the official code's 1e-12.
OFFICIAL_EPS = 1e-12

# Every choice of the official code (tianzhuotao/CAC, its ``*_cac.py`` heads) that the paper's text
# leaves open or states otherwise; ``profile: official`` sets them all, explicit keys still win.
PROFILES: dict[str, dict] = {
    "paper": {},
    "official": dict(oracle_pool="batch", oracle_absent="classifier", kl_target_mix=0.5, extra_ce="fixed",
                     projector_first_bias=False, kl_normaliser="batch", numerics="official"),
}


@dataclass(frozen=True)
class CACOptions:
    """Every switch of the method. Defaults follow the paper's text where it says; official-code
    choices are options, all set at once by ``profile="official"`` (applied by :meth:`from_dict`,
    which configs and specs go through)."""

    profile: str = "paper"  # "official": PROFILES["official"] under any explicit keys
    tau: float = 15.0  # cosine scale, Eqs. (3)/(6)
    lambda_kl: float = 1.0  # weight of L_KL in Eq. (8)
    loss_ce: float = 1.0  # weight of L^ce (original p)
    loss_ce_p: float = 1.0  # weight of L_p^ce (context-aware p_p)
    loss_ce_y: float = 1.0  # weight of L_y^ce (oracle p_y)
    kl_entropy: bool = True  # Eq. (10) entropy weighting
    kl_classwise: bool = True  # Eq. (11) per-class averaging
    kl_entropy_source: str = "oracle"  # Table 3 (1)/(2): entropy from p_y, p_p or p
    kl_target_mix: float = 0.0  # official code: 0.5 * softmax(p_y) + 0.5 * one-hot
    original: str = "dot"  # Table 4: the original classifier, dot or cosine
    context: str = "cos"  # Table 4: context classifier, cos / dot / none (no CAC branch)
    design_y: str = "proj_concat"  # Table 5: how A_y is formed (cac.core.designs.DESIGNS)
    design_p: str = "proj_concat"  # Table 5: how A_p is formed
    projector_hidden_ratio: float = 0.5  # hidden width of theta as a fraction of d (§4.1: d/2)
    oracle_pool: str = "image"  # official code pools C_y over the whole batch ("batch")
    oracle_absent: str = "zero"  # official code fills absent classes of C_y from detached C
    test_output: str = "context"  # test-time output: p_p ("context") or p ("original")
    # Eq. 11's normaliser: "batch" (official code; pixels pooled over the batch, mean over the classes
    # present) or "literal" (per image, 1/n over all n classes, then the mean over images)
    kl_normaliser: str = "batch"
    # CE of p and p_y: "head" (the head's own loss, as for p_p) or "fixed" (official code: plain CE,
    # ignore 255, bilinear align_corners=True upsampling; the head's loss then applies to p_p only)
    extra_ce: str = "head"
    projector_first_bias: bool = True  # official code: the projectors' first Linear has no bias
    # "exact": Eqs. (4), (9)-(11) as written at any confidence (only an all-zero normaliser is guarded);
    # "official": the official code's 1e-12 on the soft-mask mass, in the entropy's log and on the
    # KL's normalisers (it shrinks C_p of a class whose mass nears 1e-12: an absent class ~25 logits down)
    numerics: str = "exact"

    def __post_init__(self) -> None:
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"cac.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("design_y", "design_p"):
            if getattr(self, key) not in DESIGNS:
                raise ValueError(f"cac.{key} must be one of {sorted(DESIGNS)}, got {getattr(self, key)!r}")
        if not self.tau > 0:
            raise ValueError(f"cac.tau must be > 0, got {self.tau}")
        for key in ("lambda_kl", "loss_ce", "loss_ce_p", "loss_ce_y"):
            if getattr(self, key) < 0:
                raise ValueError(f"cac.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.kl_target_mix <= 1.0:
            raise ValueError(f"cac.kl_target_mix must be in [0, 1], got {self.kl_target_mix}")
        if not self.projector_hidden_ratio > 0:
            raise ValueError(f"cac.projector_hidden_ratio must be > 0, got {self.projector_hidden_ratio}")

    @classmethod
    def from_dict(cls, cfg: Optional[Mapping] = None) -> "CACOptions":
        """Options from a config's ``cac=dict(...)``: the profile's choices, then the explicit keys."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown cac option(s) {unknown}; known: {sorted(known)}")
        profile = cfg.get("profile", "paper")
        if profile not in PROFILES:
            raise ValueError(f"cac.profile must be one of {tuple(PROFILES)}, got {profile!r}")
        return cls(**{**PROFILES[profile], **cfg})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def eps(self) -> float:
        """What the equations' divisions and logs add: 0 (exact) or the official code's 1e-12."""
        return OFFICIAL_EPS if self.numerics == "official" else 0.0

    @property
    def has_context(self) -> bool:
        return self.context != "none"

    @property
    def needs_oracle(self) -> bool:
        """p_y is needed in training when its CE or the distillation from it is on."""
        return self.has_context and (self.loss_ce_y > 0 or self.lambda_kl > 0)

    @property
    def trains_oracle(self) -> bool:
        """theta_y gets a gradient only from L_y^ce: the distillation's teacher is detached."""
        return self.needs_oracle and self.loss_ce_y > 0


class CACOutputs(NamedTuple):
    p: Tensor  # original classifier, [B, N, h, w]
    p_p: Optional[Tensor]  # context-aware classifier (estimated), Eq. (6)
    p_y: Optional[Tensor]  # oracle context-aware classifier, Eq. (3)


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a ``[B, H, W]`` label map (ignored pixels stay ignored)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1).to(labels.dtype)


class ContextAwareClassifier(nn.Module):
    """Projectors theta_y / theta_p and the three classifiers p, p_p, p_y of Fig. 5."""

    def __init__(self, dim: int, num_classes: int, options: CACOptions | Mapping | None = None,
                 ignore_index: int = 255) -> None:
        super().__init__()
        self.options = options if isinstance(options, CACOptions) else CACOptions.from_dict(options)
        self.dim, self.num_classes, self.ignore_index = dim, num_classes, ignore_index
        o = self.options
        self.proj_y = self._projector(o.design_y) if o.needs_oracle else None
        self.proj_p = self._projector(o.design_p) if o.has_context else None
        if self.proj_y is not None and not o.trains_oracle:
            # Without L_y^ce nothing trains theta_y (Table 2 (e)): it stays at its init either way, and
            # declaring that keeps stock DDP (find_unused_parameters=False) from waiting for its grads.
            self.proj_y.requires_grad_(False)

    def _projector(self, design: str) -> Optional[Projector]:
        in_dim = DESIGNS[design].projector_in(self.dim)
        if in_dim is None:
            return None
        return Projector(in_dim, self.dim, self.options.projector_hidden_ratio, self.options.projector_first_bias)

    # -- the pieces -------------------------------------------------------------------------
    def original_logits(self, feats: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """p = f C^T (+ b), or tau * cos(f, C) for Table 4's cosine original classifier."""
        if self.options.original == "cos":
            return cosine_logits(feats, weight, self.options.tau)
        return dot_logits(feats, weight, bias)

    def context_logits(self, feats: Tensor, classifier: Tensor, out: Optional[Tensor] = None,
                       dtype: Optional[torch.dtype] = None) -> Tensor:
        """Eqs. (3)/(6): tau * cos(f, A) (or f A^T for Table 4's "Context (Dot)"); ``out`` and ``dtype``:
        see ``cosine_logits`` (used by the cosine form only)."""
        if self.options.context == "dot":
            return dot_logits(feats, classifier)
        return cosine_logits(feats, classifier, self.options.tau, out=out, dtype=dtype)

    def oracle_prototypes(self, feats: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        """C_y of Eq. (1), per image or pooled over the batch, absent rows zero or from C."""
        protos, present = mask_pool(feats, labels, self.num_classes, self.ignore_index,
                                    over_batch=self.options.oracle_pool == "batch")
        if self.options.oracle_absent == "classifier":
            fill = weight.detach().to(protos.dtype).unsqueeze(0).expand_as(protos)
            protos = torch.where(present.unsqueeze(-1), protos, fill)
        return protos

    def form(self, design: str, protos: Tensor, weight: Tensor, proj: Optional[nn.Module]) -> Tensor:
        """A_* = design(C_*, C) — Eqs. (2)/(5) for the default design."""
        cls = weight.to(protos.dtype).unsqueeze(0)
        return DESIGNS[design].form(protos, cls, proj)

    def context_classifier(self, feats: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """A_p of Eq. (5) per image, ``[B, N, D]`` (for inspection, e.g. the t-SNE of Fig. 7)."""
        p = self.original_logits(feats, weight, bias)
        return self.form(self.options.design_p, soft_pool(feats, p, self.options.eps), weight, self.proj_p)

    # -- the whole classifier -----------------------------------------------------------------
    def forward(self, feats: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, dropout: Optional[Callable[[Tensor], Tensor]] = None) -> CACOutputs:
        """``feats [B,D,h,w]`` is f, ``weight [N,D]``; ``labels [B,H,W]`` (any size) enable the oracle.

        ``dropout`` (the head's, in training) applies only on the way into the original classifier,
        p = C(dropout(f)), as in the official heads; C_p's soft masks come from that p, while the
        prototypes, p_p and p_y use f itself (the paper's f is the feature generator's output).

        p_p and p_y are computed in one product with one norm of f (their classifiers stacked), and
        come out in float32 or wider: the losses' dtype, so AMP casts nothing back and forth."""
        o = self.options
        p = self.original_logits(feats if dropout is None else dropout(feats), weight, bias)
        if not o.has_context:
            return CACOutputs(p, None, None)
        a_p = self.form(o.design_p, soft_pool(feats, p, o.eps), weight, self.proj_p)
        dtype = torch.promote_types(feats.dtype, torch.float32)
        if labels is None or not o.needs_oracle:
            return CACOutputs(p, self.context_logits(feats, a_p, dtype=dtype), None)
        c_y = self.oracle_prototypes(feats, resize_labels(labels, feats.shape[-2:]), weight)
        a_y = self.form(o.design_y, c_y, weight, self.proj_y)
        both = self.context_logits(feats, torch.cat([a_p, a_y.to(a_p.dtype)], dim=1), dtype=dtype)
        p_p, p_y = both.split(a_p.shape[1], dim=1)
        return CACOutputs(p, p_p, p_y)

    def predict(self, feats: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """Test-time output: p_p (the paper), or p when ``test_output='original'``.

        Without autograd p is dead once pooled, so p_p is written into its buffer: at inference CAC
        then allocates one full-size logit map more than the plain head (the soft masks), not three.
        """
        o = self.options
        if not o.has_context or o.test_output == "original":
            return self.original_logits(feats, weight, bias)
        if torch.is_grad_enabled():
            return self.forward(feats, weight, bias).p_p
        p = self.original_logits(feats, weight, bias)
        a_p = self.form(o.design_p, soft_pool(feats, p, o.eps), weight, self.proj_p)
        return self.context_logits(feats, a_p, out=p)


def plain_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """The official code's extra CE terms: logits upsampled bilinearly with ``align_corners=True`` to
    the labels' size, softmax CE averaged over the labelled pixels (``nn.CrossEntropyLoss``)."""
    per_pixel = upsampled_cross_entropy(logits, labels, align_corners=True, ignore_index=ignore_index)
    return per_pixel.sum() / (labels != ignore_index).sum().clamp_min(1)


def cac_losses(out: CACOutputs, labels: Tensor, options: CACOptions,
               ce: Callable[[Tensor, bool], Mapping[str, Tensor]], ignore_index: int = 255) -> dict[str, Tensor]:
    """The terms of Eq. (8), each already weighted; summing the ``loss*`` entries gives L.

    ``ce(logits, accuracy)`` is the head's own segmentation loss (a dict of named terms, plus
    ``acc_seg`` when ``accuracy``), so a head's loss configuration (class weights, OHEM, extra terms)
    carries over to p, p_p and p_y alike; only p's accuracy is asked for. With
    ``extra_ce="fixed"`` (official code) p and p_y take :func:`plain_cross_entropy` instead, and the
    head's loss (with its accuracy) applies to p_p only. Terms with weight 0 are not computed.
    """
    losses: dict[str, Tensor] = {}
    fixed = options.extra_ce == "fixed"

    def add(prefix: str, logits: Optional[Tensor], weight: float, accuracy: bool) -> None:
        if logits is None or weight == 0:
            return
        tag = f"_{prefix}" if prefix else ""
        if fixed and prefix != "ctx":
            losses[f"loss{tag}_ce"] = plain_cross_entropy(logits, labels, ignore_index) * weight
            return
        for key, value in ce(logits, accuracy).items():
            if key.startswith("loss"):
                losses[f"loss{tag}{key[4:]}"] = value * weight
            else:
                losses[f"{key}{tag}"] = value

    add("", out.p, options.loss_ce, accuracy=not fixed)
    add("ctx", out.p_p, options.loss_ce_p, accuracy=fixed)
    add("oracle", out.p_y, options.loss_ce_y, accuracy=False)
    if options.lambda_kl > 0 and out.p_p is not None and out.p_y is not None:
        source = {"oracle": None, "estimated": out.p_p, "original": out.p}[options.kl_entropy_source]
        kl = entropy_kl_loss(
            out.p_p, out.p_y, resize_labels(labels, out.p_p.shape[-2:]),
            entropy=options.kl_entropy, classwise=options.kl_classwise, ignore_index=ignore_index,
            entropy_from=source, target_mix=options.kl_target_mix, normaliser=options.kl_normaliser,
            eps=options.eps,
        )
        losses["loss_kl"] = kl * options.lambda_kl
    return losses
