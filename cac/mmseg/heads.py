"""Every decode head mmseg 1.2.2 registers, and what CAC does with it.

``HEADS`` is the one table behind three things: ``CACHead``'s refusals (a refused head is named with
its reason before anything is built), the README's head table (:func:`support_table_markdown`) and
``tests/test_heads.py``, which enumerates mmseg's registry and fails on a ``BaseDecodeHead`` this
table does not classify.

A supported head is wrapped as ``CACHead``'s docstring says: its ``cls_seg`` hands back the features,
CAC classifies them. Heads whose forward returns several maps get an adapter (:class:`HeadOutputs`)
that picks the map the head's ``predict`` uses and computes the other branches' losses as the head's
own ``loss_by_feat`` does; the classified map's loss is CAC's (p, p_p, p_y with the head's loss terms
for that map, and the KL).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from cac.errors import CacError

__all__ = ["HeadOutputs", "HeadSupport", "HEADS", "head_support", "head_type_name", "check_cac_model",
           "registered_decode_heads", "support_table_markdown"]


class HeadOutputs:
    """How a head's forward output divides into the map CAC classifies and the head's other branches.

    The plain case: forward ends in ``cls_seg`` and returns that one map. A head that returns a tuple
    (in training, or always) names the position of the map CAC classifies in ``classified``; the other
    entries are its branches, in order."""

    classified: Optional[int] = None

    def __init__(self, head: nn.Module) -> None:
        self.head = head

    def split(self, output: Any) -> tuple[Tensor, tuple]:
        """(features CAC classifies, the other branches' outputs)."""
        if isinstance(output, Tensor):
            return output, ()
        if self.classified is None:
            raise CacError(f"{type(self.head).__name__}.forward returned {type(output).__name__}, not one map: "
                           "CAC needs a head whose forward ends in cls_seg (list it in cac.mmseg.heads.HEADS "
                           "with an adapter)")
        parts = tuple(output)
        return parts[self.classified], parts[:self.classified] + parts[self.classified + 1:]

    def branch_losses(self, branches: tuple, logits: Tensor, batch_data_samples: list) -> dict:
        """The losses of the head's other branches; ``logits`` is p, the original classifier's map."""
        return {}


def _stack_semantic(batch_data_samples: list) -> Tensor:
    """``[B, 1, H, W]`` semantic labels (what ``BaseDecodeHead._stack_batch_gt`` stacks)."""
    return torch.stack([s.gt_sem_seg.data for s in batch_data_samples])


def _upsampled(logits: Tensor, size: torch.Size, head: nn.Module) -> Tensor:
    from mmseg.models.utils import resize

    return resize(logits, size=size, mode="bilinear", align_corners=head.align_corners)


class _PositionalTerm(nn.Module):
    """A loss term called as ``term(logits, label)`` (mmseg's ``OhemCrossEntropy``, as DDRHead and
    PIDHead call it), under the keyword calling convention ``CACHead`` uses for ``loss_decode``; it
    reports under the head's own name for the classified map's term."""

    def __init__(self, term: nn.Module, loss_name: str) -> None:
        super().__init__()
        self.term, self._name = term, loss_name

    @property
    def loss_name(self) -> str:
        return self._name

    def forward(self, logits: Tensor, label: Tensor, weight: Optional[Tensor] = None, **_: Any) -> Tensor:
        if weight is not None:
            raise CacError(f"{type(self.term).__name__} takes no pixel weights: remove the head's sampler")
        return self.term(logits, label)


class DualAttentionOutputs(HeadOutputs):
    """DAHead: ``(pam_cam, pam, cam)``; ``predict`` uses ``pam_cam``, the one ``cls_seg`` classifies.
    ``pam`` and ``cam`` keep their own classifiers and their ``pam.*`` / ``cam.*`` losses."""

    classified = 0  # (pam_cam, pam, cam)

    def branch_losses(self, branches: tuple, logits: Tensor, batch_data_samples: list) -> dict:
        from mmseg.models.decode_heads.decode_head import BaseDecodeHead
        from mmseg.utils import add_prefix

        losses: dict = {}
        for name, branch in zip(("pam", "cam"), branches):
            losses.update(add_prefix(BaseDecodeHead.loss_by_feat(self.head, branch, batch_data_samples), name))
        return losses


class EncodingOutputs(HeadOutputs):
    """EncHead: ``(seg, se)`` with the SE loss on (``seg`` alone without it); CAC classifies ``seg``,
    the semantic-encoding branch keeps its ``loss_se``."""

    classified = 0  # (seg, se)

    def branch_losses(self, branches: tuple, logits: Tensor, batch_data_samples: list) -> dict:
        if not branches:
            return {}
        head = self.head
        present = head._convert_to_onehot_labels(_stack_semantic(batch_data_samples), head.num_classes)
        return {"loss_se": head.loss_se_decode(branches[0], present)}


class DDROutputs(HeadOutputs):
    """DDRHead: ``(context, spatial)`` in training, ``context`` alone at test time. CAC classifies the
    context map with its ``loss_decode[0]`` (``loss_context``); the spatial branch keeps
    ``loss_decode[1]`` (``loss_spatial``)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__(head)
        terms = list(head.loss_decode)
        if len(terms) != 2:
            raise CacError(f"DDRHead has 2 loss_decode terms (context, spatial), got {len(terms)}")
        self.spatial_term = terms[1]
        head.loss_decode = _PositionalTerm(terms[0], "loss_context")

    classified = 0  # (context, spatial)

    def branch_losses(self, branches: tuple, logits: Tensor, batch_data_samples: list) -> dict:
        if not branches:
            return {}
        label = _stack_semantic(batch_data_samples)
        spatial = _upsampled(branches[0], label.shape[2:], self.head)
        return {"loss_spatial": self.spatial_term(spatial, label.squeeze(1))}


class PIDOutputs(HeadOutputs):
    """PIDHead: ``(p, i, d)`` in training, ``i`` alone at test time. CAC classifies the integral map
    ``i`` with ``loss_decode[1]`` (``loss_sem_i``); the proportional branch keeps ``loss_sem_p``, the
    boundary branch ``loss_bd``, and the boundary-aware term ``loss_sem_bd`` applies to p (the
    original classifier's map of ``i``) as PIDHead applies it to its ``i`` logits."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__(head)
        terms = list(head.loss_decode)
        if len(terms) != 4:
            raise CacError(f"PIDHead has 4 loss_decode terms (sem_p, sem_i, bd, sem_bd), got {len(terms)}")
        self.sem_p, _, self.bd, self.sem_bd = terms
        head.loss_decode = _PositionalTerm(terms[1], "loss_sem_i")
        # PIDHead stacks (semantic, edge) labels; CAC's loss needs the semantic ones, this adapter the edges.
        head._stack_batch_gt = _stack_semantic

    classified = 1  # (p, i, d)

    def branch_losses(self, branches: tuple, logits: Tensor, batch_data_samples: list) -> dict:
        if not branches:
            return {}
        head = self.head
        sem = _stack_semantic(batch_data_samples)
        edge = torch.stack([s.gt_edge_map.data for s in batch_data_samples])
        p, i = _upsampled(branches[0], sem.shape[2:], head), _upsampled(logits, sem.shape[2:], head)
        d = _upsampled(branches[1], edge.shape[2:], head)
        sem, edge = sem.squeeze(1), edge.squeeze(1)
        on_boundary = torch.where(torch.sigmoid(d[:, 0]) > 0.8, sem, torch.full_like(sem, head.ignore_index))
        return {"loss_sem_p": self.sem_p(p, sem, ignore_index=head.ignore_index),
                "loss_bd": self.bd(d, edge),
                "loss_sem_bd": self.sem_bd(i, on_boundary)}


@dataclass(frozen=True)
class HeadSupport:
    """One head: the output CAC classifies, or why it is refused."""

    classifies: str = ""
    refused: str = ""
    outputs: Callable[[nn.Module], HeadOutputs] = HeadOutputs

    @property
    def supported(self) -> bool:
        return not self.refused


_MAP = "its `cls_seg` map"
_PLAIN = HeadSupport(_MAP)

HEADS: dict[str, HeadSupport] = {
    "ANNHead": _PLAIN,
    "APCHead": _PLAIN,
    "ASPPHead": _PLAIN,
    "CCHead": _PLAIN,
    "DAHead": HeadSupport("`pam_cam` (the map `predict` uses); `pam`, `cam` keep their classifiers and losses",
                          outputs=DualAttentionOutputs),
    "DDRHead": HeadSupport("the context map (the one `predict` uses); the spatial branch keeps `loss_spatial`",
                           outputs=DDROutputs),
    "DMHead": _PLAIN,
    "DNLHead": _PLAIN,
    "DPTHead": _PLAIN,
    "DepthwiseSeparableASPPHead": _PLAIN,
    "DepthwiseSeparableFCNHead": _PLAIN,
    "EMAHead": _PLAIN,
    "EncHead": HeadSupport("the segmentation map; the SE branch keeps `loss_se`", outputs=EncodingOutputs),
    "FCNHead": _PLAIN,
    "FPNHead": _PLAIN,
    "GCHead": _PLAIN,
    "ISAHead": _PLAIN,
    "IterativeDecodeHead": HeadSupport(refused=(
        "K-Net's masks come from kernels its KernelUpdateHeads update per image over several stages, "
        "not from its own conv_seg: there is no classifier C to wrap")),
    "LRASPPHead": _PLAIN,
    "LightHamHead": _PLAIN,
    "NLHead": _PLAIN,
    "OCRHead": HeadSupport("its `cls_seg` map (the final stage of a cascade; `prev_output` passes through)"),
    "PIDHead": HeadSupport("the integral map `i` (the one `predict` uses); `loss_sem_p`, `loss_bd` keep "
                           "their branches, `loss_sem_bd` applies to p", outputs=PIDOutputs),
    "PSAHead": _PLAIN,
    "PSPHead": _PLAIN,
    "PointHead": HeadSupport(refused=(
        "it classifies sampled points ([B, C, N] logits of point features) to refine a coarse map, "
        "not a dense feature map that CAC's class centres pool")),
    "SETRMLAHead": _PLAIN,
    "SETRUPHead": _PLAIN,
    "STDCHead": HeadSupport(refused=(
        "STDC's detail head is an auxiliary binary boundary head (Laplacian targets, one output "
        "channel), not a class decoder; CAC wraps STDC's decode head (FCNHead)")),
    "SegformerHead": _PLAIN,
    "SegmenterMaskTransformerHead": HeadSupport(refused=(
        "Segmenter scores patch embeddings against class embeddings its transformer computes per image, "
        "without conv_seg: there is no classifier C to wrap")),
    "SideAdapterCLIPHead": HeadSupport(refused=(
        "an open-vocabulary head (SAN): classes are CLIP text embeddings scored on mask proposals, "
        "no fixed classifier of features")),
    "UPerHead": _PLAIN,
    "VPDDepthHead": HeadSupport(refused="a depth-estimation head: it regresses depth, there are no classes"),
}


WRAPPER_TYPES = ("CACHead", "ClassifierHead")  # the wrapper's registered names (one class, cac.mmseg.head)


def head_type_name(head_type: Any) -> str:
    """The registry name of a head config's ``type`` (a name, ``scope.Name``, or a class)."""
    name = head_type.__name__ if isinstance(head_type, type) else str(head_type)
    return name.rsplit(".", 1)[-1]


def head_support(head_type: Any) -> HeadSupport:
    """How CAC wraps ``head_type``; a ``CacError`` naming the reason if it cannot. A head outside mmseg
    (the user's own ``BaseDecodeHead``) is wrapped like a plain one: its forward must end in ``cls_seg``."""
    name = head_type_name(head_type)
    support = HEADS.get(name)
    if support is None:
        cls = head_type if isinstance(head_type, type) else _registered(name)
        from mmseg.models.decode_heads.decode_head import BaseDecodeHead

        if cls is None:
            raise CacError(f"CAC cannot wrap {name}: no decode head of that name is registered")
        if not issubclass(cls, BaseDecodeHead):
            raise CacError(f"CAC cannot wrap {name}: it is not a BaseDecodeHead (mask-classification heads "
                           "such as MaskFormerHead/Mask2FormerHead classify queries, not pixel features)")
        return _PLAIN
    if support.refused:
        raise CacError(f"CAC cannot wrap {name}: {support.refused}")
    return support


def _registered(name: str) -> Optional[type]:
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    return MODELS.get(name)


def _head_cfg_type(head_cfg: Mapping) -> Any:
    """The wrapped head's type in a ``CACHead`` config (``head=`` or ``head_type=``)."""
    inner = head_cfg.get("head")
    return inner.get("type") if isinstance(inner, Mapping) else head_cfg.get("head_type")


def check_cac_model(model: Mapping, cac: bool) -> None:
    """A resolved model config CAC can train: every ``CACHead`` wraps a supported head, and a +CAC
    model (``cac``) still ends in a ``CACHead`` after the spec's overrides. Else one ``CacError`` line."""
    heads = model.get("decode_head")
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads]
    for i, head in enumerate(heads):
        if not isinstance(head, Mapping) or head_type_name(head.get("type")) not in WRAPPER_TYPES:
            continue
        inner = _head_cfg_type(head)
        if inner is None:
            raise CacError("model.decode_head: CACHead needs `head=<decode head config>` or `head_type=`")
        head_support(inner)
    last = heads[-1]
    if cac and isinstance(last, Mapping) and head_type_name(last.get("type")) not in WRAPPER_TYPES:
        raise CacError(f"the row is +CAC but its config sets the decode head's type to "
                       f"{head_type_name(last.get('type'))!r} in place of CACHead; to change the head CAC "
                       f"wraps, set `model.decode_head.head.type`")


def registered_decode_heads() -> dict[str, type]:
    """Every ``BaseDecodeHead`` subclass mmseg itself registers (name -> class)."""
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    return {name: cls for name, cls in sorted(MODELS.module_dict.items())
            if isinstance(cls, type) and issubclass(cls, BaseDecodeHead) and cls.__module__.startswith("mmseg.")}


def support_table_markdown() -> str:
    """The README's table: head · supported or refused · which output CAC classifies · why refused."""
    lines = ["| head | CAC | output CAC classifies | why refused |", "|---|---|---|---|"]
    for name, s in sorted(HEADS.items(), key=lambda kv: kv[0].lower()):
        lines.append(f"| `{name}` | {'supported' if s.supported else 'refused'} | {s.classifies or '–'} "
                     f"| {s.refused or ''} |")
    return "\n".join(lines)
