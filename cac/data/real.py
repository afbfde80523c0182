"""Real benchmarks (ADE20K, COCO-Stuff 164K): unpack the official archives into mmseg's layout and
check them.

The experiments use mmseg's own ``ADE20KDataset`` / ``COCOStuffDataset`` and stock configs, so this
module only has to put files where those configs look (``data/ade/ADEChallengeData2016`` and
``data/coco_stuff164k``) and refuse to start on a partial copy: a run on 1,200 of 20,210 images would
silently report a different benchmark.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
from PIL import Image

from cac.errors import CacError

__all__ = ["DatasetError", "data_dir", "default_real_root", "prepare_ade20k", "prepare_cocostuff",
           "verify", "coco_stuff_lut", "REAL_DATASETS"]


class DatasetError(CacError):
    """A dataset is missing, incomplete or malformed; the message is one actionable line."""


def data_dir() -> Path:
    """Where datasets live: ``$CAC_DATA_ROOT`` if set, else ``<repo>/data`` (``<cwd>/data`` when
    ``cac`` is installed outside a checkout)."""
    env = os.environ.get("CAC_DATA_ROOT")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "cac").is_dir():
        return repo / "data"
    return Path.cwd() / "data"


@dataclass(frozen=True)
class _Split:
    label: str          # "training" / "validation": the word used in messages
    img_dir: str
    img_suffix: str
    ann_dir: str
    ann_suffix: str


@dataclass(frozen=True)
class _Layout:
    title: str
    subdir: str          # data_root relative to the data directory, as in mmseg's configs
    splits: Mapping[str, _Split]
    expected: Mapping[str, int]
    how_to: str


_ADE = _Layout(
    title="ADE20K",
    subdir="ade/ADEChallengeData2016",
    splits={
        "train": _Split("training", "images/training", ".jpg", "annotations/training", ".png"),
        "val": _Split("validation", "images/validation", ".jpg", "annotations/validation", ".png"),
    },
    expected={"train": 20_210, "val": 2_000},
    how_to=("download ADEChallengeData2016.zip from the ADE20K site "
            "(http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip) and run "
            "`cac-exp data ade20k --archive PATH`"),
)

_COCO = _Layout(
    title="COCO-Stuff 164K",
    subdir="coco_stuff164k",
    splits={
        "train": _Split("training", "images/train2017", ".jpg", "annotations/train2017",
                        "_labelTrainIds.png"),
        "val": _Split("validation", "images/val2017", ".jpg", "annotations/val2017",
                      "_labelTrainIds.png"),
    },
    expected={"train": 118_287, "val": 5_000},
    how_to=("download train2017.zip and val2017.zip (http://images.cocodataset.org/zips/) and "
            "stuffthingmaps_trainval2017.zip (http://calvin.inf.ed.ac.uk/wp-content/uploads/data/"
            "cocostuffdataset/stuffthingmaps_trainval2017.zip) and run `cac-exp data cocostuff "
            "--train-zip PATH --val-zip PATH --annotations-zip PATH`"),
)

REAL_DATASETS: dict[str, _Layout] = {"ade20k": _ADE, "cocostuff": _COCO}


def _layout(name: str) -> _Layout:
    """The layout for a dataset name; ValueError lists the valid names."""
    if name not in REAL_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(REAL_DATASETS)}")
    return REAL_DATASETS[name]


def default_real_root(name: str) -> Path:
    """mmseg's data_root for ``name`` under :func:`data_dir`."""
    return data_dir() / _layout(name).subdir


def _expected_counts(layout: _Layout, expected: Mapping[str, int] | None) -> dict[str, int]:
    """The official counts, with ``expected`` overriding some or all of them (tests, subsets)."""
    counts = dict(layout.expected)
    for split, n in (expected or {}).items():
        if split not in counts:
            raise ValueError(f"unknown split {split!r} in expected counts; valid: train, val")
        if n is not None:
            counts[split] = int(n)
    return counts


def _stems(directory: Path, suffix: str) -> set[str]:
    """File names in ``directory`` ending in ``suffix``, with the suffix removed."""
    if not directory.is_dir():
        return set()
    with os.scandir(directory) as it:
        return {e.name[: -len(suffix)] for e in it if e.name.endswith(suffix) and e.is_file()}


def verify(name: str, root: str | os.PathLike | None = None,
           expected: Mapping[str, int] | None = None) -> dict:
    """Check that ``root`` holds every image and annotation of dataset ``name``.

    Returns ``{"name", "root", "train": {"images", "annotations"}, "val": {...}}``; raises
    :class:`DatasetError` naming the path, what was found and how to get the data.
    """
    layout = _layout(name)
    counts = _expected_counts(layout, expected)
    root = Path(root) if root is not None else default_real_root(name)
    hint = f"to get it, {layout.how_to}"
    if not root.is_dir():
        raise DatasetError(f"{layout.title} not found: expected its data_root at {root}, found no such "
                           f"directory; {hint}")
    report: dict = {"name": name, "root": str(root)}
    for split, spec in layout.splits.items():
        want = counts[split]
        images = _stems(root / spec.img_dir, spec.img_suffix)
        if len(images) != want:
            found = f"found {len(images):,} of {want:,}" if len(images) < want \
                else f"found {len(images):,} (expected {want:,})"
            raise DatasetError(f"{layout.title} is incomplete at {root}: {found} {spec.label} images "
                               f"(*{spec.img_suffix}) in {spec.img_dir}; {hint}")
        annotations = _stems(root / spec.ann_dir, spec.ann_suffix)
        missing = sorted(images - annotations)
        if missing:
            raise DatasetError(f"{layout.title} is incomplete at {root}: found annotations for "
                               f"{want - len(missing):,} of {want:,} {spec.label} images in "
                               f"{spec.ann_dir} (first missing: {missing[0]}{spec.ann_suffix}); {hint}")
        report[split] = {"images": len(images), "annotations": len(images)}
    return report


def _open_zip(path: str | os.PathLike, what: str, layout: _Layout) -> zipfile.ZipFile:
    """Open an archive, turning a missing or corrupt file into a one-line DatasetError."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{layout.title}: {what} not found at {path}; to get it, {layout.how_to}")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{layout.title}: {path} is not a readable zip archive ({exc}); "
                           f"download it again, then {layout.how_to.split(' and run ', 1)[-1]}") from None


def _match_members(zf: zipfile.ZipFile, pattern: re.Pattern[str]) -> Iterator[tuple[zipfile.ZipInfo,
                                                                                    re.Match[str]]]:
    """Archive entries whose path matches ``pattern``; the last group must be a plain file name."""
    for info in zf.infolist():
        if info.is_dir():
            continue
        match = pattern.search(info.filename.replace("\\", "/"))
        # the output path is rebuilt from the groups, so rejecting odd names rules out zip-slip
        if match and match.group(match.lastindex or 0) not in ("", ".", ".."):
            yield info, match


def _write_atomic(target: Path, data: bytes) -> None:
    """Write via a ``.part`` file so an interrupted run never leaves a truncated file behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    part.write_bytes(data)
    os.replace(part, target)


def _extract(zf: zipfile.ZipFile, jobs: Iterable[tuple[zipfile.ZipInfo, Path]]) -> int:
    """Copy archive entries to their targets, skipping ones already extracted (resumable)."""
    n = 0
    for info, target in jobs:
        n += 1
        if target.is_file() and target.stat().st_size == info.file_size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        with zf.open(info) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(part, target)
    return n


def _already_ready(name: str, root: Path, expected: Mapping[str, int] | None) -> bool:
    """True when ``root`` already passes :func:`verify` (so preparation can be skipped)."""
    try:
        verify(name, root, expected)
    except DatasetError:
        return False
    return True


_ADE_MEMBER = re.compile(r"(?:^|/)ADEChallengeData2016/(images|annotations)/(training|validation)/"
                         r"([^/]+\.(?:jpg|png))$")


def prepare_ade20k(archive: str | os.PathLike, out: str | os.PathLike | None = None,
                   expected: Mapping[str, int] | None = None) -> Path:
    """Unpack the official ``ADEChallengeData2016.zip`` to ``out/ade/ADEChallengeData2016`` and verify.

    ``out`` defaults to :func:`data_dir`; an already complete copy is left as it is.
    """
    root = Path(out if out is not None else data_dir()) / _ADE.subdir
    if _already_ready("ade20k", root, expected):
        return root
    with _open_zip(archive, "archive ADEChallengeData2016.zip", _ADE) as zf:
        jobs = [(info, root / m.group(1) / m.group(2) / m.group(3))
                for info, m in _match_members(zf, _ADE_MEMBER)]
        if not jobs:
            raise DatasetError(f"ADE20K: {archive} holds no ADEChallengeData2016/images|annotations/"
                               f"training|validation files; is it the official archive? {_ADE.how_to}")
        _extract(zf, jobs)
    verify("ade20k", root, expected)
    return root


def coco_stuff_lut() -> np.ndarray:
    """A 256-entry table from COCO-Stuff label ids (0..181, 255) to mmseg's 171 train ids.

    The 182 ids are COCO's 0-based category ids; 11 of the 91 "thing" ids were never used in
    COCO, so the remaining 171 are renumbered consecutively (the mapping of mmseg's
    ``tools/dataset_converters/coco_stuff164k.py``). 255 stays "unlabelled"; ids that never occur
    in the official maps also go to 255 rather than keep a value that collides with a train id.
    """
    unused = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}
    lut = np.full(256, 255, dtype=np.uint8)
    kept = [i for i in range(182) if i not in unused]
    lut[kept] = np.arange(len(kept), dtype=np.uint8)
    return lut


def _convert_label(data: bytes, lut: np.ndarray) -> bytes:
    """Decode a COCO-Stuff label PNG, map it to train ids and encode it as an 8-bit PNG."""
    labels = np.asarray(Image.open(io.BytesIO(data)))
    if labels.ndim != 2:
        raise ValueError(f"expected a single-channel label map, got shape {labels.shape}")
    buf = io.BytesIO()
    Image.fromarray(lut[labels]).save(buf, format="PNG")
    return buf.getvalue()


def _convert_chunk(archive: str, items: list[tuple[str, str]]) -> int:
    """Worker: convert ``(member, target)`` pairs from one archive (each worker opens it itself)."""
    lut = coco_stuff_lut()
    with zipfile.ZipFile(archive) as zf:
        for member, target in items:
            _write_atomic(Path(target), _convert_label(zf.read(member), lut))
    return len(items)


_COCO_IMAGE = re.compile(r"(?:^|/)(train2017|val2017)/([^/]+\.jpg)$")
_COCO_LABEL = re.compile(r"(?:^|/)(train2017|val2017)/([^/]+)\.png$")


def _convert_labels(archive: Path, jobs: list[tuple[str, Path]], nproc: int) -> None:
    """Convert label maps not yet converted, in ``nproc`` processes (1 = in this process)."""
    todo = [(member, str(target)) for member, target in jobs if not target.is_file()]
    if not todo:
        return
    try:
        if nproc <= 1:
            _convert_chunk(str(archive), todo)
            return
        size = max(1, min(1000, len(todo) // (4 * nproc) or 1))
        chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
        with ProcessPoolExecutor(max_workers=nproc) as pool:
            for _ in pool.map(_convert_chunk, [str(archive)] * len(chunks), chunks):
                pass
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"COCO-Stuff 164K: could not convert the label maps in {archive} ({exc}); "
                           f"is it the official stuffthingmaps_trainval2017.zip?") from None


def prepare_cocostuff(images_train_zip: str | os.PathLike, images_val_zip: str | os.PathLike,
                      annotations_zip: str | os.PathLike, out: str | os.PathLike | None = None,
                      expected: Mapping[str, int] | None = None, nproc: int = 1) -> Path:
    """Unpack ``train2017.zip``/``val2017.zip`` and convert ``stuffthingmaps_trainval2017.zip`` to
    ``out/coco_stuff164k/{images,annotations}/{train2017,val2017}``, then verify.

    Label maps become ``<id>_labelTrainIds.png`` with 171 train ids (see :func:`coco_stuff_lut`).
    ``out`` defaults to :func:`data_dir`; finished files are kept, so an interrupted run resumes.
    """
    root = Path(out if out is not None else data_dir()) / _COCO.subdir
    if _already_ready("cocostuff", root, expected):
        return root
    for archive, split in ((images_train_zip, "train2017"), (images_val_zip, "val2017")):
        with _open_zip(archive, f"archive {split}.zip", _COCO) as zf:
            jobs = [(info, root / "images" / split / m.group(2))
                    for info, m in _match_members(zf, _COCO_IMAGE) if m.group(1) == split]
            if not jobs:
                raise DatasetError(f"COCO-Stuff 164K: {archive} holds no {split}/*.jpg images; is it "
                                   f"the official {split}.zip? {_COCO.how_to}")
            _extract(zf, jobs)
    with _open_zip(annotations_zip, "archive stuffthingmaps_trainval2017.zip", _COCO) as zf:
        labels = [(info.filename, root / "annotations" / m.group(1) / f"{m.group(2)}_labelTrainIds.png")
                  for info, m in _match_members(zf, _COCO_LABEL)]
    if not labels:
        raise DatasetError(f"COCO-Stuff 164K: {annotations_zip} holds no train2017/val2017 label maps "
                           f"(*.png); is it the official stuffthingmaps_trainval2017.zip? {_COCO.how_to}")
    _convert_labels(Path(annotations_zip), labels, nproc)
    verify("cocostuff", root, expected)
    return root
