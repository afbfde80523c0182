"""What the t-SNE of the paper's Figs. 1 and 7 embeds: pixel features f, the original classifier's
weights C and each image's context-aware classifier A_p, taken from a trained +CAC segmentor.

Everything is in the head's feature space (dimension D) at the features' resolution, where the
classifiers act. Vectors are L2-normalised before t-SNE: the context-aware classifier scores by
cosine similarity, and the raw norms of f, C and A_p live on unrelated scales, so Euclidean distances
between unnormalised vectors would mostly show magnitude.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["HeadView", "head_view", "sample_pixels", "Points", "joint_points", "tsne_2d", "choose_images",
           "IGNORE_INDEX"]

IGNORE_INDEX = 255


@dataclass(frozen=True)
class HeadView:
    """One batch seen by the +CAC head: ``feats [B, D, h, w]``, ``labels [B, h, w]`` (nearest-resized
    ground truth), ``classifier [N, D]`` (C) and ``context [B, N, D]`` (A_p per image)."""

    feats: np.ndarray
    labels: np.ndarray
    classifier: np.ndarray
    context: np.ndarray


def _final_head(segmentor, feats):
    """The +CAC head and its forward arguments (a cascade's earlier stages give ``prev_output``)."""
    import torch

    heads = segmentor.decode_head
    if isinstance(heads, torch.nn.ModuleList):
        prev = heads[0].forward(feats)
        for stage in heads[1:-1]:
            prev = stage.forward(feats, prev)
        return heads[-1], (feats, prev)
    return heads, (feats,)


def head_view(model, batch: dict) -> HeadView:
    """Features, labels and both classifiers for an mmengine data batch (test pipeline)."""
    import torch

    from cac.classifier import resize_labels
    from cac.head import CACHead

    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(batch, False)
        inputs, samples = data["inputs"], data["data_samples"]
        head, args = _final_head(model, model.extract_feat(inputs))
        if not isinstance(head, CACHead) or not head.options.has_context:
            raise ValueError("the t-SNE needs a +CAC model with a context-aware classifier (context != 'none')")
        feats = head.features(*args)
        weight, _bias = head._classifier_weights()
        context = head.context_weights(*args)
        labels = torch.stack([s.gt_sem_seg.data.squeeze(0) for s in samples]).to(feats.device)
        labels = resize_labels(labels, tuple(feats.shape[-2:]))
    return HeadView(feats.float().cpu().numpy(), labels.cpu().numpy().astype(np.int64),
                    weight.detach().float().cpu().numpy(), context.float().cpu().numpy())


def sample_pixels(labels: np.ndarray, per_class: int, rng: np.random.Generator,
                  ignore: int = IGNORE_INDEX) -> list[tuple[int, int, int]]:
    """``(image, y, x)`` positions: up to ``per_class`` random pixels of each class in each image."""
    picks: list[tuple[int, int, int]] = []
    for b in range(labels.shape[0]):
        for c in np.unique(labels[b]):
            if c == ignore:
                continue
            ys, xs = np.nonzero(labels[b] == c)
            take = rng.permutation(len(ys))[:per_class]
            picks += [(b, int(ys[i]), int(xs[i])) for i in take]
    return picks


@dataclass(frozen=True)
class Points:
    """Rows of ``vectors`` with their kind (0 feature, 1 classifier C, 2 context A_p), class and image
    (-1 for C, which all images share)."""

    vectors: np.ndarray
    kind: np.ndarray
    cls: np.ndarray
    image: np.ndarray

    FEATURE, CLASSIFIER, CONTEXT = 0, 1, 2


def joint_points(view: HeadView, per_class: int = 100, seed: int = 0) -> Points:
    """Sampled pixel features, C's rows for the classes present and each image's A_p rows for the
    classes in that image, stacked for one joint embedding."""
    rng = np.random.default_rng(seed)
    picks = sample_pixels(view.labels, per_class, rng)
    vecs = [view.feats[b, :, y, x] for b, y, x in picks]
    kind = [Points.FEATURE] * len(picks)
    cls = [int(view.labels[b, y, x]) for b, y, x in picks]
    image = [b for b, _, _ in picks]
    present = sorted(set(cls))
    for c in present:
        vecs.append(view.classifier[c])
        kind.append(Points.CLASSIFIER)
        cls.append(c)
        image.append(-1)
    for b in range(view.labels.shape[0]):
        for c in sorted({k for k, i in zip(cls, image) if i == b}):
            vecs.append(view.context[b, c])
            kind.append(Points.CONTEXT)
            cls.append(c)
            image.append(b)
    return Points(np.stack(vecs).astype(np.float64), np.asarray(kind), np.asarray(cls), np.asarray(image))


def tsne_2d(vectors: np.ndarray, random_state: int = 0, perplexity: Optional[float] = None) -> np.ndarray:
    """2-D t-SNE (scikit-learn, PCA init, fixed seed) of L2-normalised ``vectors``."""
    from sklearn.manifold import TSNE

    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.maximum(norms, 1e-12)
    n = len(unit)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    perplexity = perplexity or float(min(30.0, (n - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=random_state).fit_transform(unit)


def choose_images(label_maps: Sequence[np.ndarray], k: int,
                  ignore: int = IGNORE_INDEX) -> tuple[int, list[int]]:
    """The class present in the most images (ties: more pixels, then lower id) and the first ``k``
    images that contain it: Fig. 1 follows one class across images, so they must share it."""
    counts: dict[int, list[int]] = {}
    for m in label_maps:
        ids, n = np.unique(m, return_counts=True)
        for c, cnt in zip(ids.tolist(), n.tolist()):
            if c != ignore:
                counts.setdefault(c, [0, 0])
                counts[c][0] += 1
                counts[c][1] += cnt
    if not counts:
        raise ValueError("no labelled pixels in the candidate images")
    cls = min(counts, key=lambda c: (-counts[c][0], -counts[c][1], c))
    chosen = [i for i, m in enumerate(label_maps) if (m == cls).any()][:k]
    return cls, chosen
