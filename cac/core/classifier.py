"""The context-aware classifier (paper §3.2–3.3) as a pure PyTorch module, and the loss of Eq. (8).

``ContextAwareClassifier`` takes the features ``f`` a decode head feeds its classifier and the
original classifier ``C`` (weight and bias), and yields ``p`` (original), ``p_p`` (context-aware,
Eqs. 4–6) and, when labels are given, ``p_y`` (oracle, Eqs. 1–3). Every variant the paper ablates is
a field of ``CACOptions``; the defaults are the paper's text.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cac.core.designs import DESIGNS, Projector
from cac.core.profiles import check_choices, options_from
from cac.core.functional import (cosine_logits, dot_logits, entropy_kl_loss, mask_pool, resize_bilinear, soft_pool,
                                 upsampled_cross_entropy)
from cac.core.ssa import (SSAExtras, SSAModules, boundary_mask, dice_loss, position_distill_loss,
                          relation_distill_loss)

__all__ = ["PROFILES", "CACOptions", "CACOutputs", "ContextAwareClassifier", "cac_losses", "plain_cross_entropy",
           "resize_labels", "ssa_losses", "lifted"]

_CHOICES = {
    "profile": ("paper", "official", "ssa"),
    "original": ("dot", "cos"),
    "context": ("cos", "dot", "none"),
    "kl_entropy_source": ("oracle", "estimated", "original"),
    "oracle_pool": ("image", "batch"),
    "oracle_absent": ("zero", "classifier"),
    "test_output": ("context", "original"),
    "kl_normaliser": ("batch", "literal"),
    "extra_ce": ("head", "fixed"),
    "numerics": ("exact", "official"),
    "ctx_upsample": ("head", "aligned"),
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
# SSA-Seg (xwmaxwma/SSA-Seg, its ``*_ssa.py`` heads): the official CAC code's choices, which it keeps,
# plus every addition of cac.core.ssa at the weights its heads use.
PROFILES["ssa"] = dict(PROFILES["official"], ctx_upsample="aligned", ssa_pixel_pos=True, ssa_center_pos=True,
                       ssa_gt_pos=True, ssa_relation=10.0, ssa_pos_distill=0.4, ssa_dice=1.0, ssa_kl_edges=True)


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
    # How p_p reaches the label size for the head's loss: the head's own resize ("head"), or bilinear
    # with align_corners=True first ("aligned": SSA-Seg's heads upsample p_p so before their loss)
    ctx_upsample: str = "head"
    # SSA-Seg's additions (cac.core.ssa), all off by default (then this is CAC, bit for bit):
    ssa_pixel_pos: bool = False  # pixel positions P (depthwise 3x3 conv of f) added to f in p_p and p_y
    ssa_center_pos: bool = False  # class positions added to A_p, then a linear map
    ssa_gt_pos: bool = False  # the oracle's own class positions (per image, from the labels) added to A_y
    ssa_relation: float = 0.0  # weight of the inter-centre relation distillation (SSA-Seg: 10)
    ssa_pos_distill: float = 0.0  # weight of the position distillation (SSA-Seg: 0.4)
    ssa_dice: float = 0.0  # weight of the dice terms on p_p and p_y (SSA-Seg: 1)
    ssa_kl_edges: bool = False  # L_KL averages each class's boundary and interior pixels apart

    def __post_init__(self) -> None:
        check_choices(self, _CHOICES, "cac")
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
        self._check_ssa()

    def _check_ssa(self) -> None:
        for key in ("ssa_relation", "ssa_pos_distill", "ssa_dice"):
            if getattr(self, key) < 0:
                raise ValueError(f"cac.{key} must be >= 0, got {getattr(self, key)}")
        if self.uses_ssa and self.context != "cos":
            raise ValueError("cac.ssa_* options extend the cosine context classifier: they need context='cos'")
        if self.ssa_pos_distill > 0 and not (self.ssa_center_pos and self.ssa_gt_pos):
            raise ValueError("cac.ssa_pos_distill distils the oracle's class positions into the estimate's: "
                             "it needs ssa_center_pos and ssa_gt_pos")
        if self.ssa_kl_edges and not (self.kl_classwise and self.kl_normaliser == "batch" and self.lambda_kl > 0):
            raise ValueError("cac.ssa_kl_edges splits the class-wise L_KL (kl_classwise, kl_normaliser='batch', "
                             "lambda_kl > 0)")

    @classmethod
    def from_dict(cls, cfg: Optional[Mapping] = None) -> "CACOptions":
        """Options from a config's ``cac=dict(...)``: the profile's choices, then the explicit keys."""
        return options_from(cls, cfg, PROFILES, "cac", default="paper")

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
    def uses_ssa(self) -> bool:
        """Any of SSA-Seg's additions is on."""
        return (self.ssa_pixel_pos or self.ssa_center_pos or self.ssa_gt_pos or self.ssa_kl_edges
                or self.ssa_relation > 0 or self.ssa_pos_distill > 0 or self.ssa_dice > 0)

    @property
    def needs_oracle(self) -> bool:
        """p_y is needed in training when its CE, a distillation from it or its dice term is on."""
        return self.has_context and (self.loss_ce_y > 0 or self.lambda_kl > 0 or self.ssa_relation > 0
                                     or self.ssa_pos_distill > 0 or self.ssa_dice > 0)

    @property
    def trains_oracle(self) -> bool:
        """theta_y gets a gradient only from L_y^ce (and SSA-Seg's dice on p_y): the distillations'
        teachers are detached."""
        return self.needs_oracle and (self.loss_ce_y > 0 or self.ssa_dice > 0)


class CACOutputs(NamedTuple):
    p: Tensor  # original classifier, [B, N, h, w]
    p_p: Optional[Tensor]  # context-aware classifier (estimated), Eq. (6)
    p_y: Optional[Tensor]  # oracle context-aware classifier, Eq. (3)
    ssa: Optional[SSAExtras] = None  # what SSA-Seg's losses need (None without its additions)

    def logits(self) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        return self.p, self.p_p, self.p_y


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a ``[B, H, W]`` label map (ignored pixels stay ignored)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1).to(labels.dtype)


def _lift(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t


def lifted(out: CACOutputs) -> CACOutputs:
    """``out`` with half-precision tensors in float32 (the losses' dtype)."""
    ssa = None if out.ssa is None else type(out.ssa)(*map(_lift, out.ssa))
    return CACOutputs(*map(_lift, out.logits()), ssa)


class ContextAwareClassifier(nn.Module):
    """Projectors theta_y / theta_p and the three classifiers p, p_p, p_y of Fig. 5."""

    uses_head_classifier = True  # C is the head's own conv_seg

    def __init__(self, dim: int, num_classes: int, options: CACOptions | Mapping | None = None,
                 ignore_index: int = 255) -> None:
        super().__init__()
        self.options = options if isinstance(options, CACOptions) else CACOptions.from_dict(options)
        self.dim, self.num_classes, self.ignore_index = dim, num_classes, ignore_index
        o = self.options
        self.proj_y = self._projector(o.design_y) if o.needs_oracle else None
        self.proj_p = self._projector(o.design_p) if o.has_context else None
        positions = o.ssa_pixel_pos or o.ssa_center_pos or (o.ssa_gt_pos and o.needs_oracle)
        self.ssa = SSAModules(dim, num_classes, centre=o.ssa_center_pos, oracle=o.ssa_gt_pos and o.needs_oracle,
                              hidden_ratio=o.projector_hidden_ratio) if positions else None
        if o.needs_oracle and not o.trains_oracle:
            # Without L_y^ce nothing trains theta_y (Table 2 (e)): it stays at its init either way, and
            # declaring that keeps stock DDP (find_unused_parameters=False) from waiting for its grads.
            for module in self._oracle_only_modules():
                module.requires_grad_(False)

    def _oracle_only_modules(self) -> list[nn.Module]:
        """What only p_y uses: theta_y and SSA-Seg's oracle positions (and the class embeddings, when
        only the oracle's positions use them)."""
        ssa = self.ssa
        parts = [self.proj_y] + ([] if ssa is None else [ssa.oracle_pos_proj, ssa.oracle_proj]
                                 + ([ssa.centre_pos] if not self.options.ssa_center_pos else [])
                                 + ([ssa.pixel_pos] if not (self.options.ssa_pixel_pos
                                                            or self.options.ssa_center_pos) else []))
        return [m for m in parts if m is not None]

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
        """A_p of Eq. (5) per image, ``[B, N, D]`` (for inspection, e.g. the t-SNE of Fig. 7); with
        SSA-Seg's class positions, the classifier p_p uses, ``W (A_p + G)``."""
        p = self.original_logits(feats, weight, bias)
        a_p = self.form(self.options.design_p, soft_pool(feats, p, self.options.eps), weight, self.proj_p)
        if self.options.ssa_center_pos:
            a_p = self.ssa.centre(a_p, p, self.ssa.positions(feats))[0]
        return a_p

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
        # SSA-Seg: positions P of the pixels; f + P is what the context classifiers see
        pos = self.ssa.positions(feats) if self.ssa is not None else None
        f_ctx = feats + pos if o.ssa_pixel_pos else feats
        cls_p, g_p = self.ssa.centre(a_p, p, pos) if o.ssa_center_pos else (a_p, None)
        if labels is None or not o.needs_oracle:
            extras = SSAExtras(a_p, None, g_p, None) if o.uses_ssa else None
            return CACOutputs(p, self.context_logits(f_ctx, cls_p, dtype=dtype), None, extras)
        small = resize_labels(labels, feats.shape[-2:])
        c_y = self.oracle_prototypes(feats, small, weight)
        a_y = self.form(o.design_y, c_y, weight, self.proj_y)
        cls_y, g_y = self.ssa.oracle(a_y, small, pos, self.ignore_index) if o.ssa_gt_pos else (a_y, None)
        both = self.context_logits(f_ctx, torch.cat([cls_p, cls_y.to(cls_p.dtype)], dim=1), dtype=dtype)
        p_p, p_y = both.split(a_p.shape[1], dim=1)
        return CACOutputs(p, p_p, p_y, SSAExtras(a_p, a_y, g_p, g_y) if o.uses_ssa else None)

    def predict(self, feats: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """Test-time output: p_p (the paper), or p when ``test_output='original'``.

        Without autograd p is dead once pooled, so p_p is written into its buffer: at inference CAC
        then allocates one full-size logit map more than the plain head (the soft masks), not three.
        """
        o = self.options
        if not o.has_context or o.test_output == "original":
            return self.original_logits(feats, weight, bias)
        if torch.is_grad_enabled() or self.ssa is not None:
            return self.forward(feats, weight, bias).p_p
        p = self.original_logits(feats, weight, bias)
        a_p = self.form(o.design_p, soft_pool(feats, p, o.eps), weight, self.proj_p)
        return self.context_logits(feats, a_p, out=p)


    # -- as a pixel classifier of a head's wrapper (cac.core.classifiers) --------------------------
    def losses(self, out: CACOutputs, labels: Tensor, ce: Callable[[Tensor, bool], Mapping[str, Tensor]],
               ignore_index: int = 255) -> dict[str, Tensor]:
        """Eq. (8)'s terms (:func:`cac_losses`), half-precision logits lifted to float32 first."""
        return cac_losses(lifted(out), labels, self.options, ce=ce, ignore_index=ignore_index)

    @staticmethod
    def evaluation_logits(out: CACOutputs) -> dict[str, Tensor]:
        """The three classifiers' logits, those computed: ``p``, ``p_p``, ``p_y``."""
        return {k: v for k, v in zip(("p", "p_p", "p_y"), out.logits()) if v is not None}

    @property
    def test_logits(self) -> str:
        """Which of :meth:`evaluation_logits` the head predicts with: ``p_p`` (the paper) or ``p``."""
        return "p_p" if self.options.has_context and self.options.test_output == "context" else "p"


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
    ctx = out.p_p
    if ctx is not None and options.ctx_upsample == "aligned":
        ctx = resize_bilinear(ctx, labels.shape[-2:], align_corners=True)
    add("ctx", ctx, options.loss_ce_p, accuracy=fixed)
    add("oracle", out.p_y, options.loss_ce_y, accuracy=False)
    if options.lambda_kl > 0 and out.p_p is not None and out.p_y is not None:
        source = {"oracle": None, "estimated": out.p_p, "original": out.p}[options.kl_entropy_source]
        small = resize_labels(labels, out.p_p.shape[-2:])
        kl = entropy_kl_loss(
            out.p_p, out.p_y, small,
            entropy=options.kl_entropy, classwise=options.kl_classwise, ignore_index=ignore_index,
            entropy_from=source, target_mix=options.kl_target_mix, normaliser=options.kl_normaliser,
            eps=options.eps, boundary=boundary_mask(small) if options.ssa_kl_edges else None,
        )
        losses["loss_kl"] = kl * options.lambda_kl
    if out.ssa is not None:
        aligned = ctx if options.ctx_upsample == "aligned" else None  # upsampled once for the CE and the dice
        losses.update(ssa_losses(out, labels, options, ignore_index, p_p_full=aligned))
    return losses


def ssa_losses(out: CACOutputs, labels: Tensor, options: CACOptions, ignore_index: int = 255,
               p_p_full: Optional[Tensor] = None) -> dict[str, Tensor]:
    """SSA-Seg's extra terms, each weighted: dice on p_p and p_y (upsampled as the official heads do,
    bilinear with ``align_corners=True``; ``p_p_full``: p_p already so), the relation and the position
    distillations."""
    losses: dict[str, Tensor] = {}
    if options.ssa_dice > 0:
        for key, logits, full in (("loss_dice", out.p_p, p_p_full), ("loss_oracle_dice", out.p_y, None)):
            if logits is not None:
                full = full if full is not None else resize_bilinear(logits, labels.shape[-2:], align_corners=True)
                losses[key] = dice_loss(full, labels, ignore_index) * options.ssa_dice
    extras = out.ssa
    if options.ssa_relation > 0 and extras.oracle_centres is not None:
        losses["loss_relation"] = relation_distill_loss(extras.centres, extras.oracle_centres) * options.ssa_relation
    if options.ssa_pos_distill > 0 and extras.oracle_positions is not None:
        losses["loss_pos"] = position_distill_loss(extras.positions, extras.oracle_positions) * options.ssa_pos_distill
    return losses
