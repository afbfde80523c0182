"""Checkpoints from outside: loaded without running code from them, evaluated as a row's model, and
refused with one line when they do not fit."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from cac.cli import main

SPEC = """
title: checkpoint test
model: fcn-slim-r18
seeds: 1
overrides:
  train_cfg.max_iters: 4
  train_cfg.val_interval: 4
  default_hooks.checkpoint.interval: 4
  cac_curve.points: 1  # Fig. 4's curve is not what these tests check: at the end only
rows:
  - {label: "(a)", description: baseline, cac: false}
  - {label: "(f)", description: full CAC, cac: true}
"""


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, module_data_root):
    """One 4-iteration +CAC run: its spec, store, final checkpoint and logged val/mIoU."""
    work = tmp_path_factory.mktemp("ckpt")
    spec = work / "ck.yaml"
    spec.write_text(SPEC)
    uri = f"sqlite:///{work}/mlflow.db"
    env = {**os.environ, "CAC_WORK_DIR": str(work / "work_dirs")}
    out = subprocess.run([sys.executable, "-m", "cac.cli", "run", str(spec), "--rows", "(f)", "--tracking-uri", uri],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    ckpt = next((work / "work_dirs").rglob("iter_4.pth"))
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("ck").experiment_id])[0]
    return dict(work=work, spec=spec, uri=uri, ckpt=ckpt, run=run, env=env)


def _eval(trained, *args):
    return subprocess.run([sys.executable, "-m", "cac.cli", "eval", str(trained["spec"]), "--preset", "quick",
                           "--tracking-uri", trained["uri"], *args], cwd=trained["work"], env=trained["env"],
                          capture_output=True, text=True, timeout=600)


def _eval_runs(trained):
    client = mlflow.MlflowClient(tracking_uri=trained["uri"])
    exp = client.get_experiment_by_name("ck/eval")
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.slow
def test_eval_reproduces_the_training_runs_final_metrics(trained):
    out = _eval(trained, "--row", "(f)", "--checkpoint", str(trained["ckpt"]))
    assert out.returncode == 0, out.stderr[-2000:]
    runs = [r for r in _eval_runs(trained) if r.info.status == "FINISHED"]
    assert len(runs) == 1
    ev, tr = runs[0].data, trained["run"].data
    assert ev.tags["kind"] == "eval" and ev.tags["row"] == "(f)" and len(ev.tags["checkpoint_sha256"]) == 64
    for key in ("val/mIoU", "val/mIoU_p", "val/mIoU_pp", "val/mIoU_py"):
        assert abs(ev.metrics[key] - tr.metrics[key]) < 0.05, key
    # an evaluation never counts as training: the unit is still the one FINISHED training run
    client = mlflow.MlflowClient(tracking_uri=trained["uri"])
    assert len(client.search_runs([client.get_experiment_by_name("ck").experiment_id])) == 1


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated", "classes", "head", "missing"])
def test_misfit_checkpoints_get_one_line_and_no_finished_run(trained, tmp_path, case):
    row, path = "(f)", tmp_path / f"{case}.pth"
    if case == "truncated":
        path.write_bytes(trained["ckpt"].read_bytes()[:4000])
    elif case == "classes":
        state = torch.load(trained["ckpt"], weights_only=False)["state_dict"]
        key = "decode_head.head.conv_seg.weight"
        state[key] = torch.zeros(5, *state[key].shape[1:])
        torch.save({"state_dict": state}, path)
    elif case == "head":
        shutil.copy(trained["ckpt"], path)
        row = "(a)"  # the plain head has no classifier.* projectors
    else:
        path = tmp_path / "nowhere.pth"
    before = len(_eval_runs(trained))
    out = _eval(trained, "--row", row, "--checkpoint", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("cac-exp: error:")]
    assert len(lines) == 1 and str(path.name) in lines[0], out.stderr[-1500:]
    expected = {"truncated": "not a readable", "classes": "reshaped", "head": "unexpected", "missing": "not found"}
    assert expected[case] in lines[0]
    assert len(_eval_runs(trained)) == before  # nothing tracked, FINISHED or otherwise


def test_hostile_checkpoint_runs_nothing(tmp_path):
    """With cac imported, mmengine's own loader on a local file whose pickle would run a command."""
    import cac  # noqa: F401  (registers the loader, as any cac process has)
    from mmengine.runner.checkpoint import _load_checkpoint  # the function every mmengine load goes through

    from cac.mmseg.checkpoint import UntrustedCheckpointError, trust_all

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": _Payload(marker)}, path)
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint"):
        _load_checkpoint(str(path), map_location="cpu")
    assert not marker.exists()
    with trust_all():  # the user's explicit --trust-checkpoint: then it is their call
        _load_checkpoint(str(path), map_location="cpu")
    assert marker.exists()


def test_hostile_checkpoint_via_eval_is_refused(tmp_path, data_root, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": _Payload(marker)}, path)
    spec = tmp_path / "ck.yaml"
    spec.write_text(SPEC)
    capsys.readouterr()
    code = main(["eval", str(spec), "--row", "(f)", "--checkpoint", str(path),
                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err.strip()
    # refused by the checkpoint loader (not by any earlier failure): one line naming the file and the way out
    assert code == 2 and not marker.exists()
    assert len(err.splitlines()) == 1 and "--trust-checkpoint" in err and str(path) in err, err


def test_mmengine_training_checkpoints_load_weights_only(tmp_path):
    """What a training checkpoint holds (message hub history buffers, numpy scalars) is allowlisted:
    no full unpickling is needed for the files mmengine writes."""
    import numpy as np
    from mmengine.logging import MessageHub

    from cac.mmseg.checkpoint import load_checkpoint_file

    hub = MessageHub.get_instance("ckpt-test")
    for i in range(3):
        hub.update_scalar("train/loss", float(i))
    hub.update_info("iter", np.int64(3))
    path = tmp_path / "iter_3.pth"
    torch.save({"meta": {"iter": 3, "seed": np.int64(0)}, "state_dict": {"w": torch.ones(2)},
                "message_hub": hub.state_dict()}, path)
    loaded = load_checkpoint_file(path)
    assert loaded["message_hub"]["log_scalars"]["train/loss"].mean() == 1.0


@pytest.mark.slow
def test_table1_report_from_evaluation_runs_alone(tmp_path, data_root, monkeypatch):
    """A Table 1 row with no training run, only an evaluated checkpoint, gets its number (and a note)."""
    from analysis.make_tables import main as make_tables
    from cac.exp.runner import make_unit
    from cac.exp.spec import load_spec
    from cac.mmseg.params import build_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAC_WORK_DIR", str(tmp_path / "work_dirs"))
    table1 = Path(__file__).resolve().parents[1] / "experiments" / "table1_ade20k.yaml"
    spec = load_spec(table1)
    unit = make_unit(spec, spec.row("fcn-mv2+cac"), 0, "quick")
    torch.manual_seed(0)
    ckpt = tmp_path / "released.pth"
    torch.save({"state_dict": build_model(unit.cfg["model"]).state_dict()}, ckpt)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["eval", str(table1), "--row", "fcn-mv2+cac", "--preset", "quick", "--checkpoint", str(ckpt),
                 "--tracking-uri", uri]) == 0
    client = mlflow.MlflowClient(tracking_uri=uri)
    miou = client.search_runs([client.get_experiment_by_name("table1_ade20k/eval").experiment_id])[0] \
        .data.metrics["val/mIoU"]
    make_tables(["--spec", "table1_ade20k", "--preset", "quick", "--tracking-uri", uri, "--out", str(tmp_path / "r"),
                 "--no-figures"])
    text = (tmp_path / "r" / "table1.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| + Ours | MobileNet-V2")]
    assert f"| {miou:.2f} (n=1) |" in rows[0]  # the first + Ours row is fcn-mv2+cac
    assert "rows from evaluated checkpoints" in text and "fcn-mv2+cac" in text
