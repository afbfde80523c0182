"""Shared sweeps on PostgreSQL, as a new user runs them: a real PostgreSQL server (Debian's
``postgresql`` package; ``.ci/run`` installs it), started here in a temporary directory on a free
loopback port, holding both the Optuna study and the MLflow store; sweep workers as local jobs.
The driver checks need no server."""
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlflow
import optuna
import pytest

from cac.cli import main
from cac.errors import CacError
from ports import on_free_ports
from sync_probes import barrier_overrides
from test_sweep import SWEEP  # the same sweep over the base spec below

TESTS = Path(__file__).resolve().parent


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="module")
def pg_server():
    """``postgresql://postgres@127.0.0.1:PORT``: a throw-away server (trust auth, no fsync), stopped
    and removed at the end. As root it runs as the ``postgres`` user (the server refuses root)."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: "
                    "apt-get install postgresql (.ci/run does)")
    as_user: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="cac-pg-"))
    if os.geteuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(tmp)
            pytest.skip("running as root and there is no postgres user to run the server as")
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = tmp / "data"

    def run(*cmd: str) -> None:
        out = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        log = tmp / "server.log"
        assert out.returncode == 0, (out.stdout + out.stderr + (log.read_text() if log.exists() else ""))[-3000:]

    def start(ports: list[int]) -> int:
        options = (f"-p {ports[0]} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(tmp / "server.log"), "-o", options, "-w", "-t", "60",
            "start")
        return ports[0]

    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
    port = on_free_ports(start)
    try:
        for name in ("optuna", "mlflow"):
            run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name)
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


BASE = """
title: sweep base
model: fcn-slim-r18
seeds: 1
overrides:
  train_cfg.max_iters: 4
  train_cfg.val_interval: 4
  default_hooks.checkpoint.interval: 4
  cac_curve.points: 1
{extra}rows:
  - {{label: "(f)", description: full CAC, cac: true}}
"""


@pytest.mark.slow
def test_shared_sweep_on_postgresql_with_local_jobs(workspace, pg_server, capsys, monkeypatch):
    """Two worker jobs share one study in PostgreSQL and track into a fresh MLflow database on the
    same server. Every trial completes (the workers draw different points, and neither races the
    other on MLflow's schema), each worker trains a trial while the other does (a barrier in
    ``before_train``), every trial has its FINISHED run in PostgreSQL, and the submitting process
    ends with the study's totals, best trial and report path."""
    (workspace / "base.yaml").write_text(BASE.format(extra=barrier_overrides(workspace / "barrier")))
    (workspace / "sw.yaml").write_text(SWEEP)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p))
    storage, uri = f"{pg_server}/optuna", f"{pg_server}/mlflow"
    code = main(["sweep", str(workspace / "sw.yaml"), "--trials", "2", "--preset", "quick", "--storage", storage,
                 "--tracking-uri", uri, "--executor", "local", "--jobs", "2", "--out", str(workspace / "reports"),
                 "--submitit-folder", str(workspace / "jobs")])
    out = capsys.readouterr().out
    assert code == 0, out

    trials = optuna.load_study(study_name="sw", storage=storage).trials
    # each worker stops once the shared total is reached; one may have started a third trial meanwhile
    assert len(trials) in (2, 3) and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), out
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2, workers  # both worker jobs trained trials

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("base")
    # the submitting process made the store and the experiment before any worker began a trial
    assert exp.creation_time < min(t.datetime_start.timestamp() * 1000 for t in trials)
    runs = {int(r.data.tags["trial"]): r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == [t.number for t in trials]
    threads = str(max(1, (os.cpu_count() or 1) // 2))  # the machine's cores split over the 2 jobs
    for t in trials:
        run = runs[t.number]
        assert run.info.status == "FINISHED" and run.data.metrics["val/mIoU_pp"] == pytest.approx(t.value)
        assert run.data.params["num_threads"] == threads
    import psycopg  # the runs are in PostgreSQL's tables, not anywhere else

    with psycopg.connect(f"{pg_server}/mlflow") as conn:
        rows = conn.execute("SELECT t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                            "WHERE t.key = 'trial' AND r.status = 'FINISHED'").fetchall()
    assert sorted(int(v) for (v,) in rows) == [t.number for t in trials]

    best = max(trials, key=lambda t: t.value)
    report = workspace / "reports" / "sweep_sw.md"
    assert f"study sw: {len(trials)} trials ({len(trials)} complete, 0 pruned, 0 failed) by 2 workers" in out
    assert f"best trial {best.number}: val/mIoU_pp = {best.value:.2f}" in out
    assert f"report: {report}" in out and f"Best trial {best.number}: **{best.value:.2f}**" in report.read_text()


def test_missing_database_driver_is_one_line_naming_the_package(tmp_path, capsys):
    """A URL whose driver is not installed names the package to pip install, for --storage and for
    --tracking-uri alike; the pinned driver makes ``postgresql://`` itself work (no server needed)."""
    from sqlalchemy.engine import make_url

    from cac.exp.sweep import resolve_storage
    from cac.exp.tracking import check_tracking_uri

    make_url("postgresql://u@127.0.0.1:1/x").get_dialect().import_dbapi()  # requirements.txt's driver
    with pytest.raises(CacError, match=r"driver 'pg8000' is not installed; install it with: pip install 'pg8000'"):
        resolve_storage("postgresql+pg8000://u:secret@127.0.0.1:1/optuna")
    with pytest.raises(CacError, match=r"driver 'MySQLdb' is not installed; install it with: pip install 'mysqlclient'"):
        check_tracking_uri("mysql://u@127.0.0.1:1/mlflow", create=False)
    spec = Path(__file__).resolve().parents[1] / "experiments" / "sweep_tau_lambda.yaml"
    assert main(["sweep", str(spec), "--trials", "1", "--storage", "postgresql+pg8000://u:secret@127.0.0.1:1/db",
                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'pg8000'" in err
    assert "secret" not in err  # the password is not printed
    with pytest.raises(CacError, match=r"'postgresql://u:\*\*\*@127.0.0.1:1/optuna': cannot open it") as info:
        resolve_storage("postgresql://u:secret@127.0.0.1:1/optuna")  # the driver is there; no server
    assert "secret" not in str(info.value)
