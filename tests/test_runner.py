"""cac-exp run with real mmengine training on the quick data and a real MLflow SQLite store."""
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import mlflow
import pytest

from cac.cli import main
from cac.exp.runner import CURVE_POINTS, curve_interval
from cac_probes import assert_steps_logged_once, probe_env, probe_overrides, rank_reports, start_iters

SPEC = """
title: runner test
model: fcn-slim-r18
baseline: "(a)"
seeds: 1
overrides:
  train_cfg.max_iters: {iters}
  train_cfg.val_interval: {interval}
  default_hooks.checkpoint.interval: {interval}
{extra}rows:
  - {{label: "(a)", description: baseline, cac: false}}
  - {{label: "(f)", description: full CAC, cac: true}}
"""


SPARSE_CURVE = "  cac_curve.points: 2\n"  # for tests that do not check Fig. 4's curve: at the val passes


def _spec(tmp_path, iters=20, interval=10, extra=""):
    """The runner-test spec; ``extra``: more ``overrides`` lines (e.g. a probe hook)."""
    path = tmp_path / "rt.yaml"
    path.write_text(SPEC.format(iters=iters, interval=interval, extra=extra))
    return path


def _runs(uri, experiment="rt"):
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _env(workspace):
    return probe_env({**os.environ, "CAC_WORK_DIR": str(workspace / "work_dirs"), "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_run_tracks_everything_then_skips_finished(workspace, capsys):
    spec = _spec(workspace, extra=SPARSE_CURVE)
    uri = f"sqlite:///{workspace}/mlflow.db"
    assert main(["run", str(spec), "--preset", "quick", "--tracking-uri", uri]) == 0
    runs = _runs(uri)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    by_row = {r.data.tags["row"]: r for r in runs}
    cac_run = by_row["(f)"]
    tags = cac_run.data.tags
    assert tags["spec"] == "rt" and tags["seed"] == "0" and tags["preset"] == "quick"
    assert tags["data_version"].startswith("context-scenes") and len(tags["config_hash"]) == 16
    assert "git_commit" in tags
    assert cac_run.data.params["setting.cac.tau"] == "15.0"
    assert cac_run.data.params["setting.dataset"] == "context-scenes"  # the data it trained on, not the paper's
    m = cac_run.data.metrics
    for key in ("val/mIoU", "val/mIoU_p", "val/mIoU_pp", "val/mIoU_py", "train/mIoU_p", "train/mIoU_pp",
                "train/mIoU_py", "train/loss_ce", "train/loss_ctx_ce", "train/loss_oracle_ce", "train/loss_kl",
                "train/lr"):
        assert key in m, key
    # The headline (mmseg's IoUMetric on the test-time output p_p) equals our own confusion-matrix mIoU of p_p.
    assert m["val/mIoU"] == pytest.approx(m["val/mIoU_pp"], abs=0.011)
    client = mlflow.MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(cac_run.info.run_id, "val/mIoU_py")
    assert [h.step for h in history] == [10, 20]
    arts = {a.path for a in client.list_artifacts(cac_run.info.run_id)}
    assert {"config.py", "per_class_iou.csv", "checkpoint"} <= arts
    assert "val/mIoU_pp" not in by_row["(a)"].data.metrics and "val/mIoU_p" in by_row["(a)"].data.metrics

    # Provenance in MLflow's own fields (the UI's Source and Dataset columns, a training experiment)
    # and the versions of the stack as env.* tags.
    import importlib.metadata

    import torch

    assert tags["mlflow.source.name"] == "cac-exp" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == tags["git_commit"] and tags["mlflow.source.git.dirty"] in ("true", "false")
    from cac.exp.provenance import source_tree  # the checkout's state as tracked, not scrubbed ("false" was "***")

    assert tags["git_dirty"] == tags["mlflow.source.git.dirty"] == source_tree()["mlflow.source.git.dirty"]
    assert tags["env.torch"] == torch.__version__.split("+")[0] or tags["env.torch"] == importlib.metadata.version("torch")
    assert tags["env.mmcv"] == importlib.metadata.version("mmcv") and tags["env.mmcv_ops"] == "compiled"
    assert tags["env.mmseg"] == importlib.metadata.version("mmsegmentation") and tags["env.cac"] == "0.1.0"
    assert tags["env.device"].startswith("cpu") and tags["env.cuda"] == "none"
    (dataset,) = client.get_run(cac_run.info.run_id).inputs.dataset_inputs
    assert dataset.dataset.name == tags["data_version"]
    assert {t.key: t.value for t in dataset.tags} == {"mlflow.data.context": "training"}
    assert client.get_experiment_by_name("rt").tags["mlflow.experimentKind"] == "custom_model_development"
    # `results` says what the rows were made with, and when they differ, which row had what
    capsys.readouterr()
    assert main(["results", str(spec), "--preset", "quick", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert f"made with: " in out and f"mmseg {tags['env.mmseg']}" in out and "different versions" not in out
    client.set_tag(by_row["(a)"].info.run_id, "env.torch", "1.13.1")
    assert main(["results", str(spec), "--preset", "quick", "--tracking-uri", uri]) == 0
    assert f"different versions: torch: 1.13.1 in (a); {tags['env.torch']} in (f)." in capsys.readouterr().out
    client.set_tag(by_row["(a)"].info.run_id, "env.torch", tags["env.torch"])

    capsys.readouterr()
    assert main(["run", str(spec), "--preset", "quick", "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.count("skip") == 2
    assert len(_runs(uri)) == 2

    # Multi-scale + flip evaluation is added to finished runs without retraining them.
    assert main(["run", str(spec), "--preset", "quick", "--tracking-uri", uri, "--rows", "(f)", "--ms"]) == 0
    assert "multi-scale + flip val mIoU" in capsys.readouterr().out
    runs = {r.data.tags["row"]: r for r in _runs(uri)}
    assert len(runs) == 2 and "val/mIoU_ms" not in runs["(a)"].data.metrics
    ms, single = _multiscale_flip_miou(spec)
    assert runs["(f)"].data.metrics["val/mIoU_ms"] == pytest.approx(ms, abs=0.0051)  # mmseg rounds to 0.01
    assert abs(ms - single) > 0.01  # the 12 views change the prediction: a single-scale pass would not match


def _multiscale_flip_miou(spec: Path) -> tuple[float, float]:
    """mIoU of row (f)'s final checkpoint on the val split, counted here: each image at the preset's
    scales x {no flip, flip} through the same transforms, softmax averaged over the 12 views, argmax,
    one confusion matrix over the split, IoU of the classes present (numpy; mmseg's TestTimeAug,
    SegTTAModel and IoUMetric are not used). Also the single-scale, no-flip mIoU."""
    import numpy as np
    import torch
    from mmengine.dataset import Compose
    from mmseg.registry import DATASETS

    from cac.exp.runner import make_unit
    from cac.exp.spec import load_spec
    from cac.mmseg.checkpoint import load_checkpoint_file
    from cac.mmseg.params import build_model

    loaded = load_spec(spec)
    unit = make_unit(loaded, loaded.row("(f)"), 0, "quick")
    cfg = unit.cfg
    model = build_model(cfg["model"]).eval()
    state = load_checkpoint_file(unit.work_dir / f"iter_{cfg['train_cfg']['max_iters']}.pth", map_location="cpu")
    model.load_state_dict(state["state_dict"])
    ds_cfg = {k: v for k, v in cfg["val_dataloader"]["dataset"].items() if k != "pipeline"}
    infos = DATASETS.build({**ds_cfg, "pipeline": []})
    n = len(infos.metainfo["classes"])
    ratios = cfg["img_ratios"]
    views = [(r, flip) for r in ratios for flip in (False, True)]

    def view(info: dict, ratio: float, flip: bool) -> dict:
        return Compose([dict(type="LoadImageFromFile"), dict(type="Resize", scale_factor=ratio, keep_ratio=True),
                        dict(type="RandomFlip", prob=float(flip), direction="horizontal"),
                        dict(type="LoadAnnotations"), dict(type="PackSegInputs")])(dict(info))

    conf = {"ms": np.zeros((n, n), np.int64), "single": np.zeros((n, n), np.int64)}
    with torch.no_grad():
        for i in range(len(infos)):
            info = infos.get_data_info(i)
            probs = []
            for ratio, flip in views:
                packed = view(info, ratio, flip)
                data = model.data_preprocessor({"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]},
                                               False)
                (out,) = model.predict(data["inputs"], data["data_samples"])
                probs.append(out.seg_logits.data.softmax(0))
            gt = packed["data_samples"].gt_sem_seg.data[0].numpy()
            valid = gt != 255
            single = probs[views.index((1.0, False))].argmax(0).numpy()
            for key, pred in (("ms", torch.stack(probs).mean(0).argmax(0).numpy()), ("single", single)):
                conf[key] += np.bincount(n * gt[valid] + pred[valid], minlength=n * n).reshape(n, n)

    def miou(c: np.ndarray) -> float:
        union = c.sum(0) + c.sum(1) - np.diag(c)
        return float(100 * np.mean(np.diag(c)[union > 0] / union[union > 0]))
    return miou(conf["ms"]), miou(conf["single"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_then_resume_leaves_one_finished_run(workspace, capsys):
    """Killed (SIGKILL) at iteration 30 after 30's metrics were logged, before 30's checkpoint: the
    rerun resumes the same MLflow run from iter_20.pth and logs no step twice."""
    from cac.exp.runner import resume_checkpoint

    probe = workspace / "probe"
    spec = _spec(workspace, iters=40, interval=10, extra=probe_overrides(probe, kill_at=30))
    uri = f"sqlite:///{workspace}/mlflow.db"
    cmd = [sys.executable, "-m", "cac.cli", "run", str(spec), "--rows", "(f)", "--tracking-uri", uri]
    out = subprocess.run(cmd, cwd=workspace, env=_env(workspace), capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    runs = _runs(uri)
    assert [r.info.status for r in runs] == ["RUNNING"]
    work_dir = Path(runs[0].data.tags["work_dir"])
    assert resume_checkpoint(work_dir) == work_dir / "iter_20.pth"
    assert main(["run", str(spec), "--rows", "(f)", "--tracking-uri", uri]) == 0
    assert "resume" in capsys.readouterr().out
    assert start_iters(probe) == [0, 20]  # the second process started from the checkpoint, not from 0
    runs = _runs(uri)
    assert [r.info.status for r in runs] == ["FINISHED"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert [h.step for h in client.get_metric_history(runs[0].info.run_id, "val/mIoU_pp")] == [10, 20, 30, 40]
    every = curve_interval(40, 10)  # Fig. 4's curve: at least CURVE_POINTS points
    curve = [h.step for h in client.get_metric_history(runs[0].info.run_id, "curve/val_mIoU_pp")]
    assert curve == list(range(every, 41, every)) and len(curve) >= CURVE_POINTS
    assert_steps_logged_once(client, runs[0].info.run_id)


def _labelled_val_pixels(data_root: Path, images: Optional[int] = None) -> int:
    """Labelled pixels (not 255) of the quick val split's first ``images`` images (all by default),
    read from their annotation files."""
    import numpy as np
    from PIL import Image

    files = sorted((data_root / "context-scenes" / "quick" / "annotations" / "val").glob("*.png"))
    assert files and (images is None or images < len(files))
    return sum(int((np.asarray(Image.open(f)) != 255).sum()) for f in files[:images])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_two_cpu_processes(workspace, data_root):
    """Two gloo ranks: one MLflow run that knows its world size, the same parameters on both ranks
    after training, and a val confusion matrix summed over the ranks' shards: every val image once.
    31 val images on 2 ranks: the sampler pads rank 1's shard with a repeat, which is not counted."""
    from cac.mmseg.presets import get_preset

    probe = workspace / "probe"
    spec = _spec(workspace, iters=10, interval=10,
                 extra="  val_dataloader.dataset.indices: 31  # an odd count: DDP's sampler pads it\n"
                       + probe_overrides(probe))
    uri = f"sqlite:///{workspace}/mlflow.db"
    # --standalone: the launcher's rendezvous store binds a free port itself (no port picked, then taken)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cac.cli", "run", str(spec), "--rows", "(f)", "--launcher", "pytorch", "--tracking-uri", uri]
    out = subprocess.run(cmd, cwd=workspace, env=_env(workspace), capture_output=True, text=True, timeout=600)
    # each rank's own error lines, not only the launcher's summary at the end
    errors = [line for line in out.stderr.splitlines() if "Error" in line or "error" in line or "abort" in line]
    assert out.returncode == 0, "\n".join(errors[-40:]) + "\n...\n" + out.stderr[-2000:]
    runs = _runs(uri)
    assert [r.info.status for r in runs] == ["FINISHED"]
    params = runs[0].data.params
    assert params["world_size"] == "2"
    assert params["total_batch"] == str(2 * get_preset("quick").batch_size)  # per-process batch x 2

    reports = rank_reports(probe)
    assert sorted(reports) == [0, 1]
    assert {r["world_size"] for r in reports.values()} == {2} == {r["runner_world_size"] for r in reports.values()}
    assert {r["iter"] for r in reports.values()} == {10}
    # DDP kept the replicas identical: same parameters on both ranks, and not the initial ones
    assert reports[0]["params"] == reports[1]["params"] != reports[0]["initial_params"]
    # the TrackingHook's val confusion is all-reduced: equal on both ranks, covering the whole val set once
    conf0, conf1 = (reports[r]["final_confusion"] for r in (0, 1))
    assert conf0 is not None and conf0 == conf1
    assert sum(map(sum, conf0)) == _labelled_val_pixels(data_root, 31)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stock_mmseg_train_py_trains_resolved_config(workspace):
    import mmseg

    spec = _spec(workspace, iters=10, interval=10)
    cfg = workspace / "resolved.py"
    assert main(["config", str(spec), "--row", "(f)", "--preset", "quick", "--out", str(cfg)]) == 0
    text = cfg.read_text()
    assert "custom_imports" in text and "CACHead" in text and str(os.environ["CAC_DATA_ROOT"]) in text
    train_py = Path(mmseg.__file__).parent / ".mim" / "tools" / "train.py"
    out = subprocess.run([sys.executable, str(train_py), str(cfg), "--work-dir", str(workspace / "stock")],
                         cwd=workspace, env=_env(workspace), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (workspace / "stock" / "iter_10.pth").is_file()


def test_resume_checkpoint_skips_truncated_and_ignores_stale_pointer(tmp_path):
    import torch

    from cac.exp.runner import resume_checkpoint

    assert resume_checkpoint(tmp_path) is None
    torch.save({"a": 1}, tmp_path / "iter_10.pth")
    torch.save({"a": 2}, tmp_path / "iter_20.pth")
    (tmp_path / "iter_30.pth").write_bytes((tmp_path / "iter_20.pth").read_bytes()[:50])  # killed mid-save
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "iter_5.pth"))  # a pointer to a deleted file
    assert resume_checkpoint(tmp_path) == tmp_path / "iter_20.pth"


def test_new_data_version_is_neither_skipped_nor_resumed(workspace, monkeypatch):
    """A finished run on older generated data does not count for the regenerated data."""
    import cac.data.context_scenes as cs
    from cac.exp.results import matched_runs
    from cac.exp.runner import make_unit, unit_state
    from cac.exp.spec import load_spec
    from cac.exp.tracking import RunTracker

    spec = load_spec(str(_spec(workspace)))
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    unit = make_unit(spec, spec.rows[0], 0, "quick")
    tracker = RunTracker.open(uri, spec.name, unit.tags, unit.name)
    tracker.finish("FINISHED")
    assert unit_state(unit, uri) == ("finished", tracker.run_id)
    assert set(matched_runs(spec, "quick", uri)["(a)"]) == {0}

    monkeypatch.setattr(cs, "GENERATOR_VERSION", "999")
    regenerated = make_unit(spec, spec.rows[0], 0, "quick")
    assert regenerated.cfg_hash == unit.cfg_hash  # the same config text...
    assert regenerated.tags["data_version"] == "context-scenes-v999-quick"
    assert regenerated.work_dir != unit.work_dir  # ...but not the old checkpoints
    assert unit_state(regenerated, uri) == ("new", None)
    assert matched_runs(spec, "quick", uri)["(a)"] == {}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_after_final_checkpoint_finishes_like_an_uninterrupted_run(workspace, tmp_path_factory, capsys):
    """Killed after the final checkpoint was written, before FINISHED: the rerun evaluates again and
    logs what an uninterrupted run logs; with a fresh tracking store the stale work dir is not adopted."""
    probe = workspace / "probe"
    spec = _spec(workspace, iters=8, interval=4, extra=probe_overrides(probe, kill_at_end=True) + SPARSE_CURVE)
    uri = f"sqlite:///{workspace}/mlflow.db"
    cmd = [sys.executable, "-m", "cac.cli", "run", str(spec), "--rows", "(f)", "--tracking-uri", uri]
    out = subprocess.run(cmd, cwd=workspace, env=_env(workspace), capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert [r.info.status for r in _runs(uri)] == ["RUNNING"]
    assert main(["run", str(spec), "--rows", "(f)", "--tracking-uri", uri]) == 0
    assert start_iters(probe) == [0, 8]  # resumed at the end: nothing trained again
    resumed = _runs(uri)
    assert [r.info.status for r in resumed] == ["FINISHED"]
    assert_steps_logged_once(mlflow.MlflowClient(tracking_uri=uri), resumed[0].info.run_id)

    other = tmp_path_factory.mktemp("uninterrupted")
    plain = _spec(other, iters=8, interval=4, extra=probe_overrides(other / "probe") + SPARSE_CURVE)
    env = {**_env(workspace), "CAC_WORK_DIR": str(other / "work_dirs")}
    done = subprocess.run([sys.executable, "-m", "cac.cli", "run", str(plain), "--rows", "(f)", "--tracking-uri",
                           f"sqlite:///{other}/mlflow.db"], cwd=other, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = _runs(f"sqlite:///{other}/mlflow.db")[0].data.metrics
    for key in ("val/mIoU", "val/mIoU_p", "val/mIoU_pp", "val/mIoU_py"):
        assert resumed[0].data.metrics[key] == pytest.approx(reference[key], abs=1e-6), key

    capsys.readouterr()
    fresh = f"sqlite:///{workspace}/fresh.db"  # a new store: the work dir's checkpoints are not its run's
    assert main(["run", str(spec), "--rows", "(f)", "--tracking-uri", fresh]) == 0
    assert "moved to stale-" in capsys.readouterr().out
    assert start_iters(probe) == [0, 8, 0]
    assert [r.info.status for r in _runs(fresh)] == ["FINISHED"]


@pytest.mark.parametrize("iters,val_interval,expected", [
    (100, 50, 12), (1600, 800, 200), (40, 10, 5), (7, 0, 1), (160000, 16000, 16000), (160000, 0, 20000),
    (20, 10, 2)])
def test_curve_interval_gives_enough_points(iters, val_interval, expected):
    """Fig. 4's curves: at least CURVE_POINTS evaluations, never sparser than the val interval, and
    not many more than needed (each point is an evaluation of three classifiers): the largest
    interval that gives CURVE_POINTS, or the val interval where that is denser."""
    every = curve_interval(iters, val_interval)
    assert every == expected
    if iters:
        points = len(range(every, iters + 1, every)) + (iters % every != 0)  # the last one is always at max_iters
        assert min(CURVE_POINTS, iters) <= points
        assert points <= 2 * CURVE_POINTS or (val_interval and every == val_interval)
    assert val_interval == 0 or every <= val_interval


@pytest.mark.parametrize("points,val_interval,expected", [(2, 10, 10), (4, 10, 5), (0, 10, 10), (0, 0, 0), (40, 0, 1)])
def test_a_configs_cac_curve_sets_how_dense_the_curve_is(points, val_interval, expected):
    """``cac_curve.points`` (a spec override) replaces CURVE_POINTS; 0: the val interval alone."""
    from cac.exp.runner import curve_settings

    assert curve_interval(20, val_interval, curve_settings({"points": points})["points"]) == expected
    assert curve_settings(None) == {"points": CURVE_POINTS, "train_images": 32, "val_images": 96}
    assert curve_settings({"val_images": 8})["val_images"] == 8


@pytest.mark.parametrize("bad,says", [({"points": -1}, "points: an integer >= 0"), ({"dots": 3}, "a mapping of"),
                                      ({"val_images": 0}, "val_images: an integer >= 1"), ("dense", "a mapping of")])
def test_a_bad_cac_curve_is_one_line_before_anything_is_tracked(workspace, data_root, capsys, bad, says):
    import yaml

    spec = workspace / "c.yaml"
    spec.write_text(yaml.safe_dump({"title": "t", "model": "fcn-slim-r18", "seeds": 1,
                                    "overrides": {"cac_curve": bad}, "rows": [{"label": "(a)", "description": "a", "cac": False}]}))
    uri = f"sqlite:///{workspace}/m.db"
    assert main(["run", str(spec), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cac_curve" in err and says in err, err
    assert not _runs(uri, "c")


def test_heap_frozen_sets_the_heap_aside_while_a_run_trains_and_gives_it_back():
    """During a run the collector skips what existed before it (mmengine's gc.collect per dataset then
    scans the run's objects only); afterwards, even after an error, everything is collectable again."""
    import gc

    from cac.exp.runner import heap_frozen

    assert gc.get_freeze_count() == 0
    with heap_frozen():
        assert gc.get_freeze_count() > 1000
        cycle: list = []  # made during the run: still collected
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), heap_frozen():
        raise RuntimeError("the run failed")
    assert gc.get_freeze_count() == 0
    gc.freeze()  # the application froze its heap itself: a run leaves it frozen
    try:
        frozen = gc.get_freeze_count()
        with heap_frozen():
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
