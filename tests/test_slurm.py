"""`--executor slurm` against a real Slurm controller (tests/slurm_cluster.py: slurmctld, slurmd,
slurmdbd on MariaDB, munge, all on loopback): units as Slurm jobs, `--jobs` as what runs at once,
USR2 (Slurm's warning before a time limit) -> requeue -> an exact resume, a cancelled job retried
with Slurm's reason, sweep workers as jobs, and sbatch's refusals as one line."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from cac_probes import probe_env, probe_overrides, start_iters
from cli_process import CacExp
from slurm_cluster import missing_binaries, start_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _slurm_installed():
    """Slurm, munge and MariaDB: their 13 binaries, or (under CI) a failure naming the missing ones."""
    from components import require

    missing = missing_binaries()
    require("Slurm", f"missing {', '.join(missing)}" if missing else "",
            "apt-get install slurm-wlm slurmdbd munge mariadb-server (.ci/run does)")

SPEC = """
title: slurm test
model: fcn-slim-r18
seeds: 1
overrides:
  train_cfg.max_iters: {iters}
  train_cfg.val_interval: {interval}
  default_hooks.checkpoint.interval: {interval}
  cac_curve.points: 2  # the curve is not what these tests check
{extra}rows:
  - {{label: "(a)", description: baseline, cac: false}}
  - {{label: "(f)", description: full CAC, cac: true}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from start_cluster(tmp_path_factory.mktemp("slurm"))


@pytest.fixture()
def where(tmp_path, data_root, cluster):
    return tmp_path


def _spec(where: Path, iters: int = 8, interval: int = 4, extra: str = "") -> Path:
    path = where / "sl.yaml"
    path.write_text(SPEC.format(iters=iters, interval=interval, extra=extra))
    return path


def _cac_exp(where: Path, cluster, *args: str) -> CacExp:
    env = probe_env({**cluster.env, "CAC_WORK_DIR": str(where / "work_dirs"), "OMP_NUM_THREADS": "1"})
    return CacExp(list(args), where, env)


def _runs(uri: str, experiment: str = "sl"):
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _watch_running(cluster, proc) -> tuple[list[int], threading.Thread]:
    """How many jobs squeue shows RUNNING, sampled until ``proc`` ends."""
    seen: list[int] = []

    def sample():
        while proc.poll() is None:
            seen.append(cluster.squeue_running())
            time.sleep(0.5)
    thread = threading.Thread(target=sample)
    thread.start()
    return seen, thread


def test_units_run_as_slurm_jobs_as_many_at_once_as_jobs_says(where, cluster):
    """Two units, `--jobs 2`: two Slurm jobs RUNNING at the same time (each asks 1 CPU of the node's 2
    and 4 GB), one FINISHED MLflow run each; `--jobs 1` on new units: never two at once."""
    uri = f"sqlite:///{where}/mlflow.db"
    spec = _spec(where)
    args = ["run", str(spec), "--preset", "quick", "--tracking-uri", uri, "--executor", "slurm",
            "--submitit-folder", str(where / "jobs")]
    proc = _cac_exp(where, cluster, *args, "--jobs", "2")
    seen, thread = _watch_running(cluster, proc)
    out, err = proc.communicate(timeout=600)
    thread.join()
    assert proc.returncode == 0, err[-3000:]
    assert out.count("slurm job") == 2 and max(seen) == 2, (out, seen)
    runs = _runs(uri)
    assert sorted(r.data.tags["row"] for r in runs) == ["(a)", "(f)"]
    assert all(r.info.status == "FINISHED" and "val/mIoU" in r.data.metrics for r in runs)

    spec2 = _spec(where, iters=4, interval=2)  # another config: two new units
    proc = _cac_exp(where, cluster, "run", str(spec2), "--preset", "quick", "--tracking-uri", uri,
                    "--executor", "slurm", "--jobs", "1", "--submitit-folder", str(where / "jobs"))
    seen, thread = _watch_running(cluster, proc)
    out, err = proc.communicate(timeout=600)
    thread.join()
    assert proc.returncode == 0, err[-3000:]
    assert out.count("slurm job") == 2 and max(seen) == 1, (out, seen)


def test_usr2_requeues_and_the_job_resumes_exactly(where, cluster):
    """The job gets USR2 (what Slurm sends before a time limit) after its checkpoint at 4 (the probe
    holds it there): submitit requeues it, the requeued job resumes the same MLflow run at 4 and ends
    with the val mIoU of an uninterrupted run of the same unit (trained meanwhile, outside Slurm)."""
    uri = f"sqlite:///{where}/mlflow.db"
    ref_dir = where / "straight"
    ref_dir.mkdir()
    # the reference trains with 1 thread, as the job (OMP_NUM_THREADS=1, --cpus-per-task 1)
    straight = _cac_exp(ref_dir, cluster, "run", str(_spec(ref_dir)), "--preset", "quick", "--rows", "(f)",
                        "--tracking-uri", f"sqlite:///{where}/straight.db")
    probe = where / "probe"
    spec = _spec(where, extra=probe_overrides(probe, hold_at=4))
    proc = _cac_exp(where, cluster, "run", str(spec), "--preset", "quick", "--rows", "(f)", "--tracking-uri", uri,
                    "--executor", "slurm", "--cpus-per-task", "1", "--submitit-folder", str(where / "jobs"))
    _wait_held(probe, proc)
    (job,) = [j for j in cluster.job_ids() if "." not in j][-1:]
    subprocess.run(["scancel", "--signal=USR2", job], env=cluster.env, check=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert start_iters(probe) == [0, 4]
    ref_out, ref_err = straight.communicate(timeout=600)
    assert straight.returncode == 0, ref_err[-3000:]
    reference = _runs(f"sqlite:///{where}/straight.db")[0].data.metrics["val/mIoU"]
    (run,) = _runs(uri)
    assert run.info.status == "FINISHED" and run.data.metrics["val/mIoU"] == pytest.approx(reference, abs=1e-9)


def _wait_held(probe: Path, proc: CacExp) -> None:
    """Until the job's probe holds it after its checkpoint at 4 (however fast or slow the machine)."""
    proc.wait_for(probe / "held", timeout=300)


def test_a_cancelled_job_is_retried_with_slurms_reason(where, cluster):
    """scancel on the running job (held by the probe after its checkpoint at 4): cac resubmits it,
    saying Slurm's state (CANCELLED), and the unit finishes in its one MLflow run, resumed at 4."""
    uri = f"sqlite:///{where}/mlflow.db"
    probe = where / "probe"
    spec = _spec(where, extra=probe_overrides(probe, hold_at=4))
    proc = _cac_exp(where, cluster, "run", str(spec), "--preset", "quick", "--rows", "(f)", "--tracking-uri", uri,
                    "--executor", "slurm", "--submitit-folder", str(where / "jobs"))
    _wait_held(probe, proc)
    (job,) = [j for j in cluster.job_ids() if "." not in j][-1:]
    subprocess.run(["scancel", job], env=cluster.env, check=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "retry" in out and "was cancelled (Slurm state CANCELLED" in out, out
    assert start_iters(probe) == [0, 4]
    (run,) = _runs(uri)
    assert run.info.status == "FINISHED"


def test_sweep_workers_are_slurm_jobs(where, cluster):
    from test_sweep import BASE, SWEEP

    (where / "base.yaml").write_text(BASE.format(extra=""))
    (where / "sw.yaml").write_text(SWEEP)
    storage, uri = f"sqlite:///{where}/optuna.db", f"sqlite:///{where}/mlflow.db"
    proc = _cac_exp(where, cluster, "sweep", str(where / "sw.yaml"), "--trials", "2", "--storage", storage,
                    "--tracking-uri", uri, "--out", str(where / "reports"), "--executor", "slurm", "--jobs", "2",
                    "--submitit-folder", str(where / "jobs"))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("slurm job") == 2
    import optuna

    trials = optuna.load_study(study_name="sw", storage=storage).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 2 and len({t.user_attrs["worker"] for t in complete}) == 2


@pytest.mark.parametrize("flags, says", [
    (["--partition", "nosuch"], "invalid partition"),
    (["--gpus-per-run", "1"], "gres"),
    (["--slurm", "account=nosuch"], "account"),
])
def test_sbatch_refusals_are_one_line_and_track_nothing(where, cluster, flags, says, monkeypatch, capsys):
    """``cac-exp run`` as the console script runs it (in this process: the refusal is sbatch's, and
    ``main`` is what prints the line and picks the exit code)."""
    from cac.cli import main

    uri = f"sqlite:///{where}/mlflow.db"
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    monkeypatch.setenv("CAC_WORK_DIR", str(where / "work_dirs"))
    monkeypatch.chdir(where)
    capsys.readouterr()
    code = main(["run", str(_spec(where)), "--preset", "quick", "--tracking-uri", uri, "--executor", "slurm",
                 "--submitit-folder", str(where / "jobs"), *flags])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    err = err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cac-exp: error: --executor slurm: the scheduler refused"), err
    assert says in err.lower(), err
    assert _runs(uri) == []
