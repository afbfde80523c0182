"""The paper-scale command line: run options, the paper's total batch, tiny real-layout datasets, the
paper preset end to end on them, runs shared across specs, AMP's fp32 losses and the GPU check's
dry mode."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cac.cli import main
from cac.errors import CacError
from cac.exp.options import RunOptions, shipped_total_batch
from cac.exp.runner import make_unit, unit_state
from cac.exp.spec import load_spec
from cac.exp.tracking import RunTracker

ROOT = Path(__file__).resolve().parents[1]
TABLE1 = ROOT / "experiments" / "table1_ade20k.yaml"


def _has_pretrained(node) -> bool:
    if isinstance(node, dict):
        if "pretrained" in node or (isinstance(node.get("init_cfg"), dict) and node["init_cfg"].get("type") == "Pretrained"):
            return True
        return any(_has_pretrained(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_pretrained(v) for v in node)
    return False


def test_run_options_change_the_config_and_its_identity():
    spec = load_spec(TABLE1)
    row = spec.row("upernet-swin-t+cac")
    plain = make_unit(spec, row, 0, "paper")
    assert _has_pretrained(plain.cfg["model"]) and plain.cfg["optim_wrapper"]["type"] == "OptimWrapper"
    opts = RunOptions(cfg_options={"train_cfg.max_iters": 2, "model.decode_head.head.channels": 64},
                      amp=True, no_pretrained=True)
    changed = make_unit(spec, row, 0, "paper", options=opts)
    assert changed.cfg["train_cfg"]["max_iters"] == 2
    assert changed.cfg["model"]["decode_head"]["head"]["channels"] == 64
    assert changed.cfg["optim_wrapper"]["type"] == "AmpOptimWrapper"
    assert not _has_pretrained(changed.cfg["model"])
    assert changed.cfg_hash != plain.cfg_hash
    assert make_unit(spec, row, 0, "paper", options=opts).cfg_hash == changed.cfg_hash  # deterministic
    assert changed.options.params()["pretrained"] == "none"
    assert changed.options.params()["cfg_options.train_cfg.max_iters"] == 2


def test_paper_total_batch_on_any_world_size():
    spec = load_spec(TABLE1)
    swin, fcn = spec.row("upernet-swin-t"), spec.row("fcn-mv2")
    assert shipped_total_batch("swin/x_upernet_8xb2-160k_ade20k-512x512.py") == 16
    batch = lambda row, world, **kw: make_unit(spec, row, 0, "paper", options=RunOptions(world_size=world, **kw)).cfg[  # noqa: E731
        "train_dataloader"]["batch_size"]
    assert [batch(swin, w) for w in (1, 2, 4, 8, 16)] == [16, 8, 4, 2, 1]  # the shipped config says 2 (8 GPUs)
    assert batch(fcn, 4) == 4 and batch(fcn, 8) == 2
    assert batch(swin, 4, cfg_options={"train_dataloader.batch_size": 3}) == 3  # an explicit value wins
    with pytest.raises(CacError, match="total batch 16 does not divide over 3 processes"):
        batch(swin, 3)
    quick = load_spec(ROOT / "ablations" / "table3.yaml")
    assert make_unit(quick, quick.row("(e)"), 0, "quick", options=RunOptions(world_size=2)).cfg[
        "train_dataloader"]["batch_size"] == make_unit(quick, quick.row("(e)"), 0, "quick").cfg["train_dataloader"]["batch_size"]


def test_subset_is_other_data(tmp_path, monkeypatch):
    monkeypatch.setenv("CAC_DATA_ROOT", str(tmp_path))
    spec = load_spec(TABLE1)
    full = make_unit(spec, spec.row("fcn-mv2"), 0, "paper")
    subset = make_unit(spec, spec.row("fcn-mv2"), 0, "paper", options=RunOptions(expected={"train": 6, "val": 2}))
    assert full.tags["data_version"] == "ade20k"
    assert subset.tags["data_version"] == "ade20k-subset-train6-val2"
    assert subset.work_dir != full.work_dir


def test_bad_cfg_options_and_counts_are_one_line(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = main(["run", str(ROOT / "ablations" / "table3.yaml"), "--preset", "quick", "--tracking-uri", uri,
                 "--dry-run", "--cfg-options", "train_dataloader.dataset.pipeline.99.x=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("cac-exp: error: --cfg-options") and "\n" not in err
    assert main(["run", str(ROOT / "ablations" / "table3.yaml"), "--tracking-uri", uri, "--dry-run",
                 "--expected-train", "0"]) == 2
    assert "--expected-train must be >= 1" in capsys.readouterr().err


def test_tiny_datasets_have_the_official_layouts(tmp_path):
    from PIL import Image

    from cac.data.real import verify
    from cac.data.tiny import make_tiny

    ade = make_tiny("ade20k", tmp_path / "a", train=3, val=2, size=48)
    coco = make_tiny("cocostuff", tmp_path / "a", train=2, val=1, size=48)
    assert verify("ade20k", ade, {"train": 3, "val": 2})["train"]["images"] == 3
    assert verify("cocostuff", coco, {"train": 2, "val": 1})["val"]["images"] == 1
    with pytest.raises(CacError, match="found 3 of 20,210"):
        verify("ade20k", ade)  # the official count still guards the real benchmark
    label = Image.open(next((coco / "annotations" / "train2017").glob("*_labelTrainIds.png")))
    assert max(label.getdata()) == 255 and min(label.getdata()) < 171
    again = make_tiny("ade20k", tmp_path / "b", train=3, val=2, size=48)
    first = sorted(p.read_bytes() for p in (ade / "annotations").rglob("*.png"))
    assert first == sorted(p.read_bytes() for p in (again / "annotations").rglob("*.png"))  # seeded


def test_cac_losses_stay_fp32_under_autocast():
    from cac.mmseg.config import resolve_config
    from cac.mmseg.params import build_model
    from cac.synthetic import seg_batch

    cfg = resolve_config("fcn-slim-r18", "quick", cac=True)
    torch.manual_seed(0)
    model = build_model(cfg["model"]).train()
    head = model.decode_head
    data = model.data_preprocessor(seg_batch(64, 2, num_classes=8, seed=1), True)
    seen = {}
    # what autocast made of the head's features and original logits p, on their way into the losses
    head.head.register_forward_hook(lambda mod, args, out: seen.__setitem__("f", out.dtype))
    head.classifier.register_forward_hook(lambda mod, args, out: seen.__setitem__("p", out.p.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.loss(data["inputs"], data["data_samples"])
    assert seen == {"f": torch.bfloat16, "p": torch.bfloat16}  # half precision up to the losses...
    terms = {k: v for k, v in losses.items() if k.startswith("decode.loss")}
    assert {"decode.loss_ce", "decode.loss_ctx_ce", "decode.loss_oracle_ce", "decode.loss_kl"} <= set(terms)
    for name, value in terms.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name  # ...float32 from there
    sum(terms.values()).backward()  # and they train: every trainable parameter of the head gets a gradient
    for name, param in head.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name


def test_rows_shared_across_specs(workspace, capsys):
    """Table 3 (a) = Table 2 (d) and Table 3 (e) = Table 2 (f): planned as done, counted in both tables;
    an evaluation run of a checkpoint never counts as training."""
    from cac.exp.results import matched_runs

    uri = f"sqlite:///{workspace}/mlflow.db"
    table2, table3 = load_spec(ROOT / "ablations" / "table2.yaml"), load_spec(ROOT / "ablations" / "table3.yaml")
    made = {}
    for label in ("(d)", "(f)"):
        unit = make_unit(table2, table2.row(label), 0, "quick")
        tracker = RunTracker.open(uri, table2.name, unit.tags, unit.name)
        tracker.log_metrics({"val/mIoU": 40.0 + len(made)}, 1)
        tracker.finish("FINISHED")
        made[label] = tracker.run_id
    b_unit = make_unit(table3, table3.row("(b)"), 0, "quick")
    ev = RunTracker.open(uri, "table3/eval", {**b_unit.tags, "kind": "eval"}, "eval")
    ev.finish("FINISHED")
    e_unit = make_unit(table3, table3.row("(e)"), 0, "quick")
    assert unit_state(e_unit, uri) == ("shared", made["(f)"])
    assert unit_state(b_unit, uri) == ("new", None)
    assert main(["run", str(ROOT / "ablations" / "table3.yaml"), "--preset", "quick", "--tracking-uri", uri,
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"skip, shared with table2 (FINISHED run {made['(d)']})" in out
    assert f"skip, shared with table2 (FINISHED run {made['(f)']})" in out
    assert "5 to train, 0 to resume, 0 done, 2 shared with other specs" in out
    runs = matched_runs(table3, "quick", uri)
    assert runs["(a)"][0].info.run_id == made["(d)"] and runs["(e)"][0].info.run_id == made["(f)"]
    assert runs["(b)"] == {}


@pytest.fixture()
def tiny_ade(tmp_path, monkeypatch):
    from cac.data.tiny import make_tiny

    data = tmp_path / "data"
    make_tiny("ade20k", data, train=6, val=2, size=64)
    monkeypatch.setenv("CAC_DATA_ROOT", str(data))
    monkeypatch.setenv("CAC_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


SMOKE = ["--smoke", "--no-pretrained", "--expected-train", "6", "--expected-val", "2"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_paper_preset_trains_on_tiny_ade20k(tiny_ade, capsys):
    """The issue's command on a tiny ADE20K whose images differ in size and aspect (ADE20K's test
    pipeline keeps each one's aspect, so a val batch holds several sizes), with `--smoke` for 2 CPU
    cores: FCN-MV2 without and with CAC and the OCRNet cascade + CAC train at preset paper past their
    evaluation, no spec edited, tracked with what the command line changed."""
    uri = f"sqlite:///{tiny_ade}/mlflow.db"
    rows = "fcn-mv2,fcn-mv2+cac,ocrnet-hr18+cac"
    code = main(["run", str(TABLE1), "--preset", "paper", "--rows", rows, *SMOKE, "--tracking-uri", uri])
    assert code == 0, capsys.readouterr().err
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("table1_ade20k")
    runs = {r.data.tags["row"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == set(rows.split(","))
    for row, run in runs.items():
        metrics = run.data.metrics
        assert run.info.status == "FINISHED" and "val/mIoU" in metrics, row
        assert {"val/mIoU_p", "train/mIoU_p", "curve/val_mIoU_p"} <= set(metrics), row
        if row.endswith("+cac"):  # the three classifiers of Fig. 4, on val images of mixed sizes
            assert {"val/mIoU_pp", "val/mIoU_py", "val/ece_pp", "curve/val_mIoU_pp"} <= set(metrics), row
        assert run.data.tags["data_version"] == "ade20k-subset-train6-val2"
        assert run.data.params["pretrained"] == "none" and run.data.params["smoke"] == "True"
        assert run.data.params["total_batch"] == "2" and run.data.params["world_size"] == "1"
    assert len(list((tiny_ade / "work_dirs").rglob("iter_2.pth"))) == 3  # each run's checkpoint, written before its evaluation
    # the same command again is all done
    assert main(["run", str(TABLE1), "--preset", "paper", "--rows", rows, *SMOKE, "--tracking-uri", uri,
                 "--dry-run"]) == 0
    assert "0 to train, 0 to resume, 3 done" in capsys.readouterr().out


def test_smoke_shrinks_every_size_of_a_paper_config_consistently():
    """`--smoke` on Table 1 configs of every dataset: pipelines' scales and crops, the preprocessor's
    pad size and slide inference divided by 8, two iterations; nothing else of the model changes."""
    from cac.exp.options import RunOptions
    from cac.exp.runner import make_unit
    from cac.exp.spec import load_spec

    slides = 0
    for name, row in (("table1_ade20k", "upernet-swin-t+cac"), ("table1_cityscapes", "fcn-mv2+cac"),
                      ("table1_pascal_context", "fcn-mv2"), ("table1_cocostuff", "ocrnet-hr18+cac"),
                      ("table1_pascal_context", "deeplabv3plus-r101+cac")):  # slide inference, 480 crops
        spec = load_spec(str(ROOT / "experiments" / f"{name}.yaml"))
        full = make_unit(spec, spec.row(row), 0, "paper").cfg
        small = make_unit(spec, spec.row(row), 0, "paper", options=RunOptions(smoke=True)).cfg
        crop = tuple(full["crop_size"])
        assert tuple(small["crop_size"]) == tuple(c // 8 for c in crop), name
        assert tuple(small["model"]["data_preprocessor"]["size"]) == tuple(c // 8 for c in crop), name
        train = {t["type"]: t for t in small["train_dataloader"]["dataset"]["pipeline"]}
        full_train = {t["type"]: t for t in full["train_dataloader"]["dataset"]["pipeline"]}
        assert tuple(train["RandomCrop"]["crop_size"]) == tuple(small["crop_size"]), name
        assert tuple(train["RandomResize"]["scale"]) == tuple(s // 8 for s in full_train["RandomResize"]["scale"]), name
        assert train["RandomResize"]["ratio_range"] == full_train["RandomResize"]["ratio_range"]
        assert small["train_cfg"]["max_iters"] == small["train_cfg"]["val_interval"] == 2
        assert small["default_hooks"]["checkpoint"]["interval"] == 2
        assert small["train_dataloader"]["batch_size"] == 2 and small["train_dataloader"]["num_workers"] == 0
        if full["model"].get("test_cfg", {}).get("mode") == "slide":
            slides += 1
            for key in ("crop_size", "stride"):  # the windows shrink with the images they slide over
                assert tuple(small["model"]["test_cfg"][key]) == tuple(c // 8 for c in full["model"]["test_cfg"][key])
        assert small["model"]["decode_head"] == full["model"]["decode_head"]  # the method is untouched
        assert small["optim_wrapper"] == full["optim_wrapper"]
    assert slides == 1  # the slide branch above was exercised
    # GMMSeg's memory is part of its model (9.8 GB at ADE20K's 150 classes x 8): 1/64 of it
    spec = load_spec(str(ROOT / "ablations" / "classifiers.yaml"))
    row = spec.row("GMMSeg (SegFormer-B5)")
    full = make_unit(spec, row, 0, "paper").cfg["model"]["decode_head"]["classifier"]
    small = make_unit(spec, row, 0, "paper", options=RunOptions(smoke=True)).cfg["model"]["decode_head"]["classifier"]
    assert full == {"type": "gmmseg", "num_components": 8} and small == {**full, "mem_size": 32000 // 64}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_gpu_check_dry_runs_every_section(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    result = json.loads((out / "gpu_check.json").read_text())
    from cac.exp.provenance import source_tree

    # the figures name the tree they were measured on
    assert result["commit"] == source_tree()["mlflow.source.git.commit"] and result["dirty"] in ("true", "false")
    assert result["versions"]["env.mmseg"] and f"commit {result['commit'][:12]}" in proc.stdout
    assert set(result["sections"]) == {"table6", "table6_fp32", "train_step", "paper", "resume", "profile",
                                       "memory_model"}
    predicted = result["sections"]["memory_model"]["upernet-swin-t b2"]
    assert 1.0 < predicted["ratio"] < 1.08 and predicted["base_mb"] > 0
    assert result["sections"]["table6_fp32"]["tf32"] == {"cudnn": False, "matmul": False}
    assert result["sections"]["paper"]["upernet-swin-t+cac b2"]["accumulation"] == 8  # --batch-per-gpu 2
    resume = result["sections"]["resume"]
    ours, stock = resume["ResumableIterBasedTrainLoop"], resume["IterBasedTrainLoop"]
    assert ours["resumed_at"] == stock["resumed_at"] == resume["at"] > 0
    # counted loads: mmengine's loop loads the k skipped batches before its first iteration, ours only that one
    batch = resume["batch"]
    assert ours["distinguishable"] and not ours["replayed"] and stock["replayed"]
    assert ours["loaded_before_first_iter"] == batch and stock["loaded_before_first_iter"] == (resume["at"] + 1) * batch
    profile = result["sections"]["profile"]
    assert all(profile[part][label]["top"] for part, label in (("train_step", "+CAC"), ("inference", "Ours")))
    assert result["sections"]["table6"]["sizes"]["64"]["Ours"]["fps"] > 0
    assert {"fcn-mv2 fp32", "upernet-swin-t fp32"} <= set(result["sections"]["train_step"])
    assert result["sections"]["paper"]["upernet-swin-t+cac"]["it_per_s"] > 0
