"""The pixel classifiers a decode head can end with, by name: a registry.

Each kind is an options dataclass (``from_dict`` validates a config's mapping, with the method's
profiles) and a module built from the head's feature width and class count. The module's interface,
which the mmseg wrapper (:class:`cac.mmseg.head.CACHead`) relies on and nothing else:

- ``forward(f, weight, bias, labels=None, dropout=None)``: its outputs, whose ``p`` is a map the head's
  other branches may use; ``weight``/``bias`` are the head's own classifier (``conv_seg``), used only by
  kinds with ``uses_head_classifier``; ``labels`` (training) enable the training terms and state updates;
- ``predict(f, weight, bias)``: the test-time logits;
- ``losses(outputs, labels, ce, ignore_index)``: its weighted terms, ``ce(logits, accuracy)`` being the
  head's own segmentation loss;
- ``evaluation_logits(outputs)``: the logits to evaluate by name (``p``, and CAC's ``p_p``, ``p_y``), and
  ``test_logits``, the name of the one it predicts with.

The linear classifier is the head itself, unwrapped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from torch import nn

from cac.core.classifier import CACOptions, ContextAwareClassifier
from cac.core.gmmseg import GMMSegClassifier, GMMSegOptions
from cac.core.protoseg import ProtoSegClassifier, ProtoSegOptions

__all__ = ["ClassifierKind", "CLASSIFIERS", "register_classifier", "classifier_kind", "build_classifier",
           "split_classifier"]


@dataclass(frozen=True)
class ClassifierKind:
    name: str
    options: type  # with from_dict(mapping) -> options, to_dict()
    build: Callable[..., nn.Module]  # (in_channels, num_classes, options, ignore_index, norm_layer) -> module
    description: str = ""


CLASSIFIERS: dict[str, ClassifierKind] = {}


def register_classifier(kind: ClassifierKind) -> ClassifierKind:
    CLASSIFIERS[kind.name] = kind
    return kind


def classifier_kind(name: str) -> ClassifierKind:
    """A registered kind by name (case-insensitive): ``cac``, ``gmmseg``, ``protoseg``."""
    key = str(name).lower()
    if key not in CLASSIFIERS:
        raise ValueError(f"unknown classifier type {name!r}; known: {', '.join(sorted(CLASSIFIERS))}")
    return CLASSIFIERS[key]


def split_classifier(cfg: Mapping) -> tuple[ClassifierKind, Any]:
    """A config's ``classifier=dict(type=..., **options)`` as (its kind, its validated options)."""
    cfg = dict(cfg)
    if "type" not in cfg:
        raise ValueError(f"classifier needs a `type` ({', '.join(sorted(CLASSIFIERS))}), got {cfg!r}")
    kind = classifier_kind(cfg.pop("type"))
    return kind, kind.options.from_dict(cfg)


def build_classifier(cfg: Mapping, in_channels: int, num_classes: int, ignore_index: int = 255,
                     norm_layer: Optional[Callable[[int], nn.Module]] = None) -> nn.Module:
    kind, options = split_classifier(cfg)
    return kind.build(in_channels, num_classes, options, ignore_index, norm_layer)


register_classifier(ClassifierKind(
    "cac", CACOptions,
    lambda d, n, options, ignore, _norm: ContextAwareClassifier(d, n, options, ignore_index=ignore),
    "the context-aware classifier (and SSA-Seg's additions, profile ssa); C is the head's conv_seg"))
register_classifier(ClassifierKind(
    "gmmseg", GMMSegOptions,
    lambda d, n, options, ignore, norm: GMMSegClassifier(d, n, options, ignore_index=ignore, norm_layer=norm),
    "a Gaussian mixture per class, fitted by momentum EM on a memory (GMMSeg)"))
register_classifier(ClassifierKind(
    "protoseg", ProtoSegOptions,
    lambda d, n, options, ignore, _norm: ProtoSegClassifier(d, n, options, ignore_index=ignore),
    "non-learnable prototypes per class, moved by momentum towards Sinkhorn-assigned pixels (ProtoSeg)"))
