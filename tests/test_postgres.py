"""Shared sweeps on PostgreSQL, as a new user runs them: a real PostgreSQL server (Debian's
``postgresql`` package; ``.ci/run`` installs it), started here in a temporary directory on a free
loopback port, holding both the Optuna study and the MLflow store; sweep workers as local jobs.
The driver checks need no server."""
import os
from pathlib import Path

import mlflow
import optuna
import pytest

from cac.cli import main
from cac.errors import CacError
from pg_cluster import PASSWORD, postgres
from sync_probes import barrier_overrides
from test_sweep import SWEEP  # the same sweep over the base spec below

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def pg_server():
    """A password-protected PostgreSQL server with the databases ``optuna`` and ``mlflow`` (pg_cluster)."""
    with postgres() as server:
        yield server


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
    """Two worker jobs share one study in a password-protected PostgreSQL and track into a fresh MLflow
    database on the same server. Every trial completes (the workers draw different points, and neither
    races the other on MLflow's schema), each worker trains a trial while the other does (a barrier in
    ``before_train``), every trial has its FINISHED run in PostgreSQL, and the submitting process
    ends with the study's totals, best trial and report path. The password, and a secret of the
    environment, are in no byte the sweep wrote: files (work dirs, journals, job pickles and logs,
    reports, artifacts), console lines, and both databases as pg_dump writes them."""
    (workspace / "base.yaml").write_text(BASE.format(extra=barrier_overrides(workspace / "barrier")))
    (workspace / "sw.yaml").write_text(SWEEP)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p))
    env_secret = "env-Secr3t-91bd2e"
    monkeypatch.setenv("CAC_TEST_API_TOKEN", env_secret)
    storage, uri = f"{pg_server.url}/optuna", f"{pg_server.url}/mlflow"
    code = main(["sweep", str(workspace / "sw.yaml"), "--trials", "2", "--preset", "quick", "--storage", storage,
                 "--tracking-uri", uri, "--executor", "local", "--jobs", "2", "--out", str(workspace / "reports"),
                 "--submitit-folder", str(workspace / "jobs")])
    said = capsys.readouterr()
    out = said.out
    assert code == 0, out

    written = {str(p): p.read_bytes() for p in workspace.rglob("*") if p.is_file()}
    written["console"] = (said.out + said.err).encode()
    written.update({f"database {name}": pg_server.dump(name).encode() for name in ("optuna", "mlflow")})
    assert any(p.endswith(".pkl") for p in written) and any("tracking" in p for p in written)  # jobs, journals
    for secret in (PASSWORD, env_secret):
        leaks = [where for where, data in written.items() if secret.encode() in data]
        assert not leaks, f"{secret} written to {leaks}"

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
        assert run.data.tags["study_storage"] == f"postgresql://127.0.0.1:{pg_server.port}/optuna"  # public
    import psycopg  # the runs are in PostgreSQL's tables, not anywhere else

    with psycopg.connect(uri) as conn:
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
    with pytest.raises(CacError, match=r"'postgresql://127.0.0.1:1/optuna': cannot open it") as info:
        resolve_storage("postgresql://u:secret@127.0.0.1:1/optuna")  # the driver is there; no server
    assert "secret" not in str(info.value)


OUTAGE_SWEEP = SWEEP.replace("spec: base.yaml", "spec: outage-base.yaml\nstudy: outage").replace(
    "pruner: {type: none}", "pruner: {type: median, n_startup_trials: 0}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sweep_worker_outlives_its_database_server(workspace, pg_server):
    """The PostgreSQL server holding both the study and the runs goes away while a trial trains (held
    after iteration 4, stopped there, released) and comes back only after training ended. The trial
    trains to its end meanwhile (its pruner reports are skipped, never waited for), the worker waits
    for the storage and tells the trial's value when it is back, the run's journal is delivered, and
    the sweep exits 0: the trial COMPLETE with its run's value, the run FINISHED, each step once. The
    console says each outage once when it begins and once when it ends, with no traceback."""
    import time

    from cac_probes import HELD_RUN_SPEC, assert_steps_logged_once, probe_env, probe_overrides
    from cli_process import CacExp

    probe = workspace / "probe"
    (workspace / "outage-base.yaml").write_text(HELD_RUN_SPEC.format(title="outage base", extra=probe_overrides(probe, hold_at=4)))
    (workspace / "sw.yaml").write_text(OUTAGE_SWEEP)
    storage, uri = f"{pg_server.url}/optuna", f"{pg_server.url}/mlflow"
    env = probe_env({**os.environ, "CAC_TRACKING_DRAIN": "120", "CAC_SWEEP_HEARTBEAT": "2", "OMP_NUM_THREADS": "2"})
    proc = CacExp(["sweep", str(workspace / "sw.yaml"), "--trials", "1", "--storage", storage, "--tracking-uri", uri,
                   "--out", str(workspace / "reports")], workspace, env)
    proc.wait_for(probe / "held")
    pg_server.stop()
    try:
        (probe / "release").touch()
        proc.wait_for(probe / "rank0.json")  # the trial trained to its end with the server away
        time.sleep(3)
    finally:
        pg_server.restart()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out + err)[-3000:]
    shown = f"postgresql://127.0.0.1:{pg_server.port}/optuna"
    assert out.count(f"optuna: the storage {shown} is unreachable (OperationalError: ") == 1, out[-3000:]  # the cause
    assert out.count(f"optuna: the storage {shown} answers again") == 1, out[-3000:]
    assert PASSWORD not in out + err
    tracked = f"postgresql://127.0.0.1:{pg_server.port}/mlflow"
    assert err.count(f"tracking: the store {tracked} is unreachable") == 1, err[-3000:]
    # said once each way, not a traceback per delivery attempt (MLflow's database store logs them)
    assert "Traceback" not in err and len(err) < 20000, err[-3000:]

    (trial,) = optuna.load_study(study_name="outage", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("outage-base").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["val/mIoU_pp"] == pytest.approx(trial.value)
    assert_steps_logged_once(client, run.info.run_id)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/mIoU_pp")) == [4, 8, 12]
    # the pruner heard the val pass before the outage; the ones during it were skipped, not waited for
    assert 4 in trial.intermediate_values


def test_a_pruner_report_never_waits_for_a_silent_server(pg_server):
    """The server's host drops off the network (tests/tcp_proxy.py: connections stay open, nothing is
    refused, nothing answers) while a trial trains. A pruner report then costs the trial at most the
    report wait, once: the report is dropped (the trial is not pruned), the console says the storage is
    away, and the next reports are dropped at once while the first one still waits. Once the network
    heals, the late report lands and reports are heard again."""
    import threading
    import time

    from optuna.pruners import MedianPruner
    from optuna.storages import RDBStorage

    from cac.exp.patience import PatientStorage
    from tcp_proxy import TcpProxy

    said: list[str] = []
    with TcpProxy(pg_server.port) as proxy:
        url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{proxy.port}/optuna"
        storage = PatientStorage(RDBStorage(url), url, echo=said.append, report_wait=2.0)
        study = optuna.create_study(study_name="silent", storage=storage, direction="maximize",
                                    pruner=MedianPruner(n_startup_trials=0))
        trial = study.ask()
        assert storage.should_prune(trial, 0.5, 4) is False and not said  # heard

        proxy.partition()
        t0 = time.monotonic()
        assert storage.should_prune(trial, 0.6, 8) is False
        assert time.monotonic() - t0 < 5  # the report wait (2 s), not the connection's minutes
        t0 = time.monotonic()
        assert storage.should_prune(trial, 0.7, 12) is False
        assert time.monotonic() - t0 < 0.5  # the report at 8 still waits: this one is dropped at once
        assert len(said) == 1 and "is unreachable (TimeoutError: no answer within 2 s" in said[0], said
        assert PASSWORD not in said[0]

        proxy.heal()
        late = [t for t in threading.enumerate() if t.name == "cac-pruner-report"]
        for thread in late:
            thread.join(60)
        assert not any(t.is_alive() for t in late)
        assert storage.should_prune(trial, 0.8, 16) is False
        values = optuna.load_study(study_name="silent", storage=url).trials[0].intermediate_values
        assert values == {4: 0.5, 8: 0.6, 16: 0.8}  # the late report landed; 12 was dropped
