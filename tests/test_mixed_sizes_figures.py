"""The Fig. 6 masks and the t-SNE's head view on val batches whose images have different sizes.

Real test pipelines (ADE20K, COCO-Stuff, Pascal-Context) keep each image's aspect, so a collated batch
of val images holds several sizes and mmseg's ``SegDataPreProcessor`` refuses to stack it in test
mode. ``predict_masks`` and ``head_view`` run such a batch one size at a time: every image must come
out as it does when run alone, in the batch's order, at its own size.
"""
from __future__ import annotations

import numpy as np
import pytest

# (image h, w as the test pipeline resized it) and (the original size, which the label map keeps).
# Images 0 and 3 share a size (one forward pass, not next to each other in the batch); 1 and 2 have
# sizes and aspects of their own.
SIZES = [((48, 64), (96, 128)), ((64, 48), (64, 48)), ((40, 72), (60, 108)), ((48, 64), (96, 128))]
BLOCK = 16


# -- a real +CAC segmentor and loader-style items --------------------------------------------------
@pytest.fixture(scope="module")
def model():
    """fcn-slim-r18 + CAC (the paper's defaults), random init, eval mode, on the CPU."""
    import torch

    from cac.mmseg.config import resolve_config
    from cac.mmseg.params import build_model

    torch.manual_seed(0)
    cfg = resolve_config("fcn-slim-r18", "quick", cac=True)
    return build_model(cfg["model"]).eval()


def _num_classes(model) -> int:
    import torch

    head = model.decode_head
    return (head[-1] if isinstance(head, torch.nn.ModuleList) else head).num_classes


def _item(i: int, num_classes: int) -> dict:
    """Val item ``i`` as a test pipeline packs it: a uint8 ``[3, h, w]`` image and a SegDataSample whose
    ``gt_sem_seg`` keeps the original size (scene-like blocks of 4 classes, a few ignored pixels)."""
    import torch
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    (h, w), (oh, ow) = SIZES[i]
    g = torch.Generator().manual_seed(100 + i)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    present = torch.randperm(num_classes, generator=g)[:4]
    cells = present[torch.randint(0, len(present), (-(-oh // BLOCK), -(-ow // BLOCK)), generator=g)]
    label = cells.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:oh, :ow].clone()
    label[torch.rand(oh, ow, generator=g) < 0.05] = 255
    sample = SegDataSample()
    sample.set_metainfo(dict(img_shape=(h, w), ori_shape=(oh, ow), pad_shape=(h, w), padding_size=[0, 0, 0, 0],
                             scale_factor=(w / ow, h / oh), flip=False, img_path=f"val_{i}.png"))
    sample.gt_sem_seg = PixelData(data=label[None])
    return dict(inputs=image, data_samples=sample)


def _batch(model, indices) -> dict:
    """A fresh collated batch (mmengine ``pseudo_collate``: lists of images and samples) of ``indices``."""
    from mmengine.dataset import pseudo_collate

    return pseudo_collate([_item(i, _num_classes(model)) for i in indices])


class _ValSet:
    """Just enough of a dataset for :func:`analysis.figures.val_batch` (``dataset[i]``)."""

    def __init__(self, model):
        self.model = model

    def __len__(self) -> int:
        return len(SIZES)

    def __getitem__(self, i: int) -> dict:
        return _item(i, _num_classes(self.model))


ALL = list(range(len(SIZES)))


def test_the_batch_really_mixes_sizes(model):
    """The premise: mmseg cannot stack this batch in test mode, and it splits into three size groups."""
    from cac.mmseg.evaluation import size_groups

    batch = _batch(model, ALL)
    with pytest.raises(AssertionError, match="same"):
        model.data_preprocessor(batch, False)
    assert [idx for idx, _ in size_groups(batch)] == [[0, 3], [1], [2]]


# -- Fig. 6: predict_masks ---------------------------------------------------------------------------
def test_predict_masks_on_a_mixed_size_batch_equals_each_image_alone(model):
    from analysis.figures import predict_masks

    mixed = predict_masks(model, _batch(model, ALL))
    assert len(mixed) == len(SIZES)
    for i, (mask, (_, ori)) in enumerate(zip(mixed, SIZES)):
        gt = _item(i, _num_classes(model))["data_samples"].gt_sem_seg.data[0]
        assert mask.shape == ori == tuple(gt.shape), i  # the mask is at its own image's label size
        assert mask.dtype == np.int64
        alone = predict_masks(model, _batch(model, [i]))
        assert len(alone) == 1
        np.testing.assert_array_equal(mask, alone[0], err_msg=f"image {i}")
    # the batch's order, not the groups': a shuffled batch gives the same masks, shuffled
    order = [2, 0, 3, 1]
    shuffled = predict_masks(model, _batch(model, order))
    for pos, i in enumerate(order):
        np.testing.assert_array_equal(shuffled[pos], mixed[i])


# -- t-SNE: head_view and its consumers -----------------------------------------------------------------
@pytest.fixture(scope="module")
def views(model):
    """``(mixed-size view of all images, [each image's view alone])``."""
    from tsne.embed import head_view

    return head_view(model, _batch(model, ALL)), [head_view(model, _batch(model, [i])) for i in ALL]


def test_head_view_of_a_mixed_size_batch_equals_each_image_alone(model, views):
    import torch
    import torch.nn.functional as F

    mixed, alone = views
    assert mixed.images == len(SIZES) and len(mixed.feats) == len(mixed.labels) == len(mixed.context)
    d = mixed.classifier.shape[1]
    for i, ((h, w), _) in enumerate(SIZES):
        assert mixed.feats[i].shape == (d, h // 4, w // 4), i  # output stride 4, each image its own size
        assert mixed.labels[i].shape == (h // 4, w // 4)
        one = alone[i]
        assert one.images == 1
        np.testing.assert_allclose(mixed.feats[i], one.feats[0], rtol=1e-5, atol=1e-5, err_msg=f"feats {i}")
        np.testing.assert_array_equal(mixed.labels[i], one.labels[0], err_msg=f"labels {i}")
        np.testing.assert_allclose(mixed.context[i], one.context[0], rtol=1e-5, atol=1e-5, err_msg=f"A_p {i}")
        np.testing.assert_array_equal(mixed.classifier, one.classifier)
        # the labels are the original-size ground truth nearest-resized to the features
        gt = _item(i, _num_classes(model))["data_samples"].gt_sem_seg.data[0]
        small = F.interpolate(gt[None, None].float(), size=(h // 4, w // 4), mode="nearest")[0, 0]
        np.testing.assert_array_equal(mixed.labels[i], small.to(torch.int64).numpy())


def test_cosine_measures_of_a_mixed_size_view_combine_each_image_alone(views):
    from tsne.embed import cosine_stats, mean_cosines, pair_measures, row_similarity

    mixed, alone = views
    stats = {s.cls: s for s in cosine_stats(mixed)}
    per_image = [{s.cls: s for s in cosine_stats(one)} for one in alone]
    assert set(stats) == set().union(*per_image) and stats
    for k, s in stats.items():
        mine = [p[k] for p in per_image if k in p]
        assert s.images == len(mine) and s.pixels == sum(m.pixels for m in mine)
        assert s.pixels == sum(int((lab == k).sum()) for lab in mixed.labels)
        assert s.to_c == pytest.approx(np.mean([m.to_c for m in mine]), abs=1e-6)
        assert s.to_ap == pytest.approx(np.mean([m.to_ap for m in mine]), abs=1e-6)
        assert s.to_c_rest == pytest.approx(np.mean([m.to_c_rest for m in mine]), abs=1e-6)
        assert s.to_ap_rest == pytest.approx(np.mean([m.to_ap_rest for m in mine]), abs=1e-6)
        assert (s.to_other_ap is None) == (len(mine) == 1)
    assert mean_cosines(list(stats.values()))["classes"] == len(stats)
    assert set(row_similarity(mixed)) == {"ap", "c"}
    for centred in (False, True):
        got = pair_measures(mixed, centred=centred)
        want = [(i, m) for i, one in enumerate(alone) for m in pair_measures(one, centred=centred)]
        assert [(m.image, m.cls, m.pixels) for m in got] == [(i, m.cls, m.pixels) for i, m in want]
        for g, (_, w) in zip(got, want):
            assert (g.cos_c, g.cos_ap, g.margin_c, g.margin_ap) == \
                pytest.approx((w.cos_c, w.cos_ap, w.margin_c, w.margin_ap), abs=1e-6)


def test_joint_points_of_a_mixed_size_view(views):
    from tsne.embed import Points, joint_points, sample_pixels, tsne_2d, unit_rows

    mixed, _ = views
    pts = joint_points(mixed, per_class=5, seed=0)
    picks = sample_pixels(mixed.labels, 5, np.random.default_rng(0))
    feat = pts.kind == Points.FEATURE
    assert feat.sum() == len(picks) == sum(min(5, int((lab == k).sum())) for lab in mixed.labels
                                           for k in np.unique(lab) if k != 255)
    assert set(pts.image[feat].tolist()) == set(range(len(SIZES)))
    for row, (b, y, x) in zip(pts.vectors[feat], picks):  # each feature is its own image's pixel
        assert 0 <= y < mixed.labels[b].shape[0] and 0 <= x < mixed.labels[b].shape[1]
        np.testing.assert_allclose(row, unit_rows(mixed.feats[b][:, y, x]), atol=1e-12)
    assert pts.cls[feat].tolist() == [int(mixed.labels[b][y, x]) for b, y, x in picks]
    ctx = pts.kind == Points.CONTEXT
    assert sorted(zip(pts.image[ctx].tolist(), pts.cls[ctx].tolist())) == sorted(
        {(b, int(mixed.labels[b][y, x])) for b, y, x in picks})
    assert np.allclose(np.linalg.norm(pts.vectors, axis=1), 1.0)
    centred = joint_points(mixed, per_class=5, seed=0, centred=True)
    assert (centred.kind == Points.CLASSIFIER).any() and np.isfinite(centred.vectors).all()
    xy = tsne_2d(pts.vectors, random_state=0)
    assert xy.shape == (len(pts.vectors), 2) and np.isfinite(xy).all()


def test_view_measures_on_mixed_size_val_images(model):
    """make_tsne's measures over val images of several sizes: pairs name the val index."""
    from tsne.embed import head_view, pair_measures
    from tsne.make_tsne import view_measures

    indices = [3, 1, 2, 0]
    out = view_measures(model, _ValSet(model), indices)
    alone = {i: head_view(model, _batch(model, [i])) for i in indices}
    for name in ("raw", "centred"):
        want = [(i, m.cls, m.pixels) for i in indices for m in pair_measures(alone[i], centred=name == "centred")]
        assert [(p["image"], p["cls"], p["pixels"]) for p in out[name]["pairs_list"]] == want
        assert out[name]["pairs"] == len(want) and out[name]["caption"].startswith(name)


# -- the consumers on hand-made per-image arrays (numpy only) ------------------------------------------
def _hand_view(seed: int = 0):
    """Three images of 3x4, 5x2 and 3x4 features (D = 6, 4 classes), with ignored pixels."""
    from tsne.embed import HeadView

    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (5, 2), (3, 4)]
    labels = [rng.integers(0, 4, size=s) for s in shapes]
    labels[0][0, 0] = labels[1][4, 1] = 255
    labels[2][:] = np.where(labels[2] == 3, 2, labels[2])  # image 2 lacks class 3
    feats = [rng.normal(size=(6, *s)) for s in shapes]
    return HeadView(feats, labels, rng.normal(size=(4, 6)), rng.normal(size=(3, 4, 6)))


def test_consumers_iterate_per_image_on_hand_made_mixed_sizes():
    from tsne.embed import (HeadView, Points, cosine_stats, image_rows, joint_points, pair_measures,
                            row_similarity, sample_pixels, unit_rows)

    view = _hand_view()
    stats = cosine_stats(view)
    assert len(view.labels) == 3 and [f.shape for f in view.feats] == [(6, 3, 4), (6, 5, 2), (6, 3, 4)]
    # cosine_stats by hand: per image the mean cosine over the class's pixels, then over images
    c, a = unit_rows(view.classifier), unit_rows(view.context)
    assert [s.cls for s in stats] == [0, 1, 2, 3]
    for s in stats:
        per = [(unit_rows(view.feats[b][:, view.labels[b] == s.cls].T), b) for b in range(3)
               if (view.labels[b] == s.cls).any()]
        assert s.images == len(per) and s.pixels == sum(len(p) for p, _ in per)
        assert s.to_c == pytest.approx(np.mean([(p @ c[s.cls]).mean() for p, _ in per]))
        assert s.to_ap == pytest.approx(np.mean([(p @ a[b, s.cls]).mean() for p, b in per]))
    # each image's numbers are those of the image on its own
    for b in range(3):
        one = HeadView([view.feats[b]], [view.labels[b]], view.classifier, view.context[b:b + 1])
        got = [m for m in pair_measures(view, centred=True) if m.image == b]
        want = pair_measures(one, centred=True)
        assert [m.cls for m in got] == [m.cls for m in want] and len(got) > 0
        assert [v for m in got for v in (m.cos_c, m.cos_ap, m.margin_c, m.margin_ap)] == \
            pytest.approx([v for m in want for v in (m.cos_c, m.cos_ap, m.margin_c, m.margin_ap)])
        assert image_rows(view, b)[2] == image_rows(one, 0)[2]
    assert row_similarity(view)["ap"] is not None
    picks = sample_pixels(view.labels, 2, np.random.default_rng(1))
    assert all(view.labels[b][y, x] != 255 for b, y, x in picks)
    pts = joint_points(view, per_class=2, seed=1)
    assert (pts.kind == Points.FEATURE).sum() == len(picks)
    assert set(pts.image[pts.kind == Points.CONTEXT].tolist()) == {0, 1, 2}


def test_stacked_arrays_give_the_same_numbers_as_per_image_lists():
    """A same-size batch stacked ``[B, D, h, w]`` (the old layout) is split into its images, with
    every measure unchanged."""
    from tsne.embed import HeadView, cosine_stats, joint_points, pair_measures, row_similarity

    rng = np.random.default_rng(3)
    feats, labels = rng.normal(size=(3, 5, 4, 4)), rng.integers(0, 3, size=(3, 4, 4))
    classifier, context = rng.normal(size=(3, 5)), rng.normal(size=(3, 3, 5))
    stacked = HeadView(feats, labels, classifier, context)
    listed = HeadView(list(feats), list(labels), classifier, context)
    assert cosine_stats(stacked) == cosine_stats(listed)
    assert row_similarity(stacked) == row_similarity(listed)
    assert pair_measures(stacked, centred=True) == pair_measures(listed, centred=True)
    a, b = joint_points(stacked, per_class=3), joint_points(listed, per_class=3)
    assert np.array_equal(a.vectors, b.vectors) and np.array_equal(a.image, b.image)
    assert isinstance(stacked.feats, tuple) and len(stacked.feats) == 3 and stacked.feats[0].shape == (5, 4, 4)


def test_head_view_rejects_features_and_labels_that_do_not_match():
    from tsne.embed import HeadView

    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="image 1"):
        HeadView([rng.normal(size=(4, 3, 3)), rng.normal(size=(4, 2, 5))],  # image 1: labels 5x2, feats 2x5
                 [np.zeros((3, 3), int), np.zeros((5, 2), int)], rng.normal(size=(2, 4)), rng.normal(size=(2, 2, 4)))
    with pytest.raises(ValueError, match="one of each per image"):
        HeadView([rng.normal(size=(4, 3, 3))], [np.zeros((3, 3), int)], rng.normal(size=(2, 4)),
                 rng.normal(size=(2, 2, 4)))
