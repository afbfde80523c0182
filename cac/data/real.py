"""Real benchmarks (ADE20K, COCO-Stuff 164K, and the supplementary's Cityscapes and Pascal-Context 59):
unpack the official archives into mmseg's layout and check them.

The experiments use mmseg's own dataset classes and stock configs, so this module only has to put
files where those configs look (``data/ade/ADEChallengeData2016``, ``data/coco_stuff164k``,
``data/cityscapes``, ``data/VOCdevkit/VOC2010``) and refuse to start on a partial copy: a run on 1,200
of 20,210 images would silently report a different benchmark. Archives are untrusted: output paths
are rebuilt from matched name parts (never ``..``), and only regular files are read (no links).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np
from PIL import Image

from cac.errors import CacError

__all__ = ["DatasetError", "data_dir", "default_real_root", "prepare_ade20k", "prepare_cocostuff",
           "prepare_cityscapes", "prepare_pascal_context", "verify", "coco_stuff_lut", "REAL_DATASETS"]


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
    recursive: bool = False            # images in sub-folders (Cityscapes' city folders), as mmseg scans them
    split_file: Optional[str] = None   # a list of image names (Pascal-Context's ImageSets), mmseg's ann_file


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

_CITYSCAPES = _Layout(
    title="Cityscapes",
    subdir="cityscapes",
    splits={
        "train": _Split("training", "leftImg8bit/train", "_leftImg8bit.png", "gtFine/train",
                        "_gtFine_labelTrainIds.png", recursive=True),
        "val": _Split("validation", "leftImg8bit/val", "_leftImg8bit.png", "gtFine/val",
                      "_gtFine_labelTrainIds.png", recursive=True),
    },
    expected={"train": 2_975, "val": 500},
    how_to=("download gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip "
            "(https://www.cityscapes-dataset.com/downloads/, after registering) and run "
            "`cac-exp data cityscapes --gtfine-zip PATH --leftimg-zip PATH`"),
)

_PASCAL_CONTEXT = _Layout(
    title="Pascal-Context 59",
    subdir="VOCdevkit/VOC2010",
    splits={
        "train": _Split("training", "JPEGImages", ".jpg", "SegmentationClassContext", ".png",
                        split_file="ImageSets/SegmentationContext/train.txt"),
        "val": _Split("validation", "JPEGImages", ".jpg", "SegmentationClassContext", ".png",
                      split_file="ImageSets/SegmentationContext/val.txt"),
    },
    expected={"train": 4_996, "val": 5_104},
    how_to=("download VOCtrainval_03-May-2010.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2010/), convert "
            "the Pascal-Context annotations (trainval_merged.json) with mmseg's "
            "tools/dataset_converters/pascal_context.py, which needs the Detail API, and run "
            "`cac-exp data pascal-context --voc-archive PATH --context PATH`"),
)

REAL_DATASETS: dict[str, _Layout] = {"ade20k": _ADE, "cocostuff": _COCO, "cityscapes": _CITYSCAPES,
                                     "pascal-context": _PASCAL_CONTEXT}


def _layout(name: str) -> _Layout:
    """The layout for a dataset name; ValueError lists the valid names."""
    if name not in REAL_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(REAL_DATASETS)}")
    return REAL_DATASETS[name]


def known_dataset(name: str) -> bool:
    """Whether ``name`` has an official layout here (checked by :func:`verify`)."""
    return name in REAL_DATASETS


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


def _stems(directory: Path, suffix: str, recursive: bool = False) -> set[str]:
    """File names in ``directory`` ending in ``suffix``, with the suffix removed; with ``recursive``,
    paths relative to ``directory`` (``aachen/aachen_000000_000019``), as mmseg lists them."""
    if not directory.is_dir():
        return set()
    if recursive:
        return {p.relative_to(directory).as_posix()[: -len(suffix)] for p in directory.rglob(f"*{suffix}")
                if p.is_file()}
    with os.scandir(directory) as it:
        return {e.name[: -len(suffix)] for e in it if e.name.endswith(suffix) and e.is_file()}


def _listed(root: Path, spec: _Split, title: str, hint: str) -> set[str]:
    """The image names a split file lists (one a line, as mmseg's ``ann_file`` reads them)."""
    path = root / spec.split_file
    if not path.is_file():
        raise DatasetError(f"{title} is incomplete at {root}: no {spec.label} split list {spec.split_file}; {hint}")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def verify(name: str, root: str | os.PathLike | None = None,
           expected: Mapping[str, int] | None = None) -> dict:
    """Check that ``root`` holds every image and annotation of dataset ``name`` (for a layout with
    split lists, every listed one).

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
        on_disk = _stems(root / spec.img_dir, spec.img_suffix, spec.recursive)
        images = _listed(root, spec, layout.title, hint) if spec.split_file else on_disk
        where = f"listed in {spec.split_file}" if spec.split_file else f"(*{spec.img_suffix}) in {spec.img_dir}"
        if len(images) != want:
            found = f"found {len(images):,} of {want:,}" if len(images) < want \
                else f"found {len(images):,} (expected {want:,})"
            raise DatasetError(f"{layout.title} is incomplete at {root}: {found} {spec.label} images "
                               f"{where}; {hint}")
        absent = sorted(images - on_disk)
        if absent:
            raise DatasetError(f"{layout.title} is incomplete at {root}: {len(absent):,} of {want:,} "
                               f"{spec.label} images {where} are not in {spec.img_dir} (first: "
                               f"{absent[0]}{spec.img_suffix}); {hint}")
        annotations = _stems(root / spec.ann_dir, spec.ann_suffix, spec.recursive)
        missing = sorted(images - annotations)
        if missing:
            raise DatasetError(f"{layout.title} is incomplete at {root}: found annotations for "
                               f"{want - len(missing):,} of {want:,} {spec.label} images in "
                               f"{spec.ann_dir} (first missing: {missing[0]}{spec.ann_suffix}); {hint}")
        report[split] = {"images": len(images), "annotations": len(images)}
    return report


@dataclass(frozen=True)
class _Entry:
    name: str   # "/"-separated path inside the archive (or the folder)
    size: int


class _Archive:
    """The regular files of a zip or tar archive, or of a folder holding the same tree, read by name.

    Links, devices and folders are never listed, so nothing read can point outside what its name says;
    the names are only matched, never used as output paths (see :func:`_match_members`).
    """

    def __init__(self, path: Path):
        self.path = path
        self._zip: Optional[zipfile.ZipFile] = None
        self._tar: Optional[tarfile.TarFile] = None
        self._index: Optional[dict[str, tuple[object, int]]] = None  # name -> (zip name | TarInfo | Path, size)
        if path.is_dir():
            return
        if zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
        elif tarfile.is_tarfile(path):
            self._tar = tarfile.open(path)
        else:
            raise ValueError("neither a zip nor a tar archive")

    def _build_index(self) -> dict[str, tuple[object, int]]:
        index: dict[str, tuple[object, int]] = {}
        if self._zip is not None:
            for info in self._zip.infolist():
                if not info.is_dir():
                    index[info.filename.replace("\\", "/")] = (info.filename, info.file_size)
        elif self._tar is not None:
            for member in self._tar.getmembers():
                if member.isfile():  # not links (sym or hard), devices, folders
                    index[member.name.replace("\\", "/")] = (member, member.size)
        else:
            for folder, _dirs, files in os.walk(self.path):  # does not descend into linked folders
                for f in files:
                    p = Path(folder) / f
                    if p.is_file() and not p.is_symlink():
                        index[p.relative_to(self.path).as_posix()] = (p, p.stat().st_size)
        return index

    def entries(self) -> list[_Entry]:
        if self._index is None:
            self._index = self._build_index()
        return [_Entry(name, size) for name, (_key, size) in self._index.items()]

    def open(self, name: str) -> IO[bytes]:
        if self._index is None:
            self._index = self._build_index()
        key = self._index[name][0]
        if self._zip is not None:
            return self._zip.open(key)
        if self._tar is not None:
            handle = self._tar.extractfile(key)
            assert handle is not None  # only regular files are indexed
            return handle
        return open(key, "rb")

    def read(self, name: str) -> bytes:
        with self.open(name) as fh:
            return fh.read()

    def close(self) -> None:
        for handle in (self._zip, self._tar):
            if handle is not None:
                handle.close()

    def __enter__(self) -> "_Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_archive(path: str | os.PathLike, what: str, layout: _Layout, folder_ok: bool = False) -> _Archive:
    """Open an archive (zip or tar; with ``folder_ok`` also a folder), turning a missing or corrupt
    one into a one-line DatasetError."""
    path = Path(path)
    if not (path.is_file() or folder_ok and path.is_dir()):
        raise DatasetError(f"{layout.title}: {what} not found at {path}; to get it, {layout.how_to}")
    try:
        return _Archive(path)
    except (ValueError, zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
        raise DatasetError(f"{layout.title}: {path} is not a readable zip or tar archive ({exc}); "
                           f"download it again, then {layout.how_to.split(' and run ', 1)[-1]}") from None


def _match_members(archive: _Archive, pattern: re.Pattern[str]) -> Iterator[tuple[_Entry, re.Match[str]]]:
    """Archive entries whose path matches ``pattern``; no group may be empty, ``.`` or ``..``."""
    for entry in archive.entries():
        match = pattern.search(entry.name)
        # the output path is rebuilt from the groups, so rejecting odd parts rules out zip-slip
        if match and all(g not in ("", ".", "..") for g in match.groups() if g is not None):
            yield entry, match


def _write_atomic(target: Path, data: bytes) -> None:
    """Write via a ``.part`` file so an interrupted run never leaves a truncated file behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    part.write_bytes(data)
    os.replace(part, target)


def _extract(archive: _Archive, jobs: Iterable[tuple[_Entry, Path]]) -> int:
    """Copy archive entries to their targets, skipping ones already extracted (resumable)."""
    n = 0
    for entry, target in jobs:
        n += 1
        if target.is_file() and target.stat().st_size == entry.size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        with archive.open(entry.name) as src, open(part, "wb") as dst:
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
    with _open_archive(archive, "archive ADEChallengeData2016.zip", _ADE) as zf:
        jobs = [(entry, root / m.group(1) / m.group(2) / m.group(3))
                for entry, m in _match_members(zf, _ADE_MEMBER)]
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


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _coco_stuff_label(data: bytes) -> bytes:
    """Decode a COCO-Stuff label PNG, map it to train ids and encode it as an 8-bit PNG."""
    labels = np.asarray(Image.open(io.BytesIO(data)))
    if labels.ndim != 2:
        raise ValueError(f"expected a single-channel label map, got shape {labels.shape}")
    return _png_bytes(Image.fromarray(coco_stuff_lut()[labels]))


def _convert_chunk(archive: str, items: list[tuple[str, str]], convert: Callable[[bytes], bytes]) -> int:
    """Worker: convert ``(member, target)`` pairs from one archive (each worker opens it itself)."""
    with _Archive(Path(archive)) as zf:
        for member, target in items:
            try:
                converted = convert(zf.read(member))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{member}: {exc}") from None
            _write_atomic(Path(target), converted)
    return len(items)


_COCO_IMAGE = re.compile(r"(?:^|/)(train2017|val2017)/([^/]+\.jpg)$")
_COCO_LABEL = re.compile(r"(?:^|/)(train2017|val2017)/([^/]+)\.png$")


def _convert_labels(archive: Path, jobs: list[tuple[str, Path]], nproc: int, convert: Callable[[bytes], bytes],
                    title: str, official: str) -> None:
    """Convert label maps not yet converted, in ``nproc`` processes (1 = in this process); a file that
    does not convert is one line naming the archive and the member."""
    todo = [(member, str(target)) for member, target in jobs if not target.is_file()]
    if not todo:
        return
    try:
        if nproc <= 1:
            _convert_chunk(str(archive), todo, convert)
            return
        size = max(1, min(1000, len(todo) // (4 * nproc) or 1))
        chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
        with ProcessPoolExecutor(max_workers=nproc) as pool:
            for _ in pool.map(_convert_chunk, [str(archive)] * len(chunks), chunks, [convert] * len(chunks)):
                pass
    except (ValueError, OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise DatasetError(f"{title}: could not convert the label maps in {archive} ({exc}); "
                           f"is it the official {official}?") from None


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
        with _open_archive(archive, f"archive {split}.zip", _COCO) as zf:
            jobs = [(entry, root / "images" / split / m.group(2))
                    for entry, m in _match_members(zf, _COCO_IMAGE) if m.group(1) == split]
            if not jobs:
                raise DatasetError(f"COCO-Stuff 164K: {archive} holds no {split}/*.jpg images; is it "
                                   f"the official {split}.zip? {_COCO.how_to}")
            _extract(zf, jobs)
    with _open_archive(annotations_zip, "archive stuffthingmaps_trainval2017.zip", _COCO) as zf:
        labels = [(entry.name, root / "annotations" / m.group(1) / f"{m.group(2)}_labelTrainIds.png")
                  for entry, m in _match_members(zf, _COCO_LABEL)]
    if not labels:
        raise DatasetError(f"COCO-Stuff 164K: {annotations_zip} holds no train2017/val2017 label maps "
                           f"(*.png); is it the official stuffthingmaps_trainval2017.zip? {_COCO.how_to}")
    _convert_labels(Path(annotations_zip), labels, nproc, _coco_stuff_label, _COCO.title,
                    "stuffthingmaps_trainval2017.zip")
    verify("cocostuff", root, expected)
    return root


# -- Cityscapes: polygons -> labelTrainIds with cityscapesscripts, as mmseg's converter does --------

def _cityscapes_label(data: bytes) -> bytes:
    """A ``*_gtFine_polygons.json`` drawn as a ``*_gtFine_labelTrainIds.png`` (19 train ids, 255 ignored)
    by the dataset's own ``json2labelImg`` drawing and label table (``cityscapesscripts``)."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.helpers.labels import name2label
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    annotation = Annotation()
    annotation.fromJsonText(data.decode("utf-8"))
    for obj in annotation.objects:  # createLabelImage would exit the process on an unknown label
        name = obj.label if obj.label in name2label or not obj.label.endswith("group") else obj.label[:-5]
        if not obj.deleted and name not in name2label:
            raise ValueError(f"unknown Cityscapes label {obj.label!r}")
    return _png_bytes(createLabelImage(annotation, "trainIds"))


_CS_IMAGE = re.compile(r"(?:^|/)leftImg8bit/(train|val)/([^/]+)/([^/]+_leftImg8bit\.png)$")
_CS_POLYGONS = re.compile(r"(?:^|/)gtFine/(train|val)/([^/]+)/([^/]+)_gtFine_polygons\.json$")


def prepare_cityscapes(gtfine_zip: str | os.PathLike, leftimg_zip: str | os.PathLike,
                       out: str | os.PathLike | None = None, expected: Mapping[str, int] | None = None,
                       nproc: int = 1) -> Path:
    """Unpack ``leftImg8bit_trainvaltest.zip``'s train/val images and draw ``gtFine_trainvaltest.zip``'s
    polygons as ``*_gtFine_labelTrainIds.png`` in ``out/cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>``
    (mmseg's layout; the test split has no labels and is left out), then verify 2,975 / 500.

    ``out`` defaults to :func:`data_dir`; finished files are kept, so an interrupted run resumes.
    """
    root = Path(out if out is not None else data_dir()) / _CITYSCAPES.subdir
    if _already_ready("cityscapes", root, expected):
        return root
    with _open_archive(leftimg_zip, "archive leftImg8bit_trainvaltest.zip", _CITYSCAPES) as zf:
        jobs = [(entry, root / "leftImg8bit" / m.group(1) / m.group(2) / m.group(3))
                for entry, m in _match_members(zf, _CS_IMAGE)]
        if not jobs:
            raise DatasetError(f"Cityscapes: {leftimg_zip} holds no leftImg8bit/train|val/<city>/*_leftImg8bit.png "
                               f"images; is it the official leftImg8bit_trainvaltest.zip? {_CITYSCAPES.how_to}")
        _extract(zf, jobs)
    with _open_archive(gtfine_zip, "archive gtFine_trainvaltest.zip", _CITYSCAPES) as zf:
        labels = [(entry.name, root / "gtFine" / m.group(1) / m.group(2) / f"{m.group(3)}_gtFine_labelTrainIds.png")
                  for entry, m in _match_members(zf, _CS_POLYGONS)]
    if not labels:
        raise DatasetError(f"Cityscapes: {gtfine_zip} holds no gtFine/train|val/<city>/*_gtFine_polygons.json; "
                           f"is it the official gtFine_trainvaltest.zip? {_CITYSCAPES.how_to}")
    _convert_labels(Path(gtfine_zip), labels, nproc, _cityscapes_label, _CITYSCAPES.title, "gtFine_trainvaltest.zip")
    verify("cityscapes", root, expected)
    return root


# -- Pascal-Context 59: VOC2010 images + the converted 59-class masks and split lists ---------------
# The original annotations (trainval_merged.json) are composed into class maps by the Detail API,
# which no package on PyPI provides (pycocotools decodes their RLE masks, not the composition), so
# the converted layout that mmseg's tools/dataset_converters/pascal_context.py writes is taken as is.

_VOC_IMAGE = re.compile(r"(?:^|/)JPEGImages/([^/]+\.jpg)$")
_PC_MASK = re.compile(r"(?:^|/)SegmentationClassContext/([^/]+\.png)$")
_PC_SPLIT = re.compile(r"(?:^|/)ImageSets/SegmentationContext/(train|val)\.txt$")
_PC_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def prepare_pascal_context(voc_archive: str | os.PathLike, context: str | os.PathLike,
                           out: str | os.PathLike | None = None,
                           expected: Mapping[str, int] | None = None) -> Path:
    """Put VOC2010's ``JPEGImages`` (from ``VOCtrainval_03-May-2010.tar``, or a folder holding them) and
    the converted Pascal-Context annotations (an archive or folder with ``SegmentationClassContext/*.png``
    and ``ImageSets/SegmentationContext/{train,val}.txt``) in ``out/VOCdevkit/VOC2010``, then verify
    4,996 / 5,104 listed images, each with its image and mask.

    Only the images the split lists name are copied; finished files are kept (resumable).
    """
    root = Path(out if out is not None else data_dir()) / _PASCAL_CONTEXT.subdir
    if _already_ready("pascal-context", root, expected):
        return root
    with _open_archive(context, "converted Pascal-Context annotations", _PASCAL_CONTEXT, folder_ok=True) as ar:
        splits = {m.group(1): entry for entry, m in _match_members(ar, _PC_SPLIT)}
        if set(splits) != {"train", "val"}:
            raise DatasetError(f"Pascal-Context 59: {context} holds no ImageSets/SegmentationContext/"
                               f"{'train' if 'train' not in splits else 'val'}.txt; {_PASCAL_CONTEXT.how_to}")
        listed: set[str] = set()
        for split, entry in splits.items():
            names = ar.read(entry.name).decode("utf-8", "replace").split()
            bad = [n for n in names if not _PC_NAME.fullmatch(n) or n in (".", "..")]
            if bad:
                raise DatasetError(f"Pascal-Context 59: {context}: {entry.name} lists {bad[0]!r}, not an image "
                                   f"name; {_PASCAL_CONTEXT.how_to}")
            listed.update(names)
            _write_atomic(root / "ImageSets" / "SegmentationContext" / f"{split}.txt",
                          ("\n".join(names) + "\n").encode())
        masks = [(entry, root / "SegmentationClassContext" / m.group(1))
                 for entry, m in _match_members(ar, _PC_MASK) if m.group(1)[:-4] in listed]
        _extract(ar, masks)
    with _open_archive(voc_archive, "archive VOCtrainval_03-May-2010.tar", _PASCAL_CONTEXT, folder_ok=True) as ar:
        images = [(entry, root / "JPEGImages" / m.group(1))
                  for entry, m in _match_members(ar, _VOC_IMAGE) if m.group(1)[:-4] in listed]
        if not images:
            raise DatasetError(f"Pascal-Context 59: {voc_archive} holds none of the listed JPEGImages/*.jpg; is it "
                               f"the official VOCtrainval_03-May-2010.tar? {_PASCAL_CONTEXT.how_to}")
        _extract(ar, images)
    verify("pascal-context", root, expected)
    return root
