"""One MMSegmentation plug-in that ends any decode head with another pixel classifier: CAC (with its
profiles, SSA-Seg's included), GMMSeg or ProtoSeg (:mod:`cac.core.classifiers`).

Every ``BaseDecodeHead`` ends its ``forward`` with ``self.cls_seg(features)``. ``CACHead`` builds the
wrapped head, makes its ``cls_seg`` hand the features back unchanged, and classifies them itself: CAC
with the head's own ``conv_seg`` as the original classifier ``C`` plus the context-aware classifier,
the others with their own modules and state. So the head's feature path, its loss configuration and
its ``predict_by_feat`` all stay the head's own, and no head is copied. Cascade heads (OCRNet) are wrapped the same way: extra forward arguments such as
``prev_output`` pass straight through. ``cac.mmseg.heads.HEADS`` says, for every decode head mmseg
registers, which output CAC classifies (an adapter for heads whose forward returns several maps) or why
the head is refused.

In a plain mmseg config::

    custom_imports = dict(imports=['cac'])
    model = dict(decode_head=dict(type='CACHead', head_type='UPerHead', cac=dict(tau=15)))

(``_base_`` merging supplies the head's own arguments), or ``dict(type='CACHead', head=<head cfg>)``.
Another classifier: ``dict(type='ClassifierHead', head=<head cfg>, classifier=dict(type='GMMSeg', ...))``
(``ClassifierHead`` is the same class under a name that does not say CAC).
"""
from __future__ import annotations

from typing import Any, Optional

from mmengine.model import BaseModule
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS
import torch
from torch import Tensor

from cac.core.classifier import ContextAwareClassifier
from cac.core.classifiers import build_classifier
from cac.core.functional import autocast_off, resize_bilinear, upsampled_cross_entropy
from cac.mmseg.heads import head_support

__all__ = ["CACHead", "ClassifierHead", "is_plain_cross_entropy"]


def _features_unchanged(feat: Tensor) -> Tensor:
    return feat


def is_plain_cross_entropy(term: torch.nn.Module) -> bool:
    """A softmax CE term with no class weights or masks, mean-reduced: the fused path reproduces it."""
    from mmseg.models.losses import CrossEntropyLoss

    return (type(term) is CrossEntropyLoss and not term.use_sigmoid and not term.use_mask
            and term.class_weight is None and term.reduction == "mean")


@MODELS.register_module(name="ClassifierHead")
@MODELS.register_module()
class CACHead(BaseModule):
    """Wrap a decode head: features from the head, classification by CAC (Fig. 5) or by the pixel
    classifier ``classifier=dict(type=..., **options)`` names (``cac=`` is CAC's options)."""

    def __init__(self, head: Optional[dict] = None, cac: Optional[dict] = None,
                 head_type: Optional[str] = None, init_cfg: Optional[dict] = None,
                 classifier: Optional[dict] = None, **head_kwargs: Any) -> None:
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
        if classifier is not None and cac is not None:
            raise ValueError("CACHead takes `cac=` (CAC's options) or `classifier=dict(type=...)`, not both")
        spec = dict(classifier) if classifier is not None else {"type": "cac", **dict(cac or {})}
        conv = self.head.conv_seg
        self.classifier = build_classifier(spec, conv.in_channels, conv.out_channels,
                                           ignore_index=self.head.ignore_index, norm_layer=self._norm_layer())
        self.options = self.classifier.options
        if not self.classifier.uses_head_classifier:
            conv.requires_grad_(False)  # unused by this classifier: stock DDP must not wait for its gradient
        elif self.is_cac and self.options.original == "cos" and conv.bias is not None:
            # The cosine original classifier (Table 4) has no bias: mark it untrained, so stock DDP
            # does not wait for its gradient.
            conv.bias.requires_grad_(False)
        # What EncoderDecoder / CascadeEncoderDecoder read off their decode head.
        self.num_classes = self.head.num_classes
        self.out_channels = self.head.out_channels
        self.align_corners = self.head.align_corners
        self.ignore_index = self.head.ignore_index
        self.threshold = getattr(self.head, "threshold", None)

    @property
    def is_cac(self) -> bool:
        """Whether the classifier is CAC (its three classifiers, its projectors, C the head's conv_seg)."""
        return isinstance(self.classifier, ContextAwareClassifier)

    @property
    def test_logits(self) -> str:
        """Which of the evaluated logits (:meth:`all_logits`) the head predicts with."""
        return self.classifier.test_logits

    def _norm_layer(self):
        """The head's own normalisation (its ``norm_cfg``: SyncBN at paper scale) for a classifier's
        layers, as the official heads build theirs."""
        norm_cfg = getattr(self.head, "norm_cfg", None)
        if not norm_cfg:
            return None
        from mmcv.cnn import build_norm_layer

        return lambda channels: build_norm_layer(norm_cfg, channels)[1]

    # -- the classifier ``C`` is the head's conv_seg -------------------------------------------
    def _classifier_weights(self) -> tuple[Tensor, Optional[Tensor]]:
        conv = self.head.conv_seg
        return conv.weight.flatten(1), conv.bias

    def features(self, *inputs: Any) -> Tensor:
        """The features f the head hands its classifier (before the head's dropout)."""
        return self.outputs.split(self.head(*inputs))[0]

    def classify(self, feats: Tensor, labels: Optional[Tensor] = None):
        """The classifier's outputs at the features' resolution (CAC: p, p_p and, given labels, p_y).
        The head's dropout (active in training only) is the classifier's to apply: CAC applies it to
        p's input alone, p = C(dropout(f)), as ``cls_seg`` would; GMMSeg and ProtoSeg to all of f, as
        their official heads do."""
        weight, bias = self._classifier_weights()
        dropout = self.head.dropout if self.training and self.head.dropout is not None else None
        return self.classifier(feats, weight, bias, labels, dropout=dropout)

    def context_weights(self, *inputs: Any) -> Tensor:
        """The context-aware classifier A_p of each image, ``[B, N, D]`` (Fig. 7's stars)."""
        if not self.is_cac:
            raise ValueError(f"{type(self.classifier).__name__} has no context-aware classifier")
        weight, bias = self._classifier_weights()
        return self.classifier.context_classifier(self.features(*inputs), weight, bias)

    def all_logits(self, *inputs: Any, labels: Optional[Tensor] = None):
        """The classifier's outputs (CAC's :class:`~cac.core.classifier.CACOutputs`: p, p_p, p_y)."""
        return self.classify(self.features(*inputs), labels)

    def named_logits(self, *inputs: Any, labels: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Every logit map the classifier evaluates, by name (``p``, and CAC's ``p_p``, ``p_y``)."""
        return self.classifier.evaluation_logits(self.all_logits(*inputs, labels=labels))

    # -- the BaseDecodeHead interface the segmentors call --------------------------------------
    def forward(self, *inputs: Any) -> Tensor:
        weight, bias = self._classifier_weights()
        return self.classifier.predict(self.features(*inputs), weight, bias)

    def loss(self, *args: Any) -> dict:
        """``loss(inputs[, prev_output], batch_data_samples, train_cfg)``: the classifier's terms (CAC:
        Eq. 8's), the head's own loss on each of its maps, and the head's other branches' terms."""
        *inputs, batch_data_samples, _train_cfg = args
        seg_label = self.head._stack_batch_gt(batch_data_samples)
        labels = seg_label.squeeze(1)
        feats, branches = self.outputs.split(self.head(*inputs))
        out = self.classify(feats, labels)
        branch_losses = self.outputs.branch_losses(branches, out.p, batch_data_samples)
        # Under AMP the logits may be half precision: the losses, and the KL's softmaxes, entropies and
        # class-wise sums above all, are computed in float32 with autocast off.
        with autocast_off(labels.device.type):
            return {**self.classifier.losses(
                out, labels, ce=lambda logits, accuracy: self.segmentation_loss(logits, seg_label, accuracy),
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
ClassifierHead = CACHead  # the same wrapper under a name that does not say CAC
