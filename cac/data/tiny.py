"""Tiny stand-ins for ADE20K and COCO-Stuff 164K in their official layouts (random images and labels).

For checking the paper preset end to end where the real data are not (CI, a laptop, a fresh GPU
node): mmseg's own ``ADE20KDataset`` / ``COCOStuffDataset`` read them through the shipped configs,
with ``--expected-train/--expected-val`` declaring the subset sizes. Nothing is learnt from them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cac.data.real import REAL_DATASETS, default_real_root

__all__ = ["make_tiny", "NUM_LABELS"]

# Label values as the official files hold them: ADE20K 0 = "other" (mmseg's reduce_zero_label maps
# it to 255) and 1..150; COCO-Stuff's *_labelTrainIds.png 0..170 and 255 unlabelled.
NUM_LABELS = {"ade20k": (0, 150), "cocostuff": (0, 170)}


def _label_map(rng: np.random.Generator, size: int, low: int, high: int, unlabelled: int | None) -> np.ndarray:
    """Rectangles of random classes over a background class: a few classes per image, as real scenes."""
    label = np.full((size, size), rng.integers(low, high + 1), dtype=np.uint8)
    for _ in range(int(rng.integers(3, 9))):
        y0, x0 = rng.integers(0, size - 8, 2)
        h, w = rng.integers(8, size // 2, 2)
        label[y0:y0 + h, x0:x0 + w] = rng.integers(low, high + 1)
    if unlabelled is not None:
        label[rng.random((size, size)) < 0.02] = unlabelled
    return label


def make_tiny(name: str, out: str | Path | None = None, train: int = 6, val: int = 2, size: int = 96,
              seed: int = 0) -> Path:
    """Write ``train`` + ``val`` random image/annotation pairs for dataset ``name`` in its official
    layout under ``out`` (a data folder; default ``$CAC_DATA_ROOT`` or data/). Returns the data_root.
    Deterministic in ``seed``."""
    layout = REAL_DATASETS[name]
    root = (Path(out) / layout.subdir) if out is not None else default_real_root(name)
    low, high = NUM_LABELS[name]
    unlabelled = 255 if name == "cocostuff" else None
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        spec = layout.splits[split]
        (root / spec.img_dir).mkdir(parents=True, exist_ok=True)
        (root / spec.ann_dir).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            stem = f"tiny_{split}_{i:05d}"
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / spec.img_dir / f"{stem}{spec.img_suffix}", quality=90)
            Image.fromarray(_label_map(rng, size, low, high, unlabelled)).save(
                root / spec.ann_dir / f"{stem}{spec.ann_suffix}")
    return root
