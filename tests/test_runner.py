"""cac-exp run with real mmengine training on the quick data and a real MLflow SQLite store."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from cac.cli import main

pytestmark = pytest.mark.slow

SPEC = """
title: runner test
model: fcn-slim-r18
baseline: "(a)"
seeds: 1
overrides:
  train_cfg.max_iters: {iters}
  train_cfg.val_interval: {interval}
  default_hooks.checkpoint.interval: {interval}
rows:
  - {{label: "(a)", description: baseline, cac: false}}
  - {{label: "(f)", description: full CAC, cac: true}}
"""


def _spec(tmp_path, iters=20, interval=10):
    path = tmp_path / "rt.yaml"
    path.write_text(SPEC.format(iters=iters, interval=interval))
    return path


def _runs(uri, experiment="rt"):
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _env(workspace):
    return {**os.environ, "CAC_WORK_DIR": str(workspace / "work_dirs"), "PYTHONUNBUFFERED": "1"}


def test_run_tracks_everything_then_skips_finished(workspace, capsys):
    spec = _spec(workspace)
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

    capsys.readouterr()
    assert main(["run", str(spec), "--preset", "quick", "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.count("skip") == 2
    assert len(_runs(uri)) == 2

    # Multi-scale + flip evaluation is added to finished runs without retraining them.
    assert main(["run", str(spec), "--preset", "quick", "--tracking-uri", uri, "--rows", "(f)", "--ms"]) == 0
    assert "multi-scale + flip val mIoU" in capsys.readouterr().out
    runs = {r.data.tags["row"]: r for r in _runs(uri)}
    assert len(runs) == 2 and 0.0 <= runs["(f)"].data.metrics["val/mIoU_ms"] <= 100.0
    assert "val/mIoU_ms" not in runs["(a)"].data.metrics


def test_sigkill_then_resume_leaves_one_finished_run(workspace, capsys):
    spec = _spec(workspace, iters=40, interval=10)
    uri = f"sqlite:///{workspace}/mlflow.db"
    cmd = [sys.executable, "-m", "cac.cli", "run", str(spec), "--rows", "(f)", "--tracking-uri", uri]
    proc = subprocess.Popen(cmd, cwd=workspace, env=_env(workspace), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    ckpts = []
    while time.time() < deadline and not ckpts:
        ckpts = list((workspace / "work_dirs").rglob("iter_10.pth")) + list((workspace / "work_dirs").rglob("iter_20.pth"))
        time.sleep(0.2)
    assert ckpts, "no checkpoint appeared"
    time.sleep(0.5)  # let the checkpoint file be complete
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    runs = _runs(uri)
    assert [r.info.status for r in runs] == ["RUNNING"]
    assert main(["run", str(spec), "--rows", "(f)", "--tracking-uri", uri]) == 0
    assert "resume" in capsys.readouterr().out
    runs = _runs(uri)
    assert [r.info.status for r in runs] == ["FINISHED"]
    history = mlflow.MlflowClient(tracking_uri=uri).get_metric_history(runs[0].info.run_id, "val/mIoU_pp")
    assert max(h.step for h in history) == 40


def _free_port() -> int:
    """A port nobody listens on now (a fixed one can be held by another job on a shared machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_cpu_processes(workspace):
    spec = _spec(workspace, iters=10, interval=10)
    uri = f"sqlite:///{workspace}/mlflow.db"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "cac.cli", "run", str(spec), "--rows", "(f)", "--launcher", "pytorch", "--tracking-uri", uri]
    out = subprocess.run(cmd, cwd=workspace, env=_env(workspace), capture_output=True, text=True, timeout=600)
    # each rank's own error lines, not only the launcher's summary at the end
    errors = [line for line in out.stderr.splitlines() if "Error" in line or "error" in line or "abort" in line]
    assert out.returncode == 0, "\n".join(errors[-40:]) + "\n...\n" + out.stderr[-2000:]
    runs = _runs(uri)
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.params.get("cfg.launcher", "pytorch")


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

    from cac.runner import resume_checkpoint

    assert resume_checkpoint(tmp_path) is None
    torch.save({"a": 1}, tmp_path / "iter_10.pth")
    torch.save({"a": 2}, tmp_path / "iter_20.pth")
    (tmp_path / "iter_30.pth").write_bytes((tmp_path / "iter_20.pth").read_bytes()[:50])  # killed mid-save
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "iter_5.pth"))  # a pointer to a deleted file
    assert resume_checkpoint(tmp_path) == tmp_path / "iter_20.pth"


def test_new_data_version_is_neither_skipped_nor_resumed(workspace, monkeypatch):
    """A finished run on older generated data does not count for the regenerated data."""
    import cac.data.context_scenes as cs
    from cac.results import matched_runs
    from cac.runner import make_unit, unit_state
    from cac.spec import load_spec
    from cac.tracking import RunTracker

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
