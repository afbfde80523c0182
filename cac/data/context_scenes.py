"""context-scenes: a generated segmentation benchmark in which a pixel's look depends on its image.

No real data can be downloaded here, so the project makes a small benchmark where the paper's
premise holds by construction (see ``/work/shared/notes/embedded-benchmark.md``):

* every image is drawn from one of four *scene types* (12 classes in all); a scene fixes which classes
  can appear (co-occurrence), an illumination cast and a scene-specific shift of each class's colour;
* inside an image every class gets its own random colour offset (sigma 0.15 in RGB in [0, 1]), so the
  same class forms a different cluster in every image and one fixed classifier must straddle them;
* classes also carry a faint texture shared with other classes (stripes, checks, grain, flat) whose
  orientation and phase change per image, plus sensor noise, so colour alone is not the whole story;
* label maps are warped Voronoi cells (several per image), so a small CNN's ~20 px receptive field
  sees one or two regions, never the whole scene.

The benchmark's definition (classes, colours, scenes, textures) is fixed by ``GENERATOR_VERSION``;
``seed`` only picks the images. Any change to what is generated must bump the version.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from cac.data.real import DatasetError, data_dir

__all__ = ["GENERATOR_VERSION", "NAME", "PRESETS", "CLASSES", "PALETTE", "SCENES", "IGNORE_INDEX",
           "generate", "ensure", "data_version", "default_root", "render_image"]

GENERATOR_VERSION = "2"
NAME = "context-scenes"
IGNORE_INDEX = 255

PRESETS: dict[str, dict] = {
    # CI scale: seconds to generate, enough for a smoke train/eval.
    "quick": {"size": 64, "train": 64, "val": 32},
    # Benchmark scale: a larger val set is cheap and cuts seed noise in mIoU.
    "bench": {"size": 64, "train": 800, "val": 400},
}

# name, base colour (RGB in [0, 1]), texture family. Textures are shared by several classes on
# purpose: a unique texture per class would make the task solvable without any context.
# Version 2 has 12 classes whose base colours lie >= 0.2 apart, median 0.63 (version 1 had 18 classes,
# >= 0.1, median 0.45: with per-image offsets of sigma 0.15 many pairs overlapped, and the slim
# model's mIoU after the bench schedule varied by +-3.5 across seeds; see README "context-scenes").
_CLASS_TABLE: tuple[tuple[str, tuple[float, float, float], str], ...] = (
    ("sky", (0.50, 0.70, 0.95), "flat"),
    ("building", (0.65, 0.45, 0.35), "checks"),
    ("road", (0.30, 0.30, 0.32), "grain"),
    ("car", (0.85, 0.15, 0.15), "flat"),
    ("person", (0.90, 0.65, 0.50), "fine"),
    ("tree", (0.10, 0.40, 0.15), "grain"),
    ("grass", (0.50, 0.85, 0.25), "fine"),
    ("water", (0.10, 0.25, 0.60), "coarse"),
    ("sand", (0.90, 0.85, 0.55), "grain"),
    ("wall", (0.85, 0.85, 0.80), "flat"),
    ("floor", (0.45, 0.25, 0.10), "coarse"),
    ("bed", (0.55, 0.30, 0.70), "fine"),
)

CLASSES: tuple[str, ...] = tuple(name for name, _, _ in _CLASS_TABLE)
PALETTE: list[list[int]] = [[round(255 * v) for v in rgb] for _, rgb, _ in _CLASS_TABLE]
_BASE = np.array([rgb for _, rgb, _ in _CLASS_TABLE], dtype=np.float64)
_TEXTURE_OF = tuple(tex for _, _, tex in _CLASS_TABLE)

# family -> (period in px, amplitude); amplitudes stay near the noise level (mild cues only).
_TEXTURES: dict[str, tuple[float, float]] = {
    "flat": (0.0, 0.0),
    "grain": (0.0, 0.05),
    "fine": (4.0, 0.05),
    "checks": (6.0, 0.07),  # a product of two sines: larger peak for a similar contrast
    "coarse": (10.0, 0.06),
}

# Scene types: class -> relative frequency, and an illumination gain per RGB channel.
SCENES: tuple[dict[str, Any], ...] = (
    {"name": "street", "illumination": (1.00, 0.98, 0.95),
     "classes": {"sky": 3, "building": 3, "road": 3, "car": 2, "person": 2, "tree": 1}},
    {"name": "park", "illumination": (0.95, 1.05, 0.90),
     "classes": {"sky": 3, "tree": 3, "grass": 3, "person": 2, "water": 1, "road": 1}},
    {"name": "beach", "illumination": (1.10, 1.05, 0.90),
     "classes": {"sky": 3, "water": 3, "sand": 3, "person": 2, "tree": 1}},
    # "building": the one seen through the window
    {"name": "bedroom", "illumination": (1.00, 0.90, 0.75),
     "classes": {"wall": 3, "floor": 3, "bed": 3, "person": 1, "building": 1}},
)

# Scene-specific colour shift of each class, fixed by the version (not by the dataset seed), so
# "wall" in a bedroom and "wall" in a kitchen are two different, stable distributions.
_SCENE_SHIFT = np.random.default_rng(20230207).normal(0.0, 0.08, size=(len(SCENES), len(CLASSES), 3))

_IMAGE_CLASS_SIGMA = 0.15   # per-image, per-class colour offset (the regime in the notes)
_BRIGHTNESS_SIGMA = 0.05    # per-image exposure jitter on top of the scene's illumination
_NOISE_SIGMA = 0.03         # per-pixel sensor noise
_SPLIT_CODE = {"train": 0, "val": 1}


def _preset(preset: str) -> dict:
    """The preset's sizes; ValueError names the bad preset and lists the valid ones."""
    if preset not in PRESETS:
        raise ValueError(f"unknown context-scenes preset {preset!r}; valid presets: "
                         f"{', '.join(PRESETS)}")
    return PRESETS[preset]


def data_version(preset: str) -> str:
    """Identifier of the generated data, e.g. ``context-scenes-v2-quick``, logged with every run."""
    _preset(preset)
    return f"{NAME}-v{GENERATOR_VERSION}-{preset}"


def default_root(preset: str) -> Path:
    """``<data dir>/context-scenes/<preset>``; the data dir is ``$CAC_DATA_ROOT`` or ``<repo>/data``."""
    _preset(preset)
    return data_dir() / NAME / preset


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """One generator per image, so an image never depends on generation order or split sizes."""
    return np.random.default_rng([int(GENERATOR_VERSION), seed, _SPLIT_CODE[split], index])


def _scene_classes(scene: int) -> tuple[np.ndarray, np.ndarray]:
    """Class indices of a scene and their sampling probabilities."""
    items = SCENES[scene]["classes"]
    ids = np.array([CLASSES.index(name) for name in items])
    weights = np.array(list(items.values()), dtype=np.float64)
    return ids, weights / weights.sum()


def _voronoi_cells(rng: np.random.Generator, size: int, n_cells: int) -> np.ndarray:
    """Cell index per pixel of a Voronoi diagram drawn on softly warped coordinates."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    amp = rng.uniform(1.0, 4.0, size=2)
    period = rng.uniform(20.0, 48.0, size=2)
    phase = rng.uniform(0.0, 2 * np.pi, size=2)
    # the warp bends the straight Voronoi edges so boundaries look less synthetic
    wx = xx + amp[0] * np.sin(2 * np.pi * yy / period[0] + phase[0])
    wy = yy + amp[1] * np.sin(2 * np.pi * xx / period[1] + phase[1])
    seeds = rng.uniform(0.0, size, size=(n_cells, 2))
    d2 = (wy[..., None] - seeds[:, 0]) ** 2 + (wx[..., None] - seeds[:, 1]) ** 2
    return np.argmin(d2, axis=-1)


def _cell_labels(rng: np.random.Generator, scene: int, n_cells: int) -> np.ndarray:
    """Class of each cell: 3-5 of the scene's classes, each present in at least one cell."""
    ids, probs = _scene_classes(scene)
    n_present = int(rng.integers(3, min(5, len(ids)) + 1))
    present = rng.choice(ids, size=n_present, replace=False, p=probs)
    prob_of = dict(zip(ids.tolist(), probs))
    p_present = np.array([prob_of[c] for c in present.tolist()])
    extra = rng.choice(present, size=n_cells - n_present, p=p_present / p_present.sum())
    return rng.permutation(np.concatenate([present, extra]))


def _ignore_band(rng: np.random.Generator, cells: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A 1 px band on about half of the class boundaries (between cells), as annotators leave."""
    n = int(cells.max()) + 1
    chosen = np.triu(rng.random((n, n)) < 0.5, 1)
    chosen = chosen | chosen.T
    band = np.zeros(cells.shape, dtype=bool)
    # mark only the left/top pixel of each edge so the band stays 1 px wide
    right, down = cells[:, 1:], cells[1:, :]
    band[:, :-1] |= (labels[cells[:, :-1]] != labels[right]) & chosen[cells[:, :-1], right]
    band[:-1, :] |= (labels[cells[:-1, :]] != labels[down]) & chosen[cells[:-1, :], down]
    return band


def _texture(rng: np.random.Generator, family: str, size: int) -> np.ndarray:
    """A faint luminance pattern of a texture family with per-image orientation and phase."""
    period, amp = _TEXTURES[family]
    if amp == 0.0:
        return np.zeros((size, size))
    if family == "grain":
        return amp * rng.standard_normal((size, size))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    theta = rng.uniform(0.0, np.pi)
    freq = 2 * np.pi / (period * (1.0 + 0.1 * rng.standard_normal()))
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    phase = rng.uniform(0.0, 2 * np.pi, size=2)
    if family == "checks":
        return amp * np.sin(freq * u + phase[0]) * np.sin(freq * v + phase[1])
    return amp * np.sin(freq * u + phase[0])


def render_image(seed: int, split: str, index: int, size: int = 64) -> tuple[np.ndarray, np.ndarray,
                                                                             int]:
    """Draw one image: ``(rgb uint8 HxWx3, annotation uint8 HxW with 255 = ignore, scene id)``."""
    rng = _image_rng(seed, split, index)
    scene = int(rng.integers(len(SCENES)))
    n_cells = int(rng.integers(5, 10))
    cells = _voronoi_cells(rng, size, n_cells)
    cell_class = _cell_labels(rng, scene, n_cells)
    label = cell_class[cells]

    present = np.unique(cell_class)
    offsets = rng.normal(0.0, _IMAGE_CLASS_SIGMA, size=(len(present), 3))
    reflectance = np.zeros((size, size, 3))
    for c, offset in zip(present, offsets):
        mask = label == c
        colour = _BASE[c] + _SCENE_SHIFT[scene, c] + offset
        reflectance[mask] = colour + _texture(rng, _TEXTURE_OF[c], size)[mask, None]

    gain = np.asarray(SCENES[scene]["illumination"]) * (1.0 + _BRIGHTNESS_SIGMA * rng.standard_normal())
    rgb = reflectance * gain + _NOISE_SIGMA * rng.standard_normal((size, size, 3))
    rgb = np.clip(np.rint(np.clip(rgb, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)

    annotation = label.astype(np.uint8)
    annotation[_ignore_band(rng, cells, cell_class)] = IGNORE_INDEX
    return rgb, annotation, scene


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write a PNG with fixed settings and no metadata, so equal arrays give equal bytes."""
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def _meta(seed: int, preset: str, scene_ids: dict[str, list[int]]) -> dict:
    """The ``meta.json`` content (JSON types only, so a re-read meta compares equal)."""
    spec = _preset(preset)
    return {
        "name": NAME,
        "version": GENERATOR_VERSION,
        "data_version": data_version(preset),
        "seed": seed,
        "preset": preset,
        "size": spec["size"],
        "classes": list(CLASSES),
        "palette": [list(p) for p in PALETTE],
        "ignore_index": IGNORE_INDEX,
        "scenes": [{"name": s["name"], "classes": list(s["classes"])} for s in SCENES],
        "counts": {split: spec[split] for split in _SPLIT_CODE},
        "scene_ids": scene_ids,
    }


def _read_meta(out: Path) -> dict | None:
    """The meta.json in ``out`` if it is a readable context-scenes meta, else None."""
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("name") == NAME else None


def _is_complete(out: Path, meta: dict, seed: int, preset: str) -> bool:
    """Whether ``out`` holds a whole dataset of this version, seed and preset."""
    if (meta.get("version"), meta.get("seed"), meta.get("preset")) != (GENERATOR_VERSION, seed, preset):
        return False
    spec = _preset(preset)
    for split in _SPLIT_CODE:
        names = {f"{i:05d}.png" for i in range(spec[split])}
        for kind in ("images", "annotations"):
            folder = out / kind / split
            if not folder.is_dir() or not names.issubset(os.listdir(folder)):
                return False
    return True


_MARKER = ".context-scenes"


def _check_ownership(out: Path) -> None:
    """Refuse to clear a folder that holds data this generator did not write."""
    ours = (out / _MARKER).exists() or _read_meta(out) is not None
    foreign = [p for p in ("images", "annotations", "meta.json") if (out / p).exists()]
    if foreign and not ours:
        raise DatasetError(f"refusing to write context-scenes into {out}: it already holds "
                           f"{', '.join(foreign)} not written by this generator; choose another "
                           f"--out or empty it")


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` so parallel runs never generate into it at once."""
    with open(out / _MARKER, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def generate(out_dir: str | os.PathLike, seed: int = 0, preset: str = "quick") -> dict:
    """Write the dataset in mmseg's layout and return its meta.

    Layout: ``images/{train,val}/NNNNN.png`` (RGB), ``annotations/{train,val}/NNNNN.png`` (mode L,
    class 0..N-1, 255 = ignore) and ``meta.json``. A folder that already holds the same version,
    seed and preset is kept as it is; one holding another context-scenes dataset is regenerated.
    """
    spec = _preset(preset)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_ownership(out)
    with _locked(out):
        existing = _read_meta(out)
        if existing is not None and _is_complete(out, existing, seed, preset):
            return existing
        # meta.json goes first and comes back last: its presence marks a complete dataset
        for name in ("meta.json", "images", "annotations"):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        scene_ids: dict[str, list[int]] = {}
        for split in _SPLIT_CODE:
            (out / "images" / split).mkdir(parents=True)
            (out / "annotations" / split).mkdir(parents=True)
            scene_ids[split] = []
            for index in range(spec[split]):
                rgb, annotation, scene = render_image(seed, split, index, spec["size"])
                _save_png(rgb, out / "images" / split / f"{index:05d}.png")
                _save_png(annotation, out / "annotations" / split / f"{index:05d}.png")
                scene_ids[split].append(scene)
        meta = _meta(seed, preset, scene_ids)
        part = out / "meta.json.part"
        part.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        os.replace(part, out / "meta.json")
    return json.loads(json.dumps(meta))


def ensure(preset: str = "quick", seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """Generate the dataset at ``root`` (default :func:`default_root`) unless it is already there."""
    root = Path(root) if root is not None else default_root(preset)
    generate(root, seed=seed, preset=preset)
    return root
