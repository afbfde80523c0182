"""submitit dispatch on this machine (the local executor): one job per unit, K at a time; a timed-out
job is checkpointed and requeued by submitit and a job whose process is killed is resubmitted, and both
resume their unit's MLflow run from its last checkpoint."""
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from cac.cli import main
from cac.exp.dispatch import DispatchOptions, UnitJob, dispatch_units, make_executor
from cac.exp.options import RunOptions
from cac.exp.runner import make_unit
from cac.exp.spec import load_spec
from cac_probes import probe_env, start_iters

ROOT = Path(__file__).resolve().parents[1]
TABLE3 = ROOT / "ablations" / "table3.yaml"


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _runs(uri, experiment="table3"):
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _assert_resumed_once(uri, run):
    """FINISHED, resumed at iteration > 0, and no metric step logged twice."""
    client = _client(uri)
    assert run.info.status == "FINISHED" and "val/mIoU" in run.data.metrics
    starts = [m.value for m in client.get_metric_history(run.info.run_id, "resume/start_iter")]
    assert starts and all(s > 0 for s in starts)
    for key in ("train/loss", "curve/val_mIoU_p"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps and len(steps) == len(set(steps)), key


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_executor_runs_each_unit_as_a_job(workspace, capsys):
    uri = f"sqlite:///{workspace}/mlflow.db"
    short = ["--cfg-options", "train_cfg.max_iters=16", "train_cfg.val_interval=8", "default_hooks.checkpoint.interval=8"]
    code = main(["run", str(TABLE3), "--preset", "quick", "--rows", "(a),(e)", "--executor", "local", "--jobs", "2",
                 "--tracking-uri", uri, "--submitit-folder", str(workspace / "jobs"), *short])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("local job") == 2
    runs = _runs(uri)
    assert sorted(r.data.tags["row"] for r in runs) == ["(a)", "(e)"]
    assert all(r.info.status == "FINISHED" and "val/mIoU" in r.data.metrics for r in runs)
    assert len(list((workspace / "jobs").glob("*_log.out"))) == 2  # submitit's per-job logs
    assert main(["run", str(TABLE3), "--preset", "quick", "--rows", "(a),(e)", "--executor", "local", "--jobs", "2",
                 "--tracking-uri", uri, *short]) == 0
    assert capsys.readouterr().out.count("skip") == 2  # nothing submitted again


def _held_options(probe: Path) -> RunOptions:
    """16 iterations, a checkpoint every 8, and the probe holding the job once after step 10 (two
    steps logged past the checkpoint, which the resumed run trains again and must not log twice)."""
    hook = {"type": "ProbeHook", "out_dir": str(probe), "hold_at": 10}
    return RunOptions(cfg_options={"train_cfg.max_iters": 16, "train_cfg.val_interval": 8,
                                   "default_hooks.checkpoint.interval": 8, "cac_curve.points": 2,
                                   "custom_imports": {"imports": ["cac_probes"], "allow_failed_imports": False},
                                   "custom_hooks": [hook]})


def _held_job(probe: Path, folder: Path, timeout: float = 300) -> int:
    """The process id of the job's training process, once the probe holds it."""
    deadline = time.monotonic() + timeout
    while not (probe / "held").exists():
        assert time.monotonic() < deadline, f"the job was not held after step 10 within {timeout} s"
        time.sleep(0.2)
    (pid,) = _task_pids(folder)
    return pid


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_timed_out_job_checkpoints_requeues_and_resumes(workspace, monkeypatch):
    """USR2 near the time limit: submitit requeues a timed-out job only through its ``checkpoint``
    (a job without one ends "timed-out and not checkpointable"), so this exercises UnitJob.checkpoint.
    With a limit under 10 minutes submitit counts any USR2 as a timeout."""
    monkeypatch.setenv("PYTHONPATH", probe_env(dict(os.environ))["PYTHONPATH"])  # the job imports cac_probes
    uri = f"sqlite:///{workspace}/mlflow.db"
    probe = workspace / "probe"
    options = _held_options(probe)
    executor = make_executor(DispatchOptions(executor="local", time_min=8), workspace / "jobs")
    job = executor.submit(UnitJob(str(TABLE3), "(e)", 0, "quick", options, uri, str(workspace / "work_dirs"),
                                  {k: os.environ[k] for k in ("CAC_DATA_ROOT", "CAC_WORK_DIR")}))
    os.kill(_held_job(probe, workspace / "jobs"), signal.SIGUSR2)  # what Slurm sends before the time limit
    assert job.result()["state"] == "done"
    assert start_iters(probe) == [0, 8]
    (run,) = _runs(uri)
    _assert_resumed_once(uri, run)
    log = Path(job.paths.stderr).read_text() + Path(job.paths.stdout).read_text()
    assert "timed-out" in log and "Requeued" in log


def _task_pids(folder: Path) -> list[int]:
    """Process ids of the tasks (the training processes) of submitit jobs logging to ``folder``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in cmd and str(folder) in cmd:
            pids.append(int(proc.name))
    return pids


def _kill_task_when_held(probe: Path, folder: Path, done: threading.Event) -> None:
    """SIGKILL the training process of a submitit job once the probe holds it after step 10."""
    os.kill(_held_job(probe, folder), signal.SIGKILL)
    done.set()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_job_is_resubmitted_and_resumes(workspace, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", probe_env(dict(os.environ))["PYTHONPATH"])  # the job imports cac_probes
    uri = f"sqlite:///{workspace}/mlflow.db"
    spec = load_spec(TABLE3)
    probe = workspace / "probe"
    options = _held_options(probe)
    unit = make_unit(spec, spec.row("(a)"), 0, "quick", options=options)
    folder = workspace / "jobs"
    killed = threading.Event()
    killer = threading.Thread(target=_kill_task_when_held, args=(probe, folder, killed), daemon=True)
    killer.start()
    lines: list[str] = []
    failures = dispatch_units(str(TABLE3), "quick", [unit], options, uri,
                              DispatchOptions(executor="local", folder=str(folder), poll_s=0.5), echo=lines.append)
    killer.join(timeout=5)
    assert killed.is_set()
    assert failures == 0, lines
    assert any(line.startswith("retry") for line in lines) and sum("local job" in line for line in lines) == 2
    assert start_iters(probe) == [0, 8]
    (run,) = _runs(uri)
    _assert_resumed_once(uri, run)


def test_slurm_dry_run_and_bad_dispatch_flags(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["run", str(TABLE3), "--preset", "quick", "--tracking-uri", uri, "--dry-run", "--executor", "slurm",
                 "--jobs", "4", "--gpus-per-run", "2", "--partition", "gpu"]) == 0
    out = capsys.readouterr().out
    assert "plan: 7 to train" in out and "executor slurm: one job per unit to train, 4 at a time, each asks 2 GPU(s)" in out
    # a CPU job asks for the cores it trains with and some memory, so --jobs N of them fit at once
    assert main(["run", str(TABLE3), "--preset", "quick", "--tracking-uri", uri, "--dry-run", "--executor", "slurm",
                 "--jobs", "2", "--cpus-per-task", "3", "--mem-gb", "6"]) == 0
    out = capsys.readouterr().out
    assert "each asks 0 GPU(s), 3 CPU(s) (its torch threads), 6 GB" in out
    assert "#SBATCH --cpus-per-task=3" in out and "#SBATCH --mem=6G" in out
    assert main(["run", str(TABLE3), "--tracking-uri", uri, "--dry-run", "--jobs", "2"]) == 2
    assert "need --executor local or slurm" in capsys.readouterr().err


def test_slurm_submission_script(tmp_path, capsys, monkeypatch):
    """What sbatch would get: GPUs, tasks for DDP, partition, time, the requeue signal (the same with
    or without Slurm installed); submitting where there is no Slurm, or where sbatch refuses the job
    (here: no controller answers, or no partition "gpu"), is one line and exit 2, nothing trained."""
    import shutil

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["run", str(TABLE3), "--preset", "quick", "--tracking-uri", uri, "--executor", "slurm", "--gpus-per-run", "4",
            "--partition", "gpu", "--time-min", "600", "--slurm", "account=seg", "exclusive=True"]
    assert main([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    for line in ("#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --time=600", "#SBATCH --account=seg", "#SBATCH --signal=USR2@120", "#SBATCH --exclusive"):
        assert line in text, line
    if shutil.which("sbatch"):  # Slurm's clients are installed: sbatch itself refuses the job
        assert main([*args, "--submitit-folder", str(tmp_path / "jobs")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cac-exp: error: --executor slurm: the scheduler refused the job:") and "\n" not in err
        assert "Traceback" not in err
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without Slurm
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--executor slurm" in err and "--executor local" in err and "\n" not in err
