"""What the t-SNE of the paper's Figs. 1 and 7 embeds: pixel features f, the original classifier's
weights C and each image's context-aware classifier A_p, taken from a trained +CAC segmentor.

Everything is in the head's feature space (dimension D) at the features' resolution, where the
classifiers act. What is embedded is what the cosine classifier compares, tau * cos(f, A): the
L2-normalised f, C rows and A_p rows (the raw norms of f, C and A_p live on unrelated scales, so
distances between unnormalised vectors would mostly show magnitude). ``cosine_stats`` measures, on
every labelled pixel, how close each class's features are to C[k] and to their image's A_p[k], so a
figure can state in numbers whether A_p moved toward its image's features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["HeadView", "head_view", "sample_pixels", "Points", "joint_points", "tsne_2d", "choose_images",
           "unit_rows", "ClassCosine", "cosine_stats", "row_similarity", "mean_cosines", "IGNORE_INDEX",
           "VIEWS", "image_rows", "PairMeasure", "pair_measures", "view_summary"]

# The two views of Fig. 7: the rows as the classifier holds them, and their class-specific part (each
# image's rows minus their mean over the classes present in it; see ``image_rows``).
VIEWS = ("raw", "centred")

IGNORE_INDEX = 255


@dataclass(frozen=True)
class HeadView:
    """A batch of images seen by the +CAC head, one entry per image in the batch's order: ``feats``
    (image b's features ``[D, h_b, w_b]``), ``labels`` (its ground truth nearest-resized to the
    features, ``[h_b, w_b]``), ``classifier [N, D]`` (C, shared) and ``context [B, N, D]`` (A_p per image).

    The images may have different sizes (test pipelines keep each image's aspect), so ``feats`` and
    ``labels`` are sequences of per-image arrays; stacked ``[B, D, h, w]`` / ``[B, h, w]`` arrays are
    accepted too and split into their images."""

    feats: Sequence[np.ndarray]
    labels: Sequence[np.ndarray]
    classifier: np.ndarray
    context: np.ndarray

    def __post_init__(self) -> None:
        feats = tuple(np.asarray(f) for f in self.feats)
        labels = tuple(np.asarray(m) for m in self.labels)
        context = np.asarray(self.context)
        if not len(feats) == len(labels) == len(context):
            raise ValueError(f"HeadView: {len(feats)} feature maps, {len(labels)} label maps and "
                             f"{len(context)} context classifiers; one of each per image")
        for b, (f, m) in enumerate(zip(feats, labels)):
            if f.ndim != 3 or m.shape != f.shape[1:]:
                raise ValueError(f"HeadView: image {b} has features {f.shape} (want [D, h, w]) and labels "
                                 f"{m.shape} (want [h, w])")
        object.__setattr__(self, "feats", feats)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "classifier", np.asarray(self.classifier))
        object.__setattr__(self, "context", context)

    @property
    def images(self) -> int:
        """How many images the view holds."""
        return len(self.labels)


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
    """Features, labels and both classifiers for an mmengine data batch (test pipeline). Images of
    different sizes are run as :func:`cac.mmseg.evaluation.size_groups` (one forward pass per size)
    and come back in the batch's order, each at its own features' resolution."""
    import torch

    from cac.core.classifier import resize_labels
    from cac.mmseg.evaluation import size_groups
    from cac.mmseg.head import CACHead

    n = len(batch["inputs"])
    feats: list = [None] * n
    labels: list = [None] * n
    context: list = [None] * n
    weight = None
    model.eval()
    with torch.no_grad():
        for indices, group in size_groups(batch):
            data = model.data_preprocessor(group, False)
            inputs, samples = data["inputs"], data["data_samples"]
            head, args = _final_head(model, model.extract_feat(inputs))
            if not isinstance(head, CACHead) or not head.is_cac or not head.options.has_context:
                raise ValueError("the t-SNE needs a +CAC model with a context-aware classifier (context != 'none')")
            f = head.features(*args)
            if weight is None:
                weight, _bias = head._classifier_weights()
            a_p = head.context_weights(*args)
            gt = torch.stack([s.gt_sem_seg.data.squeeze(0) for s in samples]).to(f.device)
            gt = resize_labels(gt, tuple(f.shape[-2:]))
            f = f.float().cpu().numpy()
            gt = gt.cpu().numpy().astype(np.int64)
            a_p = a_p.float().cpu().numpy()
            for j, i in enumerate(indices):
                feats[i], labels[i], context[i] = f[j], gt[j], a_p[j]
    return HeadView(tuple(feats), tuple(labels), weight.detach().float().cpu().numpy(), np.stack(context))


def sample_pixels(labels: Sequence[np.ndarray], per_class: int, rng: np.random.Generator,
                  ignore: int = IGNORE_INDEX) -> list[tuple[int, int, int]]:
    """``(image, y, x)`` positions: up to ``per_class`` random pixels of each class in each image
    (``labels``: one ``[h_b, w_b]`` map per image, of any sizes, or a stacked ``[B, h, w]`` array)."""
    picks: list[tuple[int, int, int]] = []
    for b, label in enumerate(labels):
        label = np.asarray(label)
        for c in np.unique(label):
            if c == ignore:
                continue
            ys, xs = np.nonzero(label == c)
            take = rng.permutation(len(ys))[:per_class]
            picks += [(b, int(ys[i]), int(xs[i])) for i in take]
    return picks


def unit_rows(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``x / |x|`` along ``axis`` (float64; zero vectors stay zero), as the cosine classifier sees it."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


@dataclass(frozen=True)
class ClassCosine:
    """How close one class's pixel features f are to C[k] and to A_p[k]: the mean cosine over the
    class's pixels in each image, then averaged over the ``images`` that contain the class.

    ``to_other_ap``: the same features against the A_p[k] of the *other* images with the class (None
    when only one image has it): above it, ``to_ap`` shows A_p[k] fitted to its own image.
    ``to_c_rest`` / ``to_ap_rest``: against the rows of the image's *other* classes (None when the
    class is alone in its images): ``to_c - to_c_rest`` is the margin that decides the argmax."""

    cls: int
    images: int
    pixels: int
    to_c: float
    to_ap: float
    to_other_ap: Optional[float]
    to_c_rest: Optional[float] = None
    to_ap_rest: Optional[float] = None


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def _present(labels: np.ndarray, ignore: int) -> list[int]:
    return [k for k in np.unique(labels).tolist() if k != ignore]


def _unit_feats(view: HeadView) -> list[np.ndarray]:
    """Each image's ``[D, h_b, w_b]`` features L2-normalised along D."""
    return [unit_rows(f, axis=0) for f in view.feats]


def cosine_stats(view: HeadView, ignore: int = IGNORE_INDEX) -> list[ClassCosine]:
    """Per class present in ``view.labels``, on all its labelled pixels (not a sample)."""
    f = _unit_feats(view)  # per image [D, h_b, w_b]
    c = unit_rows(view.classifier)  # [N, D]
    a = unit_rows(view.context)  # [B, N, D]
    n_images = view.images
    per: dict[int, list[dict]] = {}
    for b in range(n_images):
        present = _present(view.labels[b], ignore)
        for k in present:
            pix = f[b][:, view.labels[b] == k].T  # [P, D]
            rest = [j for j in present if j != k]
            per.setdefault(k, []).append({
                "pixels": len(pix), "c": float((pix @ c[k]).mean()), "ap": float((pix @ a[b, k]).mean()),
                "other_ap": _mean([float((pix @ a[o, k]).mean()) for o in range(n_images)
                                   if o != b and (view.labels[o] == k).any()]),
                "c_rest": _mean([float((pix @ c[j]).mean()) for j in rest]),
                "ap_rest": _mean([float((pix @ a[b, j]).mean()) for j in rest])})
    out = []
    for k in sorted(per):
        items = per[k]

        def avg(key: str) -> Optional[float]:
            return _mean([i[key] for i in items if i[key] is not None])

        out.append(ClassCosine(k, len(items), sum(i["pixels"] for i in items), avg("c"), avg("ap"),
                               avg("other_ap"), avg("c_rest"), avg("ap_rest")))
    return out


def row_similarity(view: HeadView, ignore: int = IGNORE_INDEX) -> dict[str, Optional[float]]:
    """Mean pairwise cosine between the rows of the classes present in an image, averaged over
    images: ``ap`` for that image's A_p rows, ``c`` for the same classes' C rows. Rows that share
    one direction (a high ``ap``) are drawn together by t-SNE whatever features they sit beside."""
    c = unit_rows(view.classifier)
    a = unit_rows(view.context)
    sims: dict[str, list[float]] = {"ap": [], "c": []}
    for b in range(view.images):
        present = _present(view.labels[b], ignore)
        if len(present) < 2:
            continue
        off = ~np.eye(len(present), dtype=bool)
        for key, rows in (("ap", a[b][present]), ("c", c[present])):
            sims[key].append(float((rows @ rows.T)[off].mean()))
    return {key: _mean(v) for key, v in sims.items()}


def mean_cosines(stats: Sequence[ClassCosine]) -> dict[str, Optional[float]]:
    """The per-class numbers averaged over classes (each class counts once)."""
    out: dict[str, Optional[float]] = {"classes": len(stats)}
    for key in ("to_c", "to_ap", "to_other_ap", "to_c_rest", "to_ap_rest"):
        out[key] = _mean([getattr(s, key) for s in stats if getattr(s, key) is not None])
    return out


def image_rows(view: HeadView, b: int, centred: bool = False,
               ignore: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """C's rows and image ``b``'s A_p rows as the cosine classifier sees them (L2-normalised), and the
    classes present in the image. ``centred``: each set minus its mean row over the classes present
    (:func:`cac.core.explain.centre_rows`), the part that differs between those classes: the removed
    mean shifts every present class's cosine logit at a pixel by the same amount."""
    from cac.core.explain import centre_rows

    present = _present(view.labels[b], ignore)
    c, a = unit_rows(view.classifier), unit_rows(view.context[b])
    if centred and present:
        c, a = centre_rows(c, present), centre_rows(a, present)
    return c, a, present


@dataclass(frozen=True)
class PairMeasure:
    """One (image, class) pair: mean cosine of the class's pixel features to C[k] and to the image's
    A_p[k], and each classifier's smallest margin to the image's other classes (own cosine minus the
    largest cosine to another present class's row; None when the class is alone in the image)."""

    image: int
    cls: int
    pixels: int
    cos_c: float
    cos_ap: float
    margin_c: Optional[float]
    margin_ap: Optional[float]


def pair_measures(view: HeadView, centred: bool = False, ignore: int = IGNORE_INDEX) -> list[PairMeasure]:
    """Every (image, class) pair of ``view`` in images with at least two classes present (centring
    over one class leaves nothing), on all of the class's labelled pixels; rows from
    :func:`image_rows`, L2-normalised again after centring."""
    f = _unit_feats(view)
    out = []
    for b in range(view.images):
        c, a, present = image_rows(view, b, centred, ignore)
        if len(present) < 2:
            continue
        c, a = unit_rows(c[present]), unit_rows(a[present])
        for i, k in enumerate(present):
            pix = f[b][:, view.labels[b] == k].T  # [P, D]
            cos_c, cos_a = (pix @ c.T).mean(0), (pix @ a.T).mean(0)  # to every present class's row
            others = [j for j in range(len(present)) if j != i]
            out.append(PairMeasure(b, k, len(pix), float(cos_c[i]), float(cos_a[i]),
                                   float(cos_c[i] - cos_c[others].max()), float(cos_a[i] - cos_a[others].max())))
    return out


def view_summary(measures: Sequence[PairMeasure]) -> dict:
    """Means over the (image, class) pairs and the shares (%) of pairs where A_p[k] is closer to the
    class's pixels than C[k] (``ap_closer``) and where its margin is larger (``ap_margin_larger``)."""
    margins = [m for m in measures if m.margin_c is not None and m.margin_ap is not None]

    def share(hits: int, n: int) -> Optional[float]:
        return 100.0 * hits / n if n else None

    return {"pairs": len(measures), "images": len({m.image for m in measures}),
            "cos_c": _mean([m.cos_c for m in measures]), "cos_ap": _mean([m.cos_ap for m in measures]),
            "ap_closer": share(sum(m.cos_ap > m.cos_c for m in measures), len(measures)),
            "margin_c": _mean([m.margin_c for m in margins]), "margin_ap": _mean([m.margin_ap for m in margins]),
            "ap_margin_larger": share(sum(m.margin_ap > m.margin_c for m in margins), len(margins))}


@dataclass(frozen=True)
class Points:
    """Rows of ``vectors`` (L2-normalised) with their kind (0 feature, 1 classifier C, 2 context A_p),
    class and image (-1 for C, which all images share)."""

    vectors: np.ndarray
    kind: np.ndarray
    cls: np.ndarray
    image: np.ndarray

    FEATURE, CLASSIFIER, CONTEXT = 0, 1, 2


def joint_points(view: HeadView, per_class: int = 100, seed: int = 0, centred: bool = False) -> Points:
    """Sampled pixel features, C's rows for the classes present and each image's A_p rows for the
    classes in that image, each L2-normalised, stacked for one joint embedding. ``centred``: the rows'
    class-specific part (:func:`image_rows`), which makes C's rows per image too."""
    rng = np.random.default_rng(seed)
    picks = sample_pixels(view.labels, per_class, rng)
    vecs = [view.feats[b][:, y, x] for b, y, x in picks]
    kind = [Points.FEATURE] * len(picks)
    cls = [int(view.labels[b][y, x]) for b, y, x in picks]
    image = [b for b, _, _ in picks]
    by_image = {b: sorted({k for k, i in zip(cls, image) if i == b}) for b in range(view.images)}
    if centred:
        rows = {b: image_rows(view, b, True) for b in by_image if len(by_image[b]) > 1}
        vecs += [rows[b][0][c] for b in rows for c in by_image[b]]
        kind += [Points.CLASSIFIER] * sum(len(by_image[b]) for b in rows)
        cls += [c for b in rows for c in by_image[b]]
        image += [b for b in rows for _ in by_image[b]]
    else:
        rows = {b: (None, view.context[b]) for b in by_image}
        present = sorted(set(cls))
        vecs += [view.classifier[c] for c in present]
        kind += [Points.CLASSIFIER] * len(present)
        cls += present
        image += [-1] * len(present)
    for b in rows:
        for c in by_image[b]:
            vecs.append(rows[b][1][c])
            kind.append(Points.CONTEXT)
            cls.append(c)
            image.append(b)
    return Points(unit_rows(np.stack(vecs)), np.asarray(kind), np.asarray(cls), np.asarray(image))


def tsne_2d(vectors: np.ndarray, random_state: int = 0, perplexity: Optional[float] = None) -> np.ndarray:
    """2-D t-SNE (scikit-learn, PCA init, fixed seed) of L2-normalised ``vectors`` (Euclidean distance
    between unit vectors is a function of their cosine: sqrt(2 - 2 cos))."""
    from sklearn.manifold import TSNE

    unit = unit_rows(vectors)
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
