"""Data: the context-scenes generator, its mmseg dataset, real-dataset preparation and checks."""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cac.data import context_scenes as cs
from cac.data.real import DatasetError, coco_stuff_lut, prepare_ade20k, prepare_cocostuff, verify
from cac.errors import CacError


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> hex digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def _arrays(root: Path, kind: str, split: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted((root / kind / split).glob("*.png"))]


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cs") / "quick"
    return root, cs.generate(root, seed=0, preset="quick")


# ---------------------------------------------------------------- context-scenes generator

def test_layout_and_meta(quick):
    root, meta = quick
    spec = cs.PRESETS["quick"]
    for kind in ("images", "annotations"):
        for split in ("train", "val"):
            assert len(list((root / kind / split).glob("*.png"))) == spec[split]
    assert meta == json.loads((root / "meta.json").read_text())
    assert meta["version"] == cs.GENERATOR_VERSION and meta["seed"] == 0 and meta["preset"] == "quick"
    assert meta["classes"] == list(cs.CLASSES) and meta["palette"] == cs.PALETTE
    assert meta["counts"] == {"train": spec["train"], "val": spec["val"]}
    assert len(meta["scene_ids"]["train"]) == spec["train"]
    for split in ("train", "val"):  # the files and scene ids are render_image's output for (seed, split, index)
        for index in (0, spec[split] - 1):
            rgb, annotation, scene = cs.render_image(0, split, index, spec["size"])
            name = f"{index:05d}.png"
            assert np.array_equal(np.asarray(Image.open(root / "images" / split / name)), rgb)
            assert np.array_equal(np.asarray(Image.open(root / "annotations" / split / name)), annotation)
            assert meta["scene_ids"][split][index] == scene
    assert meta["data_version"] == cs.data_version("quick") == f"context-scenes-v{cs.GENERATOR_VERSION}-quick"
    assert 12 <= len(cs.CLASSES) <= 20 and 4 <= len(cs.SCENES) <= 6
    assert len(cs.PALETTE) == len(cs.CLASSES)


def test_image_and_label_format(quick):
    root, _ = quick
    img = Image.open(root / "images" / "train" / "00000.png")
    ann = Image.open(root / "annotations" / "train" / "00000.png")
    assert img.mode == "RGB" and ann.mode == "L" and img.size == ann.size == (64, 64)
    labels = np.stack(_arrays(root, "annotations", "train") + _arrays(root, "annotations", "val"))
    values = np.unique(labels)
    assert set(values.tolist()) <= set(range(len(cs.CLASSES))) | {255}
    ignore = (labels == 255).mean()
    assert 0.005 < ignore < 0.08  # a thin band on some boundaries, a few % of pixels


def test_deterministic_bytes(quick, tmp_path):
    root, _ = quick
    again = tmp_path / "again"
    cs.generate(again, seed=0, preset="quick")
    assert _digests(again) == _digests(root)
    other = tmp_path / "other"
    cs.generate(other, seed=1, preset="quick")
    a, b = _digests(root), _digests(other)
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a if k.startswith("images")) == len(
        [k for k in a if k.startswith("images")])


def test_images_do_not_depend_on_split_size(quick, tmp_path, monkeypatch):
    """A dataset with smaller splits holds exactly the first images of the larger one (same bytes,
    same scenes): an image depends on (seed, split, index) only, never on how many are generated."""
    root, meta = quick
    monkeypatch.setitem(cs.PRESETS, "tiny", {"size": 64, "train": 3, "val": 2})
    small = tmp_path / "tiny"
    small_meta = cs.generate(small, seed=0, preset="tiny")
    digests, big = _digests(small), _digests(root)
    assert {k for k in digests if k.endswith(".png")} == {
        f"{kind}/{split}/{i:05d}.png" for kind in ("images", "annotations")
        for split, n in (("train", 3), ("val", 2)) for i in range(n)}
    for name, digest in digests.items():
        if name.endswith(".png"):
            assert digest == big[name], name
    for split, n in (("train", 3), ("val", 2)):
        assert small_meta["scene_ids"][split] == meta["scene_ids"][split][:n]


def test_train_and_val_differ(quick):
    root, _ = quick
    train = {hashlib.sha256(a.tobytes()).hexdigest() for a in _arrays(root, "images", "train")}
    val = {hashlib.sha256(a.tobytes()).hexdigest() for a in _arrays(root, "images", "val")}
    assert len(train) == cs.PRESETS["quick"]["train"] and not train & val


def test_scene_conditioned_cooccurrence(quick):
    root, meta = quick
    labels = _arrays(root, "annotations", "train") + _arrays(root, "annotations", "val")
    scenes = meta["scene_ids"]["train"] + meta["scene_ids"]["val"]
    seen: dict[int, set[int]] = {}
    for lab, s in zip(labels, scenes):
        seen.setdefault(s, set()).update(int(v) for v in np.unique(lab) if v != 255)
    assert len(seen) >= 4  # most scene types occur even in the quick split
    for s, present in seen.items():
        allowed = {cs.CLASSES.index(c) for c in meta["scenes"][s]["classes"]}
        assert present <= allowed
    assert len({frozenset(v) for v in seen.values()}) == len(seen)


def test_same_class_looks_different_per_image(quick):
    """The paper's premise: a class's colour moves from image to image."""
    root, _ = quick
    means: dict[int, list[np.ndarray]] = {}
    for img, lab in zip(_arrays(root, "images", "train"), _arrays(root, "annotations", "train")):
        for c in np.unique(lab):
            if c != 255 and (lab == c).sum() > 50:
                means.setdefault(int(c), []).append(img[lab == c].mean(0) / 255)
    spread = [np.std(np.stack(v), axis=0).mean() for v in means.values() if len(v) >= 5]
    assert spread and np.median(spread) > 0.08


def test_skip_and_regenerate(tmp_path):
    root = tmp_path / "d"
    cs.generate(root, seed=0, preset="quick")
    stamp = (root / "meta.json").stat().st_mtime_ns
    cs.generate(root, seed=0, preset="quick")
    assert (root / "meta.json").stat().st_mtime_ns == stamp  # complete: kept as it is
    (root / "images" / "val" / "00003.png").unlink()
    cs.generate(root, seed=0, preset="quick")  # incomplete: rebuilt
    assert (root / "images" / "val" / "00003.png").is_file()
    meta = cs.generate(root, seed=5, preset="quick")  # another seed: replaced cleanly
    assert meta["seed"] == 5 and json.loads((root / "meta.json").read_text())["seed"] == 5
    assert _digests(root) == _digests(_fresh(tmp_path / "fresh", 5))


def _fresh(root: Path, seed: int) -> Path:
    cs.generate(root, seed=seed, preset="quick")
    return root


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "mine.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="refusing"):
        cs.generate(tmp_path, preset="quick")
    assert (tmp_path / "images" / "mine.jpg").is_file()


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"'huge'.*quick.*bench"):
        cs.generate("/nonexistent/never-written", preset="huge")
    with pytest.raises(ValueError, match="huge"):
        cs.data_version("huge")


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("CAC_DATA_ROOT", str(tmp_path))
    assert cs.default_root("bench") == tmp_path / "context-scenes" / "bench"
    assert cs.ensure("quick") == tmp_path / "context-scenes" / "quick"
    assert (tmp_path / "context-scenes" / "quick" / "meta.json").is_file()
    monkeypatch.delenv("CAC_DATA_ROOT")
    assert cs.default_root("quick").parts[-3:] == ("data", "context-scenes", "quick")


# ---------------------------------------------------------------- mmseg dataset

def test_mmseg_pipeline_loads_quick(quick):
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    import cac.mmseg.datasets  # noqa: F401  (registers ContextScenesDataset)

    root, meta = quick
    init_default_scope("mmseg")
    ds = DATASETS.build(dict(
        type="ContextScenesDataset", data_root=str(root),
        data_prefix=dict(img_path="images/val", seg_map_path="annotations/val"),
        pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"),
                  dict(type="PackSegInputs")]))
    assert len(ds) == meta["counts"]["val"]
    assert ds.metainfo["classes"] == cs.CLASSES
    item = ds[0]
    img, sample = item["inputs"], item["data_samples"]
    assert tuple(img.shape) == (3, 64, 64)
    seg = sample.gt_sem_seg.data
    assert tuple(seg.shape) == (1, 64, 64)
    expected = np.asarray(Image.open(root / "annotations" / "val" / "00000.png"))
    assert np.array_equal(seg[0].numpy(), expected)  # no zero-label reduction


# ---------------------------------------------------------------- real datasets

def _jpg(rgb=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), rgb).save(buf, format="JPEG")
    return buf.getvalue()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _ade_zip(path: Path, n_train: int = 3, n_val: int = 2) -> Path:
    top = "ADEChallengeData2016"
    members = {f"{top}/objectInfo150.txt": b"x"}
    for split, prefix, n in (("training", "ADE_train", n_train), ("validation", "ADE_val", n_val)):
        for i in range(1, n + 1):
            members[f"{top}/images/{split}/{prefix}_{i:08d}.jpg"] = _jpg()
            members[f"{top}/annotations/{split}/{prefix}_{i:08d}.png"] = _png(np.full((6, 8), i))
    return _zip(path, members)


def test_prepare_ade20k(tmp_path):
    archive = _ade_zip(tmp_path / "ADEChallengeData2016.zip")
    root = prepare_ade20k(archive, tmp_path / "data", expected={"train": 3, "val": 2})
    assert root == tmp_path / "data" / "ade" / "ADEChallengeData2016"
    assert (root / "images" / "training" / "ADE_train_00000003.jpg").is_file()
    assert (root / "annotations" / "validation" / "ADE_val_00000002.png").is_file()
    report = verify("ade20k", root, {"train": 3, "val": 2})
    assert report["train"] == {"images": 3, "annotations": 3} and report["val"]["images"] == 2
    with pytest.raises(DatasetError, match="found 3 of 20,210 training images") as err:  # the official counts
        verify("ade20k", root)
    msg = str(err.value)
    assert "\n" not in msg and str(root) in msg and "found 3 of 20,210 training images" in msg
    assert "cac-exp data ade20k --archive" in msg and isinstance(err.value, CacError)

    from mmseg.datasets import ADE20KDataset

    ds = ADE20KDataset(data_root=str(root), data_prefix=dict(img_path="images/training",
                                                             seg_map_path="annotations/training"))
    assert len(ds) == 3


def test_ade20k_missing_and_incomplete(tmp_path):
    root = tmp_path / "ade" / "ADEChallengeData2016"
    with pytest.raises(DatasetError, match=r"expected its data_root at .*ADEChallengeData2016"):
        verify("ade20k", root)
    with pytest.raises(DatasetError, match="not found at"):
        prepare_ade20k(tmp_path / "missing.zip", tmp_path)
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a readable zip"):
        prepare_ade20k(tmp_path / "bad.zip", tmp_path)
    prepare_ade20k(_ade_zip(tmp_path / "a.zip"), tmp_path, expected={"train": 3, "val": 2})
    (root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(DatasetError, match="annotations for 2 of 3 training images") as err:
        verify("ade20k", root, {"train": 3, "val": 2})
    assert "annotations for 2 of 3 training images" in str(err.value)
    assert "ADE_train_00000002.png" in str(err.value)


def test_prepare_cocostuff_converts_labels(tmp_path):
    raw = np.array([[0, 10, 11, 12, 181, 255, 90, 91]] * 6, dtype=np.uint8)
    want = np.array([[0, 10, 255, 11, 170, 255, 255, 80]] * 6, dtype=np.uint8)
    train_ids = ["000000000009", "000000000025"]
    val_ids = ["000000000139"]
    train_zip = _zip(tmp_path / "train2017.zip", {f"train2017/{i}.jpg": _jpg() for i in train_ids})
    val_zip = _zip(tmp_path / "val2017.zip", {f"val2017/{i}.jpg": _jpg() for i in val_ids})
    ann_zip = _zip(tmp_path / "stuffthingmaps_trainval2017.zip",
                   {**{f"train2017/{i}.png": _png(raw) for i in train_ids},
                    **{f"val2017/{i}.png": _png(raw) for i in val_ids}})
    expected = {"train": 2, "val": 1}
    root = prepare_cocostuff(train_zip, val_zip, ann_zip, tmp_path / "data", expected=expected)
    assert root == tmp_path / "data" / "coco_stuff164k"
    out = root / "annotations" / "train2017" / "000000000009_labelTrainIds.png"
    assert np.array_equal(np.asarray(Image.open(out)), want)
    assert (root / "images" / "val2017" / "000000000139.jpg").is_file()
    assert verify("cocostuff", root, expected)["val"] == {"images": 1, "annotations": 1}
    with pytest.raises(DatasetError, match="found 1 of 5,000 validation images"):
        verify("cocostuff", root, {"train": 2})

    from mmseg.datasets import COCOStuffDataset

    ds = COCOStuffDataset(data_root=str(root), data_prefix=dict(img_path="images/train2017",
                                                                seg_map_path="annotations/train2017"))
    assert len(ds) == 2 and ds[0]["seg_map_path"].endswith("_labelTrainIds.png")


def test_coco_stuff_lut():
    lut = coco_stuff_lut()
    kept = lut[:182][lut[:182] != 255]
    assert np.array_equal(kept, np.arange(171)) and lut[255] == 255


def test_verify_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="ade20k, cocostuff, cityscapes, pascal-context"):
        verify("kitti", tmp_path)


# ---------------------------------------------------------------- CLI

def test_cli_register(tmp_path, capsys):
    from cac.cli import build_parser, command_handler

    parser = build_parser()
    args = parser.parse_args(["data", "context-scenes", "--out", str(tmp_path / "cs"), "--seed", "2"])
    assert command_handler(args)(args) == 0
    assert "64 train / 32 val" in capsys.readouterr().out
    assert json.loads((tmp_path / "cs" / "meta.json").read_text())["seed"] == 2

    archive = _ade_zip(tmp_path / "ade.zip")
    args = parser.parse_args(["data", "ade20k", "--archive", str(archive), "--out", str(tmp_path),
                              "--expected-train", "3", "--expected-val", "2"])
    assert command_handler(args)(args) == 0 and "3 train / 2 val" in capsys.readouterr().out
    args = parser.parse_args(["data", "verify", "ade20k", "--root",
                              str(tmp_path / "ade" / "ADEChallengeData2016")])
    with pytest.raises(CacError, match="found 3 of 20,210"):
        command_handler(args)(args)
    args = parser.parse_args(["data", "context-scenes", "--preset", "huge"])
    with pytest.raises(CacError, match="unknown preset 'huge'"):
        command_handler(args)(args)
    args = parser.parse_args(["data", "context-scenes", "--preset", "paper", "--out", str(tmp_path / "p")])
    assert command_handler(args)(args) == 0 and "no context-scenes data to generate" in capsys.readouterr().out
