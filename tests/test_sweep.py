"""cac-exp sweep: real Optuna storage, real training through the runner, real MLflow."""
import os
import subprocess
import sys
import time

import mlflow
import optuna
import pytest

from cac.cli import main

pytestmark = pytest.mark.slow

BASE = """
title: sweep base
model: fcn-slim-r18
seeds: 1
overrides:
  train_cfg.max_iters: 20
  train_cfg.val_interval: 10
  default_hooks.checkpoint.interval: 10
rows:
  - {label: "(a)", description: baseline, cac: false}
  - {label: "(f)", description: full CAC, cac: true}
"""
SWEEP = """
title: tau and lambda
spec: base.yaml
row: "(f)"
objective: {metric: val/mIoU_pp, direction: maximize}
search_space:
  tau: {type: float, low: 1.0, high: 30.0, log: true}
  lambda_kl: {type: float, low: 0.01, high: 10.0, log: true}
sampler: {type: random, seed: 0}
pruner: {type: none}
"""


@pytest.fixture()
def sweep_spec(workspace):
    (workspace / "base.yaml").write_text(BASE)
    (workspace / "sw.yaml").write_text(SWEEP)
    return workspace / "sw.yaml"


def _checkpoint_exists(root, name):
    """True once a checkpoint file appears (directories may change while the trainer writes)."""
    try:
        return any(root.rglob(name))
    except FileNotFoundError:
        return False


def _counted(storage):
    study = optuna.load_study(study_name="sw", storage=storage)
    ok = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study, [t for t in study.trials if t.state in ok]


def test_two_processes_share_a_study_then_continue_to_new_total(workspace, sweep_spec):
    storage = f"sqlite:///{workspace}/optuna.db"
    uri = f"sqlite:///{workspace}/mlflow.db"
    cmd = [sys.executable, "-m", "cac.cli", "sweep", str(sweep_spec), "--trials", "3", "--storage", storage,
           "--tracking-uri", uri, "--out", str(workspace / "reports")]
    env = {**os.environ, "CAC_WORK_DIR": str(workspace / "work_dirs")}
    # Create the study once so both processes find it (Optuna's own race on first creation is not ours).
    optuna.create_study(study_name="sw", storage=storage, direction="maximize")
    procs = [subprocess.Popen(cmd, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)]
    deadline = time.time() + 120  # the second worker joins once the first has started a trial
    while time.time() < deadline and not optuna.load_study(study_name="sw", storage=storage).trials:
        time.sleep(0.2)
    procs.append(subprocess.Popen(cmd, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    study, done = _counted(storage)
    assert 3 <= len(done) <= 4  # each process stops once the shared total is reached
    assert all("trial" in o for o in outs)  # both processes ran trials
    runs = mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("base").experiment_id])
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == len(done)
    assert {r.data.tags["study"] for r in finished} == {"sw"}
    assert {int(r.data.tags["trial"]) for r in finished} == {t.number for t in done}
    for r in finished:
        t = study.trials[int(r.data.tags["trial"])]
        assert float(r.data.params["setting.cac.tau"]) == pytest.approx(t.params["tau"])
        assert r.data.metrics["val/mIoU_pp"] == pytest.approx(t.value)

    n_before = len(done)
    assert main(["sweep", str(sweep_spec), "--trials", str(n_before + 1), "--storage", storage,
                 "--tracking-uri", uri, "--out", str(workspace / "reports")]) == 0
    assert len(_counted(storage)[1]) == n_before + 1
    assert (workspace / "reports" / "sw.md").exists() is False
    assert (workspace / "reports" / "sweep_sw.md").read_text().count("tau") >= 1
    for name in ("sweep_sw_response.png", "sweep_sw_importance.png"):
        assert (workspace / "reports" / "figures" / name).stat().st_size > 0


def test_bad_sweep_spec_is_one_line(workspace, sweep_spec, capsys):
    sweep_spec.write_text(SWEEP.replace("low: 1.0", "low: -1.0"))
    assert main(["sweep", str(sweep_spec), "--trials", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tau" in err


def test_killed_trial_is_retried_with_same_params_and_resumes(workspace, sweep_spec, monkeypatch):
    import signal

    (workspace / "base.yaml").write_text(BASE.replace("max_iters: 20", "max_iters: 40"))
    storage = f"sqlite:///{workspace}/optuna.db"
    uri = f"sqlite:///{workspace}/mlflow.db"
    env = {**os.environ, "CAC_WORK_DIR": str(workspace / "work_dirs"), "CAC_SWEEP_HEARTBEAT": "1"}
    cmd = [sys.executable, "-m", "cac.cli", "sweep", str(sweep_spec), "--trials", "1", "--storage", storage,
           "--tracking-uri", uri, "--out", str(workspace / "reports")]
    proc = subprocess.Popen(cmd, cwd=workspace, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not _checkpoint_exists(workspace / "work_dirs", "iter_10.pth"):
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # past the grace period (2 heartbeats): the trial is stale
    monkeypatch.setenv("CAC_SWEEP_HEARTBEAT", "1")
    assert main(["sweep", str(sweep_spec), "--trials", "1", "--storage", storage, "--tracking-uri", uri,
                 "--out", str(workspace / "reports")]) == 0
    study = optuna.load_study(study_name="sw", storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and states.count(optuna.trial.TrialState.COMPLETE) == 1
    failed, done = study.trials
    assert failed.params == done.params
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("base").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]  # the killed trial's run was resumed, not duplicated
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/mIoU_pp")]
    assert steps[0] == 10 and steps[-1] == 40
