"""The supplementary's datasets: Cityscapes and Pascal-Context 59 at preset paper (mmseg's own configs
of Table 1's models where mmseg ships them, else the ADE20K config with the dataset's data), their
preparation from the official archives, tiny stand-ins in the official layouts, and the paper
preset end to end on them."""
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from conftest import enter_work

from cac.cli import main
from cac.data.real import DatasetError, prepare_cityscapes, prepare_pascal_context, verify
from cac.data.tiny import make_tiny
from cac.mmseg.config import resolve_config
from cac.mmseg.zoo import MODELS, dataset_config

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- configs

SHIPPED = {
    "cityscapes": {
        "fcn-mv2": "mobilenet_v2/mobilenet-v2-d8_fcn_4xb2-80k_cityscapes-512x1024.py",
        "deeplabv3plus-mv2": "mobilenet_v2/mobilenet-v2-d8_deeplabv3plus_4xb2-80k_cityscapes-512x1024.py",
        "ocrnet-hr18": "ocrnet/ocrnet_hr18_4xb2-80k_cityscapes-512x1024.py",
        "upernet-r50": "upernet/upernet_r50_4xb2-80k_cityscapes-512x1024.py",
        "deeplabv3plus-r50": "deeplabv3plus/deeplabv3plus_r50-d8_4xb2-80k_cityscapes-512x1024.py",
        "ocrnet-hr48": "ocrnet/ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py",
        "upernet-r101": "upernet/upernet_r101_4xb2-80k_cityscapes-512x1024.py",
        "deeplabv3plus-r101": "deeplabv3plus/deeplabv3plus_r101-d8_4xb2-80k_cityscapes-512x1024.py",
    },
    "pascal-context": {
        "deeplabv3plus-r50": "deeplabv3plus/deeplabv3plus_r50-d8_4xb4-80k_pascal-context-59-480x480.py",
        "deeplabv3plus-r101": "deeplabv3plus/deeplabv3plus_r101-d8_4xb4-80k_pascal-context-59-480x480.py",
    },
}
CLASSIFIER_MODELS = ("segformer-b5", "fcn-hr48")  # ablations/classifiers.yaml's, outside Table 1
TABLE1 = [name for name, e in MODELS.items()
          if e.config is not None and "_ade20k-" in e.config and name not in CLASSIFIER_MODELS]


@pytest.mark.parametrize("dataset", ["cityscapes", "pascal-context", "ade20k", "cocostuff"])
def test_shipped_config_of_each_table1_model(dataset):
    """Exactly the installed mmseg's 80k configs of the same model (the Swin UperNets have none)."""
    assert len(TABLE1) == 11
    found = {name: dataset_config(MODELS[name], dataset) for name in TABLE1}
    assert {k: v for k, v in found.items() if v is not None} == SHIPPED.get(dataset, {})


def _heads(model: dict) -> list[dict]:
    heads = model["decode_head"] if isinstance(model["decode_head"], list) else [model["decode_head"]]
    aux = model.get("auxiliary_head") or []
    return [h.get("head", h) for h in [*heads, *(aux if isinstance(aux, list) else [aux])]]  # in CACHead


@pytest.mark.parametrize("model,dataset,classes,crop,iters,dataset_type", [
    ("fcn-mv2", "cityscapes", 19, (512, 1024), 80_000, "CityscapesDataset"),          # shipped
    ("upernet-swin-t", "cityscapes", 19, (512, 1024), 160_000, "CityscapesDataset"),  # ADE20K config + data
    ("deeplabv3plus-r50", "pascal-context", 59, (480, 480), 80_000, "PascalContextDataset59"),
    ("fcn-mv2", "pascal-context", 59, (480, 480), 160_000, "PascalContextDataset59"),
])
def test_paper_config_on_the_dataset(model, dataset, classes, crop, iters, dataset_type, tmp_path, monkeypatch):
    monkeypatch.setenv("CAC_DATA_ROOT", str(tmp_path))
    cfg = resolve_config(model, "paper", cac=True, dataset=dataset)
    assert cfg["model"]["decode_head"]["type"] == "CACHead"
    assert [h["num_classes"] for h in _heads(cfg["model"])] == [classes] * len(_heads(cfg["model"]))
    assert tuple(cfg["crop_size"]) == crop and tuple(cfg["model"]["data_preprocessor"]["size"]) == crop
    assert cfg["train_cfg"]["max_iters"] == iters
    sub = {"cityscapes": "cityscapes", "pascal-context": "VOCdevkit/VOC2010"}[dataset]
    for key in ("train_dataloader", "val_dataloader"):
        ds = cfg[key]["dataset"]
        assert ds["type"] == dataset_type and ds["data_root"] == str(tmp_path / sub)


# ---------------------------------------------------------------- tiny datasets

@pytest.mark.parametrize("name,dataset_cls,labels", [
    ("cityscapes", "CityscapesDataset", set(range(19)) | {255}),
    ("pascal-context", "PascalContextDataset59", set(range(60))),
])
def test_tiny_layouts_are_what_mmseg_reads(name, dataset_cls, labels, tmp_path):
    import mmseg.datasets
    from mmengine.config import Config

    root = make_tiny(name, tmp_path, train=3, val=2, size=32)
    assert verify(name, root, {"train": 3, "val": 2})["val"] == {"images": 2, "annotations": 2}
    with pytest.raises(DatasetError, match="found 3 of"):
        verify(name, root)  # the official counts
    base = {"cityscapes": "cityscapes.py", "pascal-context": "pascal_context_59.py"}[name]
    from cac.mmseg.zoo import mmseg_config_dir

    data = Config.fromfile(str(mmseg_config_dir() / "_base_" / "datasets" / base))
    ds_cfg = data.train_dataloader.dataset.to_dict()
    ds_cfg.pop("type")
    ds_cfg.update(data_root=str(root), pipeline=[])
    ds = getattr(mmseg.datasets, dataset_cls)(**ds_cfg)
    assert len(ds) == 3
    seg = np.asarray(Image.open(ds[0]["seg_map_path"]))
    img = Image.open(ds[0]["img_path"])
    assert img.size == seg.shape[::-1]  # the label is its image's size
    assert seg.shape == (32, 64) if name == "cityscapes" else max(seg.shape) <= 32 < 2 * min(seg.shape) + 16
    assert set(np.unique(seg)) <= labels


# ---------------------------------------------------------------- Cityscapes from its archives

def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _polygons(objects: list[tuple[str, list]]) -> bytes:
    return json.dumps({"imgHeight": 16, "imgWidth": 32,
                       "objects": [{"label": label, "polygon": poly} for label, poly in objects]}).encode()


ROAD = [[0, 8], [31, 8], [31, 15], [0, 15]]     # the lower half
CAR = [[2, 2], [9, 2], [9, 6], [2, 6]]           # drawn later, over nothing
PLATE = [[4, 10], [6, 10], [6, 12], [4, 12]]      # license plate: id -1, never drawn


def _cityscapes_zips(tmp_path: Path, extra_gt: dict | None = None) -> tuple[Path, Path]:
    """Fake official archives: 2 train images (2 cities), 1 val, 1 test (no labels used), and a
    hostile member whose city is ``..``."""
    frames = [("train", "aachen", "aachen_000000_000019"), ("train", "bochum", "bochum_000000_000313"),
              ("val", "lindau", "lindau_000000_000019"), ("test", "berlin", "berlin_000000_000019")]
    left, gt = {}, {}
    for split, city, stem in frames:
        left[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = _png_bytes(np.zeros((16, 32, 3)))
        gt[f"gtFine/{split}/{city}/{stem}_gtFine_polygons.json"] = _polygons(
            [("road", ROAD), ("cargroup", CAR), ("license plate", PLATE)])
        gt[f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png"] = _png_bytes(np.zeros((16, 32)))
    left["leftImg8bit/train/../evil_leftImg8bit.png"] = b"x"  # city ".." would land outside train/
    gt.update(extra_gt or {})
    paths = tmp_path / "gtFine_trainvaltest.zip", tmp_path / "leftImg8bit_trainvaltest.zip"
    for path, members in zip(paths, (gt, left)):
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    return paths


def test_prepare_cityscapes_draws_label_train_ids(tmp_path):
    gt_zip, left_zip = _cityscapes_zips(tmp_path)
    out = tmp_path / "data"
    root = prepare_cityscapes(gt_zip, left_zip, out, expected={"train": 2, "val": 1})
    assert root == out / "cityscapes"
    label = np.asarray(Image.open(root / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png"))
    assert label.shape == (16, 32)
    assert (label[9:15, :] == 0).all()                    # road -> train id 0 (the plate is not drawn)
    assert (label[3:6, 3:9] == 13).all()                  # "cargroup" -> car -> 13
    assert label[0, 20] == 255                            # unlabelled
    assert (root / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png").is_file()
    assert not (root / "leftImg8bit/test").exists() and not (root / "gtFine/test").exists()
    assert not list(tmp_path.rglob("evil*"))              # the ".." member went nowhere
    with pytest.raises(DatasetError, match=r"found 2 of 2,975 training images") as err:
        verify("cityscapes", root)
    assert "\n" not in str(err.value) and "cac-exp data cityscapes" in str(err.value)


def test_cityscapes_cli_and_bad_input_one_line(tmp_path, capsys):
    gt_zip, left_zip = _cityscapes_zips(tmp_path)
    out = tmp_path / "data"
    base = ["data", "cityscapes", "--gtfine-zip", str(gt_zip), "--leftimg-zip", str(left_zip), "--out", str(out)]
    assert main(base + ["--expected-train", "2", "--expected-val", "1"]) == 0
    assert "Cityscapes ready at" in capsys.readouterr().out
    for argv, says in [
        (base, "found 2 of 2,975 training images"),                                  # official counts
        (base + ["--expected-train", "3", "--expected-val", "1"], "found 2 of 3 training images"),
        (["data", "cityscapes", "--gtfine-zip", str(tmp_path / "nope.zip"), "--leftimg-zip", str(left_zip),
          "--out", str(tmp_path / "d2")], "archive gtFine_trainvaltest.zip not found at"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
    (tmp_path / "bad").mkdir()
    bad_gt, _ = _cityscapes_zips(tmp_path / "bad", extra_gt={
        "gtFine/val/lindau/lindau_000001_000019_gtFine_polygons.json": _polygons([("spaceship", ROAD)])})
    assert main(["data", "cityscapes", "--gtfine-zip", str(bad_gt), "--leftimg-zip", str(left_zip),
                 "--out", str(tmp_path / "d3"), "--nproc", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown Cityscapes label 'spaceship'" in err
    assert "lindau_000001_000019_gtFine_polygons.json" in err


# ---------------------------------------------------------------- Pascal-Context from VOC2010 + converted masks

def _voc_tar(path: Path, stems: list[str], links: tuple[str, ...] = ()) -> Path:
    def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    jpg = io.BytesIO()
    Image.new("RGB", (24, 16), (10, 20, 30)).save(jpg, format="JPEG")
    with tarfile.open(path, "w") as tf:
        for stem in stems:
            add(tf, f"VOCdevkit/VOC2010/JPEGImages/{stem}.jpg", jpg.getvalue())
        add(tf, "VOCdevkit/VOC2010/Annotations/2008_000002.xml", b"<annotation/>")
        for stem in links:  # links to outside the archive
            link = tarfile.TarInfo(f"VOCdevkit/VOC2010/JPEGImages/{stem}.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(link)
        add(tf, "../JPEGImages/2008_000777.jpg", jpg.getvalue())
    return path


def _context_zip(path: Path, train: list[str], val: list[str], drop: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for split, stems in (("train", train), ("val", val)):
            if split != drop:
                zf.writestr(f"VOC2010/ImageSets/SegmentationContext/{split}.txt", "".join(f"{s}\n" for s in stems))
            for stem in stems:
                zf.writestr(f"VOC2010/SegmentationClassContext/{stem}.png", _png_bytes(np.full((16, 24), 7)))
    return path


def test_prepare_pascal_context(tmp_path, capsys):
    train, val = ["2008_000002", "2008_000003"], ["2008_000008"]
    voc = _voc_tar(tmp_path / "VOCtrainval_03-May-2010.tar", train + val + ["2008_000009"], links=("2008_000666",))
    ctx = _context_zip(tmp_path / "context.zip", train, val)
    out = tmp_path / "data"
    root = prepare_pascal_context(voc, ctx, out, expected={"train": 2, "val": 1})
    assert root == out / "VOCdevkit" / "VOC2010"
    assert (root / "ImageSets/SegmentationContext/val.txt").read_text().split() == val
    assert sorted(p.stem for p in (root / "JPEGImages").iterdir()) == sorted(train + val)  # listed ones only
    assert np.asarray(Image.open(root / "SegmentationClassContext/2008_000008.png")).max() == 7
    assert not list(tmp_path.rglob("2008_000666*")) and not list(tmp_path.rglob("2008_000777*"))

    from mmseg.datasets import PascalContextDataset59

    ds = PascalContextDataset59(data_root=str(root), ann_file="ImageSets/SegmentationContext/train.txt",
                                data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClassContext"))
    assert len(ds) == 2
    # a listed image that is a link in the tar is never followed: it is missing
    linked = _voc_tar(tmp_path / "linked.tar", train, links=tuple(val))
    with pytest.raises(DatasetError, match=r"1 of 1 validation images listed .* are not in JPEGImages"):
        prepare_pascal_context(linked, ctx, tmp_path / "d-linked", expected={"train": 2, "val": 1})
    assert not list((tmp_path / "d-linked").rglob("2008_000008.jpg"))
    # a listed mask that is gone: one line naming it
    (root / "SegmentationClassContext/2008_000003.png").unlink()
    with pytest.raises(DatasetError, match=r"annotations for 1 of 2 training images .*2008_000003.png"):
        verify("pascal-context", root, {"train": 2, "val": 1})

    base = ["data", "pascal-context", "--voc-archive", str(voc), "--out", str(tmp_path / "d2")]
    for argv, says in [
        (base + ["--context", str(_context_zip(tmp_path / "noval.zip", train, val, drop="val"))],
         "holds no ImageSets/SegmentationContext/val.txt"),
        (base + ["--context", str(tmp_path / "missing")], "converted Pascal-Context annotations not found at"),
        (base + ["--context", str(ctx)], "found 2 of 4,996 training images listed in"),
        (base + ["--context", str(_context_zip(tmp_path / "evil.zip", ["../../etc/x"], val))], "not an image name"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
    assert main(base + ["--context", str(ctx), "--expected-train", "2", "--expected-val", "1"]) == 0
    assert "Pascal-Context 59 ready at" in capsys.readouterr().out


# ---------------------------------------------------------------- the paper preset end to end

@pytest.mark.slow
@pytest.mark.parametrize("dataset,spec", [("cityscapes", "table1_cityscapes"), ("cocostuff", "table1_cocostuff"),
                                          ("pascal-context", "table1_pascal_context")])
def test_paper_preset_trains_on_tiny(dataset, spec, tmp_path, monkeypatch, capsys):
    """The issue's command on the tiny dataset (images of the dataset's sizes and aspects, its label
    conventions) with `--smoke` for 2 CPU cores: FCN-MV2 and FCN-MV2+CAC get past their evaluations
    and finish with val/mIoU and the three classifiers' metrics on the dataset's classes."""
    data = tmp_path / "data"
    make_tiny(dataset, data, train=6, val=2, size=64)
    monkeypatch.setenv("CAC_DATA_ROOT", str(data))
    enter_work(monkeypatch, tmp_path, tmp_path / "work")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = ["run", str(ROOT / "experiments" / f"{spec}.yaml"), "--preset", "paper", "--rows", "fcn-mv2,fcn-mv2+cac",
           "--smoke", "--no-pretrained", "--expected-train", "6", "--expected-val", "2", "--tracking-uri", uri]
    assert main(cmd) == 0, capsys.readouterr().err
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = {r.data.tags["row"]: r for r in client.search_runs([client.get_experiment_by_name(spec).experiment_id])}
    assert set(runs) == {"fcn-mv2", "fcn-mv2+cac"}
    classes = {"cityscapes": 19, "cocostuff": 171, "pascal-context": 59}[dataset]
    for run in runs.values():
        assert run.info.status == "FINISHED" and "val/mIoU" in run.data.metrics
        assert run.data.tags["data_version"] == f"{dataset}-subset-train6-val2"
        assert run.data.params["setting.dataset"] == dataset
        assert run.data.params["cfg.model.auxiliary_head.num_classes"] == str(classes)
        head = "cfg.model.decode_head" + (".head" if run.data.tags["row"].endswith("+cac") else "")
        assert run.data.params[f"{head}.num_classes"] == str(classes)
    assert {"val/mIoU_pp", "val/mIoU_py", "train/mIoU_pp"} <= set(runs["fcn-mv2+cac"].data.metrics)
