"""Tiny stand-ins for ADE20K, COCO-Stuff 164K, Cityscapes and Pascal-Context 59 in their official
layouts (random images and labels).

For checking the paper preset end to end where the real data are not (CI, a laptop, a fresh GPU
node): mmseg's own dataset classes read them through the shipped configs, with
``--expected-train/--expected-val`` declaring the subset sizes. Nothing is learnt from them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cac.data.real import REAL_DATASETS, default_real_root

__all__ = ["make_tiny", "NUM_LABELS"]

# Label values as the official files hold them: ADE20K 0 = "other" (mmseg's reduce_zero_label maps
# it to 255) and 1..150; COCO-Stuff's *_labelTrainIds.png 0..170 and 255 unlabelled; Cityscapes'
# *_gtFine_labelTrainIds.png 0..18 and 255; Pascal-Context's 59-class masks 0 = background (reduced
# to 255 like ADE20K's) and 1..59.
NUM_LABELS = {"ade20k": (0, 150), "cocostuff": (0, 170), "cityscapes": (0, 18), "pascal-context": (0, 59)}
_UNLABELLED = {"cocostuff": 255, "cityscapes": 255}
_ASPECT = {"cityscapes": 2}  # width / height of the official images (Cityscapes: 2048 x 1024)


def _label_map(rng: np.random.Generator, size: int, aspect: int, low: int, high: int,
               unlabelled: int | None) -> np.ndarray:
    """Rectangles of random classes over a background class: a few classes per image, as real scenes."""
    label = np.full((size, size * aspect), rng.integers(low, high + 1), dtype=np.uint8)
    for _ in range(int(rng.integers(3, 9))):
        y0, x0 = rng.integers(0, size - 8, 2)
        h, w = rng.integers(8, size // 2, 2)
        label[y0:y0 + h, x0 * aspect:(x0 + w) * aspect] = rng.integers(low, high + 1)
    if unlabelled is not None:
        label[rng.random(label.shape) < 0.02] = unlabelled
    return label


def make_tiny(name: str, out: str | Path | None = None, train: int = 6, val: int = 2, size: int = 96,
              seed: int = 0) -> Path:
    """Write ``train`` + ``val`` random image/annotation pairs for dataset ``name`` in its official
    layout under ``out`` (a data folder; default ``$CAC_DATA_ROOT`` or data/), ``size`` pixels high.
    Cityscapes' go in a city folder; Pascal-Context's split lists name them. Returns the data_root.
    Deterministic in ``seed``."""
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
        for stem in stems:
            image = rng.integers(0, 256, (size, size * _ASPECT.get(name, 1), 3), dtype=np.uint8)
            Image.fromarray(image).save(root / spec.img_dir / f"{city}{stem}{spec.img_suffix}", quality=90)
            Image.fromarray(_label_map(rng, size, _ASPECT.get(name, 1), low, high, _UNLABELLED.get(name))).save(
                root / spec.ann_dir / f"{city}{stem}{spec.ann_suffix}")
        if spec.split_file:
            (root / spec.split_file).parent.mkdir(parents=True, exist_ok=True)
            (root / spec.split_file).write_text("".join(f"{s}\n" for s in stems))
    return root
