"""Small defects found by trying the project (issue 21): why a local job ended, the thread count as a
param outside run identity, and a run restarted from iteration 0 that logs no step twice."""
import functools
import os
import time
from pathlib import Path

import mlflow
import pytest
import torch

from cac.exp.dispatch import DispatchOptions, describe_ended, run_jobs
from cac.exp.runner import execute_unit, plan_runs
from cac.exp.spec import load_spec
from cac.exp.tracking import RunTracker
from cac_probes import assert_steps_logged_once


def _jobs(tmp_path: Path, jobs: dict, retries: int, time_min: float = 5) -> list[str]:
    """Run ``jobs`` ({label: picklable callable}) as real local submitit jobs; the lines printed."""
    lines: list[str] = []
    d = DispatchOptions(executor="local", jobs=len(jobs), retries=retries, time_min=time_min,
                        folder=str(tmp_path / "jobs"), poll_s=0.2)
    run_jobs(lambda name: jobs[name], list(jobs), str, d, tmp_path / "jobs", lines.append)
    return lines


@pytest.mark.slow  # real submitit jobs
def test_local_job_killed_with_sigkill_is_reported_as_such(tmp_path):
    """The job's process gets SIGKILL from another process (its own shell child, so the kill needs no
    timing); the retry line says so, and the resubmitted job finishes."""
    marker = tmp_path / "killed-once"
    job = functools.partial(os.system, f"test -e {marker} || {{ touch {marker}; kill -9 $PPID; }}")
    lines = _jobs(tmp_path, {"victim": job}, retries=1)
    retry = [ln for ln in lines if ln.startswith("retry victim:")]
    assert len(retry) == 1, lines
    assert "was killed: its process got signal 9 (SIGKILL); resubmitted" in retry[0], retry[0]
    assert "submitit" not in retry[0] and "pickle" not in retry[0]
    assert not any(ln.startswith("error") for ln in lines), lines


@pytest.mark.slow  # real submitit jobs
def test_local_job_exit_code_exception_and_timeout_are_reported(tmp_path):
    # 12 s, the local controller's time limit: long enough for a job to start on a busy machine
    lines = _jobs(tmp_path, {"exits": functools.partial(os._exit, 3), "raises": functools.partial(int, "x"),
                             "sleeps": functools.partial(time.sleep, 600)},
                  retries=0, time_min=0.2)
    errors = {ln.split(":", 1)[0].split()[1]: ln for ln in lines if ln.startswith("error")}
    assert sorted(errors) == ["exits", "raises", "sleeps"], lines
    assert "exited with code 3: its process ended before finishing" in errors["exits"]
    assert "raised ValueError: invalid literal for int() with base 10: 'x'" in errors["raises"]
    assert "timed out (limit 0.2 min)" in errors["sleeps"]


def test_out_of_memory_kill_is_named_from_the_record():
    """The OOM killer cannot be triggered safely here: the controller's record is the input."""
    assert describe_ended({"exit_codes": [-9], "timed_out": False, "oom_kills": 1}).startswith("ran out of memory")
    assert describe_ended({"exit_codes": [-9], "timed_out": False, "oom_kills": 0}) == \
        "was killed: its process got signal 9 (SIGKILL)"
    assert describe_ended({"exit_codes": [0, -15], "timed_out": False, "oom_kills": None}) == \
        "was killed: task 1 got signal 15 (SIGTERM)"
    assert describe_ended({"exit_codes": [0], "timed_out": False, "oom_kills": 0}) is None


SPEC = """
title: restart from zero
model: fcn-slim-r18
seeds: 1
overrides:
  train_cfg.max_iters: 16
  train_cfg.val_interval: 8
  default_hooks.checkpoint.interval: 16
rows:
  - {label: "(f)", description: full CAC, cac: true}
"""


@pytest.mark.slow
def test_run_restarted_from_zero_logs_each_step_once(workspace):
    """A job killed before its first checkpoint is trained again from iteration 0 in the same MLflow
    run: the steps its killed process logged (here 1..10, with marker values) are not logged again,
    the later ones are. Its params record the torch thread count, which is not in run identity."""
    (workspace / "restart.yaml").write_text(SPEC)
    spec = load_spec(workspace / "restart.yaml")
    uri = f"sqlite:///{workspace}/mlflow.db"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        (one,) = plan_runs(spec, "quick")
        torch.set_num_threads(2)
        (unit,) = plan_runs(spec, "quick")
    finally:
        torch.set_num_threads(before)
    assert one.cfg_hash == unit.cfg_hash  # the thread count does not change run identity

    tracker = RunTracker.open(uri, spec.name, unit.tags, unit.name)
    killed_at = 10  # what the killed process logged: train/* at 8, the curves at 2, 4, ..., 10, val at 8
    keys = ("train/loss", "curve/val_mIoU_pp", "val/mIoU_pp")
    for step in range(1, killed_at + 1):
        tracker.log_metrics({k: -float(step) for k in keys}, step)
    tracker.finish("KILLED")
    assert not list(unit.work_dir.glob("iter_*.pth"))  # no checkpoint: training starts from 0

    metrics = execute_unit(unit, "resume", tracker.run_id, uri, echo=lambda _: None)
    assert metrics and "mIoU" in metrics
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert_steps_logged_once(client, tracker.run_id)
    for key in keys:
        history = {m.step: m.value for m in client.get_metric_history(tracker.run_id, key)}
        assert all(history[s] == -float(s) for s in range(1, killed_at + 1)), key  # not logged again
        assert any(s > killed_at for s in history), key  # the rest of the run was logged
    assert run.data.params["num_threads"] == str(torch.get_num_threads())
