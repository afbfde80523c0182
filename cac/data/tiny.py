"""Tiny stand-ins for ADE20K, COCO-Stuff 164K, Cityscapes and Pascal-Context 59 in their official
layouts, shaped like the real datasets (random pixels, scene-like labels).

For checking the paper preset end to end where the real data are not (CI, a laptop, a fresh GPU
node): mmseg's own dataset classes read them through the shipped configs, with
``--expected-train/--expected-val`` declaring the subset sizes. Nothing is learnt from them, but
everything a pipeline or an evaluation can trip over is there, scaled down:

- sizes and aspects vary per image as in the dataset (ADE20K from 1:2 to 2:1; COCO-Stuff 4:3 and
  Pascal-Context 4:3 in both orientations; Cityscapes all 2:1), so test pipelines that keep the
  aspect give every val image its own size, and no two consecutive images share one;
- labels use the dataset's convention (ADE20K and Pascal-Context: 0 = "other"/background, which
  mmseg's ``reduce_zero_label`` turns into 255; COCO-Stuff and Cityscapes: 255 unlabelled);
- each image holds a few of the classes, so most classes are absent from any one image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cac.data.real import REAL_DATASETS, default_real_root

__all__ = ["make_tiny", "tiny_sizes", "NUM_LABELS", "ASPECTS"]

# Label values as the official files hold them: ADE20K 0 = "other" (mmseg's reduce_zero_label maps
# it to 255) and 1..150; COCO-Stuff's *_labelTrainIds.png 0..170 and 255 unlabelled; Cityscapes'
# *_gtFine_labelTrainIds.png 0..18 and 255; Pascal-Context's 59-class masks 0 = background (reduced
# to 255 like ADE20K's) and 1..59.
NUM_LABELS = {"ade20k": (0, 150), "cocostuff": (0, 170), "cityscapes": (0, 18), "pascal-context": (0, 59)}
_UNLABELLED = {"cocostuff": 255, "cityscapes": 255}

# Width / height of the images, cycled image by image (each then jittered by up to 10%): the spread
# of the real datasets. ADE20K's photos run from portrait 1:2 to panoramic 2:1; COCO's and VOC's are
# mostly 4:3 landscape with a share of 3:4 portraits; Cityscapes' are all 2048 x 1024.
ASPECTS = {
    "ade20k": (4 / 3, 3 / 4, 2.0, 1.0, 0.5, 1.6),
    "cocostuff": (4 / 3, 3 / 4, 4 / 3, 1.5, 3 / 4),
    "pascal-context": (4 / 3, 3 / 4, 4 / 3, 4 / 3, 3 / 4),
    "cityscapes": (2.0,),
}


def tiny_sizes(name: str, count: int, size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``(height, width)`` of ``count`` images whose longer side is about ``size`` (Cityscapes:
    exactly ``size`` high and twice as wide); aspects cycle through :data:`ASPECTS` with jitter."""
    if name == "cityscapes":
        return [(size, 2 * size)] * count
    out = []
    for i in range(count):
        aspect = ASPECTS[name][i % len(ASPECTS[name])] * float(rng.uniform(0.9, 1.1))
        long_side = int(round(size * float(rng.uniform(0.85, 1.0))))
        short = max(16, int(round(long_side / max(aspect, 1 / aspect))))
        out.append((short, long_side) if aspect >= 1 else (long_side, short))
    return out


def _label_map(rng: np.random.Generator, shape: tuple[int, int], low: int, high: int,
               unlabelled: int | None) -> np.ndarray:
    """A background class and a few rectangular objects of other classes: 3–8 of the dataset's
    classes per image, as real scenes hold a handful of their 19–171."""
    h, w = shape
    label = np.full((h, w), rng.integers(low, high + 1), dtype=np.uint8)
    for _ in range(int(rng.integers(2, 8))):
        oh, ow = int(rng.integers(max(2, h // 8), max(3, h // 2))), int(rng.integers(max(2, w // 8), max(3, w // 2)))
        y0, x0 = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
        label[y0:y0 + oh, x0:x0 + ow] = rng.integers(low, high + 1)
    if unlabelled is not None:
        label[rng.random(label.shape) < 0.02] = unlabelled
    return label


def make_tiny(name: str, out: str | Path | None = None, train: int = 6, val: int = 2, size: int = 96,
              seed: int = 0) -> Path:
    """Write ``train`` + ``val`` image/annotation pairs for dataset ``name`` in its official layout
    under ``out`` (a data folder; default ``$CAC_DATA_ROOT`` or data/), of the sizes
    :func:`tiny_sizes` gives for ``size``. Cityscapes' go in a city folder; Pascal-Context's split
    lists name them. Returns the data_root. Deterministic in ``seed``."""
    layout = REAL_DATASETS[name]
    root = (Path(out) / layout.subdir) if out is not None else default_real_root(name)
    low, high = NUM_LABELS[name]
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        spec = layout.splits[split]
        city = "tiny/" if spec.recursive else ""
        (root / spec.img_dir / city).mkdir(parents=True, exist_ok=True)
        (root / spec.ann_dir / city).mkdir(parents=True, exist_ok=True)
        stems = [f"tiny_{split}_{i:05d}" for i in range(count)]
        for stem, shape in zip(stems, tiny_sizes(name, count, size, rng)):
            image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / spec.img_dir / f"{city}{stem}{spec.img_suffix}", quality=90)
            Image.fromarray(_label_map(rng, shape, low, high, _UNLABELLED.get(name))).save(
                root / spec.ann_dir / f"{city}{stem}{spec.ann_suffix}")
        if spec.split_file:
            (root / spec.split_file).parent.mkdir(parents=True, exist_ok=True)
            (root / spec.split_file).write_text("".join(f"{s}\n" for s in stems))
    return root
