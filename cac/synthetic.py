"""Seeded synthetic batches for tests and benchmarks (one builder, so every check sees the same data).

Labels look like scenes rather than noise: each image holds a few classes in square blocks and a share
of ignored pixels, which is what the per-class terms (Eq. 1, Eq. 11) are sensitive to.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["scene_labels", "kl_inputs", "seg_batch", "data_samples", "mixed_seg_batch", "confident_logits"]


def scene_labels(batch: int, size: int, num_classes: int, *, per_image: int = 8, block: int = 8,
                 ignore_frac: float = 0.1, ignore_index: int = 255,
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """``[B, size, size]`` long labels: ``per_image`` classes per image in ``block``² squares, about
    ``ignore_frac`` of the pixels set to ``ignore_index``."""
    g = generator or torch.Generator().manual_seed(0)
    per_image = min(per_image, num_classes)
    cells = -(-size // block)
    labels = torch.empty(batch, size, size, dtype=torch.long)
    for b in range(batch):
        present = torch.randperm(num_classes, generator=g)[:per_image]
        grid = present[torch.randint(0, per_image, (cells, cells), generator=g)]
        labels[b] = grid.repeat_interleave(block, 0).repeat_interleave(block, 1)[:size, :size]
    labels[torch.rand(batch, size, size, generator=g) < ignore_frac] = ignore_index
    return labels


def kl_inputs(batch: int, classes: int, size: int, per_image: int, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Student and teacher logits ``[B, N, size, size]`` and scene-like labels (the KL loss's inputs)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, size, size, generator=g, dtype=dtype) * 2
    teacher = torch.randn(batch, classes, size, size, generator=g, dtype=dtype) * 3
    return student, teacher, scene_labels(batch, size, classes, per_image=per_image, generator=g)


def data_samples(size: int, batch: int, labels: Optional[Tensor] = None) -> list:
    """mmseg ``SegDataSample``s for ``size``² images, with ``gt_sem_seg`` from ``labels [B, H, W]``."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    out = []
    for b in range(batch):
        s = SegDataSample()
        s.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                            padding_size=[0, 0, 0, 0]))
        if labels is not None:
            s.gt_sem_seg = PixelData(data=labels[b][None])
        out.append(s)
    return out


def seg_batch(size: int, batch: int, num_classes: Optional[int] = None, *, per_image: int = 8, block: int = 16,
              ignore_frac: float = 0.1, seed: int = 0) -> dict:
    """A segmentor batch ``dict(inputs=[uint8 3 x size x size], data_samples=[...])`` as mmseg's data
    loader yields it (``model.train_step`` / ``test_step`` / ``data_preprocessor`` take it). With
    ``num_classes``, every sample carries scene-like ``gt_sem_seg``; without, it is an inference batch."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g) for _ in range(batch)]
    labels = None
    if num_classes is not None:
        labels = scene_labels(batch, size, num_classes, per_image=per_image, block=block,
                              ignore_frac=ignore_frac, generator=g)
    return dict(inputs=images, data_samples=data_samples(size, batch, labels))


def mixed_seg_batch(shapes: list[tuple[int, int]], num_classes: int, *, per_image: int = 3, label_scale: int = 1,
                    seed: int = 0) -> dict:
    """A test-pipeline batch of images of the given ``(h, w)`` shapes (as ADE20K's aspect-keeping test
    resize leaves them), each with scene-like labels at ``label_scale`` times its size (the original
    image's, which is where mmseg's test pipeline loads the annotation)."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(seed)
    images, samples = [], []
    for h, w in shapes:
        images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        side = max(h, w) * label_scale
        label = scene_labels(1, side, num_classes, per_image=per_image, block=max(4, side // 6), generator=g)
        s = SegDataSample()
        s.set_metainfo(dict(img_shape=(h, w), ori_shape=(h * label_scale, w * label_scale), pad_shape=(h, w),
                            padding_size=[0, 0, 0, 0]))
        s.gt_sem_seg = PixelData(data=label[:, :h * label_scale, :w * label_scale].clone())
        samples.append(s)
    return dict(inputs=images, data_samples=samples)


def confident_logits(batch: int, classes: int, size: int, gap: float, *, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """``[B, N, size, size]`` logits of a confident network: each pixel's top class (from a few present
    per image) ``gap`` above every other class, plus unit noise; classes absent from an image are never
    on top, so their soft masses are of the order ``HW * exp(-gap)``."""
    g = torch.Generator().manual_seed(seed)
    labels = scene_labels(batch, size, classes, per_image=4, block=max(2, size // 8), ignore_frac=0.0, generator=g)
    logits = torch.randn(batch, classes, size, size, generator=g, dtype=torch.float64)
    logits.scatter_add_(1, labels.unsqueeze(1), torch.full((batch, 1, size, size), float(gap), dtype=torch.float64))
    return logits.to(dtype)
