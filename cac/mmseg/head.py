"""One MMSegmentation plug-in that adds CAC to any decode head.

Every ``BaseDecodeHead`` ends its ``forward`` with ``self.cls_seg(features)``. ``CACHead`` builds the
wrapped head, makes its ``cls_seg`` hand the features back unchanged, and classifies them itself with
the head's own ``conv_seg`` as the original classifier ``C`` plus the context-aware classifier. So the
head's feature path, its loss configuration and its ``predict_by_feat`` all stay the head's own, and
no head is copied. Cascade heads (OCRNet) are wrapped the same way: extra forward arguments such as
``prev_output`` pass straight through. ``cac.mmseg.heads.HEADS`` says, for every decode head mmseg
registers, which output CAC classifies (an adapter for heads whose forward returns several maps) or why
the head is refused.

In a plain mmseg config::

    custom_imports = dict(imports=['cac'])
    model = dict(decode_head=dict(type='CACHead', head_type='UPerHead', cac=dict(tau=15)))

(``_base_`` merging supplies the head's own arguments), or ``dict(type='CACHead', head=<head cfg>)``.
"""
from __future__ import annotations

from typing import Any, Optional

from mmengine.model import BaseModule
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS
import torch
from torch import Tensor

from cac.core.classifier import CACOptions, CACOutputs, ContextAwareClassifier, cac_losses
from cac.core.functional import autocast_off, resize_bilinear, upsampled_cross_entropy
from cac.mmseg.heads import head_support

__all__ = ["CACHead", "is_plain_cross_entropy"]


def _features_unchanged(feat: Tensor) -> Tensor:
    return feat


def _lift(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t


def _lifted(out: CACOutputs) -> CACOutputs:
    """``out`` with half-precision tensors in float32 (the losses' dtype)."""
    ssa = None if out.ssa is None else type(out.ssa)(*map(_lift, out.ssa))
    return CACOutputs(*map(_lift, out.logits()), ssa)


def is_plain_cross_entropy(term: torch.nn.Module) -> bool:
    """A softmax CE term with no class weights or masks, mean-reduced: the fused path reproduces it."""
    from mmseg.models.losses import CrossEntropyLoss

    return (type(term) is CrossEntropyLoss and not term.use_sigmoid and not term.use_mask
            and term.class_weight is None and term.reduction == "mean")


@MODELS.register_module()
class CACHead(BaseModule):
    """Wrap a decode head: features from the head, classification by CAC (Fig. 5)."""

    def __init__(self, head: Optional[dict] = None, cac: Optional[dict] = None,
                 head_type: Optional[str] = None, init_cfg: Optional[dict] = None, **head_kwargs: Any) -> None:
        if head is None:
            if head_type is None:
                raise ValueError("CACHead needs `head=<decode head config>` or `head_type=<registered head>`")
            # The flat form is the head's own config with a new type: its init_cfg too is the head's
            # (mmseg's heads initialise `conv_seg` by name, which only the head has).
            head = dict(type=head_type, **head_kwargs, **({} if init_cfg is None else {"init_cfg": init_cfg}))
            init_cfg = None
        elif head_type is not None or head_kwargs:
            raise ValueError("CACHead takes either `head=` or `head_type=` with the head's arguments, not both")
        super().__init__(init_cfg=init_cfg)
        # A head CAC cannot wrap is refused by name, with the reason, before it is built.
        support = head_support(head.get("type"))
        self.head: BaseDecodeHead = MODELS.build(head)
        if not isinstance(self.head, BaseDecodeHead):
            raise TypeError(f"CACHead wraps BaseDecodeHead subclasses, got {type(self.head).__name__}")
        if self.head.out_channels != self.head.num_classes or self.head.num_classes < 2:
            raise ValueError("CACHead needs a multi-class head (out_channels == num_classes >= 2): CAC pools one "
                             "prototype per classifier row (Eq. 4), and a binary head with out_channels=1 (sigmoid) "
                             "has one row; give it out_channels=2 with softmax cross-entropy, the same two classes")
        # An instance attribute shadows the class method: the head's forward now returns features.
        self.head.cls_seg = _features_unchanged
        # Which of the forward's outputs CAC classifies, and the other branches' losses (DAHead, EncHead, ...).
        self.outputs = support.outputs(self.head)
        self.options = CACOptions.from_dict(cac)
        conv = self.head.conv_seg
        if self.options.original == "cos" and conv.bias is not None:
            # The cosine original classifier (Table 4) has no bias: mark it untrained, so stock DDP
            # does not wait for its gradient.
            conv.bias.requires_grad_(False)
        self.classifier = ContextAwareClassifier(conv.in_channels, conv.out_channels, self.options,
                                                 ignore_index=self.head.ignore_index)
        # What EncoderDecoder / CascadeEncoderDecoder read off their decode head.
        self.num_classes = self.head.num_classes
        self.out_channels = self.head.out_channels
        self.align_corners = self.head.align_corners
        self.ignore_index = self.head.ignore_index
        self.threshold = getattr(self.head, "threshold", None)

    # -- the classifier ``C`` is the head's conv_seg -------------------------------------------
    def _classifier_weights(self) -> tuple[Tensor, Optional[Tensor]]:
        conv = self.head.conv_seg
        return conv.weight.flatten(1), conv.bias

    def features(self, *inputs: Any) -> Tensor:
        """The features f the head hands its classifier (before the head's dropout)."""
        return self.outputs.split(self.head(*inputs))[0]

    def classify(self, feats: Tensor, labels: Optional[Tensor] = None) -> CACOutputs:
        """p, p_p and (given labels) p_y at the features' resolution. The head's dropout (active in
        training only) applies to p's input alone, p = C(dropout(f)), as ``cls_seg`` would apply it."""
        weight, bias = self._classifier_weights()
        dropout = self.head.dropout if self.training and self.head.dropout is not None else None
        return self.classifier(feats, weight, bias, labels, dropout=dropout)

    def context_weights(self, *inputs: Any) -> Tensor:
        """The context-aware classifier A_p of each image, ``[B, N, D]`` (Fig. 7's stars)."""
        weight, bias = self._classifier_weights()
        return self.classifier.context_classifier(self.features(*inputs), weight, bias)

    def all_logits(self, *inputs: Any, labels: Optional[Tensor] = None) -> CACOutputs:
        return self.classify(self.features(*inputs), labels)

    # -- the BaseDecodeHead interface the segmentors call --------------------------------------
    def forward(self, *inputs: Any) -> Tensor:
        weight, bias = self._classifier_weights()
        return self.classifier.predict(self.features(*inputs), weight, bias)

    def loss(self, *args: Any) -> dict:
        """``loss(inputs[, prev_output], batch_data_samples, train_cfg)``: the terms of Eq. (8)."""
        *inputs, batch_data_samples, _train_cfg = args
        seg_label = self.head._stack_batch_gt(batch_data_samples)
        labels = seg_label.squeeze(1)
        feats, branches = self.outputs.split(self.head(*inputs))
        out = self.classify(feats, labels)
        branch_losses = self.outputs.branch_losses(branches, out.p, batch_data_samples)
        # Under AMP the logits may be half precision: the losses, and the KL's softmaxes, entropies and
        # class-wise sums above all, are computed in float32 with autocast off.
        out = _lifted(out)
        with autocast_off(labels.device.type):
            return {**cac_losses(out, labels, self.options,
                                 ce=lambda logits, accuracy: self.segmentation_loss(logits, seg_label, accuracy),
                                 ignore_index=self.ignore_index), **branch_losses}

    def segmentation_loss(self, logits: Tensor, seg_label: Tensor, accuracy: bool = True) -> dict:
        """The wrapped head's own loss terms (its ``loss_decode`` list and pixel sampler), as its
        ``loss_by_feat`` computes them; the accuracy (a top-k over all classes and pixels) only when
        asked, since p_p and p_y don't need it logged every step. The upsampling to the label size is
        ``F.interpolate``'s bilinear (mmseg's ``resize``), computed as matrix products on CPU. Terms
        without accuracy whose loss is plain softmax CE take the fused upsample + CE instead."""
        from mmseg.models.losses import accuracy as seg_accuracy

        head = self.head
        label = seg_label.squeeze(1)
        terms = head.loss_decode if isinstance(head.loss_decode, torch.nn.ModuleList) else [head.loss_decode]
        if not accuracy and head.sampler is None and all(map(is_plain_cross_entropy, terms)):
            return self._plain_cross_entropy_loss(logits, label, terms)
        logits = resize_bilinear(logits, seg_label.shape[2:], align_corners=head.align_corners)
        weight = head.sampler.sample(logits, seg_label) if head.sampler is not None else None
        losses: dict = {}
        for term in terms:
            value = term(logits, label, weight=weight, ignore_index=head.ignore_index)
            losses[term.loss_name] = losses[term.loss_name] + value if term.loss_name in losses else value
        if accuracy:
            losses["acc_seg"] = seg_accuracy(logits, label, ignore_index=head.ignore_index)
        return losses

    def _plain_cross_entropy_loss(self, logits: Tensor, label: Tensor, terms: list) -> dict:
        """mmseg's softmax cross-entropy (mean over pixels, or over labelled pixels with
        ``avg_non_ignore``) from one fused upsample + CE: CAC's p_p and p_y terms add no full-size
        tensors that live until backward."""
        total = upsampled_cross_entropy(logits, label, self.head.align_corners, self.head.ignore_index).sum()
        eps = torch.finfo(torch.float32).eps  # as mmseg's weight_reduce_loss
        losses: dict = {}
        for term in terms:
            count = (label != self.head.ignore_index).sum() if term.avg_non_ignore else label.numel()
            value = term.loss_weight * (total / (count + eps))
            losses[term.loss_name] = losses[term.loss_name] + value if term.loss_name in losses else value
        return losses

    def predict(self, *args: Any) -> Tensor:
        """``predict(inputs[, prev_output], batch_img_metas, test_cfg)``."""
        *inputs, batch_img_metas, _test_cfg = args
        return self.head.predict_by_feat(self.forward(*inputs), batch_img_metas)

    def predict_by_feat(self, seg_logits: Tensor, batch_img_metas: list) -> Tensor:
        return self.head.predict_by_feat(seg_logits, batch_img_metas)
